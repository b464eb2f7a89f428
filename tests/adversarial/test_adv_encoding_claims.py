"""Class 3 -- encoding and claims: non-canonical base64url, hostile numbers, aud/iss near-misses,
bad ``sub``, huge and deeply nested tokens (RFC 7515 §2 / RFC 4648 §5, RFC 7519 §4.1, RFC 8725
§3.8-3.9, Wycheproof-style edge values)."""

from __future__ import annotations

import json
import resource
import time

import pytest
from advhelpers import (
    ISSUER,
    ROUTES,
    assert_rejected,
    b64url,
    claims,
    get,
    seg,
    signed,
    status_of,
)

from jwtproxy.jose import TokenRejected, parse_compact


@pytest.fixture
async def gw(make_gateway):
    return await make_gateway(routes=ROUTES)


def _valid(rsa_key) -> str:
    return signed(rsa_key, {"alg": "RS256", "typ": "JWT", "kid": rsa_key.kid}, claims())


# ----------------------------------------------------------------------------------- base64url


def _with_sig_alphabet_chars(rsa_key) -> str:
    """A valid token whose signature segment contains both '-' and '_' (retry until it does)."""
    for i in range(200):
        token = signed(rsa_key, {"alg": "RS256", "kid": rsa_key.kid}, claims(jti=f"j{i}"))
        _, payload, sig = token.split(".")
        if "-" in sig and "_" in sig and len(payload) % 4:
            return token
    raise AssertionError("no signature with both - and _")


def _pad(s: str) -> str:
    return s + "=" * (-len(s) % 4)


