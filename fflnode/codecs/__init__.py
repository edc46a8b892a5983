"""Codecs for the exchange slot: how a chunk of a pseudo-gradient goes on the wire.

Every codec maps a float32 chunk to an `Encoded` (named arrays + small scalars) and back.
Codecs are sans-IO and deterministic in (seed, round, chunk): a receiver regenerates any
randomness the sender used. `make_codec` is the registry the config names.
"""

from fflnode.codecs.base import (
    CODECS,
    ChunkContext,
    Codec,
    Encoded,
    ErrorFeedback,
    NoneCodec,
    make_codec,
    register_codec,
)

__all__ = [
    "CODECS",
    "ChunkContext",
    "Codec",
    "Encoded",
    "ErrorFeedback",
    "NoneCodec",
    "make_codec",
    "register_codec",
]
