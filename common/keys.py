"""Every Redis key and group name embedq uses, made in this one module.

Per-model keys share the hash tag ``{model}`` so that they live on one Redis Cluster
shard and can be used together in a script. Reply streams hash freely.
"""

from __future__ import annotations

import re
from typing import Literal

# Two lanes per model: workers fill batches from the interactive lane first, so a query
# is never stuck behind a bulk backfill.
Lane = Literal["interactive", "bulk"]
LANES: tuple[Lane, ...] = ("interactive", "bulk")

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
    if not _MODEL_NAME.fullmatch(model):  # match's $ would let a trailing newline in
        raise ValueError(f"invalid model name {model!r}: use letters, digits and ._:/@+=- (at most 200)")
    return model


def check_client_id(client_id: str) -> str:
    if not _CLIENT_ID.fullmatch(client_id):
        raise ValueError(f"invalid client id {client_id!r}")
    return client_id


def jobs_stream(model: str, lane: Lane = "interactive") -> str:
    """A request stream of one served model: its interactive lane (``:jobs``) or its
    bulk lane (``:bulk``)."""
    suffix = "jobs" if lane == "interactive" else "bulk"
    if lane not in LANES:
        raise ValueError(f"unknown lane {lane!r}: use one of {', '.join(LANES)}")
    return f"{PREFIX}:{{{check_model_name(model)}}}:{suffix}"


def lane_of(stream: str) -> Lane:
    """The lane of a request stream named by jobs_stream()."""
    return "bulk" if stream.endswith(":bulk") else "interactive"


def dead_letter_stream(model: str) -> str:
    """Entries that could not be decoded or exhausted their deliveries."""
    return f"{PREFIX}:{{{check_model_name(model)}}}:dlq"


def workers_key(model: str) -> str:
    """Sorted set: worker id -> last heartbeat (unix ms)."""
    return f"{PREFIX}:{{{check_model_name(model)}}}:workers"


def model_info_key(model: str) -> str:
    """Hash describing the served model (dimension, limits, pooling, dtype...)."""
    return f"{PREFIX}:{{{check_model_name(model)}}}:info"


def suspects_key(model: str) -> str:
    """Hash: "<lane>:<entry id>" -> forward passes that job was in and that never finished
    (its worker crashed or hung). Jobs merely held by a dying worker are not counted."""
    return f"{PREFIX}:{{{check_model_name(model)}}}:suspects"


def stats_key(model: str) -> str:
    """Hash of running counters: jobs and inputs answered, cache hits and misses, and
    the workers' mean tokens per job (for the queued-tokens estimate)."""
    return f"{PREFIX}:{{{check_model_name(model)}}}:stats"


def cache_key(model: str, digest: str) -> str:
    """One cached embedding. No hash tag: cache entries spread over a cluster's shards."""
    return f"{PREFIX}:cache:{check_model_name(model)}:{digest}"


def reply_stream(client_id: str) -> str:
    """The reply stream of one client process (SDK instance or gateway)."""
    return f"{PREFIX}:reply:{check_client_id(client_id)}"


def client_lease(client_id: str) -> str:
    """The lease that keeps an explicit client id to one client (producer/lease.py).
    Under the reply stream's name, so the ACL pattern of a user's replies covers it;
    ``#`` is outside the client-id alphabet, so no reply stream has this name."""
    return f"{reply_stream(client_id)}#lease"


_REPLY_PREFIX = f"{PREFIX}:reply:"


def is_reply_stream(key: str) -> bool:
    """True for a key named as reply_stream() names one: the only keys a worker writes
    replies to (not a client's lease, nor anything else under the prefix)."""
    return key.startswith(_REPLY_PREFIX) and _CLIENT_ID.fullmatch(key[len(_REPLY_PREFIX) :]) is not None


# Stream entry field names.
JOB_FIELD = b"j"
REPLY_FIELD = b"r"
