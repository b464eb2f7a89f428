"""JSON as an attacker may send it: the two hooks that make ``json`` strict.

Theory of operation
-------------------
Python's ``json`` module accepts two things a security-relevant parser must not:

* *duplicate member names* (``{"sub": "a", "sub": "b"}``): it keeps the last one, another parser
  may keep the first, and the two then disagree on what was said (RFC 8259 §4 leaves it
  undefined; RFC 7515 §4 requires rejecting it in JOSE headers);
* the literals ``NaN``, ``Infinity`` and ``-Infinity``, which are not JSON (RFC 8259 §6).

:func:`strict_object` (an ``object_pairs_hook``) raises :class:`DuplicateMember` and
:func:`reject_constant` (a ``parse_constant``) raises :class:`NonFiniteNumber`; both are
``ValueError``, so a caller that only says "not valid JSON" catches them with the decoder's
own errors. Tokens (:mod:`jwtproxy.jose`) and admin revocation requests
(:mod:`jwtproxy.revocation.request`) use them; ``DECODER`` is a ready decoder with both.
"""

from __future__ import annotations

import json
from typing import Any, Final

__all__ = ["DECODER", "DuplicateMember", "NonFiniteNumber", "reject_constant", "strict_object"]


class DuplicateMember(ValueError):
    """An object names a member twice; ``name`` is the member (callers decide whether to echo it)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"duplicate member {name!r}")
        self.name = name


class NonFiniteNumber(ValueError):
    """``NaN``, ``Infinity`` or ``-Infinity``: Python's extensions, not JSON numbers."""

    def __init__(self, literal: str) -> None:
        super().__init__(f"{literal} is not a JSON number")
        self.literal = literal


def strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: the object, or :class:`DuplicateMember`."""
    obj = dict(pairs)
    if len(obj) != len(pairs):  # the common case costs one length comparison
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateMember(key)
            seen.add(key)
    return obj


def reject_constant(literal: str) -> Any:
    """``parse_constant``: always :class:`NonFiniteNumber`."""
    raise NonFiniteNumber(literal)


DECODER: Final = json.JSONDecoder(object_pairs_hook=strict_object, parse_constant=reject_constant)
