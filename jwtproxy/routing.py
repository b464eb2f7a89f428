"""Request-target normalisation and the route table (sans-I/O).

Theory of operation
===================

The gateway decides *who may call what* by matching the request path against route prefixes.
That decision is only sound if the gateway and the upstream agree on what the path is, so the
path is first brought into one canonical form, the route is matched on that form, and exactly
that form is what the upstream receives (contract §4 "Paths"). Anything whose meaning could differ
between us and a backend is refused with 400 rather than guessed at.

Request target (RFC 9112 §3.2)
------------------------------
* origin-form ``/a/b?x``: the usual case.
* absolute-form ``http://host:port/a?x`` (scheme ``http``/``https``, case-insensitive): the path
  is used as if origin-form and the authority is handed back so the caller uses it as ``Host``
  (RFC 9112 §3.2.2). Only routes ever pick the upstream, so this never makes us an open proxy.
  Userinfo (``user@host``) is refused (RFC 9110 §4.2.4); any other scheme is refused.
* authority-form (``CONNECT host:443``) and asterisk-form (``OPTIONS *``): refused (400).

Whole target: non-ASCII bytes, control characters (incl. NUL, DEL), spaces and ``#`` are
refused -- a request-target never carries a fragment, and such bytes on the upstream request
line would be an injection vector. The query (everything from the first ``?``, the ``?``
included) is otherwise returned byte-for-byte untouched.

Path normal form, in this order (the contract's order; it is also Envoy's):

1. Percent-decoding: escapes of unreserved characters (``ALPHA DIGIT - . _ ~``, RFC 3986 §2.3)
   are decoded (``%7e`` -> ``~``, ``%2e`` -> ``.``); every other escape is kept with upper-case
   hex (RFC 3986 §6.2.2.1, so ``%2f`` and ``%2F`` compare equal). ``%25`` stays ``%25``, so
   nothing is ever decoded twice. Refused: malformed escapes (``%zz``, truncated), ``%2F``
   (an encoded ``/`` that a backend might treat as a separator), ``%5C`` and raw ``\\`` (some
   backends treat backslash as ``/``), ``%00``.
2. Dot-segment removal per RFC 3986 §5.2.4, including dots that came from ``%2e``, except that a
   ``..`` climbing above the root is refused (400) instead of silently clamped.
3. Runs of ``/`` merged. Because this runs after step 2, ``/a//../b`` is ``/a/b`` (the ``..``
   consumes the empty segment, as §5.2.4 says), matching Envoy's normalize_path + merge_slashes.

The result always starts with ``/``; a trailing ``/`` is kept (``/a/`` and ``/a`` differ).

Other printable ASCII (sub-delims, ``: @``, and the characters RFC 3986 does not allow raw but
clients send anyway: ``" < > ^ ` { | } [ ]``) passes through unchanged: none of them changes
segment structure.

Matrix parameters: ``;`` is kept as part of its segment, so ``/payments;x`` is the segment
``payments;x`` and does NOT match the prefix ``/payments`` (segment-wise); ``/payments/x;y``
does. Caveat for operators: servlet containers (Tomcat, Jetty, Spring) strip ``;params`` from
each segment before routing, so behind such a backend ``/admin;x`` reaches ``/admin`` while
*we* route it by the segment ``admin;x`` (e.g. to a catch-all ``/`` route). Do not give one
upstream different auth rules by path prefix unless the backend ignores ``;``. We do close the
well-known variant of that confusion: a segment that is a dot-segment once its parameters are
removed (``..;x``, ``.;``, also via ``%2e``) is refused with 400, because servlet containers
treat ``/public/..;/admin`` as ``/admin``.

Fast path: a path made only of pchar-without-``%`` bytes, with no ``//`` and no ``/.`` (so no
empty segment and no segment starting with ``.``), and a query of printable ASCII without
``#``, is already in normal form. A handful of C-level string checks prove it (about 0.25 us
for ``/api/orders/123`` on the reference box); everything else takes the slow path (~2 us).

Route table
-----------
Prefixes are segment-aware: ``/payments`` matches ``/payments``, ``/payments/`` and
``/payments/x`` but not ``/paymentsx``; ``/`` matches every path. A prefix written with a
trailing slash, ``/api/``, matches ``/api/`` and ``/api/x`` but NOT ``/api`` (as in Envoy and
nginx: the slash says "the contents of /api/"); ``/api`` falls through to a shorter prefix or
404. Routes ``/api`` and ``/api/`` may coexist: ``/api/`` is the longer prefix and wins for
``/api/...``, ``/api`` then serves only ``/api`` itself.

The longest matching prefix wins; among routes with the same prefix, an exact host beats a
wildcard host (the longer wildcard suffix first), which beats a host-less route (contract §3). A
wildcard ``*.example.com`` matches one or more labels below ``example.com`` and not
``example.com`` itself. Hosts compare case-insensitively: route hosts are lower-cased once,
and the caller passes the request host through :func:`split_host`.

At construction every route is filed under its prefix without the trailing slash (``key``),
in one of two buckets: "prefix" (``/api``: the path equals the key or continues with ``/``) and
"dir" (``/api/``: the path continues with ``/``); host-less routes directly in a dict, hosted
ones in a per-prefix bucket (exact dict, wildcard-suffix dict). :meth:`Router.match` walks the
path's segment prefixes from the longest down (``/a/b/c``, ``/a/b``, ``/a``, ``""``), starting
at the longest configured prefix length and skipping lengths no prefix has, so a match costs a
few dict lookups (~0.4 us for a 50-route table). A ``path_prefix`` that is not its own normal
form could never match, so the Router refuses it (``ValueError``), as it does duplicate
(prefix, host) pairs.

Host: :func:`split_host` maps a ``Host`` value to the matching form: lower-case, port removed,
one trailing dot removed (``example.com.`` is the same name, and nginx-style backends strip it,
so routing must too), IPv6 literals keep their brackets; garbage is a 400.

Prefix stripping: :func:`strip_prefix` removes the matched prefix's key, so the upstream path
always starts with ``/`` (``/payments/x`` -> ``/x``, ``/payments`` -> ``/``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

__all__ = [
    "BadRequest",
    "Routable",
    "Router",
    "normalise_path",
    "normalise_target",
    "split_host",
    "strip_prefix",
]


class BadRequest(Exception):
    """The request target or Host cannot be used: the caller answers 400.

    ``description`` is a short, fixed explanation (never echoes client bytes beyond a character
    class), safe to put into the 400 body and the access log.
    """

    def __init__(self, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.description = description
        # An instance attribute, not a class one: a compiled class (jwtproxy.compiled) does not
        # show class attributes on its instances.
        self.status = status


# ---------------------------------------------------------------------------------------------
# Request target
# ---------------------------------------------------------------------------------------------

# Bytes that can appear in an already-normal path: pchar without '%' (RFC 3986 §3.3), plus '/'
# and '.'. With no "//" and no "/." (so no empty segment and no segment starting with '.', i.e.
# never a dot-segment, with or without ';params'), a path made of these is in normal form.
# Anything else takes the slow path, which is also correct for everything this accepts.
_FAST_PATH_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/"
# Bytes a query may hold: printable ASCII except space and '#'.
_QUERY_BYTES = bytes(c for c in range(0x21, 0x7F) if c != 0x23)
# Characters never allowed anywhere in the target: controls, space, DEL, '#'. Non-ASCII is
# caught by the ASCII decode before this runs.
_BAD_CHAR = re.compile(r"[\x00-\x20\x7f#]")
# Scheme per RFC 3986 §3.1, for telling absolute-form from authority-form.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# Escapes refused outright (contract §4): '/', '\', NUL. Compared after upper-casing.
_FORBIDDEN_ESCAPES = {"2F": "encoded '/' (%2F) in path", "5C": "encoded '\\' (%5C) in path",
                      "00": "encoded NUL (%00) in path"}


def normalise_target(target: bytes) -> tuple[str, str, str | None]:
    """Split and normalise an HTTP/1.1 request-target (see the module docstring for the rules).

    Returns ``(path, query, authority)``: ``path`` in normal form, always starting with ``/``;
    ``query`` untouched, with its leading ``?`` (``""`` when the target has no ``?``);
    ``authority`` is the ``host[:port]`` of an absolute-form target (the caller uses it as
    ``Host``, RFC 9112 §3.2.2), else ``None``. Raises :class:`BadRequest` for anything refused.
    """
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("non-ASCII byte in request target") from None
    # Fast path: an already-normal origin-form target, proved with a few C-level checks and no
    # copies. bytes.strip(chars) is a table-driven loop: "strips to nothing" means every byte is
    # in the set. Membership tests run on the str: `b"x" in some_bytes` is ~5x slower than the
    # str version in CPython 3.11 (it first tries the needle as an int).
    if "?" not in text:
        if (
            text
            and text[0] == "/"
            and not target.strip(_FAST_PATH_BYTES)
            and "//" not in text
            and "/." not in text
        ):
            return text, "", None
    else:
        q = text.find("?")
        path = text[:q]
        if (
            q
            and text[0] == "/"
            and not target[:q].strip(_FAST_PATH_BYTES)
            and not target.strip(_QUERY_BYTES)  # whole target printable, no space, no '#'
            and "//" not in path
            and "/." not in path
        ):
            return path, text[q:], None
    return _normalise_target_slow(text)


def _normalise_target_slow(text: str) -> tuple[str, str, str | None]:
    bad = _BAD_CHAR.search(text)
    if bad is not None:
        c = bad.group()
        if c == "#":
            raise BadRequest("fragment ('#') in request target")
        if c == " ":
            raise BadRequest("space in request target")
        raise BadRequest("control character in request target")
    authority: str | None = None
    if not text.startswith("/"):
        if text == "*":
            raise BadRequest("asterisk-form request target is not supported")
        colon = text.find(":")
        scheme = text[:colon] if colon > 0 else ""
        if not _SCHEME.fullmatch(scheme) or not text.startswith("//", colon + 1):
            # "host:443" (CONNECT) or garbage: nothing we could route.
            raise BadRequest("request target must be a path or an absolute http(s) URI")
        if scheme.lower() not in ("http", "https"):
            raise BadRequest("unsupported URI scheme in request target")
        rest = text[colon + 3 :]
        end = len(rest)
        for sep in "/?":
            i = rest.find(sep)
            if 0 <= i < end:
                end = i
        authority = rest[:end]
        if "@" in authority:
            raise BadRequest("userinfo in request target")
        if not authority:
            raise BadRequest("empty authority in request target")
        split_host(authority)  # validates; the caller splits again when it uses it as Host
        text = rest[end:]
        if not text.startswith("/"):
            text = "/" + text  # "http://h" and "http://h?x" mean path "/"
    q = text.find("?")
    if q < 0:
        path, query = text, ""
    else:
        path, query = text[:q], text[q:]
    return normalise_path(path), query, authority


def normalise_path(path: str) -> str:
    """Return ``path`` (which must start with ``/``, no query) in normal form, or raise
    :class:`BadRequest`. Public so configuration checks can insist route prefixes are normal."""
    if not path.startswith("/"):
        raise BadRequest("path must start with '/'")
    bad = _BAD_CHAR.search(path)
    if bad is not None or "?" in path:
        raise BadRequest("invalid character in path")
    if not path.isascii():
        raise BadRequest("non-ASCII character in path")
    if "\\" in path:
        raise BadRequest("backslash in path")
    if "%" in path:
        path = _percent_normalise(path)
    if "/." not in path and "//" not in path:
        return path
    return _remove_dot_segments(path)


def _percent_normalise(path: str) -> str:
    parts = path.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        hexpair = part[:2]
        if len(hexpair) != 2 or hexpair[0] not in _HEX or hexpair[1] not in _HEX:
            raise BadRequest("malformed percent-encoding in path")
        hexpair = hexpair.upper()
        problem = _FORBIDDEN_ESCAPES.get(hexpair)
        if problem is not None:
            raise BadRequest(problem)
        c = chr(int(hexpair, 16))
        if c in _UNRESERVED:
            out.append(c)
        else:
            out.append("%")
            out.append(hexpair)
        out.append(part[2:])
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    # RFC 3986 §5.2.4 on a segment list (equivalent for absolute paths), keeping empty segments
    # while doing so (so "/a//../b" is "/a/b"); empty segments are dropped afterwards (merge).
    segments = path.split("/")[1:]
    stack: list[str] = []
    for seg in segments:
        if seg == ".":
            continue
        if seg == "..":
            if not stack:
                raise BadRequest("'..' above the root in path")
            stack.pop()
            continue
        if seg.startswith(".") and seg.partition(";")[0] in (".", ".."):
            # "..;x": a dot-segment to servlet containers, a plain segment to RFC 3986.
            raise BadRequest("dot-segment with parameters in path")
        stack.append(seg)
    # A final ".", ".." or "" leaves a directory: "/a/b/.." is "/a/".
    trailing = segments[-1] in ("", ".", "..")
    kept = [s for s in stack if s]
    if not kept:
        return "/"
    return "/" + "/".join(kept) + ("/" if trailing else "")


# ---------------------------------------------------------------------------------------------
# Host
# ---------------------------------------------------------------------------------------------

# reg-name restricted to what DNS names and IPv4 literals use (plus '_', seen in internal
# names), labels non-empty, one optional trailing dot; or a bracketed IPv6 literal. Port digits.
_HOST = re.compile(
    r"(?:(?P<name>[a-z0-9_\-]+(?:\.[a-z0-9_\-]+)*)\.?|(?P<ip6>\[[0-9a-f:.]+\]))(?::(?P<port>[0-9]{0,5}))?"
)


# Memo of accepted Host values: a deployment sees a handful of distinct hosts, and a dict hit
# (~40 ns) is a tenth of the regex. Bounded, and emptied when full, so a client sending endless
# distinct hosts costs memory for at most _HOST_MEMO_MAX entries. Results are pure functions of
# the key, so sharing them across connections is safe.
_HOST_MEMO: dict[str, str] = {}
_HOST_MEMO_MAX = 1024


def split_host(host_header: str) -> str:
    """Turn a ``Host`` header value (or an absolute-form authority) into the form
    :meth:`Router.match` takes: lower-case, port removed, a single trailing dot removed
    (``Example.COM.:8080`` -> ``example.com``); IPv6 literals keep their brackets
    (``[::1]:8080`` -> ``[::1]``). ``""`` (no Host, HTTP/1.0) stays ``""`` and then only
    host-less routes match. Anything else (userinfo, paths, spaces, bad ports, empty labels)
    raises :class:`BadRequest`.
    """
    host = _HOST_MEMO.get(host_header)
    if host is not None:
        return host
    if not host_header:
        return ""
    m = _HOST.fullmatch(host_header.lower())
    if m is None:
        raise BadRequest("invalid Host")
    port = m.group("port")
    if port and int(port) > 65535:
        raise BadRequest("invalid port in Host")
    name = m.group("name")
    host = name if name is not None else m.group("ip6")
    if len(_HOST_MEMO) >= _HOST_MEMO_MAX:
        _HOST_MEMO.clear()
    _HOST_MEMO[host_header] = host
    return host


# ---------------------------------------------------------------------------------------------
# Route table
# ---------------------------------------------------------------------------------------------


class Routable(Protocol):
    """What the table reads of a route (``config.RouteConfig`` is one); routing needs no more,
    so it does not depend on the config module."""

    @property
    def path_prefix(self) -> str: ...

    @property
    def host(self) -> str: ...


R = TypeVar("R", bound=Routable)


class _Bucket(Generic[R]):
    """Routes sharing one prefix, by host: exact, then wildcard suffix, then host-less."""

    __slots__ = ("exact", "wild", "any")

    def __init__(self) -> None:
        self.exact: dict[str, R] = {}
        self.wild: dict[str, R] = {}  # ".example.com" -> route for "*.example.com"
        self.any: R | None = None

    def add(self, host: str, route: R) -> None:
        if host.startswith("*."):
            table, key = self.wild, host[1:]
        elif host:
            table, key = self.exact, host
        else:
            if self.any is not None:
                raise ValueError(f"two routes with path_prefix {route.path_prefix!r} and no host")
            self.any = route
            return
        if key in table:
            raise ValueError(f"two routes with path_prefix {route.path_prefix!r} and host {host!r}")
        table[key] = route

    def lookup(self, host: str) -> R | None:
        if self.exact:
            r = self.exact.get(host)
            if r is not None:
                return r
        if self.wild and host:
            # ".b.example.com", then ".example.com", then ".com": the longest suffix first,
            # and never the whole host, so "*.example.com" does not match "example.com".
            i = host.find(".")
            while i >= 0:
                r = self.wild.get(host[i:])
                if r is not None:
                    return r
                i = host.find(".", i + 1)
        return self.any


class Router(Generic[R]):
    """The route table, built once per configuration. See the module docstring for the rules.

    Raises ``ValueError`` at construction for a ``path_prefix`` that is not in normal form (it
    could never match a normalised path) and for two routes with the same prefix and host.
    """

    __slots__ = ("_prefix_any", "_dir_any", "_prefix_hosted", "_dir_hosted", "_lengths", "_maxlen")

    def __init__(self, routes: Sequence[R]) -> None:
        # Keyed by the prefix without its trailing '/': "prefix" for "/api"-style prefixes, "dir"
        # for "/api/"-style ones. Host-less routes sit directly in the *_any dicts so the common
        # table (few or no host routes) costs one dict lookup per candidate.
        buckets: dict[tuple[bool, str], _Bucket[R]] = {}
        for route in routes:
            prefix = route.path_prefix
            try:
                normal = normalise_path(prefix)
            except BadRequest as e:
                raise ValueError(f"path_prefix {prefix!r}: {e.description}") from None
            if normal != prefix:
                raise ValueError(f"path_prefix {prefix!r} is not in normal form; write {normal!r}")
            host = route.host.lower()
            if host.endswith("."):
                host = host[:-1]  # split_host removes it from request hosts too
            is_dir = prefix.endswith("/")
            key = prefix[:-1] if is_dir else prefix
            buckets.setdefault((is_dir, key), _Bucket[R]()).add(host, route)
        self._prefix_any: dict[str, R] = {}
        self._dir_any: dict[str, R] = {}
        self._prefix_hosted: dict[str, _Bucket[R]] = {}
        self._dir_hosted: dict[str, _Bucket[R]] = {}
        for (is_dir, key), bucket in buckets.items():
            if bucket.any is not None:
                (self._dir_any if is_dir else self._prefix_any)[key] = bucket.any
            if bucket.exact or bucket.wild:
                bucket.any = None  # reached through *_any, after the host tiers
                (self._dir_hosted if is_dir else self._prefix_hosted)[key] = bucket
        # Key lengths that exist: match() skips other candidates without slicing or hashing, and
        # jumps straight past the part of a long path that no prefix can cover.
        self._lengths = frozenset(len(key) for _, key in buckets)
        self._maxlen = max(self._lengths, default=0)

    def match(self, host: str, path: str) -> R | None:
        """The route for a normalised ``path`` (from :func:`normalise_target`) and a ``host``
        from :func:`split_host` (lower-case, no port; ``""`` if none), or ``None`` (404)."""
        # Candidates are path[:end] for each '/' position `end` (and the whole path), longest
        # first; `more` says the path continues with '/' after the candidate, which is what a
        # "dir" prefix ("/api/") needs and what makes a "prefix" prefix segment-aware.
        if path and path[-1] == "/":
            end, more = len(path) - 1, True
        else:
            end, more = len(path), False
        if end > self._maxlen:
            end, more = path.rfind("/", 0, self._maxlen + 1), True
        lengths = self._lengths
        while end >= 0:
            if end in lengths:
                key = path[:end]
                if more:
                    if self._dir_hosted:
                        b = self._dir_hosted.get(key)
                        if b is not None:
                            r = b.lookup(host)
                            if r is not None:
                                return r
                    r = self._dir_any.get(key)
                    if r is not None:
                        return r
                if self._prefix_hosted:
                    b = self._prefix_hosted.get(key)
                    if b is not None:
                        r = b.lookup(host)
                        if r is not None:
                            return r
                r = self._prefix_any.get(key)
                if r is not None:
                    return r
            if end == 0:
                return None
            end = path.rfind("/", 0, end)
            more = True
        return None  # only for a path not starting with '/', which normalise_target never yields


def strip_prefix(route: Routable, path: str) -> str:
    """The path the upstream receives for a route with ``strip_prefix = true``: ``path`` with the
    route's prefix removed, always starting with ``/`` (``/payments`` on ``/payments/x`` gives
    ``/x``; on ``/payments`` or ``/payments/`` gives ``/``; ``/`` leaves the path unchanged).
    ``path`` must be one the route matched; otherwise ``ValueError``."""
    key = route.path_prefix
    if key.endswith("/"):
        key = key[:-1]
    n = len(key)
    if not path.startswith(key) or (len(path) > n and path[n] != "/"):
        raise ValueError("path does not match the route's path_prefix")
    return path[n:] or "/"
