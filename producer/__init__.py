"""Producers: the SDK (and later the HTTP gateway). Imports embedq.common only, never torch."""

from embedq.producer.async_client import AsyncClient
from embedq.producer.sync_client import Client

__all__ = ["AsyncClient", "Client"]
