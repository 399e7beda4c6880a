"""embedq: text-embedding inference served by workers behind Redis Streams.

The public SDK::

    from embedq import AsyncClient, Client
"""

from embedq.common.errors import (
    BackendError,
    ClientIdInUseError,
    EmbedqError,
    EmptyInputError,
    ModelNotServedError,
    OverloadedError,
    ProtocolError,
    QueueUnavailableError,
    RequestError,
    RequestTimeoutError,
    TokenizerError,
    ValidationError,
)
from embedq.common.scores import Prediction, Ranked
from embedq.producer import AsyncClient, Client

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BackendError",
    "Client",
    "ClientIdInUseError",
    "EmbedqError",
    "EmptyInputError",
    "ModelNotServedError",
    "OverloadedError",
    "Prediction",
    "ProtocolError",
    "QueueUnavailableError",
    "Ranked",
    "RequestError",
    "RequestTimeoutError",
    "TokenizerError",
    "ValidationError",
    "__version__",
]
