"""Tests for jwtproxy.forwarded: which proxies are believed, and what they are believed about."""

from __future__ import annotations

import pytest

from jwtproxy.forwarded import ProxyTrust, parse_address, parse_networks

H = list[tuple[bytes, bytes]]


def trust(*cidrs: str, cert: str = "x-client-cert") -> ProxyTrust:
    return ProxyTrust(cidrs, cert)


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


def test_networks_accept_cidrs_and_single_addresses() -> None:
    nets = parse_networks(["10.0.0.0/8", "192.0.2.7", "fd00::/8", "::1"])
    assert [str(n) for n in nets] == ["10.0.0.0/8", "192.0.2.7/32", "fd00::/8", "::1/128"]


@pytest.mark.parametrize("bad", ["10.1.2.3/8", "10.0.0.0/33", "example.com", "", "1.2.3"])
def test_bad_networks_are_errors_naming_the_entry(bad: str) -> None:
    with pytest.raises(ValueError, match=repr(bad).replace("[", r"\[").replace(".", r"\.")):
        parse_networks(["127.0.0.1", bad])


def test_empty_list_trusts_nobody() -> None:
    t = ProxyTrust([], "x-client-cert")
    assert not t
    assert not t.trusts("127.0.0.1")
    assert t.forwarded("127.0.0.1", [(b"x-forwarded-for", b"1.2.3.4")]) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        (" 1.2.3.4 ", "1.2.3.4"),
        ("1.2.3.4:5678", "1.2.3.4"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("unknown", None),
        ("_hidden", None),
        ("[2001:db8::1", None),
        ("[2001:db8::1]x", None),
        ("", None),
    ],
)
def test_parse_address(text: str, expected: str | None) -> None:
    parsed = parse_address(text)
    assert (str(parsed) if parsed is not None else None) == expected


# ---------------------------------------------------------------------------------------------
# trust
# ---------------------------------------------------------------------------------------------


def test_trust_is_by_network_membership() -> None:
    t = trust("10.0.0.0/8", "2001:db8::/32")
    assert t.trusts("10.9.8.7")
    assert t.trusts("::ffff:10.9.8.7")  # an IPv4 peer on a dual-stack socket
    assert t.trusts("2001:db8::5")
    assert not t.trusts("11.0.0.1")
    assert not t.trusts("2001:db9::5")
    assert not t.trusts("not-an-address")


def test_untrusted_peer_headers_are_not_believed() -> None:
    t = trust("10.0.0.0/8")
    headers: H = [
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"api.example.com"),
        (b"x-client-cert", b"-----BEGIN%20CERTIFICATE-----"),
    ]
    assert t.forwarded("192.0.2.1", headers) is None
    assert t.untrusted_drop == frozenset({b"x-client-cert"})


def test_trusted_peer_headers_are_believed() -> None:
    t = trust("10.0.0.0/8")
    fwd = t.forwarded(
        "10.0.0.2",
        [
            (b"x-forwarded-for", b"203.0.113.9"),
            (b"x-forwarded-proto", b"HTTPS"),
            (b"x-forwarded-host", b"API.Example.com:8443"),
            (b"x-client-cert", b" -----BEGIN%20CERTIFICATE----- "),
        ],
    )
    assert fwd is not None
    assert fwd.client == "203.0.113.9"
    assert fwd.proto == b"https"
    assert fwd.host == b"api.example.com:8443"
    assert fwd.client_cert == b"-----BEGIN%20CERTIFICATE-----"


def test_trusted_peer_without_headers_is_itself_the_client() -> None:
    fwd = trust("10.0.0.0/8").forwarded("10.0.0.2", [(b"host", b"a")])
    assert fwd is not None
    assert (fwd.client, fwd.proto, fwd.host, fwd.client_cert) == ("10.0.0.2", None, None, None)


