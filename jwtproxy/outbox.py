"""Writes held to the end of the event-loop turn, then sent together.

Theory of operation
-------------------
A write to a socket whose reader is asleep wakes the reader. Where the peer runs on the same host
(an upstream beside the gateway, a load balancer or sidecar on the next core) that wake-up costs
more than the write itself, and in a virtual machine most of all: waking another virtual CPU is an
inter-processor interrupt through the hypervisor. A worker decides many requests in one turn of its
event loop. Written as each is decided, the answers wake their peer one by one, and the peer, done
with one answer before the next arrives, goes back to sleep in between. Held to the end of the turn
and written then, a turn's answers reach their peers in a burst: a peer wakes once and finds all of
them. Several writes to one connection in a turn also become one system call.

:class:`Outbox` keeps the connections that hold bytes this turn, in the order of their first
write, and writes them from a callback scheduled (``call_soon``) when the first is held; the loop
runs it after the I/O callbacks of the turn. The rules:

- **Order.** A connection's bytes go out in the order they were written (joined into one write).
- **Nothing outlives its connection.** Closing a connection first writes what it holds (as a
  transport's own buffer is written before it closes); aborting it drops what it holds, and so
  does losing it.
- **No loop, no holding.** Outside a running event loop (a direct caller, a tool) :meth:`hold`
  refuses and the caller writes at once.
- **One failure is one connection's.** A connection whose write fails is logged and closed (its
  client is not left waiting for an answer that will never be written); the others of the turn
  are written all the same.

A turn is bounded (``jwtproxy.turns`` bounds its signature work), so holding delays an answer by
at most the rest of the turn it was decided in.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

__all__ = ["HoldsWrites", "Outbox"]

log = logging.getLogger("jwtproxy")


class HoldsWrites(Protocol):
    """A connection that holds its writes in an :class:`Outbox` until :meth:`flush_out`."""

    def flush_out(self) -> None:
        """Write what this connection holds (nothing if it holds nothing or has closed)."""

    def close(self) -> None:
        """Close the connection (after a failed :meth:`flush_out`)."""


class Outbox:
    """The connections of one worker that hold writes this turn (module docstring)."""

    __slots__ = ("held", "_scheduled_on")

    def __init__(self) -> None:
        self.held: list[HoldsWrites] = []
        # The loop the pending flush was scheduled on; None when none is pending. A loop, not a
        # flag: a gateway that outlives its loop (tests) must not wait for a flush that a closed
        # loop will never run.
        self._scheduled_on: asyncio.AbstractEventLoop | None = None

    def hold(self, writer: HoldsWrites) -> bool:
        """Flush ``writer`` at the end of this turn: True, and the caller keeps its bytes until
        then; False outside a running event loop (the caller writes now). Called once per turn
        per connection, with its first write."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if self._scheduled_on is not loop:
            self._scheduled_on = loop
            loop.call_soon(self.flush)
        self.held.append(writer)
        return True

    def flush(self) -> None:
        """Write everything held (the end-of-turn callback; also safe to call at any time)."""
        self._scheduled_on = None
        held = self.held
        if not held:
            return
        self.held = []
        for writer in held:
            try:
                writer.flush_out()
            except Exception:  # the connection's own problem; the others still go out
                log.exception("writing a connection's held bytes failed; closing it")
                try:
                    writer.close()
                except Exception:
                    log.exception("closing a connection whose held bytes failed raised")
