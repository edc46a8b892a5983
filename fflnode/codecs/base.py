"""The codec interface, the identity codec and error feedback.

Rule: `decode(encode(x))` must depend only on the Encoded value and the ChunkContext;
codecs keep no hidden per-peer state (error feedback is a separate wrapper, owned by the
sender). `Encoded.wire_bytes` is the exact number of body bytes that go on the wire for
the chunk; the frame header adds its own, counted by the transport.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from fflnode.errors import ConfigError, FormatError, shown


@dataclass(frozen=True)
class ChunkContext:
    """Where a chunk sits: the shared seed, the round, the chunk index and its length."""

    seed: int
    round: int
    chunk: int
    numel: int


@dataclass
class Encoded:
    """A chunk on the wire: named numpy arrays plus small scalar metadata."""

    codec: str
    parts: dict[str, np.ndarray]
    meta: dict[str, float | int] = field(default_factory=dict)

    @property
    def wire_bytes(self) -> int:
        return sum(int(a.nbytes) for a in self.parts.values())


class Codec(ABC):
    """Compresses float32 chunks of a flat update. Subclasses set `name`."""

    name: str = ""

    @abstractmethod
    def encode(self, chunk: torch.Tensor, ctx: ChunkContext) -> Encoded:
        """Encode a 1-D float32 CPU tensor of ctx.numel elements."""

    @abstractmethod
    def decode(self, enc: Encoded, ctx: ChunkContext) -> torch.Tensor:
        """The float32 estimate of the chunk, shape (ctx.numel,)."""

    def part_spec(self, ctx: ChunkContext) -> dict[str, tuple[str, tuple[int, ...]]] | None:
        """Expected {part: (dtype, shape)} for a chunk, for receiver-side validation;
        None when it depends on meta (then `validate` checks it)."""
        return None

    def validate(self, enc: Encoded, ctx: ChunkContext) -> None:
        """Raise FormatError unless `enc` is a well-formed encoding of a ctx chunk."""
        if enc.codec != self.name:
            raise FormatError(f"codec {shown(enc.codec)} where {self.name!r} was agreed")
        spec = self.part_spec(ctx)
        if spec is None:
            return
        if set(enc.parts) != set(spec):
            raise FormatError(f"{self.name}: parts {sorted(enc.parts)} != {sorted(spec)}")
        for name, (dtype, shape) in spec.items():
            a = enc.parts[name]
            if a.dtype != np.dtype(dtype) or tuple(a.shape) != shape:
                raise FormatError(
                    f"{self.name}: part {name} is {a.dtype}{list(a.shape)}, "
                    f"expected {dtype}{list(shape)}"
                )

    @property
    def biased(self) -> bool:
        """Whether the codec's estimate is biased (then error feedback is advised)."""
        return False

    def for_mean(self) -> Codec:
        """The codec a shard's owner re-encodes the members' mean with, in a lossy
        reduce-scatter (fflnode.exchange_sharded), and gatherers decode it with: this
        one unless a variant suits a one-shot encoding followed by error feedback."""
        return self


class NoneCodec(Codec):
    """The identity: the chunk goes on the wire as raw float32."""

    name = "none"

    def encode(self, chunk: torch.Tensor, ctx: ChunkContext) -> Encoded:
        return Encoded(self.name, {"values": chunk.detach().cpu().contiguous().numpy()})

    def decode(self, enc: Encoded, ctx: ChunkContext) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(enc.parts["values"]))

    def part_spec(self, ctx: ChunkContext) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"values": ("<f4", (ctx.numel,))}


class ErrorFeedback:
    """Error feedback (EF) around any codec: what a chunk's encoding lost is added to the
    same chunk next round, so a biased codec's errors do not accumulate.

    Holds one float32 residual per chunk index (the sender's own state, checkpointed with
    the optimizer state).
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.residual: dict[int, torch.Tensor] = {}

    def encode(self, chunk: torch.Tensor, ctx: ChunkContext) -> tuple[Encoded, torch.Tensor]:
        """Encode chunk + residual; returns the encoding and the receiver's estimate."""
        target = chunk + self.residual[ctx.chunk] if ctx.chunk in self.residual else chunk
        enc = self.codec.encode(target, ctx)
        estimate = self.codec.decode(enc, ctx)
        self.residual[ctx.chunk] = target - estimate
        return enc, estimate

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ef.{i}": r for i, r in sorted(self.residual.items())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.residual = {
            int(k.split(".", 1)[1]): v for k, v in state.items() if k.startswith("ef.")
        }


CodecFactory = Callable[..., Codec]
CODECS: dict[str, CodecFactory] = {"none": NoneCodec}


def register_codec(name: str, factory: CodecFactory) -> None:
    CODECS[name] = factory


def make_codec(name: str, **params: object) -> Codec:
    """The codec `name` built with its config parameters; unknown names are a ConfigError."""
    try:
        factory = CODECS[name]
    except KeyError:
        raise ConfigError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}") from None
    try:
        return factory(**params)
    except TypeError as e:
        raise ConfigError(f"codec {name!r}: {e}") from None
