"""headerpolicy.response_head: what of an upstream's response head reaches the client."""
from __future__ import annotations

from jwtproxy import codec
from jwtproxy.codec import connection_tokens, header_tokens
from jwtproxy.headerpolicy import response_head


def _names(head: bytes) -> list[bytes]:
    lines = head.split(b"\r\n")[1:]
    return [line.split(b":", 1)[0] for line in lines if line]


def test_headers_named_by_connection_and_hop_by_hop_ones_are_dropped() -> None:
    headers = [
        (b"connection", b"Keep-Alive, X-Secret"),
        (b"keep-alive", b"timeout=5"),
        (b"x-secret", b"upstream-internal"),
        (b"connection", b"x-other"),  # a second Connection header names more
        (b"x-other", b"1"),
        (b"content-type", b"text/plain"),
        (b"content-length", b"999"),  # the gateway frames the body itself
        (b"x-request-id", b"from-upstream"),
    ]
    for _ in range(2):  # the second time the Connection values come from the memo
        head = response_head(b"1.1", 200, b"OK", headers, b"rid-1", b"content-length: 2\r\n", True, False)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert _names(head) == [b"content-type", b"x-request-id", b"content-length"], head
        assert b"x-request-id: rid-1\r\n" in head and b"from-upstream" not in head
        assert head.endswith(b"content-length: 2\r\n\r\n")


def test_connection_close_and_http10_keep_alive_are_the_gateways_own() -> None:
    headers = [(b"connection", b"close"), (b"x-a", b"1")]
    closing = response_head(b"1.1", 200, b"OK", headers, b"r", b"", False, False)
    assert _names(closing) == [b"x-a", b"x-request-id", b"connection"] and b"connection: close\r\n" in closing
    http10 = response_head(b"1.1", 200, b"OK", headers, b"r", b"", True, True)
    assert b"connection: keep-alive\r\n" in http10 and b"close" not in http10


def test_connection_tokens_agree_with_header_tokens_and_the_memo_is_bounded() -> None:
    for i in range(3 * codec._TOKENS_MEMO_LIMIT):
        value = b"Keep-Alive , X-H%d" % i
        assert connection_tokens(value) == header_tokens(value) == {b"keep-alive", b"x-h%d" % i}
        assert connection_tokens(value) == header_tokens(value)  # memoised or not, the same
    assert len(codec._TOKENS_MEMO) <= codec._TOKENS_MEMO_LIMIT
