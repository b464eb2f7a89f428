"""Sender-constrained tokens: does this request prove possession of what its token is bound to?

Theory of operation
-------------------
A token's ``cnf`` claim (RFC 7800) binds it to a key (``jkt``, DPoP, RFC 9449 §6.1) or to a
client certificate (``x5t#S256``, RFC 8705 §3.1). :func:`read_confirmation` reads it once, when
the token is verified, and the verdict cache keeps the result, so a cache hit still knows the
binding. :func:`enforce` then runs on **every** request, cached or not, against what the request
presents (:class:`Presentation`: the ``Authorization`` scheme, the ``DPoP`` headers, the method
and URI, the client certificate's thumbprint). Sans-I/O: the shell gathers the presentation, this
module decides.

====================================================  ==========================  ==============
case                                                  ``reason``                  error
====================================================  ==========================  ==============
``cnf`` not an object, ``jkt``/``x5t#S256`` not a     bad_claim                   invalid_token
non-empty string (at verification)
``cnf`` with neither member (a confirmation method    unsupported_binding         invalid_token
we cannot check: never treated as unbound)
``jkt`` token without ``Authorization: DPoP``         binding_dpop_scheme         invalid_token
(the downgrade to ``Bearer``, or another source)
``jkt`` token, no ``DPoP`` header                     binding_dpop_missing        invalid_token
``jkt`` token, two or more ``DPoP`` headers           dpop_multiple               invalid_dpop_proof
``jkt`` token, proof fails (:mod:`jwtproxy.dpop`)     dpop_*                      invalid_dpop_proof
                                                                                  / use_dpop_nonce
``Authorization: DPoP`` with a token without ``jkt``  binding_not_dpop            invalid_token
``x5t#S256`` token, no client certificate             binding_cert_missing        invalid_token
``x5t#S256`` token, another certificate               binding_cert_mismatch       invalid_token
unbound token where ``token_binding = "require"``     binding_required            invalid_token
====================================================  ==========================  ==============

A token bound both ways must pass both checks. Failures about DPoP (first seven rows) are
answered with a ``DPoP`` challenge (``dpop = True``), the others with the ``Bearer`` one.

What passes with a DPoP proof returns the :class:`~jwtproxy.dpop.AcceptedProof`: its ``jti`` is
not yet recorded as used, which the caller does last (:mod:`jwtproxy.dpopreplay`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from jwtproxy.dpop import AcceptedProof, DPoPPolicy, ProofChecker, ProofRejected, request_htu
from jwtproxy.jose import TokenRejected
from jwtproxy.mtls import binding_matches

__all__ = [
    "BEARER",
    "FAILURE_REASONS",
    "UNBOUND",
    "BindingRejected",
    "Confirmation",
    "Presentation",
    "enforce",
    "read_confirmation",
    "request_presentation",
]

INVALID_TOKEN: Final = "invalid_token"
INVALID_DPOP_PROOF: Final = "invalid_dpop_proof"

#: Every ``reason`` (``jwtproxy_auth_failures_total{reason}``) sender-constrained tokens add: the
#: proof checks of :mod:`jwtproxy.dpop`, the binding table above, and the replay guards.
FAILURE_REASONS: Final = (
    "dpop_malformed", "dpop_typ", "dpop_alg", "dpop_jwk", "dpop_signature", "dpop_key_mismatch",
    "dpop_jti", "dpop_htm", "dpop_htu", "dpop_iat", "dpop_ath", "dpop_nonce", "dpop_multiple",
    "dpop_replay", "dpop_replay_unavailable", "unsupported_binding", "binding_dpop_scheme",
    "binding_dpop_missing", "binding_not_dpop", "binding_cert_missing", "binding_cert_mismatch",
    "binding_required",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Confirmation:
    """What a token is bound to: a DPoP key thumbprint, a certificate thumbprint, both or none."""

    jkt: str | None = None
    x5t_s256: str | None = None

    @property
    def bound(self) -> bool:
        return self.jkt is not None or self.x5t_s256 is not None


UNBOUND: Final = Confirmation()


def _member(cnf: Mapping[str, Any], name: str) -> str | None:
    if name not in cnf:
        return None
    value = cnf[name]
    if not isinstance(value, str) or not value:
        raise TokenRejected("bad_claim", f"cnf {name} is not a non-empty string")
    return value


def read_confirmation(claims: Mapping[str, Any]) -> Confirmation:
    """The binding of verified ``claims``; raises :class:`TokenRejected` for a ``cnf`` we cannot
    honour (see the module table)."""
    if "cnf" not in claims:
        return UNBOUND
    cnf = claims["cnf"]
    if not isinstance(cnf, dict):
        raise TokenRejected("bad_claim", "cnf claim is not an object")
    jkt = _member(cnf, "jkt")
    x5t = _member(cnf, "x5t#S256")
    if jkt is None and x5t is None:
        raise TokenRejected("unsupported_binding", "token is bound by an unsupported confirmation method")
    return Confirmation(jkt, x5t)


@dataclass(frozen=True, slots=True)
class Presentation:
    """What one request offers as proof of possession.

    ``dpop_scheme``: the token came as ``Authorization: DPoP``. ``proofs``: every ``DPoP`` header
    value, in order. ``htu``: the request URI normalised by :func:`jwtproxy.dpop.request_htu`
    (None when it has none that could match). ``cert``: the SHA-256 thumbprint of the client
    certificate (own TLS, or a trusted proxy's header), None without one.
    """

    dpop_scheme: bool = False
    proofs: tuple[str, ...] = ()
    method: str = ""
    htu: str | None = None
    cert: str | None = None


#: A request that presents nothing but its token (the common case).
BEARER: Final = Presentation()


def request_presentation(
    *,
    method: bytes,
    target: bytes,
    scheme: bytes,
    authority: bytes | None,
    dpop_scheme: bool,
    proofs: tuple[str, ...],
    cert: str | None,
) -> Presentation:
    """The presentation of one request, as a shell sees it: ``target`` as sent (origin- or
    absolute-form), ``scheme`` and ``authority`` as the client addressed them (the listener and
    ``Host``, or what a trusted proxy said). :data:`BEARER` when there is nothing to present."""
    if not dpop_scheme and not proofs and cert is None:
        return BEARER
    htu: str | None = None
    if proofs and authority:
        path = target.split(b"?", 1)[0]
        if not path.startswith(b"/"):  # absolute-form: the path follows the authority
            rest = path.partition(b"://")[2]
            slash = rest.find(b"/")
            path = rest[slash:] if slash >= 0 else b""
        htu = request_htu(scheme.decode("latin-1"), authority.decode("latin-1"), path.decode("latin-1"))
    return Presentation(dpop_scheme, proofs, method.decode("latin-1"), htu, cert)


class BindingRejected(Exception):
    """A request that does not prove possession: 401 with ``error``; ``dpop`` chooses the
    ``DPoP`` challenge (else ``Bearer``). ``description`` is fixed text."""

    __slots__ = ("reason", "description", "error", "dpop")

    def __init__(self, reason: str, description: str, error: str = INVALID_TOKEN, dpop: bool = False) -> None:
        super().__init__(f"{reason}: {description}")
        self.reason = reason
        self.description = description
        self.error = error
        self.dpop = dpop


def enforce(
    cnf: Confirmation,
    presented: Presentation,
    *,
    require: bool,
    token: str,
    now: float,
    policy: DPoPPolicy,
    checker: ProofChecker,
) -> AcceptedProof | None:
    """Check ``presented`` against ``cnf`` (module table). ``require``: the effective
    ``token_binding`` is ``"require"``. Returns the accepted DPoP proof (None when the token is
    not DPoP-bound); raises :class:`BindingRejected`."""
    accepted: AcceptedProof | None = None
    jkt = cnf.jkt
    if jkt is not None:
        if not presented.dpop_scheme:
            raise BindingRejected("binding_dpop_scheme", "DPoP-bound token must be sent with the DPoP scheme", dpop=True)
        proofs = presented.proofs
        if not proofs:
            raise BindingRejected("binding_dpop_missing", "DPoP proof missing", dpop=True)
        if len(proofs) > 1:
            raise BindingRejected("dpop_multiple", "more than one DPoP header", INVALID_DPOP_PROOF, dpop=True)
        try:
            accepted = checker.check(
                proofs[0], method=presented.method, htu=presented.htu, token=token, jkt=jkt, now=now, policy=policy
            )
        except ProofRejected as exc:
            raise BindingRejected(exc.reason, exc.description, exc.error, dpop=True) from None
    elif presented.dpop_scheme:
        raise BindingRejected("binding_not_dpop", "token sent with the DPoP scheme is not DPoP-bound", dpop=True)
    x5t = cnf.x5t_s256
    if x5t is not None:
        if presented.cert is None:
            raise BindingRejected("binding_cert_missing", "client certificate required by the token binding")
        if not binding_matches(x5t, presented.cert):
            raise BindingRejected("binding_cert_mismatch", "client certificate does not match the token binding")
    elif jkt is None and require:
        raise BindingRejected("binding_required", "token is not sender-constrained")
    return accepted
