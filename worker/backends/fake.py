"""A deterministic backend without a model, for queue-mechanics tests and capacity runs.

Tokens are whitespace words hashed into a vocabulary; a vector is the sum of rows of a
fixed random table picked by token id and position. Same text in, same vector out, in
any process, at a few microseconds a row, so capacity runs measure the queue.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import time
from collections.abc import Sequence

import numpy as np

from embedq.common.wire import TokenList
from embedq.worker.backends.base import ModelDescription
from embedq.worker.config import WorkerConfig
from embedq.worker.tokenization import EncodeOptions, char_to_byte_offsets, too_long

_VOCAB = 30522
_TABLE_ROWS = 8191
_CLS, _SEP = 101, 102
# Words that make the fake model fail, so tests can send poison through the real queue.
RAISE_WORD = "EMBEDQ_FAKE_RAISE"
CRASH_WORD = "EMBEDQ_FAKE_CRASH"
HANG_WORD = "EMBEDQ_FAKE_HANG"


class FakeTokenizer:
    def __init__(self, max_input_length: int) -> None:
        self.max_input_length = max_input_length
        self.vocab_size = _VOCAB

    @staticmethod
    @functools.lru_cache(maxsize=1 << 16)  # text repeats its words; hashing each costs µs
    def _word_id(word: str) -> int:
        digest = hashlib.blake2b(word.encode("utf-8"), digest_size=4).digest()
        return 1000 + int.from_bytes(digest, "little") % (_VOCAB - 1000)

    def encode(self, texts: Sequence[str], options: EncodeOptions) -> list[list[int]]:
        room = self.max_input_length - 2
        out = []
        for text in texts:
            if options.prompt:
                text = options.prompt + text
            ids = [self._word_id(w) for w in text.split()] or [self._word_id(text)]
            if len(ids) > room:
                if not options.truncate:
                    raise too_long(len(ids) + 2, self.max_input_length)
                ids = ids[:room] if options.direction == "right" else ids[-room:]
            out.append([_CLS, *ids, _SEP])
        return out

    def encode_pairs(
        self, pairs: Sequence[tuple[str, str]], options: EncodeOptions
    ) -> list[tuple[list[int], list[int]]]:
        # Not a kind the fake model serves (the worker never routes score kinds to an
        # embedding model); defined for the protocol's sake: [CLS] a [SEP] b [SEP], each
        # side encoded (and truncated) on its own.
        out = []
        for first, second in pairs:
            a = self.encode([first], options)[0]
            b = self.encode([second], options)[0][1:]
            out.append(([*a, *b], [0] * len(a) + [1] * len(b)))
        return out

    def tokenize(
        self, texts: Sequence[str], *, add_special_tokens: bool, prompt: str | None
    ) -> list[TokenList]:
        out = []
        for text in texts:
            text = (prompt or "") + text
            byte_at = char_to_byte_offsets(text)
            ids, pieces, starts, stops = [], [], [], []
            pos = 0
            for word in text.split():
                at = text.index(word, pos)
                pos = at + len(word)
                ids.append(self._word_id(word))
                pieces.append(word)
                starts.append(byte_at[at])
                stops.append(byte_at[pos])
            special = [False] * len(ids)
            if add_special_tokens:
                ids, pieces = [_CLS, *ids, _SEP], ["[CLS]", *pieces, "[SEP]"]
                starts, stops, special = [-1, *starts, -1], [-1, *stops, -1], [True, *special, True]
            out.append(TokenList(ids=ids, texts=pieces, special=special, starts=starts, stops=stops))
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # Word ids are hashes and cannot be inverted: name them instead.
        keep = [i for i in ids if not (skip_special_tokens and i in (_CLS, _SEP))]
        return " ".join(f"<{i}>" for i in keep)


class FakeBackend:
    def __init__(self, config: WorkerConfig) -> None:
        self.dim = config.fake_dim
        self.tokenizer = FakeTokenizer(max_input_length=512)
        self.description = ModelDescription(
            model_id="fake",
            dim=self.dim,
            max_input_length=512,
            pooling="mean",
            dtype="float32",
            device="cpu",
            prompts={"query": "query: ", "passage": "passage: "},
            revision=f"fake-{self.dim}",
        )
        self._delay_per_token = config.fake_delay_us_per_token / 1e6
        table = np.random.default_rng(0).standard_normal((_TABLE_ROWS, self.dim), dtype=np.float32)
        # A zero row past the end, where padded positions point.
        self._table = np.vstack([table, np.zeros((1, self.dim), dtype=np.float32)])
        self._raise_id = FakeTokenizer._word_id(RAISE_WORD)
        self._crash_id = FakeTokenizer._word_id(CRASH_WORD)
        self._hang_id = FakeTokenizer._word_id(HANG_WORD)
        self._poison_ids = np.array([self._raise_id, self._crash_id, self._hang_id], dtype=np.int64)

    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        lengths = np.fromiter(map(len, batch), dtype=np.int64, count=len(batch))
        flat = np.fromiter(itertools.chain.from_iterable(batch), dtype=np.int64, count=int(lengths.sum()))
        if np.isin(flat, self._poison_ids).any():  # one vector test; the rare hit looks closer
            self._poison(batch)
        # Ids laid into a padded matrix by one mask assignment (no Python loop per row);
        # padded positions point at the table's zero row.
        width = int(lengths.max())
        positions = np.arange(width)
        real = positions[None, :] < lengths[:, None]
        rows = np.full((len(batch), width), _TABLE_ROWS, dtype=np.int64)
        at = np.broadcast_to(positions, real.shape)[real]  # each token's position, in flat's order
        rows[real] = (flat * 31 + at * 7919) % _TABLE_ROWS
        out: np.ndarray = self._table[rows].sum(axis=1)
        if self._delay_per_token:
            time.sleep(self._delay_per_token * flat.size)
        return out

    def _poison(self, batch: Sequence[Sequence[int]]) -> None:
        for ids in batch:
            if self._crash_id in ids:
                os._exit(17)  # a segfault-like death: no cleanup, no reply
            if self._raise_id in ids:
                raise RuntimeError("poison input")
            if self._hang_id in ids:
                time.sleep(24 * 3600)  # a model stuck in native code

    def embed_all(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        self.embed(batch)  # the same poison hooks and delay
        return [
            self._table[(np.asarray(ids, dtype=np.int64) * 31 + np.arange(len(ids)) * 7919) % _TABLE_ROWS]
            for ids in batch
        ]

    def predict(self, batch: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]]) -> np.ndarray:
        # An embedding model has no classification head; one made-up logit keeps the
        # protocol whole (the worker never routes score kinds to an embedding model).
        return self.embed(batch)[:, :1]

    def embed_sparse(self, batch: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        # Not an embedding kind the fake model serves; defined for the protocol's sake.
        return [
            (np.unique(np.asarray(ids, dtype=np.int32)), np.ones(len(set(ids)), np.float32)) for ids in batch
        ]

    def warmup(self) -> None:
        return None
