"""Reading a local Hugging Face model folder's sentence-transformers conventions.

Plain JSON reading, no torch: which pooling (1_Pooling), the maximum sequence length
(sentence_bert_config.json), and the prompts (config_sentence_transformers.json).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Pooling = Literal["mean", "cls", "last-token", "splade"]
POOLINGS: tuple[Pooling, ...] = ("mean", "cls", "last-token", "splade")
# What a folder's model does: pooled embeddings, or a sequence-classification head
# (one label: a cross-encoder reranker, as TEI decides).
Task = Literal["embedding", "classifier", "reranker", "splade"]

# Model families whose position ids start after the padding id (RoBERTa style).
_POSITION_OFFSET_TYPES = {"roberta", "xlm-roberta", "camembert", "xlm-roberta-xl"}


class ModelFolderError(Exception):
    """The folder is not a usable model (a start-up error, not a request error)."""


@dataclass(frozen=True, kw_only=True)
class ModelLayout:
    path: Path
    model_type: str
    task: Task
    # None for classification heads, which pool inside the model.
    pooling: Pooling | None
    max_input_length: int
    id2label: dict[int, str] = field(default_factory=dict)
    # Dense modules applied after pooling, in order.
    dense: tuple[DenseLayer, ...] = ()
    # A causal LM scoring relevance by its "yes"/"no" logits (Qwen3-Reranker style).
    llm_reranker: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} is not a JSON object")
    return data


# sentence-transformers modules this worker applies (Normalize is the request's choice).
_SUPPORTED_MODULES = ("Transformer", "Pooling", "Dense", "Normalize", "MLMTransformer", "SpladePooling")
# Activations a Dense module may name (sentence-transformers stores the class path).
DENSE_ACTIVATIONS = ("Tanh", "Identity", "ReLU", "GELU", "Sigmoid")


@dataclass(frozen=True)
class DenseLayer:
    """A sentence-transformers Dense module: y = activation(W x + b), after pooling."""

    path: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str


def check_modules(path: Path) -> None:
    """Refuse a pipeline with modules we would silently skip (wrong vectors otherwise)."""
    modules = path / "modules.json"
    if not modules.is_file():
        return
    try:
        entries = json.loads(modules.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"cannot read {modules}: {exc}") from exc
    for entry in entries:
        kind = str(entry.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _SUPPORTED_MODULES:
            raise ModelFolderError(
                f"{path} uses the sentence-transformers module {kind!r} ({entry.get('path')}), "
                "which embedq does not apply yet; serving it would give wrong vectors"
            )


def dense_layers(path: Path) -> tuple[DenseLayer, ...]:
    """The Dense modules of a sentence-transformers pipeline, in modules.json order."""
    modules = path / "modules.json"
    if not modules.is_file():
        return ()
    try:
        entries = json.loads(modules.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"cannot read {modules}: {exc}") from exc
    layers = []
    for entry in sorted(entries, key=lambda e: int(e.get("idx", 0))):
        if not str(entry.get("type", "")).endswith("Dense"):
            continue
        folder = path / str(entry.get("path", ""))
        cfg = _read_json(folder / "config.json")
        activation = str(cfg.get("activation_function", "torch.nn.modules.activation.Tanh")).rsplit(".", 1)[
            -1
        ]
        if activation not in DENSE_ACTIVATIONS:
            raise ModelFolderError(f"{folder}: Dense activation {activation!r} is not supported")
        if not (folder / "model.safetensors").is_file():
            raise ModelFolderError(f"{folder} has no model.safetensors (embedq loads safetensors only)")
        layers.append(
            DenseLayer(
                path=folder,
                in_features=int(cfg["in_features"]),
                out_features=int(cfg["out_features"]),
                bias=bool(cfg.get("bias", True)),
                activation=activation,
            )
        )
    return tuple(layers)


def _has_module(path: Path, kind: str) -> bool:
    modules = path / "modules.json"
    if not modules.is_file():
        return False
    try:
        entries = json.loads(modules.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"cannot read {modules}: {exc}") from exc
    return any(str(e.get("type", "")).endswith(kind) for e in entries)


def _pooling_folder(path: Path) -> Path | None:
    modules = path / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelFolderError(f"cannot read {modules}: {exc}") from exc
        for entry in entries:
            if str(entry.get("type", "")).endswith("Pooling") and entry.get("path"):
                sub: str = entry["path"]  # json.loads gives Any
                return path / sub
    default = path / "1_Pooling"
    return default if default.is_dir() else None


def pooling_from_config(cfg: dict[str, Any]) -> Pooling:
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_lasttoken"):
        return "last-token"
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    modes = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode") and v)
    raise ModelFolderError(f"unsupported pooling in 1_Pooling/config.json: {modes}")


def task_of(config: dict[str, Any]) -> tuple[Task, dict[int, str]]:
    """The task of a transformers config, with its labels for classification heads."""
    archs = [str(a) for a in config.get("architectures") or []]
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        return "embedding", {}
    raw = config.get("id2label") or {}
    try:
        id2label = {int(k): str(v) for k, v in raw.items()}
    except (AttributeError, ValueError) as exc:
        raise ModelFolderError(f"config.json has an unreadable id2label: {raw!r}") from exc
    if not id2label:
        n = int(config.get("num_labels") or 2)
        id2label = {i: f"LABEL_{i}" for i in range(n)}
    if sorted(id2label) != list(range(len(id2label))):
        raise ModelFolderError(f"config.json id2label ids are not 0..{len(id2label) - 1}")
    return ("reranker" if len(id2label) == 1 else "classifier"), id2label


def fingerprint(path: Path) -> str:
    """A short identity of a model folder's config and weights, cheap on large models.

    Hashes config.json and, for each safetensors file, its header (names, shapes) and
    16 samples of 64 KiB spread over the data, so two fine-tunes of one architecture
    differ while a multi-gigabyte model is not read in full.
    """
    digest = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with open(weights, "rb") as f:
            for i in range(17):
                f.seek(min(size, i * size // 16))
                digest.update(f.read(65536))
    return digest.hexdigest()[:16]


def read_layout(path: Path, *, pooling: Pooling | None = None, llm_reranker: bool = False) -> ModelLayout:
    """Describe the model folder at ``path``; ``pooling`` overrides what the folder says;
    ``llm_reranker`` serves a causal LM as a yes/no reranker (Qwen3-Reranker style)."""
    if not (path / "config.json").is_file():
        raise ModelFolderError(f"{path} has no config.json: not a Hugging Face model folder")
    check_modules(path)
    config = _read_json(path / "config.json")
    model_type = str(config.get("model_type", "unknown"))
    task, id2label = task_of(config)
    if llm_reranker:
        archs = [str(a) for a in config.get("architectures") or []]
        if not any(a.endswith("ForCausalLM") for a in archs):
            raise ModelFolderError(
                f"{path}: an LLM reranker needs a *ForCausalLM model, found {archs or 'none'}"
            )
        task, id2label, pooling = "reranker", {0: "yes"}, None
    elif pooling == "splade" or (pooling is None and _has_module(path, "SpladePooling")):
        # SPLADE: max over tokens of log(1 + relu(MLM logits)); needs a masked-LM head.
        archs = [str(a) for a in config.get("architectures") or []]
        if not any(a.endswith("ForMaskedLM") for a in archs):
            raise ModelFolderError(f"{path}: SPLADE needs a *ForMaskedLM model, found {archs or 'none'}")
        task, pooling = "splade", "splade"

    if pooling is None and task == "embedding":
        folder = _pooling_folder(path)
        if folder is not None and (folder / "config.json").is_file():
            pooling = pooling_from_config(_read_json(folder / "config.json"))
        else:
            raise ModelFolderError(
                f"{path} has no 1_Pooling/config.json: pass --pooling (mean, cls or last-token)"
            )

    max_positions = int(config.get("max_position_embeddings", 512))
    if model_type in _POSITION_OFFSET_TYPES:
        max_positions -= int(config.get("pad_token_id", 1)) + 1
    max_input_length = max_positions
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        seq = _read_json(st_config).get("max_seq_length")
        if isinstance(seq, int) and seq > 0:
            max_input_length = min(seq, max_positions)

    prompts: dict[str, str] = {}
    default_prompt_name = None
    st_model = path / "config_sentence_transformers.json"
    if st_model.is_file():
        data = _read_json(st_model)
        raw = data.get("prompts") or {}
        if isinstance(raw, dict):
            prompts = {str(k): str(v) for k, v in raw.items()}
        name = data.get("default_prompt_name")
        default_prompt_name = str(name) if name else None
        if default_prompt_name and default_prompt_name not in prompts:
            raise ModelFolderError(f"default_prompt_name {default_prompt_name!r} is not among the prompts")

    return ModelLayout(
        path=path,
        model_type=model_type,
        task=task,
        pooling=pooling if task in ("embedding", "splade") else None,
        id2label=id2label,
        dense=dense_layers(path) if task == "embedding" else (),
        llm_reranker=llm_reranker,
        max_input_length=max_input_length,
        prompts=prompts,
        default_prompt_name=default_prompt_name,
    )
