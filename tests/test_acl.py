"""compose/redis/users.acl.in against a real redis-server: every role can do its job
through embedq's own processes, and nothing more."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from embedq import AsyncClient, Client
from embedq.common import keys
from embedq.producer import lease as lease_module
from embedq.redis_server import _version, find_redis_server

from .helpers import MODEL, free_port, start_gateway, start_worker, wait_for_workers, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "compose" / "redis" / "entrypoint.sh"
ROLES = ("admin", "producer", "gateway", "worker", "metrics")
PASSWORDS = {role: f"{role}-secret-{i}!x" for i, role in enumerate(ROLES)}


class AclRedis:
    def __init__(self, port: int) -> None:
        self.port = port

    def url(self, role: str) -> str:
        return f"redis://{role}:{PASSWORDS[role]}@127.0.0.1:{self.port}/0"

    def client(self, role: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(role))


def _render_env(tmp_path: Path) -> dict[str, str]:
    binary = find_redis_server()
    env = dict(os.environ, PATH=f"{Path(binary).parent}:{os.environ['PATH']}")
    env["EMBEDQ_ACL_FILE"] = str(tmp_path / "users.acl")
    for role in ROLES:
        env[f"EMBEDQ_REDIS_{role.upper()}_PASSWORD"] = PASSWORDS[role]
    return env


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[AclRedis]:
    if _version(find_redis_server()) < (7, 0):
        pytest.skip("ACL selectors need redis-server 7.0 or newer")
    port = free_port()
    # The secret of one role comes from a file, as with Docker or Kubernetes secrets.
    env = _render_env(tmp_path)
    secret = tmp_path / "worker-password"
    secret.write_text(PASSWORDS["worker"])
    del env["EMBEDQ_REDIS_WORKER_PASSWORD"]
    env["EMBEDQ_REDIS_WORKER_PASSWORD_FILE"] = str(secret)
    proc = subprocess.Popen(
        ["sh", str(ENTRYPOINT), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
         "--save", "", "--appendonly", "no"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = AclRedis(port)
    deadline = time.monotonic() + 10
    while True:
        try:
            if server.client("admin").ping():
                break
        except (redis.ConnectionError, AuthenticationError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"redis-server with the ACL file did not start:\n{out}")
        time.sleep(0.05)
    try:
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_rendered_file_has_no_clear_text_password(acl_redis: AclRedis, tmp_path: Path) -> None:
    rendered = (tmp_path / "users.acl").read_text()
    assert "@" + "PRODUCER@" not in rendered and "#" in rendered
    assert not any(p in rendered for p in PASSWORDS.values())
    assert oct((tmp_path / "users.acl").stat().st_mode & 0o777) == "0o600"
    users = acl_redis.client("admin").acl_users()
    assert sorted(u.decode() if isinstance(u, bytes) else u for u in users) == sorted([*ROLES, "default"])


def test_a_role_without_password_stops_the_start(tmp_path: Path) -> None:
    env = _render_env(tmp_path)
    del env["EMBEDQ_REDIS_METRICS_PASSWORD"]
    res = subprocess.run(["sh", str(ENTRYPOINT), "--port", "0"], env=env, capture_output=True, text=True)
    assert res.returncode == 64 and "EMBEDQ_REDIS_METRICS_PASSWORD" in res.stderr
    assert not (tmp_path / "users.acl").exists()


def _denied(call: object, *args: object) -> None:
    with pytest.raises((NoPermissionError, ResponseError)) as info:
        call(*args)  # type: ignore[operator]
    assert "NOPERM" in str(info.value) or "permission" in str(info.value).lower(), info.value


def test_each_role_does_its_job_and_nothing_more(acl_redis: AclRedis, tmp_path: Path) -> None:
    jobs, bulk = keys.jobs_stream(MODEL), keys.jobs_stream(MODEL, "bulk")
    worker = start_worker(acl_redis.url("worker"), tmp_path, "--backend", "fake", wait=False)
    wait_for_workers(acl_redis.url("admin"), MODEL, 1, worker)

    # producer: the SDK works end to end, both lanes, with the embedding cache.
    with Client(acl_redis.url("producer"), model=MODEL, cache_ttl_s=60) as client:
        assert client.client_id.startswith("producer.")
        assert client.embed(["hello", "world"]).shape == (2, 384)
        assert client.embed(["hello"]).shape == (1, 384)  # a cache hit
        # 32 vectors (49 KB): a reply this large is written with MULTI/EXEC, not a script.
        assert client.embed([f"text {i}" for i in range(32)]).shape == (32, 384)
        assert sum(len(v) for v in client.embed_many(["a", "b", "c"], chunk_size=2)) == 3
        own_replies = client.reply_stream
    # An explicit client id is leased under the user's reply prefix (GET/SET granted).
    with Client(acl_redis.url("producer"), model=MODEL, client_id="producer.fixed-acl") as client:
        assert client.embed(["leased"]).shape == (1, 384)

    # gateway: /embed, /health and /metrics through its own user.
    gateway = start_gateway(acl_redis.url("gateway"), tmp_path, "--embedding-cache-ttl", "60")
    try:
        wait_healthy(gateway)
        base = gateway.url
        assert httpx.post(f"{base}/embed", json={"inputs": "hi"}).status_code == 200
        assert httpx.post(f"{base}/embed", json={"inputs": "hi"}).status_code == 200
        assert "embedq_cache_hits_total" in httpx.get(f"{base}/metrics").text
    finally:
        gateway.stop()

    # worker: garbage is dead-lettered (XADD to the DLQ is allowed) and it keeps serving.
    admin = acl_redis.client("admin")
    admin.xadd(jobs, {keys.JOB_FIELD: b"\xc1 garbage"})
    deadline = time.monotonic() + 20
    while not admin.xlen(keys.dead_letter_stream(MODEL)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert admin.xlen(keys.dead_letter_stream(MODEL)) == 1

    # metrics: `embedq status` works with it.
    res = subprocess.run(
        [sys.executable, "-m", "embedq", "status", "--redis-url", acl_redis.url("metrics"),
         "--interval", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0 and MODEL in res.stdout, res.stderr
    worker.stop()
    # Leaving, it removed its consumer from the group (XGROUP DELCONSUMER is granted).
    assert admin.xinfo_consumers(jobs, keys.WORKER_GROUP) == []

    producer = acl_redis.client("producer")
    _denied(producer.xrange, jobs)  # cannot read other clients' jobs
    _denied(producer.xreadgroup, keys.WORKER_GROUP, "me", {jobs: ">"})  # cannot consume
    _denied(producer.xread, {"embedq:reply:gateway.x-1": "0"})  # not its replies
    _denied(producer.xadd, "embedq:reply:gateway.x-1", {"r": b"forged"})
    _denied(producer.xadd, keys.dead_letter_stream(MODEL), {"x": 1})
    _denied(producer.delete, jobs)
    _denied(producer.hset, keys.model_info_key(MODEL), "dim", "3")
    _denied(producer.flushall)
    _denied(producer.keys, "*")
    _denied(producer.set, "embedq:models", "x")  # SET only under its own reply prefix
    _denied(producer.set, "embedq:reply:gateway.x-1#lease", "x")
    _denied(producer.config_get, "requirepass")
    assert producer.xtrim(own_replies, maxlen=0) >= 0  # its own replies: allowed

    worker_user = acl_redis.client("worker")
    _denied(worker_user.xadd, jobs, {keys.JOB_FIELD: b"x"})  # cannot enqueue
    _denied(worker_user.xadd, bulk, {keys.JOB_FIELD: b"x"})
    _denied(worker_user.xread, {own_replies: "0"})  # cannot read replies
    _denied(worker_user.xrange, keys.dead_letter_stream(MODEL))
    _denied(worker_user.mget, ["embedq:cache:x:y"])
    _denied(worker_user.flushdb)
    _denied(worker_user.flushall)
    _denied(worker_user.config_set, "appendonly", "no")
    _denied(worker_user.acl_list)

    gateway_user = acl_redis.client("gateway")
    _denied(gateway_user.xrange, jobs)
    _denied(gateway_user.xrange, keys.dead_letter_stream(MODEL))
    _denied(gateway_user.xread, {own_replies: "0"})  # a producer's replies
    _denied(gateway_user.flushall)

    metrics = acl_redis.client("metrics")
    assert metrics.xlen(jobs) == 0 and metrics.hgetall(keys.model_info_key(MODEL))
    _denied(metrics.xrange, jobs)  # queue state, never payloads
    _denied(metrics.xadd, jobs, {keys.JOB_FIELD: b"x"})
    _denied(metrics.xrange, keys.dead_letter_stream(MODEL))
    _denied(metrics.mget, ["embedq:cache:x:y"])

    with pytest.raises((AuthenticationError, ResponseError)):
        redis.Redis(port=acl_redis.port).ping()  # the default user is off
    with pytest.raises(AuthenticationError):
        redis.Redis.from_url(acl_redis.url("producer").replace("producer-secret", "wrong")).ping()


async def test_a_client_whose_acl_predates_leases_warns_once(
    acl_redis: AclRedis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A user written before every client leased its id (no GET/SET on its reply prefix):
    # the client still serves, and says once that it cannot learn of a flush.
    monkeypatch.setattr(lease_module, "LEASE_MS", 300)
    acl_redis.client("admin").execute_command(
        "ACL", "SETUSER", "legacy", "on", ">legacy-pass", "resetchannels", "-@all", "+ping",
        "+client|setname", "+client|id", "+xread", "+xtrim", "+del", "+expire", "~embedq:reply:legacy.*",
    )  # fmt: skip
    url = f"redis://legacy:legacy-pass@127.0.0.1:{acl_redis.port}/0"
    with caplog.at_level(logging.WARNING, logger="embedq.producer.lease"):
        async with AsyncClient(url, model=MODEL):
            await asyncio.sleep(0.6)  # the first write and several renewals
    refused = [r for r in caplog.records if "cannot write the lease key" in r.getMessage()]
    assert len(refused) == 1
