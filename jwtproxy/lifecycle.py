"""The life of one exchange (a request and its response): states, events, one transition table.

Theory of operation
-------------------
As in h11's ``_state.py``, an exchange is two machines side by side. The request side is what the
client has sent: *receiving*, then *received* once the request's end arrives (a boolean on the
exchange, :attr:`jwtproxy.connection.Exchange.received`). The response side is what the gateway
has done about it, and is the table below. :mod:`jwtproxy.connection` drives it; every change of
state goes through :func:`advance`, which refuses a transition the table does not list (that is a
bug, contained like any other: the exchange is answered 500 or its connection cut). Nothing here
does I/O, reads a clock or logs.

Response-side states, in the order an exchange can move through them:

``WAITING``
    The head has arrived; nothing is decided. The exchange is queued behind an earlier one, or is
    a request without a body whose end has not arrived (it is decided when it has: a request with
    a body is decided at its head, so the body can stream).
``DECIDING``
    Routed; the decision waits (a task): for a refetch of the issuer's keys, or for a rate-limit
    answer from Redis. It may wait more than once (a rate limit, then keys), each a ``DEFER``.
``CONNECTING``
    Authorised; waits for a new upstream connection (a task), first or after a stale pooled one.
``FORWARDED``
    An upstream connection carries the request; no response byte has come back.
``RESPONDING``
    The upstream's response head is out to the client; its body streams.
``TUNNEL``
    The upstream switched protocols (``101``); bytes flow both ways until a side closes.
``DONE``
    The response is complete, or the exchange was dropped with its connection. Terminal.

Events: ``DEFER`` (wait for keys or a shared rate-limit answer), ``CONNECT`` (wait for a connection), ``ATTACH`` (an upstream
connection takes the request), ``RESPONSE_HEAD``, ``SWITCH`` (a ``101`` to an upgrade request),
``FINISH`` (the upstream's response is complete), ``ANSWER`` (the gateway answers itself: a
rejection, or an upstream failure before any response byte) and ``DROP`` (the connection is gone).

Invariants, each kept in one place:

1. Responses leave in arrival order: only the connection's current exchange leaves ``WAITING``;
   the others wait in its queue, and client reading pauses while one does
   (``ClientConnection.on_request_head`` / ``_complete``).
2. Keep-alive is decided once per exchange, as its response head is written, by
   :func:`keeps_alive`; ``ClientConnection._complete`` closes the connection after a response
   that was not kept alive, and only there.
3. A stale pooled connection is retried at most once, and only when nothing of the request can
   have been consumed upstream (:func:`may_retry`, RFC 9110 §9.2.2).
4. A protocol error with earlier requests still unanswered is deferred: they are answered in
   order and the error is the last response before the close
   (``ClientConnection._protocol_error`` / ``_drained``).
"""

from __future__ import annotations

__all__ = [
    "ANSWER",
    "ATTACH",
    "CLOSE_AFTER",
    "CONNECT",
    "CONNECTING",
    "DECIDING",
    "DEFER",
    "DONE",
    "DROP",
    "FINISH",
    "FORWARDED",
    "IDEMPOTENT",
    "InvalidTransition",
    "RESPONDING",
    "RESPONSE_HEAD",
    "STATE_NAMES",
    "SWITCH",
    "TUNNEL",
    "WAITING",
    "advance",
    "keeps_alive",
    "may_retry",
]

# Response-side states. Small ints: the table is indexed by them, and "has the response started"
# is ``state >= RESPONDING``.
WAITING = 0
DECIDING = 1
CONNECTING = 2
FORWARDED = 3
RESPONDING = 4
TUNNEL = 5
DONE = 6
STATE_NAMES = ("WAITING", "DECIDING", "CONNECTING", "FORWARDED", "RESPONDING", "TUNNEL", "DONE")

# Events.
DEFER = 0
CONNECT = 1
ATTACH = 2
RESPONSE_HEAD = 3
SWITCH = 4
FINISH = 5
ANSWER = 6
DROP = 7
_EVENT_NAMES = ("DEFER", "CONNECT", "ATTACH", "RESPONSE_HEAD", "SWITCH", "FINISH", "ANSWER", "DROP")

_TRANSITIONS: dict[int, dict[int, int]] = {
    WAITING: {DEFER: DECIDING, CONNECT: CONNECTING, ATTACH: FORWARDED, ANSWER: DONE, DROP: DONE},
    DECIDING: {DEFER: DECIDING, CONNECT: CONNECTING, ATTACH: FORWARDED, ANSWER: DONE, DROP: DONE},
    CONNECTING: {ATTACH: FORWARDED, ANSWER: DONE, DROP: DONE},
    # CONNECT from FORWARDED: the pooled connection turned out stale; retry on a new one.
    FORWARDED: {CONNECT: CONNECTING, RESPONSE_HEAD: RESPONDING, SWITCH: TUNNEL, ANSWER: DONE, DROP: DONE},
    RESPONDING: {FINISH: DONE, DROP: DONE},
    TUNNEL: {DROP: DONE},
    DONE: {DROP: DONE},
}

# The same table as a tuple of tuples (-1: not allowed), so a transition on the hot path is two
# index operations rather than two dict lookups.
_NEXT: tuple[tuple[int, ...], ...] = tuple(
    tuple(_TRANSITIONS[state].get(event, -1) for event in range(len(_EVENT_NAMES)))
    for state in range(len(STATE_NAMES))
)


class InvalidTransition(Exception):
    """The connection asked for a transition the table does not have: a bug in the driver."""


def advance(state: int, event: int) -> int:
    """The state after ``event`` in ``state``; raises :class:`InvalidTransition` if not allowed."""
    new = _NEXT[state][event]
    if new < 0:
        raise InvalidTransition(f"{_EVENT_NAMES[event]} in state {STATE_NAMES[state]}")
    return new


# The gateway's own answers after which the request's framing is in doubt, so the bytes that follow
# cannot be trusted to start a new request.
CLOSE_AFTER = frozenset({400, 413, 431})


def keeps_alive(requested: bool, received: bool, upgrade: bool, close_delimited: bool, last: bool) -> bool:
    """Whether the connection stays open after a response; decided once, as its head is written.

    ``requested``: the client asked for it (HTTP/1.1 without ``Connection: close``, or HTTP/1.0
    with ``keep-alive``) and the response does not forbid it. ``received``: the whole request is in
    (otherwise its unread rest would be parsed as the next request). ``upgrade``: the request asked
    to switch protocols, so what follows it is not HTTP whether or not the switch happens.
    ``close_delimited``: the body ends when the connection does (HTTP/1.0 client, no length).
    ``last``: the connection is draining and nothing else is left to answer on it.
    """
    return requested and received and not upgrade and not close_delimited and not last


IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


def may_retry(retryable: bool, retried: bool, expects_body: bool, method: bytes) -> bool:
    """Whether a failed upstream exchange is tried once more on a new connection.

    ``retryable`` is the upstream's word that the connection was a pooled one closed before any
    response byte (the upstream closed an idle connection just as we sent on it). A request with a
    body is not retried: its bytes may have been consumed. Nor is a non-idempotent method.
    """
    return retryable and not retried and not expects_body and method in IDEMPOTENT