# ---------------------------------------------------------------------------------------------
# X-Forwarded-For: the right-most untrusted hop is the client
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("xff", "client"),
    [
        ([b"203.0.113.9"], "203.0.113.9"),
        # the client prepended a forgery: the proxy's appended entry wins
        ([b"6.6.6.6, 203.0.113.9"], "203.0.113.9"),
        # a chain of trusted proxies is walked through
        ([b"203.0.113.9, 10.1.1.1, 10.2.2.2"], "203.0.113.9"),
        # two header lines count as one list, in order
        ([b"6.6.6.6, 203.0.113.9", b"10.1.1.1"], "203.0.113.9"),
        # every hop trusted: the left-most is as far as we can see
        ([b"10.3.3.3, 10.1.1.1"], "10.3.3.3"),
        # garbage ends the walk at the last hop known
        ([b"203.0.113.9, unknown, 10.1.1.1"], "10.1.1.1"),
        ([b"unknown"], "10.0.0.2"),
        ([b""], "10.0.0.2"),
        ([b"[2001:db8::7]:1234"], "2001:db8::7"),
        ([b"203.0.113.9:5555"], "203.0.113.9"),
    ],
)
def test_client_address(xff: list[bytes], client: str) -> None:
    t = trust("10.0.0.0/8")
    fwd = t.forwarded("10.0.0.2", [(b"x-forwarded-for", v) for v in xff])
    assert fwd is not None
    assert fwd.client == client


def test_client_address_ipv6_peer() -> None:
    fwd = trust("::1/128").forwarded("::1", [(b"x-forwarded-for", b"198.51.100.4")])
    assert fwd is not None and fwd.client == "198.51.100.4"


# ---------------------------------------------------------------------------------------------
# X-Forwarded-Proto / -Host: first element, validated
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "proto"),
    [
        ([b"https"], b"https"),
        ([b"http"], b"http"),
        ([b" Https "], b"https"),
        ([b"https, http"], b"https"),
        ([b"https", b"http"], b"https"),
        ([b"wss"], None),
        ([b"ftp"], None),
        ([b""], None),
    ],
)
def test_forwarded_proto(values: list[bytes], proto: bytes | None) -> None:
    fwd = trust("10.0.0.0/8").forwarded("10.0.0.2", [(b"x-forwarded-proto", v) for v in values])
    assert fwd is not None and fwd.proto == proto


@pytest.mark.parametrize(
    ("values", "host"),
    [
        ([b"api.example.com"], b"api.example.com"),
        ([b"API.EXAMPLE.COM:443"], b"api.example.com:443"),
        ([b"a.example, b.example"], b"a.example"),
        ([b"[2001:db8::1]:8443"], b"[2001:db8::1]:8443"),
        ([b"bad host"], None),
        ([b"evil/path"], None),
        ([b"a@b"], None),
        ([b"host:99999999"], None),
        ([b""], None),
    ],
)
def test_forwarded_host(values: list[bytes], host: bytes | None) -> None:
    fwd = trust("10.0.0.0/8").forwarded("10.0.0.2", [(b"x-forwarded-host", v) for v in values])
    assert fwd is not None and fwd.host == host


def test_two_certificate_headers_count_as_none() -> None:
    fwd = trust("10.0.0.0/8").forwarded("10.0.0.2", [(b"x-client-cert", b"a"), (b"x-client-cert", b"b")])
    assert fwd is not None and fwd.client_cert is None


def test_certificate_header_unset_is_never_read() -> None:
    t = ProxyTrust(["10.0.0.0/8"], "")
    assert t.untrusted_drop == frozenset()
    fwd = t.forwarded("10.0.0.2", [(b"x-client-cert", b"a")])
    assert fwd is not None and fwd.client_cert is None


def test_trust_memo_is_bounded() -> None:
    t = trust("10.0.0.0/8")
    for i in range(5000):
        t.trusts(f"192.0.{i // 256 % 256}.{i % 256}")
    assert len(t._memo) <= 4096
    assert t.trusts("10.0.0.1") and not t.trusts("192.0.0.1")
