"""Cached tokens first: a bounded number of signature verifications per event-loop turn.

Theory of operation
-------------------
A request whose token is in the token cache costs a dictionary lookup; one whose token must be
verified costs a signature check, tens of microseconds for RS256 and more for ES256. A worker
serves every request that is ready in one turn of its event loop before it polls again, so
without a bound a burst of unknown tokens (a forged-token flood, or many sessions starting at
once) delays every cached-token request of that turn by all of their verifications, and under
a sustained flood valid clients wait for the whole flood on every request.

:class:`VerificationTurns` hands out ``per_turn`` verifications per turn. The auth stage calls
:meth:`VerificationTurns.take` before it verifies a signature; when it is refused, the
connection parks the exchange in ``DECIDING`` with :meth:`VerificationTurns.wait` (reading
stays on, unlike the other waits: the wait is a few loop turns, and a client that resets
meanwhile is noticed), and the exchange is resumed at the start of a later turn, after the loop
has polled again and answered what was cheap. Three rules:

- **Nothing is starved.** Every turn resumes up to ``per_turn`` waiting exchanges, oldest first,
  and a newly arrived unknown token never overtakes a waiting one (FIFO).
- **Nothing changes short of saturation.** A turn that needs no more than ``per_turn``
  verifications verifies them all at once, as before; waiting begins only when the worker has
  more verification work than one turn's share.
- **Nothing is left unanswered.** A resumed exchange goes on from where it stopped; one whose
  connection closed, or that was answered meanwhile (a protocol error), is skipped by its
  connection.

A turn starts with a callback scheduled on the loop (``call_soon``) the first time a slot is
taken or an exchange waits: it runs after the I/O callbacks of the current turn, resets the
budget and resumes the waiting. The module does no I/O itself; the loop's ``call_soon`` is
given (or found at first use).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["VERIFICATIONS_PER_TURN", "VerificationTurns"]

log = logging.getLogger("jwtproxy")

#: Signature verifications per event-loop turn: ~0.1-0.4 ms of signature work (RS256/ES256 on the
#: bench machine) between two polls, so a cached-token request waits at most that long behind
#: unknown tokens, and a turn of unknown tokens alone still amortises its poll over several.
VERIFICATIONS_PER_TURN = 4


class VerificationTurns:
    """Per-worker budget of signature verifications per event-loop turn (module docstring)."""

    __slots__ = ("per_turn", "left", "waiting", "_call_soon", "_scheduled_on", "_resuming")

    def __init__(self, per_turn: int = VERIFICATIONS_PER_TURN,
                 call_soon: Callable[[Callable[[], None]], Any] | None = None) -> None:
        """``call_soon``: how to run a callback after the current turn's I/O callbacks (default: the
        running event loop's ``call_soon``, looked up each time)."""
        if per_turn < 1:
            raise ValueError("per_turn must be at least 1")
        self.per_turn = per_turn
        self.left = per_turn
        self.waiting: deque[Callable[[], None]] = deque()
        self._call_soon = call_soon
        # What the pending turn callback was scheduled on (the loop, or the given call_soon); None
        # when none is pending. A loop, not a flag: a gateway that outlives its loop (tests) must
        # not wait forever for a turn that a closed loop will never run.
        self._scheduled_on: object | None = None
        self._resuming = False

    def take(self) -> bool:
        """Whether the caller may verify a signature now; True spends one of this turn's slots.

        Outside a running event loop there are no turns: always True (a direct caller, a tool)."""
        if self.waiting and not self._resuming:
            return False  # first come, first verified: no overtaking the waiting
        if self.left <= 0:
            return False
        if self._schedule():
            self.left -= 1
        return True

    def wait(self, resume: Callable[[], None]) -> None:
        """Call ``resume`` in a later turn, when a slot is free (it then calls :meth:`take` again)."""
        self.waiting.append(resume)
        if not self._schedule():
            raise RuntimeError("VerificationTurns.wait needs a running event loop")

    def _schedule(self) -> bool:
        """Make sure a turn callback is pending; False when there is no loop to run one."""
        call_soon = self._call_soon
        on: object
        if call_soon is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return False
            call_soon = loop.call_soon
            on = loop
        else:
            on = call_soon
        if self._scheduled_on is not on:
            self._scheduled_on = on
            call_soon(self._turn)
        return True

    def _turn(self) -> None:
        """A new turn: a fresh budget, spent first on the exchanges that waited."""
        self._scheduled_on = None
        self.left = self.per_turn
        waiting = self.waiting
        self._resuming = True
        try:
            while waiting and self.left > 0:
                # One that needs no slot (its token was cached meanwhile, or its connection
                # closed) leaves the budget as it was for the next.
                resume = waiting.popleft()
                try:
                    resume()  # the connection answers its own errors; this is the last resort
                except Exception:
                    log.exception("a request resumed for its verification raised")
        finally:
            self._resuming = False
        if waiting or self.left < self.per_turn:
            # Waiting exchanges, or slots spent: the next turn starts with a fresh budget.
            self._schedule()
