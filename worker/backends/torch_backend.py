"""The torch + transformers backend: a local model folder, loaded with safetensors.

Embedding models of the families in worker/backends/packed.py run padding-free where
``--packing auto`` chooses it (a GPU in bf16/fp16; a CPU, except bf16 on AMX and
int8): the batch's sequences end to end in one row, attention by a variable-length
flash kernel on a GPU and per sequence on a CPU, and the token budget counts real
tokens. A check at start compares the packed and padded paths and keeps the padded one
if they disagree.

Everything else runs with SDPA attention on right-padded batches (the batcher keeps
lengths in a batch close). Padded batches on a CPU in bfloat16, and with
``--compile``, are padded up to length buckets (worker/buckets.py) so that oneDNN and
the compiled code meet few shapes. Both pool in float32 and leave normalisation and
Matryoshka cuts to the worker's post-processing.

Options, all off by default: ``--quantize int8`` (CPU, float32 base: Linear layers run
as int8 × int8 → int32 matmuls, by ``torch._int_mm`` or fbgemm: ``--int8-kernel``) and
``--compile`` (torch.compile). Their measured effects are in docs/benchmarks.md,
sections 5 and 6.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from embedq.worker.backends import packed as packing
from embedq.worker.backends.base import ModelDescription
from embedq.worker.backends.cpu_fusion import fuse_model, fusion_available
from embedq.worker.backends.int8 import Int8Kernel, fbgemm_available, quantize_int8
from embedq.worker.buckets import COMPILE_MIN_STEP, EAGER_MIN_STEP, bucket_length, bucket_lengths
from embedq.worker.config import ConfigError, Int8KernelName, WorkerConfig, check_precision
from embedq.worker.model_files import DenseLayer, ModelFolderError, Pooling, fingerprint, read_layout
from embedq.worker.threads import PassThreads, single_thread_tokens
from embedq.worker.tokenization import HFTokenizer, LlmRerankTokenizer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# torch's own thread count (all cores), read before any pass changed it: a pass may
# leave its thread at one thread (worker/threads.py), and a backend built later in the
# same process must not take that for the default.
_DEFAULT_THREADS = torch.get_num_threads()

# bf16 must beat float32 by this much in the probe to be chosen by --dtype auto.
BF16_MIN_SPEEDUP = 1.5


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16_flags() -> bool:
    """True when the CPU has bf16 matmul instructions (AVX512-BF16 or AMX)."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_amx() -> bool:
    """True on a CPU with AMX tiles for bf16, where oneDNN builds a kernel per matmul shape."""
    return "amx_bf16" in _cpu_flags()


def bf16_matmul_speedup(size: int = 1024, repeats: int = 3) -> float:
    """float32 time ÷ bfloat16 time of a size² matmul on this CPU's torch threads (best
    of ``repeats``; ~0.1 s in all)."""

    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # oneDNN builds its kernel on the first call
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


def cpu_has_fast_bf16() -> bool:
    """True when bf16 matmuls are markedly faster than float32 here.

    The flag alone is not enough: on an AMD Zen 5 with AVX512-BF16 bf16 ran 4.6× float32,
    while on an Intel Xeon with AVX512-BF16 and no AMX exposed it ran at 0.6× (measured
    in this project, docs/benchmarks.md). So the flag gates a short probe.
    """
    if not cpu_has_bf16_flags():
        return False
    speedup = bf16_matmul_speedup()
    log.info("bf16 matmul probe: %.2f× float32 (bf16 is chosen from %.1f×)", speedup, BF16_MIN_SPEEDUP)
    return speedup >= BF16_MIN_SPEEDUP


def resolve_dtype(requested: str, device: str, quantize: str | None = None) -> str:
    """Turn ``auto`` into the fastest dtype that keeps cosine ≥ 0.999 to float32."""
    if requested != "auto":
        return requested
    if quantize is not None:
        return "float32"  # int8 quantizes a float32 model
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_fast_bf16() else "float32"


