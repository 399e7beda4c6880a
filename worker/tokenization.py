"""Turning a job's inputs into token ids, with TEI's truncation and prompt rules.

Uses the Rust ``tokenizers`` library directly (no torch): content is encoded without
special tokens, cut to the room left by them, then the post-processor adds them back.
This matches Hugging Face truncation, which never drops [CLS]/[SEP].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

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

    def encode_pairs(
        self, pairs: Sequence[tuple[str, str]], options: EncodeOptions
    ) -> list[tuple[list[int], list[int]]]:
        """(ids, token type ids) of text pairs, truncated longest-first when allowed."""
        ...

    def tokenize(
        self, texts: Sequence[str], *, add_special_tokens: bool, prompt: str | None
    ) -> list[TokenList]:
        """Tokens with their text and UTF-8 byte offsets (TEI's /tokenize), no truncation."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


def too_long(given: int, limit: int) -> ValidationError:
    return ValidationError(f"`inputs` must have less than {limit} tokens. Given: {given}")


def check_token_ids(
    given: list[int] | list[str], vocab_size: int, limit: int, options: EncodeOptions
) -> list[int]:
    """Validate an input given as token ids (used as is: no prompt, no special tokens)."""
    if not given:
        raise ValidationError("`inputs` cannot be empty")
    for tok in given:
        if not isinstance(tok, int):
            raise ValidationError("`inputs` must be texts or lists of token ids")
        if not 0 <= tok < vocab_size:
            raise ValidationError(f"token id {tok} is outside the vocabulary (size {vocab_size})")
    ids = cast("list[int]", given)  # every item was checked to be an int just above
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


Encoded = tuple[list[int], list[int]]


def encode_scoring_inputs(
    tokenizer: TextTokenizer, inputs: Sequence[Input], query: str | None, options: EncodeOptions
) -> list[Encoded]:
    """(ids, token type ids) for a rerank job (each input paired with ``query``) or a
    predict job (each input a text or a [text, text] pair)."""
    if not inputs:
        raise EmptyInputError("Batch is empty")
    singles: list[tuple[int, str]] = []
    pairs: list[tuple[int, tuple[str, str]]] = []
    # As in TEI, a pair is empty only when both of its texts are: (query, "") is scored.
    for i, item in enumerate(inputs):
        if isinstance(item, str) and (item or query):
            if query is not None:
                pairs.append((i, (query, item)))
            else:
                singles.append((i, item))
        elif (
            query is None
            and isinstance(item, list)
            and len(item) == 2
            and all(isinstance(x, str) for x in item)
            and (item[0] or item[1])
        ):
            pairs.append((i, (str(item[0]), str(item[1]))))
        elif item == "" or (isinstance(item, list) and (not item or item == ["", ""])):
            raise ValidationError("`inputs` cannot be empty")
        else:
            what = "texts" if query is not None else "texts or [text, text] pairs"
            raise ValidationError(f"`inputs` of this request must be {what}")
    out: list[Encoded] = [([], []) for _ in inputs]
    if singles:
        encoded = tokenizer.encode([t for _, t in singles], options)
        for (i, _), ids in zip(singles, encoded, strict=True):
            out[i] = (ids, [0] * len(ids))
    if pairs:
        for (i, _), enc in zip(pairs, tokenizer.encode_pairs([p for _, p in pairs], options), strict=True):
            out[i] = enc
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
        self._truncating: dict[str, Any] = {}
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

    def encode_pairs(self, pairs: Sequence[tuple[str, str]], options: EncodeOptions) -> list[Encoded]:
        try:
            encodings = self._tok.encode_batch(list(pairs), add_special_tokens=True)
        except Exception as exc:
            raise TokenizerError(f"tokenizer failed: {exc}") from exc
        out: list[Encoded] = []
        for pair, enc in zip(pairs, encodings, strict=True):
            if len(enc.ids) > self.max_input_length:
                if not options.truncate:
                    raise too_long(len(enc.ids), self.max_input_length)
                enc = self._truncator(options.direction).encode(*pair, add_special_tokens=True)
            out.append((list(enc.ids), list(enc.type_ids)))
        return out

    def _truncator(self, direction: TruncationDirection) -> Any:
        """A copy of the tokenizer that truncates pairs longest-first (Hugging Face's rule)."""
        from tokenizers import Tokenizer

        tok = self._truncating.get(direction)
        if tok is None:
            tok = Tokenizer.from_str(self._tok.to_str())
            tok.no_padding()
            tok.enable_truncation(self.max_input_length, strategy="longest_first", direction=direction)
            self._truncating[direction] = tok
        return tok

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


# Qwen3-Reranker's prompt: the model answers "yes" or "no" after the assistant tag.
LLM_RERANK_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
    'the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
LLM_RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


class LlmRerankTokenizer(HFTokenizer):
    """Pairs for a causal-LM reranker: each (query, document) becomes the model's prompt;
    the content between the fixed prefix and suffix is what truncation cuts."""

    def __init__(self, backend: object, max_input_length: int, instruction: str) -> None:
        super().__init__(backend, max_input_length)
        self.instruction = instruction
        self._prefix = list(self._tok.encode(LLM_RERANK_PREFIX, add_special_tokens=False).ids)
        self._suffix = list(self._tok.encode(LLM_RERANK_SUFFIX, add_special_tokens=False).ids)

    def token_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"the tokenizer has no {token!r} token, which an LLM reranker needs")
        return int(tid)

    def encode_pairs(self, pairs: Sequence[tuple[str, str]], options: EncodeOptions) -> list[Encoded]:
        texts = [f"<Instruct>: {self.instruction}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
        try:
            encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        except Exception as exc:
            raise TokenizerError(f"tokenizer failed: {exc}") from exc
        room = self.max_input_length - len(self._prefix) - len(self._suffix)
        out: list[Encoded] = []
        for enc in encodings:
            content = list(enc.ids)
            if len(content) > room:
                if not options.truncate:
                    raise too_long(
                        len(content) + len(self._prefix) + len(self._suffix), self.max_input_length
                    )
                content = content[:room] if options.direction == "right" else content[-room:]
            ids = [*self._prefix, *content, *self._suffix]
            out.append((ids, [0] * len(ids)))
        return out


def char_to_byte_offsets(text: str) -> list[int]:
    """byte_at[i] = UTF-8 byte offset of character i (and of the end, at len(text))."""
    out = [0] * (len(text) + 1)
    pos = 0
    for i, ch in enumerate(text):
        out[i] = pos
        pos += len(ch.encode("utf-8"))
    out[len(text)] = pos
    return out
