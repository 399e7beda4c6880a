"""TLS (rediss://) with a CA and client certificates the test makes, for every
component; the Redis password comes from a file and never reaches a log."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from embedq import AsyncClient
from embedq.common import keys
from embedq.common.settings import RedisSettings, connect_sync
from embedq.redis_server import find_redis_server

from .helpers import MODEL, free_port, start_gateway, start_worker, wait_healthy

PASSWORD = "tls-test-password-7c1f"


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _certificates(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=embedq test CA", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=embedq test {name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext",
                 cwd=d)  # fmt: skip
    # A second CA that signed nothing here: trusting only it must fail.
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.crt",
             "-days", "2", "-subj", "/CN=other CA", cwd=d)  # fmt: skip


@pytest.fixture
def tls_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test certificates")
    certs = tmp_path / "certs"
    certs.mkdir()
    _certificates(certs)
    port = free_port()
    proc = subprocess.Popen(
        [find_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", certs / "server.crt", "--tls-key-file", certs / "server.key",
         "--tls-ca-cert-file", certs / "ca.crt", "--tls-auth-clients", "yes",
         "--requirepass", PASSWORD, "--dir", tmp_path, "--save", "", "--appendonly", "no"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD + "\n")
    # What every embedq process reads (the URL carries no secret).
    monkeypatch.setenv("EMBEDQ_REDIS_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("EMBEDQ_REDIS_TLS_CA_FILE", str(certs / "ca.crt"))
    monkeypatch.setenv("EMBEDQ_REDIS_TLS_CERT_FILE", str(certs / "client.crt"))
    monkeypatch.setenv("EMBEDQ_REDIS_TLS_KEY_FILE", str(certs / "client.key"))
    url = f"rediss://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            if connect_sync(RedisSettings.from_env(url), name="probe").ping():
                break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise RuntimeError(
                    f"redis-server with TLS did not start (built without TLS?):\n{out}"
                ) from None
            time.sleep(0.05)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_every_component_over_tls(tls_redis: str, tmp_path: Path) -> None:
    worker = start_worker(tls_redis, tmp_path, "--backend", "fake", wait=False)
    settings = RedisSettings.from_env(tls_redis)
    wait_for_workers_tls(settings, worker)
    async with AsyncClient(tls_redis, model=MODEL) as client:
        assert (await client.embed(["over", "tls"])).shape == (2, 384)

    gateway = start_gateway(tls_redis, tmp_path)
    try:
        wait_healthy(gateway)
        assert httpx.post(f"{gateway.url}/embed", json={"inputs": "hi"}).status_code == 200
    finally:
        gateway.stop()
    status = subprocess.run(
        [sys.executable, "-m", "embedq", "status", "--redis-url", tls_redis, "--interval", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0 and MODEL in status.stdout, status.stderr
    worker.stop()
    # The password came from a file and appears in no log.
    assert PASSWORD not in worker.log() and PASSWORD not in gateway.log()


def wait_for_workers_tls(settings: RedisSettings, worker: object) -> None:
    client = connect_sync(settings, name="probe")
    deadline = time.monotonic() + 60
    while not client.zcard(keys.workers_key(MODEL)):
        assert time.monotonic() < deadline, "the worker did not register over TLS"
        time.sleep(0.05)


def test_tls_is_enforced(tls_redis: str) -> None:
    good = RedisSettings.from_env(tls_redis)
    assert connect_sync(good, name="t").ping()
    for bad in (
        RedisSettings.from_env(tls_redis, tls_cert_file=None, tls_key_file=None),  # no client certificate
        RedisSettings.from_env(
            tls_redis, tls_ca_file=str(Path(good.tls_ca_file or "").with_name("other.crt"))
        ),
        RedisSettings.from_env(tls_redis.replace("rediss://", "redis://")),  # plain TCP to the TLS port
    ):
        with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
            connect_sync(bad, name="t").ping()
    with pytest.raises(redis.AuthenticationError):
        connect_sync(RedisSettings.from_env(tls_redis, password="wrong"), name="t").ping()
    assert "tls-test-password" not in repr(good)


def test_redacted_url() -> None:
    s = RedisSettings(url="rediss://user:secret@host:6380/0")
    assert s.redacted_url == "rediss://user:***@host:6380/0" and "secret" not in repr(s)
    assert RedisSettings(url="redis://h:1/0").redacted_url == "redis://h:1/0"
