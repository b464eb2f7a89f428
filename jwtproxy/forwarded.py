"""What a trusted front proxy says about the client: address, scheme, host and certificate.

Theory of operation
-------------------
A gateway behind a TLS-terminating proxy (nginx, HAProxy, a cloud load balancer) sees that proxy as
its peer: the client's address, the scheme and host it used and the certificate it presented are
known only from headers the proxy adds. Anyone can send those headers, so they are believed only
when the *peer* of the TCP connection is inside ``[server] trusted_proxies``; from any other peer
they are ignored, and the gateway's own view (peer address, listener scheme, ``Host``) stands.
With ``trusted_proxies = []`` (the default) nothing is ever believed.

:class:`ProxyTrust` is compiled once per config and is pure: addresses and headers in, facts out.

* *Trust* is decided on the peer address of the connection (IPv4-mapped IPv6 peers such as
  ``::ffff:10.0.0.1`` count as their IPv4 address), once per distinct address (bounded memo).
* *Client address* (``X-Forwarded-For``, every occurrence in order, comma-separated): walked from
  the right, the nearest hop first. Each trusted hop hands over to the address it names; the first
  address that is *not* trusted is the client (what nginx's ``real_ip_recursive on`` does). Entries
  to the left of it were written by the client and are never believed. An entry that is not an IP
  address (``unknown``, an obfuscated name) ends the walk at the last hop known. ``1.2.3.4:5678``
  and ``[2001:db8::1]:443`` spellings are accepted.
* *Scheme and host* (``X-Forwarded-Proto``, ``X-Forwarded-Host``): the first element of the
  comma-separated value, as Express and Django do (a proxy chain appends, the outermost proxy
  speaks first). A scheme other than ``http``/``https``, or a host that is not ``host[:port]``, is
  ignored, so the gateway's own value stands.
* *Client certificate* (``[server] client_cert_header``): the raw header value (URL-encoded PEM,
  nginx's ``$ssl_client_escaped_cert``), handed on undecoded; :mod:`jwtproxy.mtls` turns it into a
  thumbprint only when a certificate-bound token asks. Two such headers are ambiguous and count as
  none (a certificate-bound token then fails, closed).

Headers from an untrusted peer are not merely ignored: :attr:`ProxyTrust.untrusted_drop` names what
the gateway removes before forwarding (the certificate header), so a backend that reads it never
sees a client's forgery. ``X-Forwarded-*`` are always rewritten by the gateway itself.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

__all__ = ["Forwarded", "IPAddress", "IPNetwork", "ProxyTrust", "parse_address", "parse_networks"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_MEMO_LIMIT: Final = 4096
# host[:port]: a reg-name or IPv4 address, or a bracketed IPv6 literal (RFC 3986 §3.2.2).
_AUTHORITY: Final = re.compile(rb"(?:[A-Za-z0-9._~!$&'()*+,;=%-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?")
_PROTOS: Final = {b"http": b"http", b"https": b"https"}


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``trusted_proxies`` entries as networks: ``10.0.0.0/8``, ``fd00::/8`` or a single address.

    Raises ``ValueError`` naming the first bad entry (host bits set count as bad: ``10.1.2.3/8``
    is more likely a typo than a wish to trust ``10.0.0.0/8``).
    """
    networks: list[IPNetwork] = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=True))
        except ValueError as exc:
            raise ValueError(f"{cidr!r} is not a CIDR or IP address ({exc})") from None
    return tuple(networks)


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_address(text: str) -> IPAddress | None:
    """An address as it appears in ``X-Forwarded-For`` or as a peer name, else None.

    Accepts ``1.2.3.4``, ``1.2.3.4:5678``, ``2001:db8::1``, ``[2001:db8::1]`` and
    ``[2001:db8::1]:443``; IPv4-mapped IPv6 addresses come back as IPv4.
    """
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (end + 1 < len(text) and not text[end + 1 :].startswith(":")):
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return _unmapped(ipaddress.ip_address(text))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Forwarded:
    """What a trusted proxy told us about one request; None where it said nothing usable."""

    #: The effective client address (compressed text form), always set.
    client: str
    #: ``b"http"`` or ``b"https"`` from ``X-Forwarded-Proto``.
    proto: bytes | None
    #: ``host[:port]`` from ``X-Forwarded-Host``.
    host: bytes | None
    #: The raw value of ``client_cert_header`` (still URL-encoded PEM).
    client_cert: bytes | None


