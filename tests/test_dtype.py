import pytest

from embedq.worker.backends import torch_backend
from embedq.worker.backends.torch_backend import resolve_dtype


@pytest.mark.parametrize(("fast_bf16", "want"), [(True, "bfloat16"), (False, "float32")])
def test_auto_on_cpu_follows_native_bf16(monkeypatch: pytest.MonkeyPatch, fast_bf16: bool, want: str) -> None:
    monkeypatch.setattr(torch_backend, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert resolve_dtype("auto", "cpu") == want


def test_explicit_dtype_is_kept() -> None:
    assert resolve_dtype("float16", "cpu") == "float16"
    assert resolve_dtype("bfloat16", "cuda:0") == "bfloat16"


def test_cpu_flag_detection_reads_this_machine() -> None:
    flags = open("/proc/cpuinfo").read()
    assert torch_backend.cpu_has_fast_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
