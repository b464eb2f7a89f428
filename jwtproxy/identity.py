"""Identity headers for the upstream, rendered from verified claims (contract §4 "Identity headers").

Theory of operation
-------------------
For each ``(header, claim)`` of ``[claims_to_headers]`` whose claim is present (and not JSON
``null``) one header is produced:

* string -> as is;
* number / boolean -> its JSON form (``42``, ``1.5``, ``true``);
* array of strings -> the strings joined with a single space (``"a b c"``, like OAuth ``scope``);
* any other array, or an object -> compact JSON (``{"k":"v"}``, no spaces).

Header values are **UTF-8 bytes** (RFC 9110 §5.5 allows obs-text; upstreams in this stack are
our own services, and re-encoding as latin-1 would silently mangle non-Latin names).

A value that would carry a control character (C0 ``U+0000..U+001F``, ``DEL``, or C1
``U+0080..U+009F``) -- raw, or inside a string of a JSON-rendered array/object -- fails the
whole request with ``TokenRejected("bad_claim_value")``: a CR/LF must never be able to split a
header, and a value silently cleaned up would no longer be what the IdP signed. A string that
cannot be UTF-8 encoded (a lone surrogate from a ``\\ud800`` JSON escape) fails the same way.
The header names come from the configuration (already lower-case) and are encoded as ASCII.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from jwtproxy.jose import TokenRejected
from jwtproxy.tokencache import Repeats

__all__ = ["render_claim", "render_identity_headers"]

_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
# Header names (from the configuration, so a bounded set) as bytes, and rendered (name, value)
# pairs of string claims whose values repeat (a role, a scope string): one object shared by every
# cached verdict instead of a copy in each. A pair is a function of its header and claim value
# alone, and only values that rendered without error are remembered.
_NAMES: dict[str, bytes] = {}
_PAIRS = Repeats()


def _bad() -> TokenRejected:
    return TokenRejected("bad_claim_value", "claim value not allowed in a header")


def _strings_ok(value: Any) -> bool:
    """True if no string anywhere inside ``value`` holds a control character (iterative)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _CONTROL.search(item):
                return False
        elif isinstance(item, dict):
            for key, child in item.items():
                if _CONTROL.search(key):
                    return False
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
    return True


def render_claim(value: Any) -> str:
    """The header text for one claim value; raises ``TokenRejected("bad_claim_value")``."""
    if isinstance(value, str):
        if value.isascii() and value.isprintable():  # U+0020..U+007E only: nothing to refuse
            return value
        text = value
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        text = " ".join(value)
    elif isinstance(value, (bool, int, float, list, dict)):
        if not _strings_ok(value):
            raise _bad()
        try:
            text = _JSON.encode(value)
        except (ValueError, RecursionError):  # NaN cannot come from jose; depth is bounded there
            raise _bad() from None
    else:
        raise _bad()
    if _CONTROL.search(text):
        raise _bad()
    return text


def render_identity_headers(claims: dict[str, Any], mapping: tuple[tuple[str, str], ...]) -> list[tuple[bytes, bytes]]:
    """``[(header, value), ...]`` for every mapped claim present in ``claims`` (see module doc).

    Raises ``TokenRejected(reason="bad_claim_value")`` when a value holds a control character.
    """
    out: list[tuple[bytes, bytes]] = []
    for header, claim in mapping:
        value = claims.get(claim)
        if value is None:
            continue
        pair = _PAIRS.lookup(header, value) if type(value) is str else None
        if pair is None:
            try:
                encoded = render_claim(value).encode("utf-8")
            except UnicodeEncodeError:
                raise _bad() from None
            name = _NAMES.get(header)
            if name is None:
                name = _NAMES[header] = header.encode("ascii")
            pair = (name, encoded)
            if type(value) is str:
                _PAIRS.remember(header, value, pair)
        out.append(pair)
    return out
