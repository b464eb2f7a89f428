"""Tests for jwtproxy.revocation (+ _sqlite, _redis): parser, hot-path check, both backends.

The Redis tests run a real redis-server (tests/redis_server.py) and skip when it is missing.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import textwrap
import time
import timeit
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from redis_server import RedisServer, redis_server  # noqa: E402,F401  (fixture)

from jwtproxy.config import RevocationConfig  # noqa: E402
from jwtproxy.revocation import (  # noqa: E402
    DEFAULT_JTI_TTL,
    EXPIRY_GRACE,
    MAX_TIME,
    RevocationBackendError,
    RevocationMirror,
    open_store,
    parse_revocation_request,
)
from jwtproxy.revocation.sqlite import SqliteRevocationStore  # noqa: E402

NOW = 1_800_000_000.0
REPO = Path(__file__).resolve().parent.parent


class Logs:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, message: str, *args: Any) -> None:
        self.lines.append(message % args if args else message)

    def text(self) -> str:
        return "\n".join(self.lines)


async def wait_for(pred: Callable[[], bool], timeout: float = 2.0, step: float = 0.002) -> float:
    """Seconds until pred() held; fails the test after timeout."""
    start = time.perf_counter()
    while not pred():
        if time.perf_counter() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(step)
    return time.perf_counter() - start


# -- parse_revocation_request ---------------------------------------------------------------------


def test_parse_jti_with_exp() -> None:
    assert parse_revocation_request(b'{"jti": "abc", "exp": 1800000100}', NOW) == ("jti", "abc", 1800000100.0)


def test_parse_jti_default_exp_is_seven_days() -> None:
    assert parse_revocation_request(b'{"jti": "abc"}', NOW) == ("jti", "abc", NOW + DEFAULT_JTI_TTL)
    assert DEFAULT_JTI_TTL == 7 * 24 * 3600


def test_parse_jti_exp_in_the_past_is_accepted() -> None:
    assert parse_revocation_request(b'{"jti": "abc", "exp": 5}', NOW) == ("jti", "abc", 5.0)


def test_parse_sub_with_and_without_before() -> None:
    assert parse_revocation_request(b'{"sub": "alice", "before": 1.5}', NOW) == ("sub", "alice", 1.5)
    assert parse_revocation_request(b'{"sub": "alice"}', NOW) == ("sub", "alice", NOW)


def test_parse_accepts_limits() -> None:
    assert parse_revocation_request(json.dumps({"jti": "j" * 512, "exp": MAX_TIME}).encode(), NOW)[1] == "j" * 512
    assert parse_revocation_request(b'{"sub": "\\u00e9l\\u00e8ve", "before": 0}', NOW) == ("sub", "élève", 0.0)


@pytest.mark.parametrize(("body", "message"), [
    (b"\xff\xfe", "body is not UTF-8"),
    (b"{", "body is not JSON"),
    (b"", "body is not JSON"),
    (b"[1]", "body must be a JSON object"),
    (b'"jti"', "body must be a JSON object"),
    (b'{"jti": "a", "sub": "b"}', "either jti or sub, not both"),
    (b'{"exp": 5}', "missing jti or sub"),
    (b"{}", "missing jti or sub"),
    (b'{"jti": "a", "exp": 5, "foo": 1}', "unknown member(s) for a jti revocation: 'foo'"),
    (b'{"jti": "a", "before": 5}', "unknown member(s) for a jti revocation: 'before'"),
    (b'{"sub": "a", "exp": 5}', "unknown member(s) for a sub revocation: 'exp'"),
    (b'{"jti": "a", "jti": "b"}', "duplicate member 'jti'"),
    (b'{"jti": 5}', "jti: must be a string"),
    (b'{"jti": null}', "jti: must be a string"),
    (b'{"jti": ""}', "jti: must not be empty"),
    (b'{"sub": ""}', "sub: must not be empty"),
    (json.dumps({"jti": "j" * 513}).encode(), "jti: longer than 512 characters"),
    (json.dumps({"sub": "s" * 513}).encode(), "sub: longer than 512 characters"),
    (b'{"jti": "\\ud800"}', "jti: not valid Unicode"),
    (b'{"jti": "a", "exp": true}', "exp: must be a number"),
    (b'{"jti": "a", "exp": "5"}', "exp: must be a number"),
    (b'{"jti": "a", "exp": null}', "exp: must be a number"),
    (b'{"jti": "a", "exp": NaN}', "NaN is not a JSON number"),
    (b'{"jti": "a", "exp": Infinity}', "Infinity is not a JSON number"),
    (b'{"jti": "a", "exp": 1e400}', "exp: must be a finite number"),
    (b'{"jti": "a", "exp": -1}', "exp: out of range"),
    (b'{"jti": "a", "exp": 253402300800}', "exp: out of range"),
    (b'{"sub": "a", "before": false}', "before: must be a number"),
    (b'{"sub": "a", "before": -0.5}', "before: out of range"),
    (b'{"sub": "a", "before": 1e300}', "before: out of range"),
])
def test_parse_rejects(body: bytes, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_revocation_request(body, NOW)
    assert message in str(info.value)


def test_parse_rejects_deep_nesting() -> None:
    with pytest.raises(ValueError, match="body is not JSON"):
        parse_revocation_request(b"[" * 100000, NOW)


# -- hot path -------------------------------------------------------------------------------------


def mirror(jti: dict[str, float] | None = None, sub: dict[str, float] | None = None) -> RevocationMirror:
    store = RevocationMirror(Logs())
    store._jti = dict(jti or {})
    store._sub = dict(sub or {})
    return store


def test_is_revoked_by_jti() -> None:
    s = mirror(jti={"j1": NOW + 10})
    assert s.is_revoked("j1", None, None, NOW)
    assert s.is_revoked("j1", "bob", NOW, NOW)
    assert not s.is_revoked("j2", "bob", NOW, NOW)
    assert not s.is_revoked(None, None, None, NOW)


def test_is_revoked_by_subject_before_iat() -> None:
    s = mirror(sub={"alice": 1000.0})
    assert s.is_revoked(None, "alice", 999.0, NOW)          # issued before: revoked
    assert not s.is_revoked(None, "alice", 1000.0, NOW)     # issued at `before`: valid
    assert not s.is_revoked(None, "alice", 1001.0, NOW)     # issued after: valid
    assert s.is_revoked("x", "alice", None, NOW)            # no iat: fail closed
    assert not s.is_revoked(None, "bob", 1.0, NOW)
    assert not s.is_revoked(None, None, 1.0, NOW)


def test_hot_path_cost_with_10k_entries() -> None:
    s = mirror(jti={f"jti-{i}": NOW + i for i in range(10_000)},
               sub={f"user-{i}": NOW for i in range(10_000)})
    n = 200_000
    miss = min(timeit.repeat(lambda: s.is_revoked("nope", "someone", NOW, NOW), number=n, repeat=3)) / n
    hit = min(timeit.repeat(lambda: s.is_revoked("jti-5000", "user-1", NOW, NOW), number=n, repeat=3)) / n
    sub_hit = min(timeit.repeat(lambda: s.is_revoked("nope", "user-1", NOW - 1, NOW), number=n, repeat=3)) / n
    print(f"\nis_revoked with 10k jti + 10k sub: miss {miss * 1e9:.0f} ns, jti hit {hit * 1e9:.0f} ns, "
          f"sub hit {sub_hit * 1e9:.0f} ns (incl. lambda call)")
    assert miss < 5e-6 and hit < 5e-6 and sub_hit < 5e-6


def test_open_store_picks_backend(tmp_path: Path) -> None:
    from jwtproxy.revocation.redis import RedisRevocationStore

    assert isinstance(open_store(RevocationConfig(backend="sqlite", sqlite_path=str(tmp_path / "r.db")), Logs()),
                      SqliteRevocationStore)
    assert isinstance(open_store(RevocationConfig(backend="redis", redis_url="redis://127.0.0.1:1/0"), Logs()),
                      RedisRevocationStore)
    with pytest.raises(ValueError, match="unknown revocation backend"):
        open_store(RevocationConfig(backend="memcached"), Logs())  # type: ignore[arg-type]


async def test_memory_store_validates_like_a_backend_and_stays_in_process() -> None:
    from jwtproxy.revocation.memory import MemoryRevocationStore

    store = MemoryRevocationStore()
    await store.start()
    assert store.up and store.status() == {"backend": "memory", "up": True, "jti": 0, "sub": 0}
    with pytest.raises(ValueError, match="jti: must not be empty"):
        await store.revoke_jti("", NOW)
    with pytest.raises(ValueError, match="before: must be a finite number"):
        await store.revoke_sub("bob", float("nan"))
    await store.revoke_jti("j1", NOW + 10)
    await store.revoke_jti("j1", NOW + 5)   # the larger exp stays
    await store.revoke_sub("bob", NOW)
    assert store.list() == {"jti": [{"jti": "j1", "exp": NOW + 10}], "sub": [{"sub": "bob", "before": NOW}]}
    assert store.is_revoked("j1", None, None, NOW) and store.is_revoked(None, "bob", NOW - 1, NOW)
    assert await store.unrevoke_jti("j1") and not await store.unrevoke_jti("j1")
    assert await store.unrevoke_sub("bob") and not await store.unrevoke_sub("bob")
    assert not store.is_revoked("j1", "bob", NOW - 1, NOW)
    await store.close()


# -- sqlite -------------------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "revocations.db")


@pytest.fixture
async def stores(db: str) -> AsyncIterator[Callable[..., Any]]:
    opened: list[SqliteRevocationStore] = []

    async def make(**kwargs: Any) -> SqliteRevocationStore:
        store = SqliteRevocationStore(db, kwargs.pop("log", Logs()), **kwargs)
        await store.start()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


async def test_sqlite_revoke_then_is_revoked(stores: Callable[..., Any], db: str) -> None:
    s = await stores()
    now = time.time()
    await s.revoke_jti("j1", now + 60)
    await s.revoke_sub("alice", now)
    assert s.is_revoked("j1", None, None, now)
    assert s.is_revoked(None, "alice", now - 5, now)
    assert not s.is_revoked(None, "alice", now + 5, now)
    assert s.list() == {"jti": [{"jti": "j1", "exp": now + 60}], "sub": [{"sub": "alice", "before": now}]}
    st = s.status()
    assert st["backend"] == "sqlite" and st["up"] is True and st["jti"] == 1 and st["sub"] == 1
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_sqlite_rejects_bad_arguments(stores: Callable[..., Any]) -> None:
    s = await stores()
    with pytest.raises(ValueError, match="jti: must not be empty"):
        await s.revoke_jti("", 5.0)
    with pytest.raises(ValueError, match="before: must be a finite number"):
        await s.revoke_sub("bob", float("nan"))
    assert s.list() == {"jti": [], "sub": []}


async def test_sqlite_two_stores_see_each_others_writes(stores: Callable[..., Any]) -> None:
    a = await stores()
    b = await stores()
    now = time.time()
    await a.revoke_jti("from-a", now + 60)
    delay_ab = await wait_for(lambda: b.is_revoked("from-a", None, None, now), timeout=1.0)
    await b.revoke_sub("bob", now)
    delay_ba = await wait_for(lambda: a.is_revoked(None, "bob", now - 1, now), timeout=1.0)
    assert await a.unrevoke_jti("from-a") is True
    delay_un = await wait_for(lambda: not b.is_revoked("from-a", None, None, now), timeout=1.0)
    print(f"\nsqlite propagation between two stores: {delay_ab * 1000:.0f} / {delay_ba * 1000:.0f} ms,"
          f" unrevoke {delay_un * 1000:.0f} ms")


CHILD = textwrap.dedent("""
    import asyncio, sys, time
    from jwtproxy.revocation.sqlite import SqliteRevocationStore

    async def main():
        store = SqliteRevocationStore(sys.argv[1], lambda *a: None)
        await store.start()
        await store.revoke_jti("from-child", time.time() + 60)
        print("written", flush=True)
        t0 = time.perf_counter()
        while not store.is_revoked("from-parent", None, None, time.time()):
            if time.perf_counter() - t0 > 5:
                print("timeout", flush=True)
                return
            await asyncio.sleep(0.002)
        print("seen", time.perf_counter() - t0, flush=True)
        await store.close()

    asyncio.run(main())
