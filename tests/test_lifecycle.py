"""The exchange state machine on its own: the table, the keep-alive rule, the retry rule."""

from __future__ import annotations

import itertools

import pytest

from jwtproxy import lifecycle as lc

ALLOWED = {
    (lc.WAITING, lc.DEFER): lc.DECIDING,
    (lc.WAITING, lc.CONNECT): lc.CONNECTING,
    (lc.WAITING, lc.ATTACH): lc.FORWARDED,
    (lc.WAITING, lc.ANSWER): lc.DONE,
    (lc.DECIDING, lc.DEFER): lc.DECIDING,
    (lc.DECIDING, lc.CONNECT): lc.CONNECTING,
    (lc.DECIDING, lc.ATTACH): lc.FORWARDED,
    (lc.DECIDING, lc.ANSWER): lc.DONE,
    (lc.CONNECTING, lc.ATTACH): lc.FORWARDED,
    (lc.CONNECTING, lc.ANSWER): lc.DONE,
    (lc.FORWARDED, lc.CONNECT): lc.CONNECTING,
    (lc.FORWARDED, lc.RESPONSE_HEAD): lc.RESPONDING,
    (lc.FORWARDED, lc.SWITCH): lc.TUNNEL,
    (lc.FORWARDED, lc.ANSWER): lc.DONE,
    (lc.RESPONDING, lc.FINISH): lc.DONE,
}
STATES = range(len(lc.STATE_NAMES))
EVENTS = [lc.DEFER, lc.CONNECT, lc.ATTACH, lc.RESPONSE_HEAD, lc.SWITCH, lc.FINISH, lc.ANSWER, lc.DROP]


@pytest.mark.parametrize(("state", "event"), list(itertools.product(STATES, EVENTS)))
def test_table_allows_exactly_the_listed_transitions(state, event):
    if event == lc.DROP:
        assert lc.advance(state, event) == lc.DONE  # the connection can go away in any state
    elif (state, event) in ALLOWED:
        assert lc.advance(state, event) == ALLOWED[(state, event)]
    else:
        with pytest.raises(lc.InvalidTransition):
            lc.advance(state, event)


def test_response_started_is_an_ordering_of_states():
    # The connection asks "is any of the response out" as state >= RESPONDING.
    assert [s >= lc.RESPONDING for s in STATES] == [False, False, False, False, True, True, True]


def test_done_is_terminal_and_answering_twice_is_refused():
    with pytest.raises(lc.InvalidTransition, match="ANSWER in state DONE"):
        lc.advance(lc.DONE, lc.ANSWER)
    with pytest.raises(lc.InvalidTransition):
        lc.advance(lc.RESPONDING, lc.ANSWER)  # after the head is out only a cut is honest


def test_keep_alive_needs_every_condition():
    assert lc.keeps_alive(True, True, False, False, False)
    for flip in range(5):
        args = [True, True, False, False, False]
        args[flip] = not args[flip]
        assert not lc.keeps_alive(*args), args


def test_retry_only_once_only_idempotent_only_without_body():
    assert lc.may_retry(True, False, False, b"GET")
    assert not lc.may_retry(False, False, False, b"GET")
    assert not lc.may_retry(True, True, False, b"GET")
    assert not lc.may_retry(True, False, True, b"PUT")
    assert not lc.may_retry(True, False, False, b"POST")
