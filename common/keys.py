"""Every Redis key and group name embedq uses, made in this one module.

Per-model keys share the hash tag ``{model}`` so that they live on one Redis Cluster
shard and can be used together in a script. Reply streams hash freely.
"""

from __future__ import annotations

import re

PREFIX = "embedq"
# The consumer group every worker of a model reads with.
WORKER_GROUP = "embedq-workers"
# Set of the model names a worker has ever registered.
MODELS_SET = f"{PREFIX}:models"

# Served model names appear inside hash tags and key names: keep them printable and
# free of the characters that would break the tag.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,199}$")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def check_model_name(model: str) -> str:
    """Return ``model`` if it is a valid served-model name, else raise ValueError."""
    if not _MODEL_NAME.match(model):
        raise ValueError(f"invalid model name {model!r}: use letters, digits and ._:/@+=- (at most 200)")
    return model


def check_client_id(client_id: str) -> str:
    if not _CLIENT_ID.match(client_id):
        raise ValueError(f"invalid client id {client_id!r}")
    return client_id


def jobs_stream(model: str) -> str:
    """The request stream of one served model."""
    return f"{PREFIX}:{{{check_model_name(model)}}}:jobs"


def dead_letter_stream(model: str) -> str:
    """Entries that could not be decoded or exhausted their deliveries."""
    return f"{PREFIX}:{{{check_model_name(model)}}}:dlq"


def workers_key(model: str) -> str:
    """Sorted set: worker id -> last heartbeat (unix ms)."""
    return f"{PREFIX}:{{{check_model_name(model)}}}:workers"


def model_info_key(model: str) -> str:
    """Hash describing the served model (dimension, limits, pooling, dtype...)."""
    return f"{PREFIX}:{{{check_model_name(model)}}}:info"


def reply_stream(client_id: str) -> str:
    """The reply stream of one client process (SDK instance or gateway)."""
    return f"{PREFIX}:reply:{check_client_id(client_id)}"


def is_reply_stream(key: str) -> bool:
    """True for a key shaped like a reply stream: the only keys a worker writes replies to."""
    return key.startswith(f"{PREFIX}:reply:") and 0 < len(key) <= 256


# Stream entry field names.
JOB_FIELD = b"j"
REPLY_FIELD = b"r"