""")


async def test_sqlite_shared_with_another_process(stores: Callable[..., Any], db: str) -> None:
    s = await stores()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, db, stdout=subprocess.PIPE, cwd=str(REPO))
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert line.strip() == b"written"
        now = time.time()
        delay_in = await wait_for(lambda: s.is_revoked("from-child", None, None, now), timeout=1.0)
        t0 = time.perf_counter()
        await s.revoke_jti("from-parent", now + 60)
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert line.startswith(b"seen"), line
        delay_out = float(line.split()[1])
        assert delay_out < 1.0
        print(f"\nsqlite cross-process propagation: child->parent <= {delay_in * 1000:.0f} ms,"
              f" parent->child {delay_out * 1000:.0f} ms (write {(time.perf_counter() - t0) * 1000:.0f} ms"
              " incl. process pipe)")
    finally:
        if proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0


async def test_sqlite_durable_across_reopen(db: str) -> None:
    now = time.time()
    s = SqliteRevocationStore(db, Logs())
    await s.start()
    await s.revoke_jti("j1", now + 60)
    await s.revoke_sub("alice", now)
    await s.close()
    s2 = SqliteRevocationStore(db, Logs())
    await s2.start()
    try:
        assert s2.is_revoked("j1", None, None, now)
        assert s2.is_revoked(None, "alice", None, now)
    finally:
        await s2.close()


async def test_sqlite_keeps_the_larger_exp_and_before(stores: Callable[..., Any], db: str) -> None:
    a = await stores()
    await a.revoke_jti("j", 2000.0 + time.time())
    await a.revoke_jti("j", 1000.0 + time.time())
    await a.revoke_sub("s", 500.0)
    await a.revoke_sub("s", 100.0)
    with sqlite3.connect(db) as raw:
        exp = raw.execute("SELECT exp FROM revoked_jti WHERE jti='j'").fetchone()[0]
        before = raw.execute("SELECT before FROM revoked_sub WHERE sub='s'").fetchone()[0]
    assert exp > 1500.0 + time.time() and before == 500.0
    assert a.list()["jti"][0]["exp"] == exp and a.list()["sub"][0]["before"] == 500.0


async def test_sqlite_expiry_pruning(stores: Callable[..., Any], db: str) -> None:
    clock = [NOW]
    a = await stores(clock=lambda: clock[0], prune_interval=0.0, poll_interval=0.01)
    await a.revoke_jti("old", NOW - 10)            # expired, but within the grace: kept
    await a.revoke_jti("young", NOW + 100)
    await a.revoke_sub("alice", NOW - 10 * 86400)  # subjects never expire
    await asyncio.sleep(0.05)
    assert a.is_revoked("old", None, None, NOW)
    clock[0] = NOW + EXPIRY_GRACE + 50              # "old" is past exp + grace now
    await wait_for(lambda: not a.is_revoked("old", None, None, clock[0]), timeout=1.0)
    assert a.is_revoked("young", None, None, clock[0])
    assert a.is_revoked(None, "alice", None, clock[0])

    def on_disk() -> list[str]:
        with sqlite3.connect(db) as raw:
            return [r[0] for r in raw.execute("SELECT jti FROM revoked_jti")]

    await wait_for(lambda: on_disk() == ["young"], timeout=1.0)   # deleted from storage too
    # A fresh store never loads an entry past exp + grace, even if still on disk.
    with sqlite3.connect(db) as raw:
        raw.execute("INSERT INTO revoked_jti VALUES ('stale', ?)", (NOW - 10,))
    b = await stores(clock=lambda: clock[0])
    assert not b.is_revoked("stale", None, None, clock[0])
    assert b.is_revoked("young", None, None, clock[0])


async def test_sqlite_unrevoke(stores: Callable[..., Any]) -> None:
    a = await stores()
    b = await stores()
    now = time.time()
    await a.revoke_jti("j", now + 60)
    await a.revoke_sub("alice", now)
    await wait_for(lambda: b.is_revoked(None, "alice", None, now), timeout=1.0)
    assert await b.unrevoke_sub("alice") is True
    assert await b.unrevoke_sub("alice") is False
    assert await b.unrevoke_jti("j") is True
    assert await b.unrevoke_jti("j") is False
    assert not b.is_revoked("j", "alice", None, now)
    await wait_for(lambda: not a.is_revoked("j", "alice", None, now), timeout=1.0)


async def test_sqlite_poll_failure_keeps_mirror(stores: Callable[..., Any],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    logs = Logs()
    a = await stores(log=logs, poll_interval=0.01)
    await a.revoke_jti("j", time.time() + 60)

    def broken() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(a, "_poll", broken)
    await wait_for(lambda: a.status()["up"] is False, timeout=1.0)
    assert a.up is False   # what the supervisor's jwtproxy_revocation_backend_up reads
    assert a.is_revoked("j", None, None, time.time())
    assert "disk I/O error" in a.status()["last_error"] and "sqlite poll failed" in logs.text()
    monkeypatch.undo()
    await wait_for(lambda: a.status()["up"] is True, timeout=1.0)
    assert a.up is True


async def test_sqlite_write_failure_raises(stores: Callable[..., Any], db: str) -> None:
    a = await stores()
    with sqlite3.connect(db, timeout=0.1) as raw:   # hold the write lock
        raw.execute("BEGIN IMMEDIATE")
        a_conn = a._conn
        assert a_conn is not None
        await a._run(a_conn.execute, "PRAGMA busy_timeout=50")
        with pytest.raises(RevocationBackendError, match="sqlite write failed"):
            await a.revoke_jti("j", time.time() + 60)
        raw.execute("ROLLBACK")
    assert not a.is_revoked("j", None, None, time.time())   # nothing half-done
    await a.close()
    with pytest.raises(RevocationBackendError, match="not open"):
        await a.revoke_jti("j", time.time() + 60)


async def test_sqlite_unopenable_database(tmp_path: Path) -> None:
    s = SqliteRevocationStore(str(tmp_path / "missing-dir" / "r.db"), Logs())
    with pytest.raises(RevocationBackendError, match="cannot open revocation database"):
        await s.start()


# -- redis --------------------------------------------------------------------------------------

FAST: dict[str, Any] = dict(backoff_min=0.05, backoff_max=0.3, command_timeout=1.0, start_timeout=2.0)


@pytest.fixture
async def nodes(redis_server: RedisServer) -> AsyncIterator[Callable[..., Any]]:
    from jwtproxy.revocation.redis import RedisRevocationStore

    opened: list[RedisRevocationStore] = []

    async def make(**kwargs: Any) -> RedisRevocationStore:
        options = {**FAST, **kwargs}
        store = RedisRevocationStore(redis_server.url, options.pop("log", Logs()), **options)
        await store.start()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Any]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


async def test_redis_propagation_between_nodes(nodes: Callable[..., Any], raw: Any) -> None:
    a = await nodes()
    b = await nodes()
    assert a.status()["up"] and b.status()["synced"]
    now = time.time()
    t0 = time.perf_counter()
    await a.revoke_jti("j1", now + 60)
    write = time.perf_counter() - t0
    assert a.is_revoked("j1", None, None, now)            # own mirror at once
    delay_jti = await wait_for(lambda: b.is_revoked("j1", None, None, now), timeout=1.0) + write
    t0 = time.perf_counter()
    await b.revoke_sub("alice", now)
    await wait_for(lambda: a.is_revoked(None, "alice", now - 1, now), timeout=1.0)
    delay_sub = time.perf_counter() - t0
    print(f"\nredis propagation node->node: jti {delay_jti * 1000:.1f} ms (write {write * 1000:.1f} ms),"
          f" sub {delay_sub * 1000:.1f} ms")
    assert await raw.get("jwtproxy:rev:jti:j1") == repr(now + 60)
    assert await raw.hget("jwtproxy:rev:sub", "alice") == repr(now)
    expire_ms = await raw.pexpiretime("jwtproxy:rev:jti:j1")
    assert abs(expire_ms - (now + 60 + EXPIRY_GRACE) * 1000) < 2
    assert await raw.pexpiretime("jwtproxy:rev:sub") == -1      # subjects do not expire
    assert a.list() == b.list() == {"jti": [{"jti": "j1", "exp": now + 60}],
                                    "sub": [{"sub": "alice", "before": now}]}
    assert await a.unrevoke_jti("j1") is True
    assert await b.unrevoke_sub("alice") is True
    await wait_for(lambda: not b.is_revoked("j1", None, None, now)
                   and not a.is_revoked(None, "alice", None, now), timeout=1.0)
    assert await a.unrevoke_jti("j1") is False
    assert await a.unrevoke_sub("alice") is False
    assert await raw.exists("jwtproxy:rev:jti:j1") == 0


async def test_redis_keeps_the_larger_exp_and_before(nodes: Callable[..., Any], raw: Any) -> None:
    a = await nodes()
    now = time.time()
    await a.revoke_jti("j", now + 200)
    await a.revoke_jti("j", now + 100)
    await a.revoke_sub("s", 500.0)
    await a.revoke_sub("s", 100.0)
    assert float(await raw.get("jwtproxy:rev:jti:j")) == now + 200
    assert float(await raw.hget("jwtproxy:rev:sub", "s")) == 500.0
    assert a.list() == {"jti": [{"jti": "j", "exp": now + 200}], "sub": [{"sub": "s", "before": 500.0}]}


async def test_redis_outage_and_empty_restart(nodes: Callable[..., Any], raw: Any,
                                              redis_server: RedisServer) -> None:
    logs = Logs()
    a = await nodes(log=logs)
    b = await nodes()
    now = time.time()
    await a.revoke_jti("j1", now + 60)
    await a.revoke_sub("alice", now)
    # Both, each on its own (one call with both would hold as soon as the jti arrived, before
    # the subject's revocation reached b's mirror).
    await wait_for(lambda: b.is_revoked("j1", None, None, now) and b.is_revoked(None, "alice", now - 1, now),
                   timeout=1.0)

    redis_server.stop()
    await wait_for(lambda: not a.status()["up"] and not b.status()["up"], timeout=2.0)
    st = b.status()
    assert st["connected"] is False and st["down_since"] is not None and st["last_error"]
    assert "unreachable" in logs.text() and "enforcing the last 1 jti / 1 sub" in logs.text()
    # The mirror keeps being enforced.
    assert b.is_revoked("j1", None, None, now) and b.is_revoked(None, "alice", now - 1, now)
    # A revocation during the outage fails loudly and changes nothing (it is not queued).
    with pytest.raises(RevocationBackendError, match="redis unreachable, revoke_jti not recorded"):
        await a.revoke_jti("during-outage", now + 60)
    with pytest.raises(RevocationBackendError):
        await a.unrevoke_jti("j1")
    assert not a.is_revoked("during-outage", None, None, now)
    assert a.is_revoked("j1", None, None, now)

    redis_server.start()                                  # back, but EMPTY
    t0 = time.perf_counter()
    await wait_for(lambda: a.status()["up"] and b.status()["up"], timeout=3.0)
    await wait_for(lambda: a.status()["writebacks"] + b.status()["writebacks"] >= 1, timeout=3.0)
    print(f"\nredis back after outage: nodes up and written back in {(time.perf_counter() - t0) * 1000:.0f} ms")
    assert "wrote back" in logs.text() or b.status()["writebacks"] >= 1
    c = await nodes()                                     # a third, fresh node
    assert c.is_revoked("j1", None, None, now) and c.is_revoked(None, "alice", now - 1, now)
    assert await raw.exists("jwtproxy:rev:jti:j1") == 1
    # And the nodes keep propagating after the restart.
    await c.revoke_jti("after", now + 60)
    await wait_for(lambda: a.is_revoked("after", None, None, now) and b.is_revoked("after", None, None, now),
                   timeout=1.0)


async def test_redis_fresh_node_after_restart_learns_write_back(nodes: Callable[..., Any],
                                                                 redis_server: RedisServer) -> None:
    # The fresh node connects to the empty Redis *before* the old node has written back: the
    # "resync" message after the write-back makes it reload.
    a = await nodes(backoff_min=0.5, backoff_max=0.5)
    now = time.time()
    await a.revoke_jti("j1", now + 60)
    redis_server.restart()
    c = await nodes()
    await wait_for(lambda: c.is_revoked("j1", None, None, now), timeout=3.0)


async def test_redis_start_while_down_then_up(redis_server: RedisServer) -> None:
    from jwtproxy.revocation.redis import RedisRevocationStore

    redis_server.stop()
    logs = Logs()
    s = RedisRevocationStore(redis_server.url, logs, **{**FAST, "start_timeout": 0.3})
    t0 = time.perf_counter()
    await s.start()                                       # does not raise, does not hang
    try:
        assert time.perf_counter() - t0 < 1.0
        st = s.status()
        assert st["up"] is False and st["synced"] is False and "not reachable at start" in logs.text()
        assert s.up is False
        with pytest.raises(RevocationBackendError):
            await s.revoke_sub("bob", 1.0)
        redis_server.start()
        await wait_for(lambda: s.status()["up"], timeout=3.0)
        assert s.up is True
        await s.revoke_sub("bob", 1.0)
        assert s.is_revoked(None, "bob", 0.5, time.time())
    finally:
        await s.close()


async def test_redis_expiry_at_exp(nodes: Callable[..., Any], raw: Any) -> None:
    a = await nodes(grace=0.0, resync_interval=0.2)
    now = time.time()
    await a.revoke_jti("short", now + 0.3)
    await a.revoke_jti("long", now + 60)
    assert await raw.exists("jwtproxy:rev:jti:short") == 1
    await wait_for(lambda: not a.is_revoked("short", None, None, time.time()), timeout=2.0)
    assert await raw.exists("jwtproxy:rev:jti:short") == 0          # Redis expired it at exp
    assert a.is_revoked("long", None, None, time.time())
    await a.revoke_jti("dead", now - 5)                  # past exp + grace: nothing to store
    assert await raw.exists("jwtproxy:rev:jti:dead") == 0 and not a.is_revoked("dead", None, None, now)


async def test_redis_ignores_malformed_messages(nodes: Callable[..., Any], raw: Any) -> None:
    logs = Logs()
    a = await nodes(log=logs)
    for junk in ("not json", "[1]", '{"op": "drop_all"}', '{"op": "jti", "jti": "", "exp": 5}',
                 '{"op": "jti", "jti": "x", "exp": "soon"}'):
        await raw.publish("jwtproxy:rev:events", junk)
    await raw.publish("jwtproxy:rev:events", json.dumps({"op": "jti", "jti": "ok", "exp": time.time() + 60}))
    await wait_for(lambda: a.is_revoked("ok", None, None, time.time()), timeout=1.0)
    assert a.status()["up"] is True
    assert logs.text().count("ignored a malformed message") == 5
    assert not a.is_revoked("x", None, None, time.time())


async def test_redis_status_never_shows_password(redis_server: RedisServer) -> None:
    from jwtproxy.revocation.redis import RedisRevocationStore, redact_url

    assert redact_url("redis://user:s3cret@db.example:6380/2") == "redis://db.example:6380/2"
    s = RedisRevocationStore(f"redis://:s3cret@127.0.0.1:{redis_server.port}/0", Logs())
    assert "s3cret" not in json.dumps(s.status())


def test_seed_widens_the_mirror_and_skips_malformed_entries() -> None:
    """What a worker inherits from the supervisor at fork (used while the backend is away)."""
    from jwtproxy.revocation.sqlite import SqliteRevocationStore

    store = SqliteRevocationStore(":memory:", lambda *a: None)
    store.seed({"jti": [{"jti": "a", "exp": 100.0}, {"jti": "", "exp": 1.0}, {"exp": 5}],
                "sub": [{"sub": "alice", "before": 50.0}, {"sub": "bob", "before": "soon"}]})
    store.seed({"jti": [{"jti": "a", "exp": 10.0}], "sub": [{"sub": "alice", "before": 70.0}]})
    assert store.list() == {"jti": [{"jti": "a", "exp": 100.0}], "sub": [{"sub": "alice", "before": 70.0}]}
    assert store.is_revoked("a", None, None, 0.0)
    assert store.is_revoked(None, "alice", 60.0, 0.0)
    assert not store.is_revoked(None, "bob", None, 0.0)
