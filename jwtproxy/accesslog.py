"""Structured logging: one compact JSON line per request (access log) or per event.

Theory of operation
-------------------
* Every line is a single ``write()`` of one JSON object followed by ``\\n``. Workers share
  stderr (the journal under systemd); a line shorter than PIPE_BUF (4096 bytes) is written
  atomically, so lines from different workers never interleave.
* Tokens and secrets never reach a log line. Two guards enforce it:
  - a field whose *name* is ``token``, ``authorization``, ``secret``, ``password`` (or ends
    in ``_token``/``_secret``/``_password``, e.g. ``hs_secret``) is refused with
    ``ValueError`` -- a programming error that the tests catch, never a silent leak;
  - the access log drops the query string of ``path``, because the ``query:NAME`` token
    source carries the token there.
* A disabled ``AccessLog`` costs one attribute check: callers test ``log.enabled`` before
  building the record at all.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Mapping, TextIO

__all__ = ["AccessLog", "log_event", "check_field_names", "echo", "FORBIDDEN_FIELDS", "iso_utc"]

#: Field names that may carry credentials. Matched case-insensitively, also as a suffix
#: after ``_`` (``access_token``, ``hs_secret``), with ``-`` treated as ``_``.
FORBIDDEN_FIELDS: frozenset[str] = frozenset({"token", "authorization", "secret", "password"})

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, default=str)

# ISO8601 rendering is the costly part of a log line; the whole-second prefix changes once a
# second, so it is cached and only the milliseconds are formatted per line.
_iso_cache: list[Any] = [-1, ""]


def echo(value: object, limit: int) -> str:
    """A remote value quoted for a log line or an error message: ``repr()`` (quotes, control
    characters escaped), cut after ``limit`` characters. Never pass a token or a secret."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def iso_utc(t: float) -> str:
    """``t`` (Unix time) as ``YYYY-MM-DDTHH:MM:SS.mmmZ``."""
    sec = int(t)
    if _iso_cache[0] != sec:
        _iso_cache[0] = sec
        _iso_cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return "%s.%03dZ" % (_iso_cache[1], int((t - sec) * 1000))


# Verdicts per field name: records reuse the same dozen names, so after the first line the
# guard is one dict lookup per field (bounded in case a caller invents names dynamically).
_verdicts: dict[str, bool] = {}


def _forbidden(name: str) -> bool:
    verdict = _verdicts.get(name)
    if verdict is None:
        key = name.lower().replace("-", "_")
        verdict = key in FORBIDDEN_FIELDS or any(key.endswith("_" + w) for w in FORBIDDEN_FIELDS)
        if len(_verdicts) < 4096:
            _verdicts[name] = verdict
    return verdict


def check_field_names(fields: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` if any (nested) field name could carry a credential."""
    for name, value in fields.items():
        if _forbidden(str(name)):
            raise ValueError(f"refusing to log field {name!r}: it may carry a credential")
        if isinstance(value, Mapping):
            check_field_names(value)


class AccessLog:
    """One JSON line per request.

    Record keys (all optional except what the caller has): ``time`` (added if absent),
    ``request_id``, ``method``, ``path``, ``status``, ``route``, ``upstream``, ``duration``,
    ``sub``, ``jti``, ``auth``, ``bytes_in``, ``bytes_out``, ``client``.
    """

    __slots__ = ("enabled", "_stream")

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self._stream = stream if stream is not None else sys.stderr

    def write(self, record: dict[str, Any]) -> None:
        """Write ``record`` as one line; a no-op when disabled.

        Raises ``ValueError`` for a credential-bearing field name (see module docstring).
        """
        if not self.enabled:
            return
        for name in record:
            if _forbidden(name):
                raise ValueError(f"refusing to log field {name!r}: it may carry a credential")
        path = record.get("path")
        if isinstance(path, str) and "?" in path:
            record = dict(record, path=path.split("?", 1)[0])
        if "time" not in record:
            record = {"time": iso_utc(time.time()), **record}
        try:
            self._stream.write(_encoder.encode(record) + "\n")
        except (OSError, ValueError):
            # stderr gone (closed pipe, journal restart): losing a log line must not fail
            # the request that produced it.
            pass


def log_event(event: str, level: str = "info", **fields: Any) -> None:
    """Write an event line ``{"time", "level", "event", **fields}`` on stderr.

    For state changes an operator wants to see: reloads, worker restarts, key changes.
    Raises ``ValueError`` if a field name could carry a credential.
    """
    check_field_names(fields)
    line = {"time": iso_utc(time.time()), "level": level, "event": event}
    line.update(fields)
    try:
        sys.stderr.write(_encoder.encode(line) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
