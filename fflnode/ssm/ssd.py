"""The SSD scan (Mamba-2's state-space duality) and the SSD mixer layer, in plain torch.

Equations (Dao & Gu 2024, "Transformers are SSMs"), per head, with a_t = exp(dt_t·A):

    h_t = a_t · h_{t-1} + dt_t · x_t B_tᵀ        h: (P, N), x_t: (P,), B_t, C_t: (N,)
    y_t = h_t C_t

`ssd_sequential` runs that recurrence step by step: it is the test oracle, never used for
training. `ssd_chunked` computes the same thing in the dual form: inside a chunk of Q steps
it is masked attention, y = (L ∘ C Bᵀ) (dt·x) with L[s, r] = exp(Σ_{r<k≤s} log a_k); across
chunks the state is passed on by the recurrence. Both take an initial state and return the
final one, so a sequence can be cut anywhere and continued exactly (the basis of F-SSD,
see states.py). Device-agnostic: every tensor is made on the inputs' device and dtype.

Precision: L is exp of a difference of in-chunk cumulative sums of log a (as Mamba's own
kernels do), so its relative rounding grows with |Σ log a| over one chunk, ~6e-8 per unit;
chunks are short (16-64 steps) and a head that forgets e^-100 per chunk contributes nothing
across it anyway. Measured against the float64 recurrence: ≤ 2.2e-6 relative (max |ΔY| /
max |Y|) for T ≤ 1000 and Q in 1..64, with per-step log a down to -1.5.

Must never: materialise anything quadratic in the full sequence length (only in the
chunk length Q and the number of chunks), or depend on a CUDA kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fflnode.errors import ConfigError
from fflnode.ssm.states import LayerState

# Q = 64 keeps the within-chunk masked attention (Q² per head) small next to the P·N state
# work; any Q gives the same result (tested), only speed changes.
DEFAULT_CHUNK_SIZE = 64
RMS_EPS = 1e-5  # RMSNorm epsilon, as in Mamba-2


def ssd_sequential(
    X: torch.Tensor,  # (b, T, H, P)
    dt: torch.Tensor,  # (b, T, H), > 0
    A: torch.Tensor,  # (H,), < 0
    B: torch.Tensor,  # (b, T, G, N), G divides H: head h reads group h // (H / G)
    C: torch.Tensor,  # (b, T, G, N)
    initial_state: torch.Tensor | None = None,  # (b, H, P, N)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence, one step at a time: Y (b, T, H, P) and the final h (b, H, P, N)."""
    b, T, H, P = X.shape
    G, N = B.shape[-2:]
    B = B.repeat_interleave(H // G, dim=2)  # (b, T, H, N)
    C = C.repeat_interleave(H // G, dim=2)
    h = X.new_zeros(b, H, P, N) if initial_state is None else initial_state
    Y = []
    for t in range(T):
        a_t = torch.exp(dt[:, t] * A)  # (b, H)
        u_t = (dt[:, t, :, None] * X[:, t])[..., None] * B[:, t, :, None, :]  # (b, H, P, N)
        h = a_t[..., None, None] * h + u_t
        Y.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    return torch.stack(Y, dim=1), h


def ssd_chunked(
    X: torch.Tensor,  # (b, T, H, P)
    dt: torch.Tensor,  # (b, T, H), > 0
    A: torch.Tensor,  # (H,), < 0
    B: torch.Tensor,  # (b, T, G, N), G divides H: head h reads group h // (H / G)
    C: torch.Tensor,  # (b, T, G, N)
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    initial_state: torch.Tensor | None = None,  # (b, H, P, N)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dual form, chunk by chunk: Y (b, T, H, P) and the final h (b, H, P, N).

    Heads are split as H = G·E (E heads per group of B, C) so that C Bᵀ is computed once
    per group. T need not be a multiple of the chunk: the tail is padded with dt = 0
    (a = 1, no input), which leaves the state unchanged, and the padded outputs are dropped.
    """
    b, T, H, P = X.shape
    G, N = B.shape[-2:]
    E = H // G
    Q = max(1, min(chunk_size, T))
    pad = (-T) % Q
    if pad:
        X, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (X, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c = (T + pad) // Q
    X = X.reshape(b, c, Q, G, E, P)
    B = B.reshape(b, c, Q, G, N)
    C = C.reshape(b, c, Q, G, N)
    dt = dt.reshape(b, c, Q, G, E)
    logA_cum = torch.cumsum(dt * A.reshape(G, E), dim=2)  # (b, c, Q, G, E): Σ log a in chunk
    Xdt = X * dt[..., None]  # (b, c, Q, G, E, P): dt_r · x_r

    # 1. Within each chunk, the quadratic (attention) form: Y_diag = (L ∘ C Bᵀ) · (dt x),
    #    L[s, r] = exp(Σ_{r<k≤s} log a_k) for s ≥ r, 0 above the diagonal.
    cum = logA_cum.permute(0, 1, 3, 4, 2)  # (b, c, G, E, Q)
    causal = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=X.device))
    L = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, -math.inf))
    CB = torch.einsum("bcsgn,bcrgn->bcgsr", C, B)  # (b, c, G, Q, Q)
    Y_diag = torch.einsum("bcgesr,bcrgep->bcsgep", L * CB[:, :, :, None], Xdt)

    # 2. Each chunk's own state from h = 0: S_c = Σ_r exp(L_end − L_r) dt_r x_r B_rᵀ.
    decay_to_end = torch.exp(logA_cum[:, :, -1:] - logA_cum)  # (b, c, Q, G, E)
    S = torch.einsum("bcrgn,bcrge,bcrgep->bcgepn", B, decay_to_end, Xdt)  # (b, c, G, E, P, N)

    # 3. Across chunks, the recurrence itself: h_c = exp(Σ_chunk log a)·h_{c-1} + S_c.
    a_chunk = torch.exp(logA_cum[:, :, -1])[..., None, None]  # (b, c, G, E, 1, 1)
    h = X.new_zeros(b, G, E, P, N) if initial_state is None else initial_state
    h = h.reshape(b, G, E, P, N)
    h_start = []
    for k in range(c):
        h_start.append(h)
        h = a_chunk[:, k] * h + S[:, k]
    H_start = torch.stack(h_start, dim=1)  # (b, c, G, E, P, N): state entering each chunk

    # 4. Contribution of the state entering the chunk: Y_off[s] = exp(L_s) · C_s h_start.
    Y_off = torch.einsum("bcsgn,bcgepn,bcsge->bcsgep", C, H_start, torch.exp(logA_cum))

    Y = (Y_diag + Y_off).reshape(b, c * Q, H, P)[:, :T]
    return Y, h.reshape(b, H, P, N)


def segment_log_decay(dt: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """L(S) = Σ_t log a_t = Σ_t dt_t·A per head: dt (b, T, H), A (H,) -> (b, H)."""
    return (dt * A).sum(dim=1)


def head_init(
    nheads: int, a_init_range: tuple[float, float], dt_init_range: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2's per-head initialisation, drawn on the CPU from torch's generator:
    (A_log with A ~ U(a_init_range), dt_bias = softplus⁻¹(dt), dt log-uniform)."""
    lo, hi = a_init_range
    A = torch.empty(nheads, device="cpu").uniform_(lo, hi)
    dt_lo, dt_hi = dt_init_range
    dt = torch.exp(
        torch.rand(nheads, device="cpu") * (math.log(dt_hi) - math.log(dt_lo)) + math.log(dt_lo)
    )
    return torch.log(A), dt + torch.log(-torch.expm1(-dt))


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight over the last dimension."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * self.weight


class SSDLayer(nn.Module):
    """The Mamba-2 mixer without its convolution: u (b, T, D) -> y (b, T, D).

    in_proj gives z (gate), x, B, C and dt from each token; the heads share one B and C
    (one group). y = out_proj(norm((SSD(x) + D·x) · silu(z))). There is deliberately no
    causal convolution: its window would cross segment boundaries and make the layer's
    state composition approximate (DESIGN.md); with it gone, every layer's entire memory of
    the past is the LayerState (h, Σ log a), so `forward` on a split sequence, carrying
    the state, equals `forward` on the whole.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        headdim: int = 16,
        expand: int = 2,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        a_init_range: tuple[float, float] = (1.0, 16.0),
        dt_init_range: tuple[float, float] = (1e-3, 1e-1),
    ) -> None:
        super().__init__()
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ConfigError(f"expand·d_model = {d_inner} is not a multiple of headdim {headdim}")
        self.d_inner, self.d_state, self.headdim = d_inner, d_state, headdim
        self.nheads = d_inner // headdim
        self.chunk_size = chunk_size
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * d_state + self.nheads, bias=False)
        # Mamba-2 initialisation: A = -exp(A_log) with A ~ U(a_init_range), dt log-uniform.
        # These per-head vectors are drawn on the CPU even when the module is built on the
        # meta device (streamed.py's skeletons): meta versions of these ops pull in ~70 MB
        # of torch's Python decompositions, which a memory-budgeted streamer cannot afford.
        self.a_init_range, self.dt_init_range = a_init_range, dt_init_range
        A_log, dt_bias = head_init(self.nheads, a_init_range, dt_init_range)
        self.A_log = nn.Parameter(A_log)
        self.dt_bias = nn.Parameter(dt_bias)
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = RMSNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    @torch.no_grad()
    def reset_heads(self) -> None:
        """Redraw this layer's own per-head parameters (A_log, dt_bias, D) in place, as
        the constructor draws them (its Linear and RMSNorm children reset themselves)."""
        A_log, dt_bias = head_init(self.nheads, self.a_init_range, self.dt_init_range)
        self.A_log.copy_(A_log)
        self.dt_bias.copy_(dt_bias)
        self.D.fill_(1.0)

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """(heads H, head_dim P, d_state N) of this layer's h."""
        return (self.nheads, self.headdim, self.d_state)

    def forward(
        self, u: torch.Tensor, initial_state: LayerState | None = None
    ) -> tuple[torch.Tensor, LayerState]:
        """u (b, T, D) -> (y (b, T, D), state of initial_state ++ u).

        The returned LayerState has h (b, H, P, N) and log_decay (b, H): the initial
        state's log-decay plus this segment's Σ_t dt_t·A, so it composes (states.py).
        """
        b, T, _ = u.shape
        H, P, N = self.state_shape
        z, x, B, C, dt = torch.split(
            self.in_proj(u), [self.d_inner, self.d_inner, N, N, H], dim=-1
        )  # z, x: (b, T, H·P); B, C: (b, T, N); dt: (b, T, H)
        X = F.silu(x).reshape(b, T, H, P)
        dt = F.softplus(dt + self.dt_bias)  # (b, T, H)
        A = -torch.exp(self.A_log)  # (H,)
        B = B[:, :, None, :]  # (b, T, 1, N): one group, every head reads the same B and C
        C = C[:, :, None, :]
        h0 = None if initial_state is None else initial_state.h
        Y, h = ssd_chunked(X, dt, A, B, C, self.chunk_size, h0)  # (b, T, H, P), (b, H, P, N)
        Y = Y + self.D[:, None] * X
        y = self.norm(Y.reshape(b, T, self.d_inner) * F.silu(z))
        L = segment_log_decay(dt, A)  # (b, H)
        if initial_state is not None:
            L = initial_state.log_decay + L
        return self.out_proj(y), LayerState(h, L)