class ProxyTrust:
    """``[server] trusted_proxies`` and ``client_cert_header``, compiled once per config."""

    __slots__ = ("networks", "cert_header", "untrusted_drop", "_memo")

    def __init__(self, trusted_proxies: Iterable[str], client_cert_header: str = "") -> None:
        self.networks = parse_networks(trusted_proxies)
        self.cert_header: bytes | None = client_cert_header.strip().lower().encode("ascii") or None
        #: Header names removed towards the upstream when the peer is not trusted.
        self.untrusted_drop: frozenset[bytes] = (
            frozenset({self.cert_header}) if self.cert_header is not None else frozenset()
        )
        self._memo: dict[str, bool] = {}

    def __bool__(self) -> bool:
        """True if any proxy is trusted at all (else :meth:`forwarded` always says None)."""
        return bool(self.networks)

    def trusts(self, address: str | IPAddress) -> bool:
        """True if ``address`` (a peer name or a parsed address) is in ``trusted_proxies``."""
        if not self.networks:
            return False
        key = str(address)
        verdict = self._memo.get(key)
        if verdict is None:
            parsed = address if not isinstance(address, str) else parse_address(address)
            verdict = parsed is not None and any(parsed in net for net in self.networks)
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[key] = verdict
        return verdict

    def forwarded(
        self, peer: str, headers: Iterable[tuple[bytes, bytes]], *, peer_trusted: bool = False
    ) -> Forwarded | None:
        """The forwarded facts of a request whose connection comes from ``peer``.

        None when ``peer`` is not trusted: then no header of the request is believed. ``headers``
        are the request's (lower-case name, value) pairs in arrival order. ``peer_trusted``: the
        peer is a front proxy whatever ``trusted_proxies`` says (an ``[authz]`` listener's peer,
        contract §5.1); the hops named in ``X-Forwarded-For`` are still judged by the list.
        """
        if not peer_trusted and not self.trusts(peer):
            return None
        xff: list[bytes] = []
        protos: list[bytes] = []
        hosts: list[bytes] = []
        certs: list[bytes] = []
        cert_header = self.cert_header
        for name, value in headers:
            if name == b"x-forwarded-for":
                xff.append(value)
            elif name == b"x-forwarded-proto":
                protos.append(value)
            elif name == b"x-forwarded-host":
                hosts.append(value)
            elif name == cert_header:
                certs.append(value)
        return Forwarded(
            client=self._client(peer, xff),
            proto=_PROTOS.get(_first(protos).lower()) if protos else None,
            host=_host(_first(hosts)) if hosts else None,
            client_cert=(certs[0].strip() or None) if len(certs) == 1 else None,
        )

    def _client(self, peer: str, xff: list[bytes]) -> str:
        parsed_peer = parse_address(peer)
        client: IPAddress | str = parsed_peer if parsed_peer is not None else peer
        if not xff:
            return str(client)
        hops = b",".join(xff).decode("latin-1").split(",")
        for entry in reversed(hops):
            address = parse_address(entry)
            if address is None:
                break  # not an address: the last hop we could read is as far as we can see
            client = address
            if not self.trusts(address):
                break
        return str(client)


def _first(values: list[bytes]) -> bytes:
    return b",".join(values).split(b",", 1)[0].strip()


def _host(value: bytes) -> bytes | None:
    return value.lower() if value and _AUTHORITY.fullmatch(value) else None