def _noncanonical_last(segment: str) -> str:
    """The same bytes spelled with non-zero unused low bits in the last character."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    rem = len(segment) % 4
    assert rem in (2, 3), "segment has no unused bits"
    value = alphabet.index(segment[-1])
    return segment[:-1] + alphabet[value | (1 if rem == 3 else 3)]


ENCODINGS = {
    "padded-header": lambda h, p, s: f"{_pad(h)}.{p}.{s}",
    "padded-payload": lambda h, p, s: f"{h}.{_pad(p)}.{s}",
    "padded-signature": lambda h, p, s: f"{h}.{p}.{_pad(s)}",
    "extra-padding": lambda h, p, s: f"{h}.{p}.{s}====",
    "std-alphabet-signature": lambda h, p, s: f"{h}.{p}.{s.replace('-', '+').replace('_', '/')}",
    "std-alphabet-plus-only": lambda h, p, s: f"{h}.{p}.{s.replace('-', '+')}",
    "space-in-signature": lambda h, p, s: f"{h}.{p}.{s[:10]} {s[10:]}",
    "tab-in-payload": lambda h, p, s: f"{h}.{p[:5]}\t{p[5:]}.{s}",
    "newline-in-header": lambda h, p, s: f"{h[:4]}\n{h[4:]}.{p}.{s}",
    "cr-in-header": lambda h, p, s: f"{h[:4]}\r{h[4:]}.{p}.{s}",
    "nul-in-signature": lambda h, p, s: f"{h}.{p}.{s}\x00",
    "percent-encoded-dots": lambda h, p, s: f"{h}%2E{p}%2E{s}",
    "fullwidth-dot": lambda h, p, s: f"{h}\uff0e{p}.{s}",
    "non-ascii-in-payload": lambda h, p, s: f"{h}.{p[:3]}\u00e9{p[3:]}.{s}",
    "noncanonical-signature-tail": lambda h, p, s: f"{h}.{p}.{_noncanonical_last(s)}",
    "len-1-mod-4-signature": lambda h, p, s: f"{h}.{p}.{s}" + "A" * ((1 - len(s)) % 4 or 4),
    "leading-dot": lambda h, p, s: f".{h}.{p}.{s}",
    "trailing-dot": lambda h, p, s: f"{h}.{p}.{s}.",
    "double-dot": lambda h, p, s: f"{h}..{p}.{s}",
    "quoted": lambda h, p, s: f'"{h}.{p}.{s}"',
    "bearer-inside": lambda h, p, s: f"Bearer {h}.{p}.{s}",
    "signature-appended-garbage": lambda h, p, s: f"{h}.{p}.{s}AAAA",
    "signature-base64-of-hex": lambda h, p, s: f"{h}.{p}.{b64url(s.encode())}",
}


@pytest.mark.parametrize("name", sorted(ENCODINGS))
async def test_non_canonical_base64url_rfc7515_2(gw, backend, rsa_key, name):
    """One signed token, many spellings: only the canonical one may pass (otherwise one token
    has many cache/revocation keys). Control: the canonical spelling is accepted."""
    token = _with_sig_alphabet_chars(rsa_key)
    h, p, s = token.split(".")
    if name == "noncanonical-signature-tail" and len(s) % 4 not in (2, 3):
        pytest.skip("signature length has no unused bits")
    forged = ENCODINGS[name](h, p, s)
    assert forged != token
    # Bearer parsing splits on spaces: a token with a space is "malformed authorization" -> 401;
    # CR, LF and NUL inside a header value are refused by the HTTP parser itself -> 400.
    allowed = (400,) if name in ("cr-in-header", "newline-in-header", "nul-in-signature") else (401,)
    await assert_rejected(gw, backend, forged, allowed=allowed)
    assert await status_of(gw, get("/x", token)) == 200


async def test_noncanonical_header_and_payload_segments(gw, backend, rsa_key):
    """Non-zero unused bits in header/payload tails, re-signed so only the spelling is odd."""
    for pad_to in range(0, 3):
        payload = claims(sub="u" * (5 + pad_to))
        h = seg({"alg": "RS256", "kid": rsa_key.kid})
        p = seg(payload)
        for which in ("h", "p"):
            segs = {"h": h, "p": p}
            if len(segs[which]) % 4 not in (2, 3):
                continue
            segs[which] = _noncanonical_last(segs[which])
            signing_input = segs["h"] + "." + segs["p"]
            token = signing_input + "." + b64url(rsa_key.sign(signing_input.encode()))
            await assert_rejected(gw, backend, token)


# ---------------------------------------------------------------------------------- numeric claims

BAD_NUMBERS = {
    "string": '"{v}"',
    "string-float": '"{v}.0"',
    "true": "true",
    "false": "false",
    "null": "null",
    "NaN": "NaN",
    "Infinity": "Infinity",
    "-Infinity": "-Infinity",
    "1e400": "1e400",
    "-1e400": "-1e400",
    "400-digit": "1" + "0" * 399,
    "neg-400-digit": "-1" + "0" * 399,
    "5000-digit": "9" * 5000,
    "array": "[{v}]",
    "object": '{{"v":{v}}}',
    "hex-string": '"0x{v:x}"',
    "negative": "-1",
    "zero": "0",
    "leading-zeros": "0{v}",
    "plus-sign": "+{v}",
}


def _payload_with(name: str, value: str) -> str:
    now = int(time.time())
    base = {"iss": ISSUER, "aud": "api", "sub": "user-1", "iat": now, "exp": now + 600}
    base.pop(name, None)
    head = json.dumps(base)[:-1]
    return head + f', "{name}": {value}' + "}"


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("shape", sorted(BAD_NUMBERS))
async def test_numeric_claims_must_be_finite_json_numbers(gw, backend, rsa_key, claim, shape):
    """RFC 7519 §2 NumericDate; contract: never NaN, Infinity, 1e400, strings or booleans."""
    now = int(time.time())
    v = now + 600 if claim == "exp" else now - 10
    text = BAD_NUMBERS[shape].format(v=v)
    token = signed(rsa_key, {"alg": "RS256", "kid": rsa_key.kid}, _payload_with(claim, text))
    if shape in ("negative", "zero") and claim != "exp":
        # nbf/iat in the past are fine: these are well-formed numbers.
        assert await status_of(gw, get("/x", token)) == 200
        return
    await assert_rejected(gw, backend, token)


@pytest.mark.parametrize(("claim", "value"), [
    ("exp", lambda now: now - 3600), ("exp", lambda now: now - 31), ("nbf", lambda now: now + 3600),
    ("iat", lambda now: now + 3600), ("exp", lambda now: -(2 ** 53)), ("nbf", lambda now: 1.7976931348623157e308),
    ("exp", lambda now: 5e-324),
])
async def test_time_claims_out_of_window(gw, backend, rsa_key, claim, value):
    now = int(time.time())
    await assert_rejected(gw, backend, rsa_key.token(**{claim: value(now)}))


async def test_missing_exp_and_far_future_exp(gw, backend, rsa_key):
    await assert_rejected(gw, backend, rsa_key.token(exp=None))
    # A finite double far in the future is a valid NumericDate (max_lifetime is 0 here).
    assert await status_of(gw, get("/x", rsa_key.token(exp=1e308))) == 200


# ------------------------------------------------------------------------- aud / iss near-misses

AUD_MISSES = ["ap", "apii", "api/", "/api", "API", "Api", " api", "api ", "api\u0000", "api\n", "\u0430pi",
              "", ["API"], ["api "], [], [["api"]], {"api": True}, ["other", 1], 1, True, "api,other",
              "other api", ["other"], "https://idp.test/api"]


@pytest.mark.parametrize("aud", AUD_MISSES, ids=[repr(a) for a in AUD_MISSES])
async def test_audience_near_misses(gw, backend, rsa_key, aud):
    await assert_rejected(gw, backend, rsa_key.token(aud=aud))


async def test_audience_missing_and_null(gw, backend, rsa_key):
    await assert_rejected(gw, backend, rsa_key.token(aud=None))
    await assert_rejected(gw, backend, signed(rsa_key, {"alg": "RS256", "kid": "rsa-1"},
                                              _payload_with("aud", "null")))


ISS_MISSES = [ISSUER + "/", ISSUER[:-1], ISSUER.upper(), "HTTPS://idp.test", "https://IDP.test",
              ISSUER + ".evil", "https://evil/" + ISSUER, ISSUER + "#", ISSUER + "?", ISSUER + "%2F",
              "http://idp.test", " " + ISSUER, ISSUER + " ", ISSUER + "\u0000", [ISSUER], {"iss": ISSUER},
              "", 1, True, "https://idp.test:443", "https://idp.test.", "https://idp%2etest"]


@pytest.mark.parametrize("iss", ISS_MISSES, ids=[repr(i) for i in ISS_MISSES])
async def test_issuer_near_misses(gw, backend, rsa_key, iss):
    await assert_rejected(gw, backend, rsa_key.token(iss=iss))


async def test_issuer_missing_or_null(gw, backend, rsa_key):
    await assert_rejected(gw, backend, rsa_key.token(iss=None))
    await assert_rejected(gw, backend, signed(rsa_key, {"alg": "RS256", "kid": "rsa-1"}, _payload_with("iss", "null")))


# ---------------------------------------------------------------------------------------- sub

@pytest.mark.parametrize("sub", ["", 0, 123, 1.5, True, False, [], ["alice"], {}, {"id": "alice"}],
                         ids=lambda s: repr(s))
async def test_sub_empty_or_not_a_string(gw, backend, rsa_key, sub):
    await assert_rejected(gw, backend, rsa_key.token(sub=sub))


async def test_sub_json_null_is_rejected(gw, backend, rsa_key):
    """Found by this suite (fixed in verifier.py): ``"sub": null`` was accepted as if absent."""
    await assert_rejected(gw, backend, signed(rsa_key, {"alg": "RS256", "kid": "rsa-1"}, _payload_with("sub", "null")))


@pytest.mark.parametrize("jti", ["", 0, [], {}, True], ids=repr)
async def test_jti_empty_or_not_a_string(gw, backend, rsa_key, jti):
    await assert_rejected(gw, backend, rsa_key.token(jti=jti))


# ------------------------------------------------------------------------ size and depth bounds


@pytest.fixture
async def gw_big(make_gateway, big_backend):
    """Limits raised so 100 KB tokens and 5,000-deep JSON reach the JOSE parser itself."""
    return await make_gateway(routes=ROUTES, backend_port=big_backend.port, token={"max_bytes": 400_000},
                              server={"max_header_bytes": 1_000_000})


def _deep_array(depth: int) -> str:
    return "[" * depth + "]" * depth


def _deep_object(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def _big_tokens(rsa_key) -> dict[str, str]:
    now = int(time.time())
    base = f'"iss":"{ISSUER}","aud":"api","exp":{now + 600}'
    header = '{"alg":"RS256","kid":"rsa-1"}'
    return {
        "100kb-claim": signed(rsa_key, header, "{" + base + ',"pad":"' + "x" * 100_000 + '"}'),
        "100kb-garbage": "a" * 100_000 + ".b.c",
        "100kb-signature": seg(json.loads(header)) + "." + seg("{" + base + "}") + "." + "A" * 100_000,
        "5000-deep-array-payload": signed(rsa_key, header, "{" + base + ',"x":' + _deep_array(5000) + "}"),
        "5000-deep-object-payload": signed(rsa_key, header, "{" + base + ',"x":' + _deep_object(5000) + "}"),
        "5000-deep-header": signed(rsa_key, '{"alg":"RS256","kid":"rsa-1","x":' + _deep_array(5000) + "}", "{" + base + "}"),
        "33-deep-role": signed(rsa_key, header, "{" + base + ',"role":' + _deep_array(33) + "}"),
        "50000-members": signed(rsa_key, header, "{" + base + "," + ",".join(f'"k{i}":0' for i in range(15000)) + "}"),
        "many-escapes": signed(rsa_key, header, "{" + base + ',"sub":"' + "\\u0041" * 15000 + '"}'),
    }


@pytest.mark.parametrize("name", ["100kb-claim", "100kb-garbage", "100kb-signature"])
async def test_100kb_tokens_default_limits(gw, backend, rsa_key, name):
    """Default limits: a 100 KB token is 401 (too large) or 431 (head too large), never 500."""
    token = _big_tokens(rsa_key)[name]
    started = time.monotonic()
    await assert_rejected(gw, backend, token, allowed=(401, 431))
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("name", ["100kb-claim", "100kb-garbage", "100kb-signature", "5000-deep-array-payload",
                                  "5000-deep-object-payload", "5000-deep-header", "33-deep-role", "many-escapes",
                                  "50000-members"])
async def test_huge_and_deep_tokens_raised_limits(gw_big, big_backend, rsa_key, name):
    """Limits raised: the JOSE parser itself must refuse deep JSON (bounded time, no
    RecursionError turning into 500). ``100kb-claim``/``50000-members``/``many-escapes`` are
    validly signed, well-formed JWTs: with limits raised they may pass (200) -- what matters is
    bounded time and no 5xx."""
    token = _big_tokens(rsa_key)[name]
    started = time.monotonic()
    status = await status_of(gw_big, get("/x", token), timeout=10)
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, elapsed
    if name in ("100kb-claim", "50000-members", "many-escapes"):
        assert status in (200, 401, 431), status
    else:
        assert status == 401, status


def test_parser_bounded_time_and_memory_on_deep_json():
    """Sans-I/O: 5,000-deep and 100 KB inputs are rejected in bounded time and memory."""
    inputs = [
        seg('{"alg":"RS256","x":' + _deep_array(5000) + "}") + "." + seg("{}") + ".AAAA",
        seg('{"alg":"RS256"}') + "." + seg('{"x":' + _deep_object(5000) + "}") + ".AAAA",
        seg('{"alg":"RS256"}') + "." + seg('{"x":' + _deep_array(50_000) + "}") + ".AAAA",
        "A" * 100_000,
        ("A" * 1000 + ".") * 2 + "A" * 98_000,
    ]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for token in inputs:
        started = time.monotonic()
        with pytest.raises(TokenRejected):
            parse_compact(token, 1_000_000)
        assert time.monotonic() - started < 1.0
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 200_000, grown_kb
