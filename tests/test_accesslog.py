"""Access log and event lines: format, disabled mode, and the credential guard."""

from __future__ import annotations

import io
import json
import re

import pytest

from jwtproxy.accesslog import AccessLog, check_field_names, iso_utc, log_event

RECORD = {
    "request_id": "3f2a9c1e", "method": "GET", "path": "/payments/42", "status": 200,
    "route": "/payments", "upstream": "payments", "duration": 0.0023, "sub": "user-1",
    "jti": "abc", "auth": "ok", "bytes_in": 0, "bytes_out": 512, "client": "192.0.2.7",
}


def test_one_compact_json_line_with_utc_time() -> None:
    out = io.StringIO()
    AccessLog(True, out).write(dict(RECORD))
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    assert ", " not in text and '": ' not in text          # compact separators
    line = json.loads(text)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    assert list(line)[0] == "time"
    assert {k: v for k, v in line.items() if k != "time"} == RECORD


def test_iso_utc() -> None:
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"
    assert iso_utc(1_700_000_001.999) == "2023-11-14T22:13:21.999Z"


def test_disabled_is_a_noop() -> None:
    out = io.StringIO()
    log = AccessLog(False, out)
    assert log.enabled is False
    log.write(dict(RECORD, token="x"))    # not even the guard runs: nothing is written
    assert out.getvalue() == ""


def test_query_string_never_logged() -> None:
    out = io.StringIO()
    AccessLog(True, out).write({"path": "/p?access_token=eyJhbGciOi.x.y", "status": 401})
    assert json.loads(out.getvalue())["path"] == "/p"
    assert "eyJ" not in out.getvalue()


@pytest.mark.parametrize("name", ["token", "Authorization", "secret", "password",
                                  "access_token", "hs_secret", "admin-token", "db_password"])
def test_guard_refuses_credential_fields(name: str) -> None:
    out = io.StringIO()
    with pytest.raises(ValueError, match="credential"):
        AccessLog(True, out).write({"path": "/", name: "s3cr3t"})
    assert out.getvalue() == ""
    with pytest.raises(ValueError, match="credential"):
        log_event("reload", **{name: "s3cr3t"})


def test_guard_allows_harmless_names_and_checks_nested() -> None:
    check_field_names({"token_cache": 1, "tokens_total": 2, "jti": "a", "sub": "b"})
    with pytest.raises(ValueError):
        check_field_names({"detail": {"issuer": "corp", "hs_secret": "x"}})


def test_log_event_line(capsys: pytest.CaptureFixture[str]) -> None:
    log_event("worker_died", level="error", worker=2, pid=1234, status="signal SIGKILL")
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    line = json.loads(err)
    assert line["level"] == "error" and line["event"] == "worker_died"
    assert line["worker"] == 2 and line["pid"] == 1234 and line["status"] == "signal SIGKILL"
    log_event("ready")
    assert json.loads(capsys.readouterr().err)["level"] == "info"


def test_unserialisable_values_do_not_break_logging() -> None:
    out = io.StringIO()
    AccessLog(True, out).write({"path": "/", "client": ("192.0.2.1", 5555), "x": object()})
    assert json.loads(out.getvalue())["client"] == ["192.0.2.1", 5555]
