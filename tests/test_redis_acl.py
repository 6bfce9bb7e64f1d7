"""Redis through the real server: nobody logs in as the default user, each process's user may do
its job and nothing more, and Redis' files are its service user's alone."""

from __future__ import annotations

import pwd
import socket
import stat
from pathlib import Path

import pytest
import redis

from hvs.keys import FX_KEY, usage_key
from ingestion.stream import open_consumer, open_producer, stream_key
from ops.stack.process import is_root


def client(stack, role: str, db: int = 0) -> redis.Redis:
    return redis.Redis.from_url(stack.settings.redis_url_for(role, db))


def test_a_client_that_does_not_log_in_gets_noauth(stack) -> None:
    with socket.create_connection((stack.settings.host, stack.settings.redis_port), 5) as sock:
        sock.sendall(b"GET anything\r\nKEYS *\r\n")
        replies = b""
        while replies.count(b"\r\n") < 2:
            replies += sock.recv(4096)
    assert [r.split()[0] for r in replies.splitlines()] == [b"-NOAUTH", b"-NOAUTH"]
    anonymous = redis.Redis(host=stack.settings.host, port=stack.settings.redis_port, protocol=2)
    with pytest.raises(redis.AuthenticationError):  # redis-py's name for NOAUTH
        anonymous.get("anything")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(
            f"redis://default:x@{stack.settings.host}:{stack.settings.redis_port}/0"
        ).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(
            f"redis://api:wrong@{stack.settings.host}:{stack.settings.redis_port}/0"
        ).ping()


def test_the_api_user_reads_usage_and_cannot_write_or_look_around(stack, redis_client) -> None:
    key = usage_key("27831234567", "20240101")
    redis_client.hset(key, "data:video:ev", 3)
    redis_client.hset(FX_KEY, "2024010100:USDZAR:n", 1)
    api = client(stack, "api")
    assert api.ping()
    assert api.hgetall(key) == {b"data:video:ev": b"3"}
    denied = [
        lambda: api.hset(key, "data:video:ev", 99),
        lambda: api.hincrby(key, "data:video:ev", 1),
        lambda: api.delete(key),
        lambda: api.expire(key, 1),
        lambda: api.set("hvs:other", 1),
        lambda: api.hgetall(FX_KEY),  # not a usage key
        lambda: api.keys("*"),
        lambda: api.scan(0),
        lambda: api.flushdb(),
        lambda: api.config_get("*"),
        lambda: api.xadd(stream_key("cdr-data"), {"v": "x"}),
        lambda: api.eval("return redis.call('hset', KEYS[1], 'f', 1)", 1, key),
    ]
    for attempt in denied:
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    assert redis_client.hgetall(key) == {b"data:video:ev": b"3"}


