"""Reference implementations of the gradient codecs people ship, for tools/bench_codecs.py.

What this file owns: small, readable versions of the codecs fflnode's `holo` must be
compared with at equal bits per coordinate, behind fflnode's own `Codec` interface (so
`Encoded.wire_bytes` counts every byte that would go on the wire, and fflnode's
`ErrorFeedback` wraps them as it wraps `holo`). Each class names its source; the tests
in tests/test_codecs_reference.py check each against its definition, and against the
shipped package where that package installs (hivemind, torch.distributed).

* `UniformQuantization(bits)`: hivemind's `Uniform8BitQuantization` (1.1.12) at 8 bits,
  and its b-bit analogue: subtract the mean, bins of width 6 sigma / 2**b around it
  (`torch.quantize_per_tensor`, round half to even, clamped to the 2**b codes), and a
  codebook of the mean of the values in each bin. Wire as hivemind's buffer: int64
  codebook length, float32 codebook, codes (uint8 at 8 bits; b bit planes below).
* `QuantileQuantization(bits)`: hivemind's `Quantile8BitQuantization` and its analogue:
  2**b bins of equal population (quantile-of-quantiles over chunks of >= 1e5 values, as
  hivemind computes them), codebook = bin means. Same wire layout.
* `QSGD(levels, bucket)`: Alistarh et al. 2017. Per bucket of `bucket` coordinates with
  norm n = ||v||_2, each v_i goes to n * sign(v_i) * l / s with l = floor(s |v_i| / n) or
  l + 1, the latter with probability s |v_i| / n - l: unbiased, E Q(v) = v. Wire: one
  float32 norm per bucket and the signed level l in [-s, s] as a fixed-width code of
  ceil(log2(2 s + 1)) bits (the paper's Elias coding would shave bits at small s; a
  fixed width keeps the size known before encoding, as every other codec here).
* `SignScale(block)`: scaled signSGD, the compressor of EF-signSGD (Karimireddy et al.
  2019): C(v) = (||v||_1 / d) sign(v) per block of `block` coordinates (the paper takes
  one block per tensor). Biased: run it under error feedback. Wire: 1 bit per coordinate
  and a float32 scale per block.
* `PowerSGD(shapes, rank)`: Vogels et al. 2019, as torch.distributed's `powerSGD_hook`
  runs it (one power iteration per step, warm-started Q, a tensor compressed only when
  (n + m) r * min_compression_rate < n m, every other tensor, 1-D ones included, sent as
  float32). For one sender: P = M Q, P^ = orthonormal(P), Q = M^T P^, estimate P^ Q^T.
  Wire: P^ and Q as float32, (n + m) r * 32 bits per compressed n x m matrix. It keeps
  Q between rounds (the warm start), so one instance belongs to one sender, and its
  error feedback is fflnode's `ErrorFeedback` (the hook's is the same: residual =
  input + error - estimate, added to the next input).
* `Float16`: hivemind's `Float16Compression` (clamp to the float16 range, cast).
* `HivemindCodec(name)`: hivemind's own compression class, when hivemind is importable;
  the wire is the serialized protobuf `runtime_pb2.Tensor` it sends.

Randomness here (QSGD's rounding, PowerSGD's first Q) comes from a torch.Generator seeded
from (seed, round, chunk): fine for a benchmark, where nothing has to agree across
devices; fflnode's own codecs use the integer counter hash instead.

Must never: be imported by the daemon (it is a benchmark's yardstick, not a product codec).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from fflnode.codecs.base import ChunkContext, Codec, Encoded
from fflnode.codecs.packing import pack, unpack

HIVEMIND_RANGE_IN_SIGMAS = 6  # hivemind Uniform8BitQuantization.RANGE_IN_SIGMAS
HIVEMIND_QUANTILE_CHUNK = 10**5  # hivemind quantile_qq_approximation(min_chunk_size)
POWERSGD_MIN_COMPRESSION_RATE = 2  # torch PowerSGDState default
FP16_MIN, FP16_MAX = torch.finfo(torch.float16).min, torch.finfo(torch.float16).max


def _generator(ctx: ChunkContext, salt: int) -> torch.Generator:
    key = (ctx.seed * 1_000_003 + ctx.round) * 1_000_033 + ctx.chunk * 31 + salt
    return torch.Generator().manual_seed(key % (1 << 63))


def _codes_part(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes as they go on the wire: a byte each at 8 bits, else `bits` bit planes."""
    return codes.astype(np.uint8) if bits == 8 else pack(codes, bits)


