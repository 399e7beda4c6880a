import pytest

from embedq.worker.backends import torch_backend
from embedq.worker.backends.torch_backend import resolve_dtype


@pytest.mark.parametrize(("fast_bf16", "want"), [(True, "bfloat16"), (False, "float32")])
def test_auto_on_cpu_follows_fast_bf16(monkeypatch: pytest.MonkeyPatch, fast_bf16: bool, want: str) -> None:
    monkeypatch.setattr(torch_backend, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert resolve_dtype("auto", "cpu") == want


def test_explicit_dtype_is_kept() -> None:
    assert resolve_dtype("float16", "cpu") == "float16"
    assert resolve_dtype("bfloat16", "cuda:0") == "bfloat16"


def test_cpu_flag_detection_reads_this_machine() -> None:
    flags = open("/proc/cpuinfo").read()
    assert torch_backend.cpu_has_bf16_flags() == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.parametrize(
    ("flags", "speedup", "want"),
    [(False, 4.0, False), (True, 0.6, False), (True, 1.2, False), (True, 4.6, True)],
)
def test_bf16_needs_the_flag_and_a_measured_speedup(
    monkeypatch: pytest.MonkeyPatch, flags: bool, speedup: float, want: bool
) -> None:
    # The flag without the speed: an Intel Xeon with AVX512-BF16 and no AMX ran bf16 at 0.6×.
    monkeypatch.setattr(torch_backend, "cpu_has_bf16_flags", lambda: flags)
    monkeypatch.setattr(torch_backend, "bf16_matmul_speedup", lambda: speedup)
    assert torch_backend.cpu_has_fast_bf16() is want


def test_the_probe_measures_a_positive_ratio() -> None:
    assert torch_backend.bf16_matmul_speedup(size=256, repeats=1) > 0
