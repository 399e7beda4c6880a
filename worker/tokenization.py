"""Turning a job's inputs into token ids, with TEI's truncation and prompt rules.

Uses the Rust ``tokenizers`` library directly (no torch): content is encoded without
special tokens, cut to the room left by them, then the post-processor adds them back.
This matches Hugging Face truncation, which never drops [CLS]/[SEP].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from embedq.common.errors import EmptyInputError, TokenizerError, ValidationError
from embedq.common.wire import Input, TokenList, TruncationDirection


@dataclass(frozen=True, kw_only=True)
class EncodeOptions:
    truncate: bool
    direction: TruncationDirection
    prompt: str | None


class TextTokenizer(Protocol):
    """What the worker needs of a tokenizer; backends provide one."""

    max_input_length: int
    vocab_size: int

    def encode(self, texts: Sequence[str], options: EncodeOptions) -> list[list[int]]: ...

    def tokenize(
        self, texts: Sequence[str], *, add_special_tokens: bool, prompt: str | None
    ) -> list[TokenList]:
        """Tokens with their text and UTF-8 byte offsets (TEI's /tokenize), no truncation."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


def too_long(given: int, limit: int) -> ValidationError:
    return ValidationError(f"`inputs` must have less than {limit} tokens. Given: {given}")


def check_token_ids(ids: list[int], vocab_size: int, limit: int, options: EncodeOptions) -> list[int]:
    """Validate an input given as token ids (used as is: no prompt, no special tokens)."""
    if not ids:
        raise ValidationError("`inputs` cannot be empty")
    for tok in ids:
        if not 0 <= tok < vocab_size:
            raise ValidationError(f"token id {tok} is outside the vocabulary (size {vocab_size})")
    if len(ids) > limit:
        if not options.truncate:
            raise too_long(len(ids), limit)
        ids = ids[:limit] if options.direction == "right" else ids[-limit:]
    return ids


def encode_inputs(
    tokenizer: TextTokenizer, inputs: Sequence[Input], options: EncodeOptions
) -> list[list[int]]:
    """Token ids for every input of a job, in order; raises typed request errors."""
    if not inputs:
        raise EmptyInputError("Batch is empty")
    texts: list[str] = []
    text_slots: list[int] = []
    out: list[list[int]] = [[] for _ in inputs]
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            if not item:
                raise ValidationError("`inputs` cannot be empty")
            texts.append(item)
            text_slots.append(i)
        else:
            out[i] = check_token_ids(item, tokenizer.vocab_size, tokenizer.max_input_length, options)
    if texts:
        for slot, ids in zip(text_slots, tokenizer.encode(texts, options), strict=True):
            out[slot] = ids
    return out


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with per-request truncation and prompts."""

    def __init__(self, backend: object, max_input_length: int) -> None:
        from tokenizers import Tokenizer

        assert isinstance(backend, Tokenizer)
        # Our own copy: truncation and padding are decided per request, not globally.
        self._tok = Tokenizer.from_str(backend.to_str())
        self._tok.no_truncation()
        self._tok.no_padding()
        self._specials = self._tok.num_special_tokens_to_add(False)
        self.max_input_length = max_input_length
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: Sequence[str], options: EncodeOptions) -> list[list[int]]:
        if options.prompt:
            texts = [options.prompt + t for t in texts]
        try:
            encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        except Exception as exc:  # the Rust tokenizer raises plain Exception
            raise TokenizerError(f"tokenizer failed: {exc}") from exc
        room = self.max_input_length - self._specials
        out: list[list[int]] = []
        for enc in encodings:
            if len(enc.ids) > room:
                if not options.truncate:
                    raise too_long(len(enc.ids) + self._specials, self.max_input_length)
                enc.truncate(room, direction=options.direction)
            out.append(self._tok.post_process(enc, None, True).ids)
        return out

    def tokenize(
        self, texts: Sequence[str], *, add_special_tokens: bool, prompt: str | None
    ) -> list[TokenList]:
        texts = [(prompt or "") + t for t in texts]
        try:
            encodings = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        except Exception as exc:
            raise TokenizerError(f"tokenizer failed: {exc}") from exc
        out = []
        for text, enc in zip(texts, encodings, strict=True):
            # Python's tokenizers reports character offsets; TEI's are byte offsets.
            byte_at = char_to_byte_offsets(text)
            raw = text.encode("utf-8")
            pieces: list[str] = []
            starts: list[int] = []
            stops: list[int] = []
            for token, (a, b), special in zip(enc.tokens, enc.offsets, enc.special_tokens_mask, strict=True):
                if special:
                    pieces.append(token)
                    starts.append(-1)
                    stops.append(-1)
                else:
                    start, stop = byte_at[a], byte_at[b]
                    pieces.append(raw[start:stop].decode("utf-8", "replace"))
                    starts.append(start)
                    stops.append(stop)
            out.append(
                TokenList(
                    ids=list(enc.ids),
                    texts=pieces,
                    special=[bool(m) for m in enc.special_tokens_mask],
                    starts=starts,
                    stops=stops,
                )
            )
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        for tok in ids:
            if not 0 <= tok < self.vocab_size:
                raise ValidationError(f"token id {tok} is outside the vocabulary (size {self.vocab_size})")
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def char_to_byte_offsets(text: str) -> list[int]:
    """byte_at[i] = UTF-8 byte offset of character i (and of the end, at len(text))."""
    out = [0] * (len(text) + 1)
    pos = 0
    for i, ch in enumerate(text):
        out[i] = pos
        pos += len(ch.encode("utf-8"))
    out[len(text)] = pos
    return out
