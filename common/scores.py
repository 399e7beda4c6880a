"""Turning a classifier's raw logits into TEI's rerank and predict answers (pure numpy).

Shared by the SDK and the gateway, so both give the same scores for the same reply.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Ranked:
    index: int
    score: float


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float


def sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of a negative magnitude only: no overflow for large logits.
    e = np.exp(-np.abs(x))
    # numpy's ufunc stubs type the result as Any.
    out: np.ndarray = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    out: np.ndarray = (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)
    return out


def rank(logits: np.ndarray, *, raw_scores: bool = False, top_n: int | None = None) -> list[Ranked]:
    """Inputs by relevance, highest first: sigmoid of each single logit unless raw.

    Ties keep input order, so equal scores rank stably.
    """
    column = np.asarray(logits, dtype=np.float32).reshape(len(logits), -1)[:, 0]
    scores = column if raw_scores else sigmoid(column)
    order = np.argsort(-scores, kind="stable")
    if top_n is not None:
        order = order[:top_n]
    return [Ranked(int(i), float(scores[i])) for i in order]


def predictions(logits: np.ndarray, labels: list[str], *, raw_scores: bool = False) -> list[list[Prediction]]:
    """Per input, every label with its score, highest first: softmax over the labels
    (sigmoid for a single label) unless raw."""
    rows = np.asarray(logits, dtype=np.float32).reshape(len(logits), len(labels))
    if not raw_scores:
        rows = sigmoid(rows) if len(labels) == 1 else softmax(rows)
    out = []
    for row in rows:
        order = np.argsort(-row, kind="stable")
        out.append([Prediction(labels[j], float(row[j])) for j in order])
    return out