def warn_if_emulated_bf16(device: str, dtype_name: str) -> bool:
    """Log a warning when bf16 was asked for on a CPU without bf16 matmul instructions;
    True if it did. There torch runs reference kernels: 1-2 GFLOP/s against 72-87
    float32 on a Zen 3 (docs/benchmarks.md §1, machine K), where ``auto`` picks float32."""
    if device.startswith("cpu") and dtype_name == "bfloat16" and not cpu_has_bf16_flags():
        log.warning(
            "--dtype bfloat16 on a CPU without AVX512-BF16 or AMX: bf16 matmuls run emulated, "
            "many times slower than float32 (--dtype auto picks float32 here)"
        )
        return True
    return False


def _pool(
    hidden: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, pooling: Pooling | None
) -> torch.Tensor:
    # None: the layout names no pooling (models that are not served `embed`); mean, as "mean".
    hidden = hidden.float()
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last-token":
        # Right padding: the last real token of row i sits at lengths[i] - 1.
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, lengths - 1]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def _load_dense(layers: Sequence[DenseLayer], width: int, device: torch.device) -> torch.nn.Module | None:
    """sentence-transformers Dense modules as one float32 torch module (after pooling)."""
    from safetensors.torch import load_file

    if not layers:
        return None
    stack: list[torch.nn.Module] = []
    for layer in layers:
        if layer.in_features != width:
            raise ModelFolderError(
                f"{layer.path}: expects {layer.in_features} inputs, the model gives {width}"
            )
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
        state = load_file(str(layer.path / "model.safetensors"))
        linear.load_state_dict({k.removeprefix("linear."): v.float() for k, v in state.items()})
        stack += [linear, getattr(torch.nn, layer.activation)()]
        width = layer.out_features
    return torch.nn.Sequential(*stack).eval().to(device)


# The start check of packed batches runs sequences up to this long (padded too, so a
# model's full context would make it slow on a CPU).
PACKING_CHECK_MAX_TOKENS = 512
# Warm-up prepares the length buckets up to this many tokens (longer ones lazily).
WARMUP_MAX_TOKENS = 512
# Eager warm-up also prepares batch-1 shapes up to this length: queries are short.
# Packed: one-thread token counts up to this many (a small model's budget is larger).
PACKED_WARMUP_MAX_TOKENS = 256
WARMUP_SINGLE_MAX_TOKENS = 128


def poisons_device(exc: BaseException) -> bool:
    """Whether an error leaves the process's accelerator context unusable (a CUDA
    device-side assert, an illegal memory access), so that nothing more can run on that
    device in this process. Out of memory does not: torch raises it as its own class."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):  # torch.OutOfMemoryError since 2.5
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and "CUDA error" in str(exc)


def choose_int8_kernel(requested: Int8KernelName) -> Int8Kernel:
    """The int8 matmul for --int8-kernel: ``torch._int_mm`` where the CPU has VNNI or AMX
    (per-token scales, the measured quality bound), fbgemm elsewhere: without VNNI
    ``torch._int_mm`` ran at 2-3 GOP/s against 72-87 GFLOP/s float32 on a Zen 3, and
    fbgemm's AVX2 kernels at ~1.5-1.8× float32 (docs/benchmarks.md §1, machine K)."""
    vnni = bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})
    if requested == "fbgemm" or (requested == "auto" and not vnni and fbgemm_available()):
        if not fbgemm_available():
            engines = ", ".join(torch.backends.quantized.supported_engines)
            raise ConfigError(
                f"--int8-kernel fbgemm: this torch has no x86/fbgemm quantized engine ({engines})"
            )
        return "fbgemm"
    if not hasattr(torch, "_int_mm"):
        raise ConfigError(f"--int8-kernel int_mm needs torch._int_mm (torch {torch.__version__} lacks it)")
    if not vnni:
        log.warning("int8 (int_mm) without VNNI on this CPU: expect it many times slower than float32")
    return "int_mm"


