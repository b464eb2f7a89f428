"""The admin API's ``POST /revocations`` body, validated (sans-I/O).

Strict JSON (:mod:`jwtproxy.strictjson`: no duplicate members, no ``NaN``), then the shape rules
of :func:`parse_revocation_request`; every failure is a ``ValueError`` whose message the admin
API returns as the 400 ``error_description``.
"""

from __future__ import annotations

import json
from typing import Literal

from jwtproxy.strictjson import reject_constant, strict_object

from .core import DEFAULT_JTI_TTL, MAX_TIME, check_id, check_time

__all__ = ["parse_revocation_request"]


def parse_revocation_request(
    body: bytes, now: float
) -> tuple[Literal["jti", "sub"], str, float]:
    """Validate a ``POST /revocations`` body.

    Returns ``("jti", jti, exp)`` or ``("sub", sub, before)``; raises ValueError whose message
    says precisely what is wrong (the admin API returns it as a 400 ``error_description``).

    Rules: a UTF-8 JSON object without duplicate members holding exactly one of ``jti`` / ``sub``
    and nothing but its time member (``exp`` / ``before``); ids are non-empty strings of at most
    512 characters; times are finite numbers in [0, 253402300799]. A missing ``exp`` defaults to
    ``now + 7 days`` (``DEFAULT_JTI_TTL``); a missing ``before`` defaults to ``now`` (every
    token issued so far). An ``exp`` in the past is accepted: the verifier still admits a token
    until ``exp + leeway``, and refusing would make scripted revocation racy.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("body is not UTF-8") from None
    try:
        data = json.loads(text, object_pairs_hook=strict_object, parse_constant=reject_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise ValueError("body is not JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    has_jti = "jti" in data
    has_sub = "sub" in data
    if has_jti and has_sub:
        raise ValueError("give either jti or sub, not both")
    if not has_jti and not has_sub:
        raise ValueError("missing jti or sub")
    kind: Literal["jti", "sub"] = "jti" if has_jti else "sub"
    time_key = "exp" if has_jti else "before"
    unknown = sorted(k for k in data if k not in (kind, time_key))
    if unknown:
        raise ValueError(f"unknown member(s) for a {kind} revocation: {', '.join(map(repr, unknown))}")
    ident = check_id(kind, data[kind])
    if time_key in data:
        when = check_time(time_key, data[time_key])
    else:
        when = min(now + DEFAULT_JTI_TTL, MAX_TIME) if has_jti else now
    return kind, ident, when