def _codes_back(part: np.ndarray, bits: int, count: int) -> np.ndarray:
    return part if bits == 8 else unpack(part, bits, count)


def average_buckets(x: torch.Tensor, codes: torch.Tensor, n_bins: int) -> torch.Tensor:
    """The mean of the values in each bin (0 for an empty bin): hivemind's codebook."""
    sums = torch.zeros(n_bins).scatter_add_(0, codes.flatten().long(), x.flatten())
    counts = torch.clamp_min_(torch.bincount(codes.flatten(), minlength=n_bins), 1)
    return sums / counts


class _CodebookQuantization(Codec):
    """b-bit codes plus a float32 codebook of 2**b bin means, as hivemind sends them."""

    def __init__(self, bits: int) -> None:
        if not 1 <= bits <= 8:
            raise ValueError(f"{self.name}: bits must be in [1, 8], got {bits}")
        self.bits = bits
        self.n_bins = 1 << bits

    @property
    def biased(self) -> bool:
        return True  # deterministic rounding to bin means

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, chunk: torch.Tensor, ctx: ChunkContext) -> Encoded:
        x = chunk.detach().float().reshape(-1)
        codes = self.codes(x)
        codebook = average_buckets(x, codes, self.n_bins).numpy().astype(np.float32)
        return Encoded(
            self.name,
            {
                "codebook_len": np.array([self.n_bins], dtype=np.int64),
                "codebook": codebook,
                "codes": _codes_part(codes.numpy(), self.bits),
            },
        )

    def decode(self, enc: Encoded, ctx: ChunkContext) -> torch.Tensor:
        codes = _codes_back(enc.parts["codes"], self.bits, ctx.numel).astype(np.int64)
        return torch.from_numpy(enc.parts["codebook"][codes])


class UniformQuantization(_CodebookQuantization):
    """hivemind Uniform8BitQuantization (bits=8) and its b-bit analogue."""

    name = "uniform"

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.n_bins // 2
        centered = x - x.mean()
        std_unbiased = centered.norm() / math.sqrt(max(1, centered.numel() - 1))
        scale = HIVEMIND_RANGE_IN_SIGMAS * std_unbiased / self.n_bins
        if not float(scale) > 0:  # a constant chunk: every value in the middle bin
            return torch.full_like(x, offset, dtype=torch.uint8)
        with warnings.catch_warnings():  # deprecated in torch 2.13; hivemind calls it
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_tensor(centered, scale, offset, torch.quint8).int_repr()
        return q.clamp_(max=self.n_bins - 1)


def _chunk_size(num_elements: int, min_chunk_size: int) -> int:
    """hivemind get_chunk_size: chunks of at least min_chunk_size, balanced."""
    if min_chunk_size >= num_elements:
        return min_chunk_size
    leftover = num_elements % min_chunk_size
    num_chunks = num_elements // min_chunk_size
    return min_chunk_size + (leftover - 1) // num_chunks + 1


def quantile_of_quantiles(array: np.ndarray, n_quantiles: int) -> np.ndarray:
    """hivemind quantile_qq_approximation, serially: the quantiles of each chunk's
    quantiles (equal to np.quantile on chunks of one; an approximation above)."""
    array = np.ascontiguousarray(array.reshape(-1))
    quantiles = np.linspace(0.0, 1.0, num=n_quantiles, dtype=array.dtype)
    chunk = _chunk_size(len(array), HIVEMIND_QUANTILE_CHUNK)
    num_chunks = (len(array) - 1) // chunk + 1
    partial = np.empty((num_chunks, len(quantiles)), dtype=array.dtype)
    for i in range(num_chunks):
        np.quantile(array[chunk * i : chunk * (i + 1)], quantiles, out=partial[i])
    return np.quantile(partial, quantiles)


class QuantileQuantization(_CodebookQuantization):
    """hivemind Quantile8BitQuantization (bits=8) and its b-bit analogue."""

    name = "quantile"

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        borders = torch.as_tensor(quantile_of_quantiles(x.numpy(), self.n_bins + 1)[1:-1])
        codes = torch.clamp_(torch.bucketize(x, borders), 0, self.n_bins - 1)
        return codes.to(torch.uint8)


