"""The one error tree of embedq.

    EmbedqError
    ├── RequestError              the caller sent something we will not run
    │   ├── ValidationError       bad field, too many tokens, unknown prompt   (TEI: Validation, 422)
    │   ├── TokenizerError        the tokenizer failed on an input             (TEI: Tokenizer, 422)
    │   ├── EmptyInputError       no inputs at all                             (TEI: Empty, 400)
    │   └── PayloadTooLargeError  an HTTP body over the payload limit          (413)
    ├── AuthenticationError       missing or wrong API key (HTTP gateway)      (401)
    ├── ModelNotServedError       no worker has ever registered the model      (404)
    ├── OverloadedError           admission limit reached                      (TEI: Overloaded, 429)
    ├── BackendError              the model failed                             (TEI: Backend, 424)
    ├── RequestTimeoutError       the deadline passed before an answer         (504)
    ├── ProtocolError             a message that cannot be decoded             (422)
    ├── QueueUnavailableError     Redis cannot be reached                      (503)
    └── ClientIdInUseError        an explicit SDK client_id another client holds

Every error crosses the queue as ``(code, message)`` and is rebuilt on the other side
by :func:`error_from_wire`, so a caller always catches the same class the worker raised.
"""

from __future__ import annotations

from typing import ClassVar


class EmbedqError(Exception):
    """Base class of every error embedq raises on purpose."""

    code: ClassVar[str] = "internal"
    tei_type: ClassVar[str] = "Backend"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RequestError(EmbedqError):
    code = "request"
    tei_type = "Validation"
    http_status = 422


class ValidationError(RequestError):
    code = "validation"
    tei_type = "Validation"
    http_status = 422


class TokenizerError(RequestError):
    code = "tokenizer"
    tei_type = "Tokenizer"
    http_status = 422


class EmptyInputError(RequestError):
    code = "empty"
    tei_type = "Empty"
    http_status = 400


class PayloadTooLargeError(RequestError):
    code = "payload_too_large"
    tei_type = "PayloadTooLarge"
    http_status = 413


class AuthenticationError(EmbedqError):
    code = "unauthorized"
    tei_type = "Unauthorized"
    http_status = 401


class ModelNotServedError(EmbedqError):
    code = "model_not_served"
    tei_type = "NotFound"
    http_status = 404


class OverloadedError(EmbedqError):
    code = "overloaded"
    tei_type = "Overloaded"
    http_status = 429


class BackendError(EmbedqError):
    code = "backend"
    tei_type = "Backend"
    http_status = 424


class ModelTypeError(BackendError):
    """A route of another type of model (/rerank on an embedding model...): TEI's 424,
    counted apart from model failures in its metrics."""

    code = "model_type"


class RequestTimeoutError(EmbedqError):
    code = "timeout"
    tei_type = "Timeout"
    http_status = 504


class ProtocolError(EmbedqError):
    code = "protocol"
    tei_type = "Validation"
    http_status = 422


class QueueUnavailableError(EmbedqError):
    code = "unavailable"
    tei_type = "Unhealthy"
    http_status = 503


class ClientIdInUseError(EmbedqError):
    """Raised by the SDK's start: two clients on one reply stream drop each other's replies."""

    code = "client_id_in_use"
    http_status = 409


_BY_CODE: dict[str, type[EmbedqError]] = {
    cls.code: cls
    for cls in (
        EmbedqError,
        RequestError,
        ValidationError,
        TokenizerError,
        EmptyInputError,
        PayloadTooLargeError,
        AuthenticationError,
        ModelNotServedError,
        OverloadedError,
        BackendError,
        ModelTypeError,
        RequestTimeoutError,
        ProtocolError,
        QueueUnavailableError,
        ClientIdInUseError,
    )
}


def error_from_wire(code: str, message: str) -> EmbedqError:
    """Rebuild the typed error a worker sent; unknown codes become a plain EmbedqError."""
    cls = _BY_CODE.get(code, EmbedqError)
    return cls(message)
