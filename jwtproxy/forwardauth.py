"""Forward-auth: which request an ``[authz]`` listener is asked about (sans-I/O).

Theory of operation
-------------------
A front proxy (nginx ``auth_request``, Traefik ``forwardAuth``, Envoy ``ext_authz`` with an HTTP
service) asks the authz listener "may this request pass?" with a request of its own. That request
carries the client's headers (the token among them) and describes the *original* request in
headers, each proxy in its own way:

==========  ===========================  ==========================  =========================
            nginx ``auth_request``       Traefik ``forwardAuth``     Envoy ``ext_authz`` (HTTP)
==========  ===========================  ==========================  =========================
method      ``X-Original-Method`` [1]_   ``X-Forwarded-Method``      its own method
path+query  ``X-Original-URI`` [1]_      ``X-Forwarded-Uri``         its own path after
                                                                     ``path_prefix``
host        ``Host`` (the client's)      ``X-Forwarded-Host``        its own ``Host``
==========  ===========================  ==========================  =========================

.. [1] Set by the recipe's ``proxy_set_header``; nginx asks on its own internal location, so the
   request's own path says nothing about the original one.

:func:`original_request` turns one request head into ``(method, target, forwarded host)`` with
these rules, each header read independently:

* method: ``X-Original-Method``, else ``X-Forwarded-Method``, else the request's own method. It
  must be an RFC 9110 token; ``CONNECT`` is refused as it is on a traffic listener.
* target: ``X-Original-URI``, else ``X-Forwarded-Uri`` (the request's own path is then ignored),
  else the request's own target with ``path_prefix`` removed. The prefix is removed from the
  target as sent, before normalisation, because Envoy prepends it literally: the rest must be
  empty or start with ``/`` or ``?`` (``/authz`` + ``/api?x``), else the request is outside the
  prefix (404, :func:`outside_prefix`).
* host: the authority of an absolute-form target (as on a traffic listener, RFC 9112 §3.2.2), else
  ``X-Forwarded-Host``, else ``Host``.

The result is normalised, routed and authorised by the connection exactly as a traffic request's
own method, target and ``Host`` are; nothing here decides anything about access.

The listener believes these headers from whoever reaches it, as the front proxy must be able to
set them: so it is only reachable by that proxy (loopback by default, and never on a traffic
listener, which the config refuses). A header that is present twice is ambiguous and refused (400),
as is an empty one: a front proxy that sends nothing for a value omits the header, so an empty one
is a broken recipe, and falling back to the request's own path would authorise the wrong request.

The scan is one pass over the head with no allocation unless a header is found (the cached-token
path of an authz request allocates only its response head).
"""

from __future__ import annotations

import re
from typing import Final

from jwtproxy.codec import RequestHead
from jwtproxy.routing import BadRequest

__all__ = ["OUTSIDE_PREFIX", "original_request", "outside_prefix", "prefix_key"]

_ORIGINAL_URI: Final = b"x-original-uri"
_FORWARDED_URI: Final = b"x-forwarded-uri"
_ORIGINAL_METHOD: Final = b"x-original-method"
_FORWARDED_METHOD: Final = b"x-forwarded-method"
_FORWARDED_HOST: Final = b"x-forwarded-host"
_DESCRIBING: Final = frozenset({_ORIGINAL_URI, _FORWARDED_URI, _ORIGINAL_METHOD, _FORWARDED_METHOD, _FORWARDED_HOST})
# RFC 9110 §5.6.2 token: what a method may be.
_METHOD: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}")


OUTSIDE_PREFIX = "path outside the authz path_prefix"


def outside_prefix() -> BadRequest:
    """The request's own path is not under ``[authz] path_prefix``: it describes no request (404).

    A BadRequest with its own status rather than a subclass: BadRequest is compiled
    (jwtproxy.compiled), and a compiled class does not take subclasses from plain Python."""
    return BadRequest(OUTSIDE_PREFIX, 404)


def prefix_key(path_prefix: str) -> bytes:
    """``[authz] path_prefix`` as :func:`original_request` strips it: without a trailing ``/``
    (``"/"`` strips nothing, ``"/authz/"`` strips ``/authz``)."""
    return path_prefix.rstrip("/").encode("ascii")


def original_request(head: RequestHead, key: bytes) -> tuple[bytes, bytes, bytes | None]:
    """``(method, target, forwarded_host)`` of the request ``head`` describes (module docstring).

    ``forwarded_host`` is the ``X-Forwarded-Host`` value, None when absent (the request's own
    ``Host`` then stands, as it does for the absolute-form authority of a target, which comes
    first). ``key`` comes from :func:`prefix_key`. Raises :class:`BadRequest` for a header present twice or empty, or a
    method that is not a token or is ``CONNECT``; :func:`outside_prefix` (404) for an own path outside
    the prefix.
    """
    original_uri = forwarded_uri = original_method = forwarded_method = forwarded_host = None
    for name, value in head.headers:
        if name not in _DESCRIBING:
            continue
        value = value.strip(b" \t")
        if not value:
            raise BadRequest(f"empty {_shown(name)} header")
        if name == _ORIGINAL_URI:
            if original_uri is not None:
                raise _twice(name)
            original_uri = value
        elif name == _FORWARDED_URI:
            if forwarded_uri is not None:
                raise _twice(name)
            forwarded_uri = value
        elif name == _ORIGINAL_METHOD:
            if original_method is not None:
                raise _twice(name)
            original_method = value
        elif name == _FORWARDED_METHOD:
            if forwarded_method is not None:
                raise _twice(name)
            forwarded_method = value
        else:
            if forwarded_host is not None:
                raise _twice(name)
            forwarded_host = value

    method = original_method if original_method is not None else forwarded_method
    if method is None:
        method = head.method
    elif not _METHOD.fullmatch(method):
        raise BadRequest("invalid method in X-Original-Method / X-Forwarded-Method")
    if method == b"CONNECT":
        raise BadRequest("CONNECT is not supported")

    target = original_uri if original_uri is not None else forwarded_uri
    if target is None:
        target = head.target
        if key:
            if not target.startswith(key):
                raise outside_prefix()
            target = target[len(key) :]
            if not target:
                target = b"/"
            elif target[0] == 0x3F:  # "?": the prefix itself, with a query
                target = b"/" + target
            elif target[0] != 0x2F:  # "/authzX" is not under "/authz"
                raise outside_prefix()
    return method, target, forwarded_host


_SHOWN: Final = {
    _ORIGINAL_URI: "X-Original-URI",
    _FORWARDED_URI: "X-Forwarded-Uri",
    _ORIGINAL_METHOD: "X-Original-Method",
    _FORWARDED_METHOD: "X-Forwarded-Method",
    _FORWARDED_HOST: "X-Forwarded-Host",
}


def _shown(name: bytes) -> str:
    return _SHOWN[name]


def _twice(name: bytes) -> BadRequest:
    return BadRequest(f"more than one {_shown(name)} header")
