"""freeze_startup_heap: what start-up allocated leaves the collector's generations."""

from __future__ import annotations

import gc

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
