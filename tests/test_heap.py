"""Process memory set-up: the frozen start-up heap, the worker's glibc allocator settings."""

from __future__ import annotations

import gc
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from embedq.common.heap import freeze_startup_heap
from embedq.redis_server import RedisServer

from .helpers import start_worker


def test_freeze_moves_live_objects_out_of_every_generation() -> None:
    loaded = [[i] for i in range(1000)]  # tracked containers, alive like a loaded model
    try:
        frozen = freeze_startup_heap()
        # A frozen object freed afterwards (its last reference dropped) leaves the
        # permanent generation, so the count can only have shrunk since the freeze.
        assert frozen >= gc.get_freeze_count() >= len(loaded)
        scanned = {id(o) for o in gc.get_objects()}
        assert not any(id(x) in scanned for x in loaded)
        # What is allocated afterwards is collected as usual.
        later = [0]
        assert any(o is later for o in gc.get_objects())
    finally:
        gc.unfreeze()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, "True"), ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "False"), ({"LD_PRELOAD": ""}, "False")],
)
def test_the_worker_tunes_glibc_unless_the_operator_did(env: dict[str, str], expected: str) -> None:
    # In a child: mallopt changes the whole process.
    clean = {k: v for k, v in os.environ.items() if k not in ("MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from embedq.worker.main import keep_freed_memory; print(keep_freed_memory())",
        ],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == expected


def test_a_worker_sets_up_its_memory_at_start(redis_server: RedisServer, tmp_path: Path) -> None:
    worker = start_worker(redis_server.url, tmp_path, "--backend", "fake")
    try:
        log = worker.log()
        frozen = re.search(r"(\d+) start-up objects frozen out of the garbage collector", log)
        assert frozen is not None and int(frozen.group(1)) > 1000, log[-2000:]
        expected = "True" if platform.libc_ver()[0] == "glibc" else "False"
        assert f"glibc keeps freed memory between batches: {expected}" in log
    finally:
        worker.stop()
