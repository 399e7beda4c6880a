from pathlib import Path

import pytest
from transformers import AutoTokenizer

from embedq.common.errors import EmptyInputError, ValidationError
from embedq.worker.tokenization import EncodeOptions, HFTokenizer, encode_inputs

RIGHT = EncodeOptions(truncate=True, direction="right", prompt=None)
LEFT = EncodeOptions(truncate=True, direction="left", prompt=None)
STRICT = EncodeOptions(truncate=False, direction="right", prompt=None)


@pytest.fixture(scope="module")
def hf(model_path: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def tok(hf) -> HFTokenizer:  # type: ignore[no-untyped-def]
    return HFTokenizer(hf.backend_tokenizer, max_input_length=16)


def test_matches_transformers_without_truncation(tok: HFTokenizer, hf) -> None:  # type: ignore[no-untyped-def]
    texts = ["What is Deep Learning?", "short", "naïve café — ünïcödé"]
    assert encode_inputs(tok, texts, STRICT) == [hf(t)["input_ids"] for t in texts]


def test_right_truncation_keeps_special_tokens(tok: HFTokenizer, hf) -> None:  # type: ignore[no-untyped-def]
    text = " ".join(f"word{i}" for i in range(40))
    ids = encode_inputs(tok, [text], RIGHT)[0]
    assert ids == hf(text, truncation=True, max_length=16)["input_ids"]
    assert len(ids) == 16 and ids[0] == hf.cls_token_id and ids[-1] == hf.sep_token_id


def test_left_truncation_keeps_the_end(tok: HFTokenizer, hf) -> None:  # type: ignore[no-untyped-def]
    text = " ".join(f"word{i}" for i in range(40))
    ids = encode_inputs(tok, [text], LEFT)[0]
    content = hf(text, add_special_tokens=False)["input_ids"]
    assert ids == [hf.cls_token_id, *content[-14:], hf.sep_token_id]


def test_too_long_without_truncation(tok: HFTokenizer) -> None:
    with pytest.raises(ValidationError, match="less than 16 tokens"):
        encode_inputs(tok, ["a b c d e f g h i j k l m n o p q r s"], STRICT)


def test_prompt_is_prepended(tok: HFTokenizer, hf) -> None:  # type: ignore[no-untyped-def]
    opts = EncodeOptions(truncate=True, direction="right", prompt="query: ")
    assert encode_inputs(tok, ["hello"], opts)[0] == hf("query: hello")["input_ids"]


def test_empty_inputs(tok: HFTokenizer) -> None:
    with pytest.raises(EmptyInputError):
        encode_inputs(tok, [], RIGHT)
    with pytest.raises(ValidationError, match="cannot be empty"):
        encode_inputs(tok, ["ok", ""], RIGHT)


def test_token_id_inputs(tok: HFTokenizer) -> None:
    assert encode_inputs(tok, [[101, 7592, 102]], RIGHT) == [[101, 7592, 102]]
    assert encode_inputs(tok, [list(range(100, 130))], LEFT)[0] == list(range(114, 130))
    with pytest.raises(ValidationError, match="vocabulary"):
        encode_inputs(tok, [[10**9]], RIGHT)
    with pytest.raises(ValidationError, match="less than"):
        encode_inputs(tok, [list(range(100, 130))], STRICT)