def test_each_process_user_may_do_its_job_and_no_more(stack, redis_client) -> None:
    cdr, ticks = stream_key("cdr-data"), stream_key("tick-data")
    loader = client(stack, "cdr_loader", 1)
    loader.xadd(cdr, {"v": "1"})
    # retention by time: the groups' positions, then XADD with MINID (ingestion.stream)
    with open_producer(stack.settings.redis_url_for("cdr_loader", 1), trim_interval=0) as p:
        p.publish("cdr-data", b"2")
        assert p.trim_floor("cdr-data") is not None
    for attempt in (
        lambda: loader.xadd(ticks, {"v": "1"}),
        lambda: loader.xinfo_groups(ticks),
        lambda: loader.xrange(cdr),
        lambda: loader.delete(cdr),
        lambda: loader.xtrim(cdr, maxlen=0),
        lambda: loader.xtrim(cdr, minid="0-1"),
        lambda: loader.xinfo_stream(cdr),
        lambda: client(stack, "cdr_loader").hset(usage_key("1", "20240101"), "f", 1),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()

    client(stack, "sources", 1).xadd(ticks, {"v": "1"})
    sink = client(stack, "tick_sink", 1)
    sink.xgroup_create(ticks, "g", id="0")
    entries = sink.xreadgroup("g", "c", {ticks: ">"})
    assert len(entries[0][1]) == 1
    assert sink.xack(ticks, "g", entries[0][1][0][0]) == 1
    # a consumer removes consumers that are gone with a script: only its own rights inside
    admin = redis.Redis.from_url(stack.stream_url)
    admin.xgroup_createconsumer(ticks, "g", "gone")
    admin.close()
    with open_consumer(
        stack.settings.redis_url_for("tick_sink", 1), ["tick-data"], "g", gone_after_ms=0
    ) as consumer:
        assert consumer.poll(max_messages=10, timeout=0.05) == []
    assert "gone" not in {c["name"].decode() for c in sink.xinfo_consumers(ticks, "g")}
    for attempt in (
        lambda: sink.xadd(ticks, {"v": "2"}),
        lambda: sink.xgroup_create(cdr, "g", id="0"),
        lambda: sink.xdel(ticks, entries[0][1][0][0]),
        lambda: sink.eval("return 1", 1, cdr),
        lambda: client(stack, "tick_sink").hset(FX_KEY, "f", 1),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    for script in (  # inside a script, the same rights as outside
        "return redis.call('XADD', KEYS[1], '*', 'v', 1)",
        "return redis.call('XTRIM', KEYS[1], 'MAXLEN', 0)",
        "return redis.call('DEL', KEYS[1])",
    ):
        with pytest.raises(redis.exceptions.ResponseError, match="can't run this command"):
            sink.eval(script, 1, ticks)
    check = redis.Redis.from_url(stack.stream_url)
    assert check.xlen(ticks) == 1
    check.close()

    hvs = client(stack, "hvs")
    key = usage_key("27831234567", "20240101")
    hvs.hincrby(key, "data:video:ev", 1)
    hvs.expire(key, 60)
    hvs.setbit("hvs:seen:f.csv", 3, 1)
    assert hvs.eval("return redis.call('HINCRBY', KEYS[1], 'f', 2)", 1, FX_KEY) == 2
    hvs_stream = client(stack, "hvs", 1)
    hvs_stream.xgroup_create(cdr, "hvs", id="0")
    assert hvs_stream.xreadgroup("hvs", "c", {cdr: ">"})
    for attempt in (
        lambda: hvs.set("other", 1),
        lambda: hvs.eval("return redis.call('SET', KEYS[1], 1)", 1, "other"),
        lambda: hvs.flushdb(),
        lambda: hvs.keys("*"),
        lambda: hvs_stream.xadd(cdr, {"v": "x"}),
        lambda: hvs.config_set("appendonly", "no"),
        lambda: hvs.acl_list(),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()


@pytest.mark.skipif(not is_root(), reason="service users exist only when the stack runs as root")
def test_redis_files_are_its_service_users_alone(stack, redis_client) -> None:
    redis_client.hset(usage_key("1", "20240101"), "f", 1)
    redis_client.bgrewriteaof()
    s = stack.settings
    owner = pwd.getpwnam(s.redis_os_user)
    assert s.redis_os_user != s.pg_os_user
    redis_dir = stack.stack.redis_dir
    paths = [p for p in redis_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".aof" for p in paths), paths
    assert "appendonlydir" in {p.parent.name for p in paths}
    for path in [redis_dir, *redis_dir.rglob("*")]:
        st = path.stat()
        assert st.st_uid == owner.pw_uid, path
        assert stat.S_IMODE(st.st_mode) & 0o077 == 0, (path, oct(st.st_mode))
    pid = (redis_dir / "redis.pid").read_text().strip()
    assert Path(f"/proc/{pid}").stat().st_uid == owner.pw_uid  # the server runs as that user


def test_the_users_file_names_the_keys_the_code_uses() -> None:
    """contracts/redis_users.acl writes its key patterns out; they are the ones the HVS key
    layout and the stream backend make (a renamed prefix or topic fails here first)."""
    from hvs.keys import PREFIX
    from ingestion.cdr_publish import CDR_DATA_TOPIC, CDR_VOICE_TOPIC
    from ops.stack.redis_acl import RULES

    def keys(user: str) -> set[str]:
        return {w.lstrip("(%RW~") for w in RULES[user].split() if "~" in w}

    cdr = {stream_key(CDR_DATA_TOPIC), stream_key(CDR_VOICE_TOPIC)}
    assert keys("hvs") == {PREFIX + "*", *cdr, stream_key("tick-data")}
    assert keys("api") == {usage_key("*", "*")}
    assert keys("cdr_loader") == cdr
    assert keys("tick_sink") == keys("sources") == {stream_key("tick-data")}
    assert keys("exporter") == set()
    assert RULES["admin"] == "~* &* +@all"


def test_what_scripts_wrote_survives_a_restart_and_nobody_logs_in_as_default(
    stack, redis_client
) -> None:
    """Redis replays its append-only file as `default` and re-checks that user's rights at each
    replayed EXEC: a `default` user that is off dropped every multi-write script's effects."""
    hvs = client(stack, "hvs")
    keys = [usage_key("27830000001", "20240101"), usage_key("27830000002", "20240101")]
    hvs.delete(*keys)
    two_writes = "redis.call('HINCRBY', KEYS[1], 'ev', 3); redis.call('HINCRBY', KEYS[2], 'ev', 4)"
    hvs.eval(two_writes, 2, *keys)  # replicated to the AOF as MULTI ... EXEC
    stack.stack.stop_redis()
    stack.stack.start_redis()
    after = client(stack, "admin")
    assert [after.hget(k, "ev") for k in keys] == [b"3", b"4"]
    for password in ("", "x", stack.settings.redis_password("admin")):
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(
                f"redis://default:{password}@{stack.settings.host}:{stack.settings.redis_port}/0"
            ).ping()
