"""The wire contract shared by collector and pipeline: message types, codecs, topic names, config.

Imports nothing else from spendstream.
"""

from schemas.config import Config, load_config
from schemas.deadletter import DeadLetter
from schemas.errors import ConfigError, PermanentError, SchemaError, SpendstreamError, TransientError
from schemas.topics import TopicNames
from schemas.usage import TokenCounts, UsageEvent, decode_usage_batch, encode_usage_batch

__all__ = [
    "Config",
    "ConfigError",
    "DeadLetter",
    "PermanentError",
    "SchemaError",
    "SpendstreamError",
    "TokenCounts",
    "TopicNames",
    "TransientError",
    "UsageEvent",
    "decode_usage_batch",
    "encode_usage_batch",
    "load_config",
]