def length_step(device: str, dtype_name: str, quantize: str | None, compiled: bool) -> int:
    """The min_step of the length buckets this backend pads to (worker/buckets.py); 0
    when batches are padded only to their longest sequence.

    float32 and float16 CPU matmuls and CUDA's need no per-shape set-up, so they are
    not padded (measured on the AMX Xeon: first call at a new shape costs nothing extra).
    """
    if compiled:
        return COMPILE_MIN_STEP
    if device == "cpu" and dtype_name == "bfloat16" and quantize is None:
        return EAGER_MIN_STEP
    return 0


def linear_flops_per_token(model: torch.nn.Module) -> float:
    """Multiply-add FLOPs of the model's Linear layers for one token (attention aside)."""
    linears = (m for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 2.0 * sum(m.in_features * m.out_features for m in linears)


class TorchBackend:
    def __init__(self, config: WorkerConfig) -> None:
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoModelForCausalLM,
            AutoModelForMaskedLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        path = Path(config.model_path)
        layout = read_layout(path, pooling=config.pooling, llm_reranker=config.llm_reranker)
        threads = config.threads or _DEFAULT_THREADS
        torch.set_num_threads(threads)
        self.device = torch.device(config.device)
        # WorkerConfig can be built without config_from_args (benchmarks, tests).
        check_precision(config.device, config.dtype, config.quantize)
        self.dtype_name = resolve_dtype(config.dtype, config.device, config.quantize)
        warn_if_emulated_bf16(config.device, self.dtype_name)
        dtype = _DTYPES[self.dtype_name]

        hf_config = AutoConfig.from_pretrained(path)
        self.task = layout.task
        # Classification heads (rerankers, classifiers) load with their head.
        auto = {"embedding": AutoModel, "splade": AutoModelForMaskedLM}.get(
            layout.task, AutoModelForSequenceClassification
        )
        if layout.llm_reranker:
            auto = AutoModelForCausalLM
        self._packed = packing.choose(
            config.packing,
            device=self.device,
            dtype=dtype,
            task=layout.task,
            family=str(hf_config.model_type),
            compiled=config.compile,
            quantized=config.quantize is not None,
            shape_kernels=self.device.type == "cpu" and self.dtype_name == "bfloat16" and cpu_has_amx(),
        )
        attention = "sdpa"
        if self._packed:
            packing.register()  # serves padded calls too (SDPA), for the check below
            attention = packing.ATTENTION
        try:
            self.model = auto.from_pretrained(
                path, dtype=dtype, attn_implementation=attention, use_safetensors=True
            )
        except (ValueError, ImportError) as exc:
            # Some architectures have no SDPA path; the eager one is correct, only slower.
            if config.packing == "on" and self._packed:
                raise ConfigError(
                    f"--packing on: the model cannot load with packed attention ({exc})"
                ) from exc
            log.warning("SDPA attention unavailable (%s); using eager attention", exc)
            self._packed = False  # eager attention would let packed sequences see each other
            self.model = auto.from_pretrained(path, dtype=dtype, use_safetensors=True)
        self.model.eval().to(self.device)
        self._pad_id = int(getattr(hf_config, "pad_token_id", None) or 0)
        self.quantize = config.quantize
        self.int8_kernel: Int8Kernel | None = None
        if config.quantize == "int8":
            self.int8_kernel = choose_int8_kernel(config.int8_kernel)
            swapped = quantize_int8(self.model, self.int8_kernel)
            log.info("int8: %d Linear layers quantized (%s kernel)", swapped, self.int8_kernel)
        self.compiled = config.compile
        # Small passes run on one thread (worker/threads.py): eager bf16 on a CPU, where
        # it was measured (int8 and --compile not).
        rule_on = config.single_thread_small_passes and self.device.type == "cpu"
        rule_on = rule_on and not config.quantize and not config.compile
        flops = linear_flops_per_token(self.model) if rule_on else 0.0
        self._thread_policy = PassThreads(threads, single_thread_tokens(self.dtype_name, flops, threads))
        # Padded batches' buckets (the start check of packing runs padded ones too).
        self._length_step = length_step(self.device.type, self.dtype_name, config.quantize, config.compile)
        # Kernels warm-up runs at each bucket: (kind, in, out, bias) → module; see _prime_kernels.
        self._kernels: dict[tuple[str, int, int, bool], torch.nn.Module] = {}
        # oneDNN fusions serve eager bf16 on a CPU, padded to length buckets or packed.
        if self._length_step == EAGER_MIN_STEP and fusion_available():
            fused = fuse_model(self.model)
            self._kernels = fused.kernels
            log.info(
                "oneDNN fusions: %d Linear+GELU, %d Linear+residual, %d Linear",
                fused.linear_gelu,
                fused.linear_add,
                fused.linear,
            )
        self._max_batch = config.max_batch_requests
        if config.compile:
            # One graph with symbolic batch and length; warmup() compiles it before the
            # first request, and _collate pads lengths to buckets.
            self.model = torch.compile(self.model, dynamic=True)

        tokenizer = AutoTokenizer.from_pretrained(path)
        backend_tok = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
        if backend_tok is None:
            raise ModelFolderError(f"{path} has no fast tokenizer (tokenizer.json)")
        self.tokenizer = HFTokenizer(backend_tok, layout.max_input_length)
        # An LLM reranker scores the "yes" logit against the "no" logit at the last token.
        self._yes_no: tuple[int, int] | None = None
        if layout.llm_reranker:
            llm_tok = LlmRerankTokenizer(backend_tok, layout.max_input_length, config.reranker_instruction)
            self._yes_no = (llm_tok.token_id("yes"), llm_tok.token_id("no"))
            self.tokenizer = llm_tok
        self.pooling = layout.pooling
        width = int(getattr(hf_config, "hidden_size", 0) or getattr(hf_config, "dim", 0))
        if layout.task == "splade":  # sparse vectors span the vocabulary
            width = int(hf_config.vocab_size)
        self.dense = _load_dense(layout.dense, width, self.device)
        if layout.dense:
            width = layout.dense[-1].out_features
        # Token type ids matter for BERT-style pair inputs; models without them ignore none.
        self._uses_types = int(getattr(hf_config, "type_vocab_size", 0) or 0) > 1
        self._max_input_length = layout.max_input_length
        self._position_offset = packing.position_offset(hf_config)
        forward_args = inspect.signature(self.model.forward).parameters
        # A packed row is longer than the models' buffered token types: pass zeros.
        self._packed_types = "token_type_ids" in forward_args
        # Decoders (Qwen) would otherwise keep every layer's keys and values of the pass.
        self._no_cache = {"use_cache": False} if "use_cache" in forward_args else {}
        if self._packed:
            self._packed = self._check_packing(config.packing == "on")
        if self._packed:
            self._length_step = 0  # no padding, so no buckets
        self.description = ModelDescription(
            model_id=config.model_id,
            model_type=layout.task,
            id2label=layout.id2label,
            revision=fingerprint(path),
            dim=width,
            max_input_length=layout.max_input_length,
            pooling=layout.pooling or "none",
            # The info hash and the cache key carry this: int8 vectors differ from float32
            # ones, and the two int8 kernels' from each other (auto picks per CPU).
            dtype=self._int8_label() if self.int8_kernel else self.dtype_name,
            device=str(self.device),
            packed=self._packed,
            length_step=self._length_step,
            prompts=layout.prompts,
            default_prompt_name=layout.default_prompt_name,
        )
        log.info(
            "loaded %s (%s %s, dim %d, max %d tokens, %s pooling, %s batches) on %s with %d threads",
            path,
            layout.task,
            self.dtype_name,
            width,
            layout.max_input_length,
            layout.pooling or "no",
            "packed" if self._packed else "padded",
            self.device,
            torch.get_num_threads(),
        )

    def _int8_label(self) -> str:
        return "int8" if self.int8_kernel == "int_mm" else f"int8-{self.int8_kernel}"

    def padded_width(self, width: int) -> int:
        """The width a batch whose longest sequence has ``width`` tokens is run at."""
        if not self._length_step:
            return width
        return bucket_length(width, self._max_input_length, self._length_step)

    def _collate(
        self, batch: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]] | None = None
    ) -> list[torch.Tensor]:
        """[ids, mask, lengths(, token types)] on the device, right-padded."""
        lengths = np.fromiter((len(s) for s in batch), dtype=np.int64, count=len(batch))
        width = self.padded_width(int(lengths.max()))
        ids = np.full((len(batch), width), self._pad_id, dtype=np.int64)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = seq
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        arrays = [ids, mask, lengths]
        if type_ids is not None:
            types = np.zeros((len(batch), width), dtype=np.int64)
            for row, seq in enumerate(type_ids):
                types[row, : len(seq)] = seq
            arrays.append(types)
        pin = self.device.type == "cuda"
        tensors = [torch.from_numpy(a) for a in arrays]
        if pin:
            tensors = [t.pin_memory() for t in tensors]
        return [t.to(self.device, non_blocking=pin) for t in tensors]

    @contextmanager
    def _forward_pass(self, tokens: int) -> Iterator[None]:
        """inference_mode, on the thread count PassThreads gives a pass of ``tokens``
        (computed ones: padding included).

        torch's count changes only when the answer does, so a run of small passes never
        switches: a switch rebuilds thread pools (~80 µs measured for each on machine H)."""
        threads = self._thread_policy.for_pass(tokens)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        with torch.inference_mode():
            yield

    def _packed_hidden(self, batch: Sequence[Sequence[int]]) -> tuple[torch.Tensor, packing.PackedBatch]:
        """[total, width] token states of a packed batch (call inside _forward_pass)."""
        packed = packing.pack(batch, self._position_offset, self.device)
        extra = {"token_type_ids": torch.zeros_like(packed.ids)} if self._packed_types else {}
        out = self.model(
            input_ids=packed.ids,
            position_ids=packed.positions,
            **extra,
            **self._no_cache,
            **packed.attention_kwargs,
        )
        return out.last_hidden_state[0], packed

    def _embed_packed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        with self._forward_pass(sum(len(s) for s in batch)):
            hidden, packed = self._packed_hidden(batch)
            pooled = packing.pool(hidden, packed, self.pooling)
            if self.dense is not None:
                pooled = self.dense(pooled)
        return pooled.to("cpu").numpy()

    def _check_packing(self, required: bool) -> bool:
        """Whether packed and padded passes agree on a batch of mixed lengths; a packed
        path that does not (an attention kernel this torch runs differently) is left
        off, or refused with ``--packing on``."""
        top = min(self._max_input_length, PACKING_CHECK_MAX_TOKENS)
        lengths = [n for n in (1, 5, 37, 130, top) if n <= top]
        rng = np.random.default_rng(0)
        vocab = int(getattr(self.model.config, "vocab_size", 1000))
        batch = [rng.integers(min(1000, vocab // 2), vocab, size=n).tolist() for n in lengths]
        problem = ""
        try:
            packed, padded = self._embed_packed(batch), self._embed_padded(batch)
            cos = _min_cosine(packed, padded)
            # bf16 paths agree to ~0.9999; a window off by one token moved vectors by more.
            floor = 0.99999 if self.dtype_name == "float32" else 0.999
            if not cos >= floor:
                problem = f"min cosine {cos:.5f} to the padded path (needs {floor})"
        except Exception as exc:  # any failure of the kernel means: do not use it
            if poisons_device(exc):
                # A device-side assert or an illegal address leaves this process's CUDA
                # context unusable: the padded fallback would fail too, less clearly.
                raise ConfigError(
                    f"the packed path's start check failed on {self.device} with an error that "
                    f"leaves the device unusable in this process ({type(exc).__name__}: {exc}); "
                    "start the worker with --packing off"
                ) from exc
            problem = f"{type(exc).__name__}: {exc}"
        if not problem:
            log.info("packed batches: checked against padded ones at lengths %s", lengths)
            return True
        if required:
            raise ConfigError(f"--packing on: the packed path fails its check at start ({problem})")
        log.warning("packed batches disagree with padded ones (%s); running padded", problem)
        return False

    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        if self._packed:
            return self._embed_packed(batch)
        return self._embed_padded(batch)

    def _embed_padded(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        ids, mask, lengths = self._collate(batch)
        with self._forward_pass(ids.numel()):
            hidden = self.model(input_ids=ids, attention_mask=mask, **self._no_cache).last_hidden_state
            pooled = _pool(hidden, mask, lengths, self.pooling)
            if self.dense is not None:
                pooled = self.dense(pooled)
        return pooled.to("cpu").numpy()

    def embed_all(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        if self._packed:
            with self._forward_pass(sum(len(s) for s in batch)):
                hidden, packed = self._packed_hidden(batch)
                rows = packing.split(hidden.float().to("cpu"), packed)
            return [r.numpy() for r in rows]
        ids, mask, _lengths = self._collate(batch)
        with self._forward_pass(ids.numel()):
            hidden = self.model(input_ids=ids, attention_mask=mask, **self._no_cache).last_hidden_state
            hidden = hidden.float().to("cpu")
        return [hidden[row, : len(seq)].numpy() for row, seq in enumerate(batch)]

    def predict(self, batch: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]]) -> np.ndarray:
        if self._yes_no is not None:
            return self._yes_no_logit(batch)
        ids, mask, _lengths, types = self._collate(batch, type_ids)
        extra = {"token_type_ids": types} if self._uses_types else {}
        with self._forward_pass(ids.numel()):
            logits = self.model(input_ids=ids, attention_mask=mask, **extra, **self._no_cache).logits
        # transformers models are untyped: the logits are Any to mypy.
        out: np.ndarray = logits.float().to("cpu").numpy()
        return out

    def _yes_no_logit(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """logit(yes) − logit(no) at each sequence's last token: its sigmoid is the
        softmax probability of "yes" over the two answers."""
        assert self._yes_no is not None
        ids, mask, lengths = self._collate(batch)
        base = getattr(self.model, self.model.base_model_prefix)
        with self._forward_pass(ids.numel()):
            hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            last = hidden[rows, lengths - 1]  # right padding: the last real token
            head = self.model.get_output_embeddings()
            logits = head(last)[:, list(self._yes_no)].float()
        out: np.ndarray = (logits[:, 0] - logits[:, 1]).unsqueeze(1).to("cpu").numpy()
        return out

    def embed_sparse(self, batch: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        ids, mask, _lengths = self._collate(batch)
        with self._forward_pass(ids.numel()):
            logits = self.model(input_ids=ids, attention_mask=mask, **self._no_cache).logits
            weights = torch.log1p(torch.relu(logits.float())) * mask.unsqueeze(-1)
            pooled = weights.max(dim=1).values.to("cpu")
        out = []
        for row in pooled:
            nz = torch.nonzero(row, as_tuple=True)[0]
            out.append((nz.numpy().astype(np.int32), row[nz].numpy().astype(np.float32)))
        return out

    def _prime_kernels(self, shapes: Sequence[tuple[int, int]]) -> int:
        """Run each distinct matmul kernel of the model once at every (batch, length) shape;
        returns how many (shape, kernel) pairs ran. Far cheaper than whole forward passes."""
        kernels = self._kernels or {
            ("none", m.in_features, m.out_features, m.bias is not None): m
            for m in self.model.modules()
            if isinstance(m, torch.nn.Linear)
        }
        dtype = _DTYPES[self.dtype_name]
        with torch.inference_mode():
            for n, length in shapes:
                for (kind, fan_in, fan_out, _bias), module in kernels.items():
                    x = torch.zeros(n, length, fan_in, dtype=dtype, device=self.device)
                    if kind == "add":  # Linear + residual: takes the residual as well
                        module(x, torch.zeros(n, length, fan_out, dtype=dtype, device=self.device))
                    else:
                        module(x)
        return len(shapes) * len(kernels)

    def warmup(self) -> None:
        """Run the model on the shapes it will meet, so the first request is not slow.

        Eager: two small batches take the one-off costs of the first forward pass
        (allocations, oneDNN kernel set-up: ~5 ms on the first request without them).
        Eager with length buckets: also each distinct matmul kernel at every bucket up to
        WARMUP_MAX_TOKENS at a full batch, and up to WARMUP_SINGLE_MAX_TOKENS at batch 1,
        which builds the oneDNN kernels a forward pass at those shapes will look up; and
        at batch 1 on one thread up to the one-thread budget (worker/threads.py).
        Packed on a CPU in bf16: each matmul kernel at every token count up to the
        one-thread budget (at most PACKED_WARMUP_MAX_TOKENS), on one thread, since a
        small packed pass runs at its exact count there (a first pass at a new count
        cost ~3 ms more on machine J).
        With --compile: every length bucket, at batch 1 and at a full batch (torch.compile
        builds a separate graph for size 1), so compiling happens here, not on a request.
        """
        top = min(self.description.max_input_length, WARMUP_MAX_TOKENS)
        buckets = bucket_lengths(top, self.description.max_input_length, self._length_step or 1)
        shapes = [(1, 8), (8, 64)]
        if self.compiled:
            shapes = [(n, length) for length in buckets for n in (1, max(2, self._max_batch))]
        start = time.perf_counter()
        torch.set_num_threads(self._thread_policy.threads)  # a pass may have left one
        if self._length_step and not self.compiled:
            singles = [(1, length) for length in buckets if length <= WARMUP_SINGLE_MAX_TOKENS]
            primed = self._prime_kernels([(self._max_batch, length) for length in buckets] + singles)
            if self._thread_policy.single_thread_tokens:
                # Small passes run on one thread (worker/threads.py), and oneDNN builds
                # its kernels per thread count as well. A matmul kernel follows the rows
                # (batch × width), so one input at every bucket up to the budget covers
                # every small batch too.
                torch.set_num_threads(1)
                try:
                    limit = self._thread_policy.single_thread_tokens
                    primed += self._prime_kernels([(1, length) for length in buckets if length <= limit])
                finally:
                    torch.set_num_threads(self._thread_policy.threads)
            log.info("warm-up: %d matmul kernels in %.1f s", primed, time.perf_counter() - start)
        elif self._packed and self._kernels and self._thread_policy.single_thread_tokens:
            torch.set_num_threads(1)
            try:
                top = min(self._thread_policy.single_thread_tokens, PACKED_WARMUP_MAX_TOKENS)
                counts = range(1, top + 1)
                primed = self._prime_kernels([(1, n) for n in counts])
            finally:
                torch.set_num_threads(self._thread_policy.threads)
            log.info("warm-up: %d matmul kernels in %.1f s", primed, time.perf_counter() - start)
        for n, length in shapes:
            seqs = [[self._pad_id + 1] * length] * n
            if self.task == "embedding":
                self.embed(seqs)
            elif self.task == "splade":
                self.embed_sparse(seqs)
            else:
                self.predict(seqs, [[0] * length] * n)
        log.info("warm-up: %d shapes in %.1f s", len(shapes), time.perf_counter() - start)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return float(((a64 * b64).sum(axis=1) / np.maximum(norms, 1e-30)).min())
