"""Tests for the sender-constrained keys of jwtproxy.config (contract §5.2): defaults, parsed
values, and one test per rejection path."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from jwtproxy.config import ConfigError, parse_config

F = "t.toml"


def base() -> dict[str, Any]:
    return {
        "issuer": [
            {
                "name": "corp",
                "issuer": "https://idp.example.com",
                "jwks_uri": "https://idp.example.com/jwks.json",
                "audiences": ["api"],
            }
        ],
        "upstream": {"backend": {"targets": ["http://127.0.0.1:9001"]}},
        "route": [{"path_prefix": "/api", "upstream": "backend"}],
    }


def with_(mutate: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    data = copy.deepcopy(base())
    mutate(data)
    return data


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, F, {})
    return info.value.problems


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    ca = trustme.CA()
    d = tmp_path_factory.mktemp("tls")
    server = ca.issue_cert("localhost")
    cert, key, bundle = d / "cert.pem", d / "key.pem", d / "ca.pem"
    server.cert_chain_pems[0].write_to_path(str(cert))
    server.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(bundle))
    (d / "empty.pem").write_text("")
    (d / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    return {"cert": str(cert), "key": str(key), "ca": str(bundle), "empty": str(d / "empty.pem"),
            "junk": str(d / "junk.pem"), "missing": str(d / "missing.pem")}


def test_defaults() -> None:
    cfg = parse_config(base(), F, {})
    server, issuer, route = cfg.server, cfg.issuers[0], cfg.routes[0]
    assert (server.tls_client_ca, server.tls_client_cert) == ("", "optional")
    assert (server.trusted_proxies, server.client_cert_header) == ((), "")
    assert issuer.token_binding == "allow"
    assert issuer.dpop_algorithms == ("ES256", "EdDSA", "PS256", "RS256")
    assert (issuer.dpop_max_age, issuer.dpop_nonce) == (60.0, False)
    assert route.token_binding == ""


def test_every_key_set(tls_files: dict[str, str]) -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["server"] = {
            "tls_cert": tls_files["cert"], "tls_key": tls_files["key"], "tls_client_ca": tls_files["ca"],
            "tls_client_cert": "required", "trusted_proxies": ["10.0.0.0/8", "::1"],
            "client_cert_header": "X-Client-Cert",
        }  # fmt: skip
        d["issuer"][0].update(token_binding="require", dpop_algorithms=["ES384", "Ed25519"], dpop_max_age=12.5,
                              dpop_nonce=True)
        d["route"][0]["token_binding"] = "allow"

    cfg = parse_config(with_(mutate), F, {})
    assert cfg.server.tls_client_ca == tls_files["ca"]
    assert cfg.server.tls_client_cert == "required"
    assert cfg.server.trusted_proxies == ("10.0.0.0/8", "::1")
    assert cfg.server.client_cert_header == "x-client-cert"
    issuer = cfg.issuers[0]
    assert (issuer.token_binding, issuer.dpop_algorithms) == ("require", ("ES384", "Ed25519"))
    assert (issuer.dpop_max_age, issuer.dpop_nonce) == (12.5, True)
    assert cfg.routes[0].token_binding == "allow"


def _server(**values: Any) -> Callable[[dict[str, Any]], object]:
    return lambda d: d.__setitem__("server", values)


def _issuer(**values: Any) -> Callable[[dict[str, Any]], object]:
    return lambda d: d["issuer"][0].update(values)


def _route(**values: Any) -> Callable[[dict[str, Any]], object]:
    return lambda d: d["route"][0].update(values)


REJECTED: list[tuple[str, Callable[[dict[str, Any]], object], str]] = [
    ("client cert choice", _server(tls_client_cert="sometimes"),
     "server.tls_client_cert: expected one of 'optional', 'required'"),
    ("required without ca", _server(tls_client_cert="required"),
     'server.tls_client_cert: "required" needs tls_client_ca'),
    ("ca without tls", _server(tls_client_ca="/x/ca.pem"),
     "server.tls_client_ca: client certificates need TLS listeners: set tls_cert and tls_key too"),
    ("ca type", _server(tls_client_ca=5), "server.tls_client_ca: expected a string, got integer"),
    ("proxies type", _server(trusted_proxies="10.0.0.0/8"), "server.trusted_proxies: expected an array"),
    ("proxies entry", _server(trusted_proxies=["10.0.0.0/8", "10.1.2.3/8"]),
     "server.trusted_proxies[1]: '10.1.2.3/8' is not a CIDR or IP address"),
    ("proxies name", _server(trusted_proxies=["proxy.local"]),
     "server.trusted_proxies[0]: 'proxy.local' is not a CIDR or IP address"),
    ("cert header name", _server(trusted_proxies=["10.0.0.0/8"], client_cert_header="x client cert"),
     "server.client_cert_header: 'x client cert' is not a valid header name"),
    ("cert header reserved", _server(trusted_proxies=["10.0.0.0/8"], client_cert_header="Authorization"),
     "server.client_cert_header: 'authorization' is a header the gateway manages itself"),
    ("cert header dpop", _server(trusted_proxies=["10.0.0.0/8"], client_cert_header="dpop"),
     "server.client_cert_header: 'dpop' is a header the gateway manages itself"),
    ("cert header untrusted", _server(client_cert_header="x-client-cert"),
     "server.client_cert_header: is only believed from trusted_proxies, which is empty"),
    ("binding choice", _issuer(token_binding="always"),
     "issuer[0].token_binding: expected one of 'allow', 'require'"),
    ("dpop none", _issuer(dpop_algorithms=["ES256", "none"]),
     "issuer[0].dpop_algorithms[1]: 'none' is not an asymmetric algorithm"),
    ("dpop hs", _issuer(dpop_algorithms=["HS256"]),
     "issuer[0].dpop_algorithms[0]: 'HS256' is not an asymmetric algorithm"),
    ("dpop unknown", _issuer(dpop_algorithms=["ES257"]), "issuer[0].dpop_algorithms[0]: unknown algorithm 'ES257'"),
    ("dpop empty", _issuer(dpop_algorithms=[]), "issuer[0].dpop_algorithms: must not be empty"),
    ("max age zero", _issuer(dpop_max_age=0), "issuer[0].dpop_max_age: must be greater than 0"),
    ("max age negative", _issuer(dpop_max_age=-1), "issuer[0].dpop_max_age: must be"),
    ("nonce type", _issuer(dpop_nonce="yes"), "issuer[0].dpop_nonce: expected true or false"),
    ("route binding choice", _route(token_binding="strict"),
     "route[0].token_binding: expected one of '', 'allow', 'require'"),
    ("route binding auth off", _route(auth="off", token_binding="require"),
     'route[0].token_binding: has no effect with auth = "off"'),
]


@pytest.mark.parametrize(("mutate", "expected"), [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED])
def test_rejected(mutate: Callable[[dict[str, Any]], object], expected: str) -> None:
    found = problems(with_(mutate))
    assert any(p.startswith(f"{F}: {expected}") for p in found), found


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("missing", "cannot load the CA bundle"),
        ("junk", "cannot load the CA bundle"),
        ("empty", "cannot load the CA bundle"),
        ("cert", "the CA bundle holds no CA certificate"),  # a leaf certificate is no CA
    ],
)
def test_bad_ca_bundle(tls_files: dict[str, str], which: str, message: str) -> None:
    data = with_(_server(tls_cert=tls_files["cert"], tls_key=tls_files["key"], tls_client_ca=tls_files[which]))
    found = problems(data)
    assert any(p.startswith(f"{F}: server.tls_client_ca: {message}") for p in found), found


def test_sample_documents_the_new_keys() -> None:
    text = (Path(__file__).resolve().parent.parent / "jwtproxy.toml").read_text()
    for key in ("tls_client_ca", "tls_client_cert", "trusted_proxies", "client_cert_header", "token_binding",
                "dpop_algorithms", "dpop_max_age", "dpop_nonce"):
        assert f"\n{key} = " in text, key
