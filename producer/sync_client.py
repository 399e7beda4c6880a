"""A blocking wrapper around AsyncClient, driven by an event loop on its own thread."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncGenerator, Coroutine, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from embedq.common.scores import Prediction, Ranked
from embedq.common.settings import DEFAULT_MODEL_NAME, DEFAULT_REDIS_URL
from embedq.producer.async_client import AsyncClient, Texts

T = TypeVar("T")


class Client:
    """Same methods as :class:`AsyncClient`, blocking. Usable from any thread."""

    def __init__(
        self, redis_url: str = DEFAULT_REDIS_URL, *, model: str = DEFAULT_MODEL_NAME, **kwargs: Any
    ) -> None:
        # embed_many generators not yet closed (closed by close()).
        self._generators: weakref.WeakSet[AsyncGenerator[np.ndarray, None]] = weakref.WeakSet()
        # Built first: bad arguments raise before a loop thread exists to be left behind.
        self._async = AsyncClient(redis_url, model=model, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="embedq-client", daemon=True)
        self._thread.start()
        try:
            self._call(self._async.start())
        except BaseException:
            self.close()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def model(self) -> str:
        return self._async.model

    def embed(self, texts: Texts, **params: Any) -> np.ndarray:
        return self._call(self._async.embed(texts, **params))

    def embed_sparse(self, texts: Texts, **params: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        return self._call(self._async.embed_sparse(texts, **params))

    def rerank(self, query: str, texts: Sequence[str], **params: Any) -> list[Ranked]:
        return self._call(self._async.rerank(query, texts, **params))

    def predict(self, inputs: str | Sequence[str | Sequence[str]], **params: Any) -> list[list[Prediction]]:
        return self._call(self._async.predict(inputs, **params))

    def embed_many(self, texts: Iterable[str], **params: Any) -> Iterator[np.ndarray]:
        agen = self._async.embed_many(texts, **params)
        self._generators.add(agen)
        try:
            while True:
                try:
                    yield self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._generators.discard(agen)
            if not self._loop.is_closed():  # else close() closed the generator already
                self._call(agen.aclose())

    @property
    def client_id(self) -> str:
        return self._async.client_id

    @property
    def reply_stream(self) -> str:
        return self._async.reply_stream

    def close(self) -> None:
        if self._loop.is_closed():
            return
        # Generators left open end on their own loop while it runs (their in-flight
        # chunks are cancelled), not in a finalizer that finds the loop closed.
        for agen in list(self._generators):
            self._call(agen.aclose())
        self._generators.clear()
        self._call(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
