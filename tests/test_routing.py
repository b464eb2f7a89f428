"""Tests for jwtproxy.routing: request-target normalisation, Host parsing, the route table."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jwtproxy import routing
from jwtproxy.config import RouteConfig
from jwtproxy.routing import BadRequest, Router, normalise_path, normalise_target, split_host, strip_prefix


def route(prefix: str, host: str = "", upstream: str = "", *, strip: bool = False) -> RouteConfig:
    """A route whose upstream name doubles as a label for asserting which route matched."""
    return RouteConfig(path_prefix=prefix, host=host, upstream=upstream or f"{host}{prefix}", strip_prefix=strip)


# ---------------------------------------------------------------------------------------------
# normalise_target: accepted targets
# ---------------------------------------------------------------------------------------------

ACCEPTED: list[tuple[bytes, tuple[str, str, str | None]]] = [
    # plain origin-form (fast path)
    (b"/", ("/", "", None)),
    (b"/api/orders/123", ("/api/orders/123", "", None)),
    (b"/api/orders/123/", ("/api/orders/123/", "", None)),
    (b"/file.json", ("/file.json", "", None)),
    (b"/a.", ("/a.", "", None)),
    (b"/a-b_c~d!$&'()*+,=:@", ("/a-b_c~d!$&'()*+,=:@", "", None)),
    # query returned untouched, with its '?'
    (b"/a?x=1&y=2", ("/a", "?x=1&y=2", None)),
    (b"/a?", ("/a", "?", None)),
    (b"/?x", ("/", "?x", None)),
    (b"/a?x=../../y", ("/a", "?x=../../y", None)),
    (b"/a?x=%2F%00%zz\\", ("/a", "?x=%2F%00%zz\\", None)),
    (b"/a?b?c", ("/a", "?b?c", None)),
    (b"/a/./b?x=/./", ("/a/b", "?x=/./", None)),
    # dot-segments (RFC 3986 §5.2.4)
    (b"/a/./b", ("/a/b", "", None)),
    (b"/a/../b", ("/b", "", None)),
    (b"/a/b/..", ("/a/", "", None)),
    (b"/a/b/.", ("/a/b/", "", None)),
    (b"/a/.", ("/a/", "", None)),
    (b"/a/..", ("/", "", None)),
    (b"/.", ("/", "", None)),
    (b"/./", ("/", "", None)),
    (b"/a/b/../../c", ("/c", "", None)),
    (b"/a/./././b", ("/a/b", "", None)),
    # dots that came from percent-encoding
    (b"/a/%2e/b", ("/a/b", "", None)),
    (b"/a/%2e%2E/b", ("/b", "", None)),
    (b"/a/%2E%2e/b", ("/b", "", None)),
    (b"/a/.%2e/b", ("/b", "", None)),
    # dots that are not dot-segments
    (b"/.well-known/jwks.json", ("/.well-known/jwks.json", "", None)),
    (b"/a/.b", ("/a/.b", "", None)),
    (b"/a/...", ("/a/...", "", None)),
    (b"/a/..b", ("/a/..b", "", None)),
    (b"/a/b..", ("/a/b..", "", None)),
    # slash runs merged (after dot-segment removal, so ".." eats the empty segment)
    (b"//a//b", ("/a/b", "", None)),
    (b"//", ("/", "", None)),
    (b"///", ("/", "", None)),
    (b"/a//", ("/a/", "", None)),
    (b"/a//../b", ("/a/b", "", None)),
    (b"//..", ("/", "", None)),
    (b"/a///b/", ("/a/b/", "", None)),
    # percent-encoding: unreserved decoded (any hex case), the rest kept with upper-case hex
    (b"/%7euser", ("/~user", "", None)),
    (b"/%7Euser", ("/~user", "", None)),
    (b"/%41", ("/A", "", None)),
    (b"/%61%62%63", ("/abc", "", None)),
    (b"/%30%39", ("/09", "", None)),
    (b"/x%2d%2E%5f%7E", ("/x-._~", "", None)),
    (b"/a%20b", ("/a%20b", "", None)),
    (b"/a%3bb", ("/a%3Bb", "", None)),
    (b"/a%3Fb", ("/a%3Fb", "", None)),
    (b"/a%23b", ("/a%23b", "", None)),
    (b"/%e2%82%ac", ("/%E2%82%AC", "", None)),
    (b"/%25", ("/%25", "", None)),
    (b"/%252e", ("/%252e", "", None)),  # never decoded twice
    (b"/%252F", ("/%252F", "", None)),
    (b"/%2541", ("/%2541", "", None)),
    # matrix parameters stay part of their segment
    (b"/payments;x", ("/payments;x", "", None)),
    (b"/payments/x;y=1/z", ("/payments/x;y=1/z", "", None)),
    (b"/a/b;c/../d", ("/a/d", "", None)),
    (b"/a/.x;y", ("/a/.x;y", "", None)),
    # printable characters RFC 3986 does not allow raw pass through (no structural meaning)
    (b"/a|b/{c}/[d]/\"e\"/<f>/^g/`h`", ("/a|b/{c}/[d]/\"e\"/<f>/^g/`h`", "", None)),
    # absolute-form (RFC 9112 §3.2.2): path as origin-form, authority returned for Host
    (b"http://example.com/a?x", ("/a", "?x", "example.com")),
    (b"https://example.com/a", ("/a", "", "example.com")),
    (b"HTTP://Example.COM:8080/a/../b", ("/b", "", "Example.COM:8080")),
    (b"hTtPs://example.com:443/%7e", ("/~", "", "example.com:443")),
    (b"http://example.com", ("/", "", "example.com")),
    (b"http://example.com/", ("/", "", "example.com")),
    (b"http://example.com?x=1", ("/", "?x=1", "example.com")),
    (b"http://[::1]:8080/x", ("/x", "", "[::1]:8080")),
    (b"http://127.0.0.1/x?y", ("/x", "?y", "127.0.0.1")),
    (b"http://example.com//a//b", ("/a/b", "", "example.com")),
]


@pytest.mark.parametrize(("target", "expected"), ACCEPTED, ids=[repr(t) for t, _ in ACCEPTED])
def test_normalise_target_accepts(target: bytes, expected: tuple[str, str, str | None]) -> None:
    assert normalise_target(target) == expected


@pytest.mark.parametrize(("target", "expected"), ACCEPTED, ids=[repr(t) for t, _ in ACCEPTED])
def test_normal_form_is_a_fixed_point(target: bytes, expected: tuple[str, str, str | None]) -> None:
    path, query, _ = expected
    assert normalise_target((path + query).encode()) == (path, query, None)
    assert normalise_path(path) == path


# ---------------------------------------------------------------------------------------------
# normalise_target: refused targets (each check has one that fails without it)
# ---------------------------------------------------------------------------------------------

REFUSED: list[tuple[bytes, str]] = [
    # forms we do not serve
    (b"", "must be a path"),
    (b"*", "asterisk-form"),
    (b"example.com:443", "must be a path"),  # CONNECT authority-form
    (b"[::1]:443", "must be a path"),
    (b"a/b", "must be a path"),
    (b"?x", "must be a path"),
    (b"ftp://example.com/a", "unsupported URI scheme"),
    (b"ws://example.com/a", "unsupported URI scheme"),
    (b"httpx://example.com/a", "unsupported URI scheme"),
    (b"http:/a", "must be a path"),
    (b"http:a", "must be a path"),
    (b"1http://example.com/a", "must be a path"),
    (b"http://user@example.com/a", "userinfo"),
    (b"http://user:pw@example.com/a", "userinfo"),
    (b"http:///a", "empty authority"),
    (b"http://?x", "empty authority"),
    (b"http://exa%41mple.com/a", "invalid Host"),
    (b"http://example.com:99999/a", "invalid port"),
    (b"http://example.com/%2e%2e/a", "above the root"),
    # bytes never allowed in a target
    (b"/\xc3\xa9", "non-ASCII"),
    (b"/a?\xff", "non-ASCII"),
    (b"/a b", "space"),
    (b"/a?x y", "space"),
    (b"/a/./b?x y", "space"),
    (b"/a#frag", "fragment"),
    (b"/a?x#frag", "fragment"),
    (b"/a/./b?x#frag", "fragment"),
    (b"#", "fragment"),
    (b"/a\x00b", "control character"),
    (b"/a\x01", "control character"),
    (b"/a\tb", "control character"),
    (b"/a\x7f", "control character"),
    (b"/a?x\r\nHost: evil", "control character"),
    (b"/a/./b?x\x00", "control character"),
    (b"http://example.com/a b", "space"),
    # backslash and its encoding, encoded '/' and NUL, any hex case
    (b"/a\\b", "backslash"),
    (b"/a\\..\\b", "backslash"),
    (b"/a%5cb", "%5C"),
    (b"/a%5Cb", "%5C"),
    (b"/a%2fb", "%2F"),
    (b"/a%2Fb", "%2F"),
    (b"/a%00", "%00"),
    (b"/%00/a", "%00"),
    # malformed escapes
    (b"/%zz", "malformed percent"),
    (b"/%", "malformed percent"),
    (b"/a%", "malformed percent"),
    (b"/%4", "malformed percent"),
    (b"/a%g1", "malformed percent"),
    (b"/a%1g", "malformed percent"),
    (b"/a%%41", "malformed percent"),
    (b"/a%+1", "malformed percent"),
    (b"/a% 1", "space"),
    # '..' above the root: refused, never clamped
    (b"/..", "above the root"),
    (b"/../a", "above the root"),
    (b"/%2e%2e/x", "above the root"),
    (b"/%2E%2E", "above the root"),
    (b"/a/b/../../..", "above the root"),
    (b"/a/../../b", "above the root"),
    (b"/a/%2e%2e/%2E%2E/b", "above the root"),
    (b"/./..", "above the root"),
    # dot-segments with matrix parameters (servlet containers read these as '..' / '.')
    (b"/a/..;/b", "dot-segment with parameters"),
    (b"/public/..;x/admin", "dot-segment with parameters"),
    (b"/..;", "dot-segment with parameters"),
    (b"/a/.;x/b", "dot-segment with parameters"),
    (b"/a/%2e%2e;/b", "dot-segment with parameters"),
    (b"/a/%2e;/b", "dot-segment with parameters"),
]


@pytest.mark.parametrize(("target", "why"), REFUSED, ids=[repr(t) for t, _ in REFUSED])
def test_normalise_target_refuses(target: bytes, why: str) -> None:
    with pytest.raises(BadRequest) as info:
        normalise_target(target)
    assert why in info.value.description
    assert info.value.status == 400


def test_bad_request_description_does_not_echo_the_target() -> None:
    with pytest.raises(BadRequest) as info:
        normalise_target(b"/secret-token-abc/%zz")
    assert "secret" not in info.value.description
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("a/b", "must start with '/'"),
        ("", "must start with '/'"),
        ("/a?b", "invalid character"),
        ("/a#b", "invalid character"),
        ("/a b", "invalid character"),
        ("/é", "non-ASCII"),
        ("/a\\b", "backslash"),
        ("/a%2f", "%2F"),
        ("/..", "above the root"),
    ],
)
def test_normalise_path_refuses(path: str, why: str) -> None:
    # normalise_path is also the check for route prefixes (and public for config validation).
    with pytest.raises(BadRequest) as info:
        normalise_path(path)
    assert why in info.value.description


# ---------------------------------------------------------------------------------------------
# Properties: the fast path agrees with the slow path; output is always in normal form
# ---------------------------------------------------------------------------------------------

# An alphabet dense in the characters that matter, so generated targets hit every branch.
_TARGET_CHARS = st.sampled_from(list("/./.%2eEfF5cC00aAz;?~#\\ ") + ["%2e", "%2E", "..", "//", "%7e", "%25"])
_targets = st.lists(_TARGET_CHARS, max_size=24).map(lambda parts: "".join(parts).encode())


def _outcome(fn: Callable[..., object], *args: object) -> object:
    try:
        return fn(*args)
    except BadRequest as e:
        return ("BadRequest", e.description)


@settings(max_examples=1000, deadline=None)
@given(_targets)
def test_fast_path_agrees_with_slow_path(target: bytes) -> None:
    slow = _outcome(routing._normalise_target_slow, target.decode("ascii"))
    fast = _outcome(normalise_target, target)
    assert fast == slow


@settings(max_examples=1000, deadline=None)
@given(_targets)
def test_output_is_normal(target: bytes) -> None:
    try:
        path, query, authority = normalise_target(target)
    except BadRequest:
        return
    assert authority is None
    assert path.startswith("/")
    assert "//" not in path
    segments = path.split("/")
    assert "." not in segments and ".." not in segments
    assert "\\" not in path and "#" not in path and "?" not in path
    for bad in ("%2F", "%5C", "%00", "%2E", "%7E", "%41"):
        assert bad not in path.upper().replace("%25", "")  # "%252F" is a literal "%2F" text
    assert query == "" or query.startswith("?")
    assert normalise_target((path + query).encode()) == (path, query, None)


# ---------------------------------------------------------------------------------------------
# split_host
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("example.com:8080", "example.com"),
        ("example.com:", "example.com"),  # RFC 3986: port = *DIGIT
        ("example.com.", "example.com"),
        ("EXAMPLE.com.:443", "example.com"),
        ("localhost", "localhost"),
        ("my_host.internal:1", "my_host.internal"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("[::1]", "[::1]"),
        ("[::1]:8080", "[::1]"),
        ("[2001:DB8::1]:443", "[2001:db8::1]"),
        ("[::ffff:127.0.0.1]", "[::ffff:127.0.0.1]"),
        ("a:65535", "a"),
        ("", ""),
    ],
)
def test_split_host(header: str, host: str) -> None:
    assert split_host(header) == host
    assert split_host(header) == host  # second call comes from the memo


@pytest.mark.parametrize(
    "header",
    [
        "exa mple.com",
        " example.com",
        "example.com ",
        "example.com:abc",
        "example.com:99999",
        "example.com:65536",
        "example.com:123456",
        "example.com:80:80",
        "user@example.com",
        "example.com/path",
        "example.com?x",
        "[::1",
        "::1",
        "::1:8080",
        "[::1]x",
        "[::1]:x",
        "[zz::1]",
        "[]",
        "a..b",
        ".example.com",
        "example..com",
        "example.com..",
        ".",
        ":80",
        "*.example.com",
        "exa%41mple.com",
        "ex\u00e4mple.com",
        "example.com\r\nx",
    ],
)
def test_split_host_refuses(header: str) -> None:
    with pytest.raises(BadRequest):
        split_host(header)
    assert header not in routing._HOST_MEMO  # rejections are never memoised


def test_split_host_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing, "_HOST_MEMO", {})
    for i in range(routing._HOST_MEMO_MAX * 3):
        assert split_host(f"h{i}.Example.com:{i % 65536}") == f"h{i}.example.com"
        assert len(routing._HOST_MEMO) <= routing._HOST_MEMO_MAX


# ---------------------------------------------------------------------------------------------
# Router
# ---------------------------------------------------------------------------------------------

TABLE = [
    route("/", upstream="root"),
    route("/payments", upstream="pay"),
    route("/payments/refunds", upstream="refunds"),
    route("/payments", "pay.example.com", upstream="pay-host"),
    route("/payments", "*.example.com", upstream="pay-wild"),
    route("/payments", "*.eu.example.com", upstream="pay-wild-eu"),
    route("/admin", "admin.example.com", upstream="admin"),
    route("/api/", upstream="api-dir"),
    route("/docs", upstream="docs"),
    route("/docs/", upstream="docs-dir"),
    route("/static/", "cdn.example.com", upstream="static-dir-host"),
    route("/static", upstream="static"),
    route("/Case", "Mixed.Example.COM", upstream="mixed"),
    route("/~user", upstream="tilde"),
]


@pytest.mark.parametrize(
    ("host", "path", "upstream"),
    [
        # segment-aware prefix
        ("", "/payments", "pay"),
        ("", "/payments/", "pay"),
        ("", "/payments/x", "pay"),
        ("", "/payments/x/y/z/1/2/3/4/5/6/7/8/9", "pay"),
        ("", "/paymentsx", "root"),
        ("", "/payment", "root"),
        ("", "/Payments", "root"),  # paths are case-sensitive
        # matrix params are part of the segment
        ("", "/payments;x", "root"),
        ("", "/payments;x/y", "root"),
        ("", "/payments/x;y", "pay"),
        # longest prefix wins, even over a host route with a shorter prefix
        ("", "/payments/refunds", "refunds"),
        ("", "/payments/refunds/1", "refunds"),
        ("", "/payments/refundsx", "pay"),
        ("pay.example.com", "/payments/refunds/1", "refunds"),
        # among equal prefixes: exact host > longest wildcard > host-less
        ("pay.example.com", "/payments/x", "pay-host"),
        ("x.example.com", "/payments/x", "pay-wild"),
        ("a.b.example.com", "/payments", "pay-wild"),
        ("eu.example.com", "/payments", "pay-wild"),
        ("a.eu.example.com", "/payments", "pay-wild-eu"),
        ("a.b.eu.example.com", "/payments", "pay-wild-eu"),
        ("example.com", "/payments", "pay"),  # wildcard does not match the apex
        ("notexample.com", "/payments", "pay"),  # suffix is label-aligned
        ("pay.example.com.evil.org", "/payments", "pay"),
        ("other.org", "/payments", "pay"),
        ("", "/payments", "pay"),
        # host-only route: no host-less route at that prefix falls back to a shorter prefix
        ("admin.example.com", "/admin", "admin"),
        ("admin.example.com", "/admin/x", "admin"),
        ("other.example.com", "/admin/x", "root"),
        ("", "/admin", "root"),
        # trailing-slash prefix: "/api/" matches "/api/" and "/api/x" but not "/api"
        ("", "/api/", "api-dir"),
        ("", "/api/x", "api-dir"),
        ("", "/api/x/", "api-dir"),
        ("", "/api", "root"),
        ("", "/apix", "root"),
        # "/docs" and "/docs/" coexist: "/docs/" is the longer prefix
        ("", "/docs", "docs"),
        ("", "/docs/", "docs-dir"),
        ("", "/docs/x", "docs-dir"),
        ("", "/docsx", "root"),
        # a longer "dir" host route beats the shorter host-less "prefix" route, only for its host
        ("cdn.example.com", "/static/a.css", "static-dir-host"),
        ("cdn.example.com", "/static", "static"),
        ("www.example.com", "/static/a.css", "static"),
        # route hosts compare case-insensitively (request hosts arrive lower-cased)
        ("mixed.example.com", "/Case/x", "mixed"),
        ("", "/Case/x", "root"),
        ("", "/~user/x", "tilde"),
        # root
        ("", "/", "root"),
        ("", "/anything/else", "root"),
        ("any.host", "/", "root"),
    ],
)
def test_router_match(host: str, path: str, upstream: str) -> None:
    matched = Router(TABLE).match(host, path)
    assert matched is not None
    assert matched.upstream == upstream


@pytest.mark.parametrize(
    ("routes", "host", "path"),
    [
        ([], "", "/"),
        ([route("/a")], "", "/"),
        ([route("/a")], "", "/b"),
        ([route("/ab")], "", "/abcd"),  # longer than every prefix: must not match "/ab"
        ([route("/ab")], "", "/abc/d"),
        ([route("/a/")], "", "/a"),
        ([route("/a", "h.example.com")], "", "/a"),
        ([route("/a", "h.example.com")], "g.example.com", "/a"),
        ([route("/a", "*.example.com")], "example.com", "/a"),
        ([route("/a")], "", ""),  # not a normalised path: no match rather than a crash
        ([route("/a")], "", "a"),
    ],
)
def test_router_no_match(routes: list[RouteConfig], host: str, path: str) -> None:
    assert Router(routes).match(host, path) is None


@pytest.mark.parametrize(
    ("routes", "why"),
    [
        ([route("/a"), route("/a")], "two routes"),
        ([route("/a", "h.example.com"), route("/a", "H.example.com")], "two routes"),
        ([route("/a", "*.example.com"), route("/a", "*.example.com")], "two routes"),
        ([route("a")], "must start with '/'"),
        ([route("/a/../b")], "not in normal form"),
        ([route("//a")], "not in normal form"),
        ([route("/%7euser")], "not in normal form"),
        ([route("/a%2fb")], "%2F"),
        ([route("/a?b")], "invalid character"),
    ],
)
def test_router_rejects_bad_tables(routes: list[RouteConfig], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Router(routes)


def test_router_route_host_trailing_dot_is_ignored() -> None:
    # split_host drops a trailing dot from request hosts, so route hosts are compared without it.
    r = route("/a", "H.example.com.")
    assert Router([r]).match("h.example.com", "/a") is r


def test_router_allows_same_prefix_different_hosts_and_slash_forms() -> None:
    Router([route("/a"), route("/a/"), route("/a", "h.example.com"), route("/a", "*.example.com")])


def _reference_match(routes: list[RouteConfig], host: str, path: str) -> RouteConfig | None:
    """The documented rules, written as plainly as possible: O(routes) per request."""
    best: tuple[tuple[int, int], RouteConfig] | None = None
    for r in routes:
        p = r.path_prefix
        if p.endswith("/"):
            ok = path.startswith(p)
        else:
            ok = path == p or path.startswith(p + "/")
        if not ok:
            continue
        h = r.host.lower()
        if not h:
            host_rank = 0
        elif h.startswith("*."):
            if not (host.endswith(h[1:]) and len(host) > len(h) - 1):
                continue
            host_rank = len(h)
        elif h == host:
            host_rank = 10**6
        else:
            continue
        rank = (len(p), host_rank)
        if best is None or rank > best[0]:
            best = (rank, r)
    return best[1] if best else None


_seg = st.sampled_from(["a", "b", "ab", "c;x"])
_prefixes = st.lists(_seg, max_size=3).flatmap(
    lambda segs: st.sampled_from(["/" + "/".join(segs), "/" + "/".join(segs) + "/"]).map(
        lambda p: "/" if p == "//" else p
    )
)
_route_hosts = st.sampled_from(["", "x.example.com", "*.example.com", "*.y.example.com"])
_req_hosts = st.sampled_from(["", "x.example.com", "y.example.com", "z.y.example.com", "example.com", "other.org"])
_paths = st.lists(st.sampled_from(["a", "b", "ab", "c;x", "c", ""]), max_size=5).map(lambda s: "/" + "/".join(s)).filter(
    lambda p: "//" not in p
)


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(st.tuples(_prefixes, _route_hosts), max_size=8, unique=True),
    _req_hosts,
    _paths,
)
def test_router_agrees_with_reference(table: list[tuple[str, str]], host: str, path: str) -> None:
    routes = [route(p, h, upstream=f"{i}") for i, (p, h) in enumerate(table)]
    assert Router(routes).match(host, path) == _reference_match(routes, host, path)


# ---------------------------------------------------------------------------------------------
# strip_prefix
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "path", "stripped"),
    [
        ("/payments", "/payments/x", "/x"),
        ("/payments", "/payments/x/y/", "/x/y/"),
        ("/payments", "/payments", "/"),
        ("/payments", "/payments/", "/"),
        ("/payments", "/payments/x;y", "/x;y"),
        ("/api/", "/api/x/y", "/x/y"),
        ("/api/", "/api/", "/"),
        ("/a/b", "/a/b/c", "/c"),
        ("/", "/a/b", "/a/b"),
        ("/", "/", "/"),
    ],
)
def test_strip_prefix(prefix: str, path: str, stripped: str) -> None:
    r = route(prefix, strip=True)
    assert Router([r]).match("", path) is r
    assert strip_prefix(r, path) == stripped


@pytest.mark.parametrize(
    ("prefix", "path"),
    [("/payments", "/paymentsx"), ("/payments", "/other"), ("/payments", "/pay"), ("/a/b", "/a")],
)
def test_strip_prefix_refuses_a_path_the_route_does_not_match(prefix: str, path: str) -> None:
    with pytest.raises(ValueError):
        strip_prefix(route(prefix, strip=True), path)
