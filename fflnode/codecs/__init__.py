"""Codecs for the exchange slot: how a chunk of a pseudo-gradient goes on the wire.

Every codec maps a float32 chunk to an `Encoded` (named arrays + small scalars) and back.
Codecs are sans-IO and deterministic in (seed, round, chunk): a receiver regenerates any
randomness the sender used. `make_codec` is the registry the config names. Importing
this package registers every codec: "none", "holo" (rotate + b-bit quantization),
"topk" (sparse, biased) and "sketch" (linear count sketch + heavy hitters).
"""

from fflnode.codecs import holo, sketch, topk
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
from fflnode.codecs.holo import HoloCodec
from fflnode.codecs.sketch import SketchCodec
from fflnode.codecs.topk import TopKCodec

__all__ = [
    "CODECS",
    "ChunkContext",
    "Codec",
    "Encoded",
    "ErrorFeedback",
    "HoloCodec",
    "NoneCodec",
    "SketchCodec",
    "TopKCodec",
    "holo",
    "make_codec",
    "register_codec",
    "sketch",
    "topk",
]