class QSGD(Codec):
    """QSGD with s = `levels` levels and one L2 norm per bucket of `bucket` coordinates."""

    name = "qsgd"

    def __init__(self, levels: int, bucket: int = 512) -> None:
        if levels < 1 or bucket < 1:
            raise ValueError("qsgd: levels and bucket must be positive")
        self.s = levels
        self.bucket = bucket
        self.bits = max(1, math.ceil(math.log2(2 * levels + 1)))  # l in [-s, s]

    def _buckets(self, n: int) -> int:
        return -(-n // self.bucket)

    def encode(self, chunk: torch.Tensor, ctx: ChunkContext) -> Encoded:
        x = chunk.detach().float().reshape(-1)
        n, b = x.numel(), self._buckets(x.numel())
        v = torch.zeros(b * self.bucket)
        v[:n] = x
        v = v.view(b, self.bucket)
        norms = v.norm(dim=1, keepdim=True)
        r = v.abs() / torch.where(norms > 0, norms, torch.ones_like(norms)) * self.s
        low = r.floor()
        u = torch.rand(r.shape, generator=_generator(ctx, 1))
        level = (low + (u < r - low).float()).clamp_(max=self.s) * v.sign()  # in [-s, s]
        codes = (level.reshape(-1)[:n] + self.s).to(torch.int64).numpy()
        return Encoded(
            self.name,
            {
                "norms": norms.reshape(-1).numpy().astype(np.float32),
                "codes": pack(codes, self.bits),
            },
        )

    def decode(self, enc: Encoded, ctx: ChunkContext) -> torch.Tensor:
        n = ctx.numel
        level = torch.from_numpy(unpack(enc.parts["codes"], self.bits, n).astype(np.float32))
        level -= self.s
        norms = torch.from_numpy(enc.parts["norms"]).repeat_interleave(self.bucket)[:n]
        return norms * level / self.s


class SignScale(Codec):
    """Scaled sign (EF-signSGD's compressor): (||v||_1 / d) sign(v) per block."""

    name = "signscale"

    def __init__(self, block: int | None = None) -> None:
        self.block = block  # None: one block per chunk

    @property
    def biased(self) -> bool:
        return True

    def encode(self, chunk: torch.Tensor, ctx: ChunkContext) -> Encoded:
        x = chunk.detach().float().reshape(-1)
        n = x.numel()
        block = self.block or n
        nb = -(-n // block)
        v = torch.zeros(nb * block)
        v[:n] = x
        counts = torch.full((nb,), float(block))
        counts[-1] = n - (nb - 1) * block
        scales = v.view(nb, block).abs().sum(dim=1) / counts
        return Encoded(
            self.name,
            {"scales": scales.numpy().astype(np.float32), "signs": pack((x >= 0).numpy(), 1)},
        )

    def decode(self, enc: Encoded, ctx: ChunkContext) -> torch.Tensor:
        n = ctx.numel
        block = self.block or n
        signs = torch.from_numpy(unpack(enc.parts["signs"], 1, n).astype(np.float32)) * 2 - 1
        return torch.from_numpy(enc.parts["scales"]).repeat_interleave(block)[:n] * signs


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the column span of p (n x r), by reduced QR. Column signs
    may differ from Gram-Schmidt's; P^ Q^T does not depend on them."""
    return torch.linalg.qr(p, mode="reduced").Q


class PowerSGD(Codec):
    """PowerSGD rank-r over a flat vector made of tensors of `shapes` (flat order)."""

    name = "powersgd"

    def __init__(
        self,
        shapes: Sequence[Sequence[int]],
        rank: int,
        min_compression_rate: float = POWERSGD_MIN_COMPRESSION_RATE,
        warm_start: bool = True,
    ) -> None:
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.rank = rank
        self.min_compression_rate = min_compression_rate
        self.warm_start = warm_start
        self.q_memory: dict[int, list[torch.Tensor]] = {}  # per chunk: the sender's Qs
        self.plan = []  # (offset, numel, (n, m), rank or 0 when sent raw)
        offset = 0
        for shape in self.shapes:
            numel = math.prod(shape) if shape else 1
            n = shape[0] if shape else 1
            m = numel // n if n else 0
            r = min(n, m, rank)
            compress = (n + m) * r * min_compression_rate < n * m
            self.plan.append((offset, numel, (n, m), r if compress else 0))
            offset += numel
        self.numel = offset

    @property
    def biased(self) -> bool:
        return True

    def wire_floats(self) -> int:
        """Float32 values per encoding: (n + m) r per compressed matrix, numel per other."""
        return sum((n + m) * r if r else numel for _, numel, (n, m), r in self.plan)

    def initial_qs(self, ctx: ChunkContext) -> list[torch.Tensor]:
        g = _generator(ctx, 2)
        return [torch.randn(m, r, generator=g) for _, _, (_, m), r in self.plan if r]

    def encode(self, chunk: torch.Tensor, ctx: ChunkContext) -> Encoded:
        x = chunk.detach().float().reshape(-1)
        if x.numel() != self.numel:
            raise ValueError(f"powersgd: chunk of {x.numel()}, shapes cover {self.numel}")
        qs = self.q_memory.get(ctx.chunk) if self.warm_start else None
        if qs is None:
            qs = self.initial_qs(ctx)
        ps_out, qs_out, raw, new_qs = [], [], [], []
        i = 0
        for offset, numel, (n, m), r in self.plan:
            piece = x[offset : offset + numel]
            if not r:
                raw.append(piece)
                continue
            mat = piece.view(n, m)
            p_hat = orthonormalize(mat @ qs[i])
            q = mat.T @ p_hat
            ps_out.append(p_hat.reshape(-1))
            qs_out.append(q.reshape(-1))
            new_qs.append(q)
            i += 1
        self.q_memory[ctx.chunk] = new_qs

        def cat(parts: list[torch.Tensor]) -> np.ndarray:
            return (torch.cat(parts) if parts else torch.empty(0)).numpy().astype(np.float32)

        return Encoded(self.name, {"p": cat(ps_out), "q": cat(qs_out), "raw": cat(raw)})

    def decode(self, enc: Encoded, ctx: ChunkContext) -> torch.Tensor:
        p_all = torch.from_numpy(enc.parts["p"])
        q_all = torch.from_numpy(enc.parts["q"])
        raw_all = torch.from_numpy(enc.parts["raw"])
        out = torch.empty(self.numel)
        pi = qi = ri = 0
        for offset, numel, (n, m), r in self.plan:
            if not r:
                out[offset : offset + numel] = raw_all[ri : ri + numel]
                ri += numel
                continue
            p = p_all[pi : pi + n * r].view(n, r)
            q = q_all[qi : qi + m * r].view(m, r)
            out[offset : offset + numel] = (p @ q.T).reshape(-1)
            pi, qi = pi + n * r, qi + m * r
        return out


class Float16(Codec):
    """hivemind Float16Compression: clamp to the float16 range, send float16."""

    name = "float16"

    @property
    def biased(self) -> bool:
        return True

    def encode(self, chunk: torch.Tensor, ctx: ChunkContext) -> Encoded:
        x = chunk.detach().float().reshape(-1).clamp(FP16_MIN, FP16_MAX).half()
        return Encoded(self.name, {"values": x.numpy()})

    def decode(self, enc: Encoded, ctx: ChunkContext) -> torch.Tensor:
        return torch.from_numpy(enc.parts["values"].astype(np.float32))


def hivemind_version() -> str | None:
    """hivemind's version when it is importable here, else None."""
    try:
        import hivemind
    except ImportError:
        return None
    return str(hivemind.__version__)


class HivemindCodec(Codec):
    """One of hivemind's compression classes, run from the package itself. Wire: the
    serialized `runtime_pb2.Tensor` (buffer plus shape, dtype and type fields)."""

    def __init__(self, class_name: str) -> None:
        from hivemind import compression

        self.impl = getattr(compression, class_name)()
        self.name = f"hivemind.{class_name}"

    @property
    def biased(self) -> bool:
        return True

    def encode(self, chunk: torch.Tensor, ctx: ChunkContext) -> Encoded:
        from hivemind.compression import CompressionInfo

        x = chunk.detach().float().reshape(-1)
        message = self.impl.compress(x, CompressionInfo.from_tensor(x))
        return Encoded(self.name, {"message": np.frombuffer(message.SerializeToString(), np.uint8)})

    def decode(self, enc: Encoded, ctx: ChunkContext) -> torch.Tensor:
        from hivemind.compression.quantization import Quantization
        from hivemind.proto import runtime_pb2

        message = runtime_pb2.Tensor.FromString(enc.parts["message"].tobytes())
        try:
            return self.impl.extract(message).float()
        except TypeError:
            if not isinstance(self.impl, Quantization):
                raise
        # hivemind 1.1.12's Quantization.extract does int(np.frombuffer(..., count=1)),
        # which numpy 2.4 refuses; the same buffer layout, read with [0]:
        buffer = message.buffer
        size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        book = np.frombuffer(buffer, offset=8, count=size, dtype=self.impl.codebook_dtype)
        codes = np.frombuffer(buffer, offset=8 + book.nbytes, dtype=self.impl.indices_dtype)
        return torch.from_numpy(book[codes.astype(np.int64)])
