"""The retrieve step of a RAG system on embedq's embedded defaults.

Starts a private Redis and one worker serving the bundled all-MiniLM-L6-v2, embeds a
few documents through the SDK, and ranks them for a question by cosine similarity.

    python examples/rag_quickstart.py ["your question"]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from embedq import Client
from embedq.up import Stack

DOCUMENTS = [
    "Redis Streams is an append-only log data structure with consumer groups.",
    "The Eiffel Tower was completed in 1889 and is 330 metres tall.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "A consumer group lets several workers share the entries of one stream.",
    "Sourdough bread rises thanks to wild yeast and lactic acid bacteria.",
    "Embedding models map sentences to vectors so that similar meanings are close.",
]


def main() -> int:
    question = sys.argv[1] if len(sys.argv) > 1 else "How can several workers read one queue?"
    with tempfile.TemporaryDirectory(prefix="embedq-") as data_dir:
        with Stack(data_dir=Path(data_dir)) as stack, Client(stack.redis_url, model=stack.model) as client:
            doc_vectors = client.embed(DOCUMENTS)  # (6, 384), L2-normalised
            query = client.embed(question)[0]
            scores = doc_vectors @ query  # cosine similarity
            print(f"\nquestion: {question}")
            for rank, i in enumerate(np.argsort(-scores)[:3], start=1):
                print(f"  {rank}. {scores[i]:.3f}  {DOCUMENTS[i]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
