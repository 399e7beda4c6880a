import json
from pathlib import Path

import pytest

from embedq.worker.model_files import ModelFolderError, read_layout


def _folder(tmp_path: Path, config: dict, **files: dict) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name, content in files.items():
        path = tmp_path / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))
    return tmp_path


def test_bundled_model_layout(model_path: Path) -> None:
    layout = read_layout(model_path)
    assert layout.pooling == "mean"
    assert layout.max_input_length == 256  # sentence_bert_config max_seq_length
    assert layout.model_type == "bert"
    assert layout.prompts == {}


@pytest.mark.parametrize(
    ("cfg", "pooling"),
    [
        ({"pooling_mode_cls_token": True}, "cls"),
        ({"pooling_mode_mean_tokens": True}, "mean"),
        ({"pooling_mode_lasttoken": True}, "last-token"),
    ],
)
def test_pooling_from_st_config(tmp_path: Path, cfg: dict, pooling: str) -> None:
    folder = _folder(tmp_path, {"model_type": "bert"}, **{"1_Pooling__config.json": cfg})
    assert read_layout(folder).pooling == pooling


def test_unsupported_pooling_and_missing_pooling(tmp_path: Path) -> None:
    folder = _folder(
        tmp_path, {"model_type": "bert"}, **{"1_Pooling__config.json": {"pooling_mode_max_tokens": True}}
    )
    with pytest.raises(ModelFolderError, match="max_tokens"):
        read_layout(folder)
    bare = _folder(tmp_path / "b", {"model_type": "bert"})
    with pytest.raises(ModelFolderError, match="--pooling"):
        read_layout(bare)
    assert read_layout(bare, pooling="cls").pooling == "cls"


def test_roberta_position_offset(tmp_path: Path) -> None:
    folder = _folder(
        tmp_path, {"model_type": "xlm-roberta", "max_position_embeddings": 514, "pad_token_id": 1}
    )
    assert read_layout(folder, pooling="cls").max_input_length == 512


def test_prompts(tmp_path: Path) -> None:
    folder = _folder(
        tmp_path,
        {"model_type": "bert"},
        **{
            "config_sentence_transformers.json": {
                "prompts": {"query": "q: ", "doc": ""},
                "default_prompt_name": "query",
            }
        },
    )
    layout = read_layout(folder, pooling="mean")
    assert layout.prompts == {"query": "q: ", "doc": ""}
    assert layout.default_prompt_name == "query"


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="config.json"):
        read_layout(tmp_path)


def test_unapplied_st_modules_are_refused(tmp_path: Path) -> None:
    folder = _folder(
        tmp_path, {"model_type": "bert"}, **{"1_Pooling__config.json": {"pooling_mode_cls_token": True}}
    )
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelFolderError, match="LayerNorm"):
        read_layout(folder)
    # A Dense module is applied, so its files must be there.
    dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    (folder / "modules.json").write_text(json.dumps([*modules[:2], dense]))
    with pytest.raises(ModelFolderError, match="2_Dense"):
        read_layout(folder)
    (folder / "modules.json").write_text(json.dumps(modules[:2]))
    assert read_layout(folder).pooling == "cls"
