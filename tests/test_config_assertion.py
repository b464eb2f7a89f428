"""config: ``[assertion]`` and the upstream TLS keys (contract §5.4, §5.3): defaults, every
rejection path (each fails if its check is removed), and the files loaded as the workers load them."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from jwtproxy.assertion import key_from_private
from jwtproxy.config import AssertionConfig, ConfigError, UpstreamConfig, parse_config

F = "t.toml"
Mutation = Callable[[dict[str, Any]], object]


def base() -> dict[str, Any]:
    return {
        "issuer": [{"name": "corp", "issuer": "https://idp.example.com",
                    "jwks_uri": "https://idp.example.com/jwks.json", "audiences": ["api"]}],
        "upstream": {"backend": {"targets": ["https://backend.internal:8443"]}},
        "route": [{"path_prefix": "/api", "upstream": "backend"}],
    }


def problems(mutate: Mutation) -> list[str]:
    data = copy.deepcopy(base())
    mutate(data)
    with pytest.raises(ConfigError) as info:
        parse_config(data, F, {})
    return info.value.problems


def parse(mutate: Mutation) -> Any:
    data = copy.deepcopy(base())
    mutate(data)
    return parse_config(data, F, {})


def _assertion(**values: Any) -> Mutation:
    return lambda d: d.setdefault("assertion", {}).update(values)


def _upstream(**values: Any) -> Mutation:
    return lambda d: d["upstream"]["backend"].update(values)


def _pem(key: Any, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    data: bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    return data


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("keys")
    made = {
        "es1": _pem(ec.generate_private_key(ec.SECP256R1())),
        "ed": _pem(ed25519.Ed25519PrivateKey.generate()),
        "rsa": _pem(rsa.generate_private_key(65537, 2048)),
        "p384": _pem(ec.generate_private_key(ec.SECP384R1())),
        "encrypted": _pem(ec.generate_private_key(ec.SECP256R1()), b"pw"),
        "garbage": b"not a key\n",
    }
    paths = {}
    for name, data in made.items():
        path = folder / f"{name}.pem"
        path.write_bytes(data)
        paths[name] = str(path)
    paths["missing"] = str(folder / "missing.pem")
    return paths


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    client = ca.issue_cert("gateway")
    paths = {"ca": folder / "ca.pem", "cert": folder / "client.pem", "key": folder / "client.key",
             "empty": folder / "empty.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    client.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    client.private_key_pem.write_to_path(str(paths["key"]))
    paths["empty"].write_text("")
    return {name: str(path) for name, path in paths.items()}


# -- [assertion] -------------------------------------------------------------------------------------


def test_defaults() -> None:
    config = parse(lambda d: None)
    assert config.assertion == AssertionConfig()
    assert config.assertion.enabled is False
    assert config.assertion.header == "x-jwtproxy-assertion"
    assert config.assertion.issuer == "jwtproxy"
    assert config.assertion.algorithm == "ES256"
    assert config.assertion.lifetime == 60.0
    assert config.assertion.claims == ("sub", "scope", "role")
    assert config.assertion.key_files == () and config.assertion.keys == ()


def test_every_key_set(keys: dict[str, str]) -> None:
    config = parse(_assertion(enabled=True, header="X-Gateway-Assertion", issuer="edge-1", algorithm="EdDSA",
                              key_files=[keys["ed"], keys["es1"]], lifetime=30.5, claims=["sub", "email"]))
    a = config.assertion
    assert (a.enabled, a.header, a.issuer, a.algorithm, a.lifetime, a.claims) == (
        True, "x-gateway-assertion", "edge-1", "EdDSA", 30.5, ("sub", "email"))
    assert a.key_files == (keys["ed"], keys["es1"])
    assert [k.algorithm for k in a.keys] == ["EdDSA", "ES256"]
    private = serialization.load_pem_private_key(Path(keys["ed"]).read_bytes(), None)
    assert a.keys[0].kid == key_from_private(private).kid
    assert "keys=" not in repr(a) and "AssertionKey" not in repr(a)  # key objects never in a logged config


def test_key_files_are_loaded_even_while_disabled(keys: dict[str, str]) -> None:
    # A broken key must fail the config it is written in, not the reload that enables it.
    assert problems(_assertion(key_files=[keys["garbage"]])) == [
        f"{F}: assertion.key_files[0]: not a PEM private key"]


ASSERTION_CASES: list[tuple[str, Callable[[dict[str, str]], Mutation], str]] = [
    ("unknown key", lambda k: _assertion(enable=True), "assertion.enable: unknown key (did you mean 'enabled'?)"),
    ("enabled type", lambda k: _assertion(enabled="yes"), "assertion.enabled: expected true or false, got string"),
    ("empty header", lambda k: _assertion(header=""), "assertion.header: must not be empty"),
    ("bad header", lambda k: _assertion(header="x assertion"), "assertion.header: 'x assertion' is not a valid HTTP header name"),
    ("reserved header", lambda k: _assertion(header="Authorization"), "assertion.header: 'authorization' is a hop-by-hop"),
    ("reserved spelling", lambda k: _assertion(header="x_forwarded_for"), "assertion.header: 'x_forwarded_for' is a hop-by-hop"),
    ("identity header", lambda k: _assertion(header="X_User_Id"), "assertion.header: 'x_user_id' is also a [claims_to_headers] header"),
    ("token source", lambda k: (lambda d: (d.update(token={"sources": ["header:x-api-token"]}),
                                           _assertion(header="x-api-token")(d))),
     "assertion.header: 'x-api-token' is also a token source in token.sources"),
    ("empty issuer", lambda k: _assertion(issuer=""), "assertion.issuer: must not be empty"),
    ("issuer type", lambda k: _assertion(issuer=1), "assertion.issuer: expected a string, got integer"),
    ("algorithm", lambda k: _assertion(algorithm="RS256"), "assertion.algorithm: expected one of"),
    ("zero lifetime", lambda k: _assertion(lifetime=0), "assertion.lifetime: must be greater than 0, got 0"),
    ("negative lifetime", lambda k: _assertion(lifetime=-5), "assertion.lifetime: must be greater than 0"),
    ("infinite lifetime", lambda k: _assertion(lifetime=float("inf")), "assertion.lifetime: must be a finite number"),
    ("lifetime type", lambda k: _assertion(lifetime="60"), "assertion.lifetime: expected a number of seconds"),
    ("claims type", lambda k: _assertion(claims="sub"), "assertion.claims: expected an array of strings"),
    ("empty claim", lambda k: _assertion(claims=["sub", ""]), "assertion.claims[1]: must not be empty"),
    ("duplicate claim", lambda k: _assertion(claims=["sub", "sub"]), "assertion.claims[1]: duplicate value 'sub'"),
    ("gateway claim aud", lambda k: _assertion(claims=["aud"]), "assertion.claims[0]: 'aud' is set by the gateway itself"),
    ("gateway claim exp", lambda k: _assertion(claims=["sub", "exp"]), "assertion.claims[1]: 'exp' is set by the gateway"),
    ("gateway claim jti", lambda k: _assertion(claims=["jti"]), "assertion.claims[0]: 'jti' is set by the gateway"),
    ("key_files type", lambda k: _assertion(key_files=k["es1"]), "assertion.key_files: expected an array of strings"),
    ("missing key file", lambda k: _assertion(key_files=[k["missing"]]),
     "assertion.key_files[0]: cannot read the key file: No such file or directory"),
    ("rsa key", lambda k: _assertion(key_files=[k["es1"], k["rsa"]]),
     "assertion.key_files[1]: a RSAPrivateKey; expected a P-256 (ES256) or Ed25519 (EdDSA) private key"),
    ("p384 key", lambda k: _assertion(key_files=[k["p384"]]),
     "assertion.key_files[0]: an EC key on secp384r1; ES256 needs a P-256 (secp256r1) key"),
    ("encrypted key", lambda k: _assertion(key_files=[k["encrypted"]]),
     "assertion.key_files[0]: the private key is encrypted; give an unencrypted PEM key"),
    ("first key of the other algorithm", lambda k: _assertion(key_files=[k["ed"], k["es1"]]),
     "assertion.key_files: the first key signs and is an EdDSA key, but algorithm is 'ES256'"),
]


@pytest.mark.parametrize(("make", "expected"), [(m, e) for _, m, e in ASSERTION_CASES],
                         ids=[name for name, _, _ in ASSERTION_CASES])
def test_assertion_problem(keys: dict[str, str], make: Callable[[dict[str, str]], Mutation], expected: str) -> None:
    found = problems(make(keys))
    assert len(found) == 1, found
    assert found[0].startswith(f"{F}: {expected}"), found


def test_the_same_key_in_two_files_is_refused(keys: dict[str, str], tmp_path: Path) -> None:
    copy_path = tmp_path / "copy.pem"
    copy_path.write_bytes(Path(keys["es1"]).read_bytes())
    found = problems(_assertion(key_files=[keys["es1"], str(copy_path)]))
    assert len(found) == 1 and found[0].startswith(f"{F}: assertion.key_files: the key ")
    assert found[0].endswith("is listed twice")


# -- [upstream.NAME] TLS keys -----------------------------------------------------------------------


def test_upstream_tls_defaults() -> None:
    upstream = parse(lambda d: None).upstreams["backend"]
    assert (upstream.ca_file, upstream.client_cert, upstream.client_key) == ("", "", "")
    assert upstream == UpstreamConfig(name="backend", targets=upstream.targets)


def test_upstream_tls_files_accepted(tls: dict[str, str]) -> None:
    upstream = parse(_upstream(ca_file=tls["ca"], client_cert=tls["cert"], client_key=tls["key"])).upstreams["backend"]
    assert (upstream.ca_file, upstream.client_cert, upstream.client_key) == (tls["ca"], tls["cert"], tls["key"])


UPSTREAM_CASES: list[tuple[str, Callable[[dict[str, str]], Mutation], str]] = [
    ("ca_file type", lambda t: _upstream(ca_file=1), "upstream.backend.ca_file: expected a string, got integer"),
    ("missing ca_file", lambda t: _upstream(ca_file=t["ca"] + ".missing"),
     "upstream.backend.ca_file: cannot load ca_file: No such file or directory"),
    ("empty ca_file", lambda t: _upstream(ca_file=t["empty"]),
     "upstream.backend.ca_file: cannot load ca_file: no certificate or crl found"),
    ("cert without key", lambda t: _upstream(client_cert=t["cert"]),
     "upstream.backend.client_key: client_cert and client_key must be set together"),
    ("key without cert", lambda t: _upstream(client_key=t["key"]),
     "upstream.backend.client_cert: client_cert and client_key must be set together"),
    ("swapped cert and key", lambda t: _upstream(client_cert=t["key"], client_key=t["cert"]),
     "upstream.backend.client_cert: cannot load client_cert and client_key: not a PEM"),
    ("ca_file on plain http", lambda t: (lambda d: d["upstream"]["backend"].update(
        targets=["http://127.0.0.1:9001"], ca_file=t["ca"])),
     "upstream.backend.ca_file: is set, but no target uses https://"),
    ("client cert on plain http", lambda t: (lambda d: d["upstream"]["backend"].update(
        targets=["http://127.0.0.1:9001"], client_cert=t["cert"], client_key=t["key"])),
     "upstream.backend.client_cert: is set, but no target uses https://"),
]


@pytest.mark.parametrize(("make", "expected"), [(m, e) for _, m, e in UPSTREAM_CASES],
                         ids=[name for name, _, _ in UPSTREAM_CASES])
def test_upstream_tls_problem(tls: dict[str, str], make: Callable[[dict[str, str]], Mutation], expected: str) -> None:
    found = problems(make(tls))
    assert len(found) == 1, found
    assert found[0].startswith(f"{F}: {expected}"), found


def test_mixed_targets_may_carry_tls_settings(tls: dict[str, str]) -> None:
    upstream = parse(lambda d: d["upstream"]["backend"].update(
        targets=["http://127.0.0.1:9001", "https://backend.internal"], ca_file=tls["ca"])).upstreams["backend"]
    assert upstream.ca_file == tls["ca"]
