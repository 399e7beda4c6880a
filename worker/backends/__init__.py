"""Model backends. Only the torch backend imports torch, and only when it is chosen."""

from __future__ import annotations

from embedq.worker.backends.base import Backend, ModelDescription
from embedq.worker.config import WorkerConfig


def load_backend(config: WorkerConfig) -> Backend:
    """Build the backend named by the config (torch is imported here, lazily)."""
    if config.backend == "fake":
        from embedq.worker.backends.fake import FakeBackend

        return FakeBackend(config)
    from embedq.worker.backends.torch_backend import TorchBackend

    return TorchBackend(config)


__all__ = ["Backend", "ModelDescription", "load_backend"]
