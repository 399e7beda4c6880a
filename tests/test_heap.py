"""Process memory set-up: the frozen start-up heap, the worker's glibc allocator settings."""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys

import pytest

from embedq.common.heap import freeze_startup_heap


def test_freeze_moves_live_objects_out_of_every_generation() -> None:
    loaded = [[i] for i in range(1000)]  # tracked containers, alive like a loaded model
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() >= len(loaded)
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
