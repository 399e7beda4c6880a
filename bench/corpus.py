"""A deterministic English corpus for benchmarks, cut from CPython's bundled docs.

The prose comes from ``pydoc_data.topics`` (the text behind ``help("topic")``), so it
needs no download. The corpus depends only on ``n``, ``seed`` and the Python version
(the topics text changes between CPython releases): ``fingerprint()`` tells two
corpora apart.

    python bench/corpus.py [--n 4000] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics

MIN_WORDS = 8
MAX_WORDS = 200


def _words() -> list[str]:
    """Every word of the topics, in sorted-key order, whitespace collapsed."""
    from pydoc_data.topics import topics

    text = " ".join(topics[key] for key in sorted(topics))
    return text.split()


def build_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """``n`` passages of MIN_WORDS..MAX_WORDS consecutive words (wrapping at the end)."""
    if n < 0:
        raise ValueError("n must be non-negative")
    words = _words()
    rng = random.Random(seed)
    passages: list[str] = []
    pos = 0
    for _ in range(n):
        length = rng.randint(MIN_WORDS, MAX_WORDS)  # inclusive on both ends
        run = [words[(pos + i) % len(words)] for i in range(length)]
        passages.append(" ".join(run))
        pos = (pos + length) % len(words)
    return passages


def fingerprint(corpus: list[str]) -> str:
    """A short hash of the corpus, to check two runs embedded the same texts."""
    h = hashlib.sha256()
    for text in corpus:
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    corpus = build_corpus(args.n, args.seed)
    counts = [len(text.split()) for text in corpus]
    print(f"passages: {len(corpus)}")
    if counts:
        print(f"words per passage: min {min(counts)}, mean {statistics.fmean(counts):.1f}, max {max(counts)}")
    print(f"total words: {sum(counts)}")
    print(f"fingerprint: {fingerprint(corpus)}")


if __name__ == "__main__":
    main()
