"""The SSD scan: the chunked dual form equals the sequential recurrence, and states compose."""

from __future__ import annotations

import pytest
import torch

from fflnode.ssm.ssd import SSDLayer, segment_log_decay, ssd_chunked, ssd_sequential
from fflnode.ssm.states import LayerState, compose

torch.set_num_threads(1)

SCAN_RTOL = 1e-5  # the done-when target: chunked == sequential to 1e-5 relative in fp32
COMPOSE_RTOL = 1e-6  # composition of two segments' states == state of the concatenation


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def scan_inputs(
    b: int, T: int, H: int, P: int, N: int, G: int, seed: int, device: str = "cpu"
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(b, T, H, P, generator=g)
    dt = torch.rand(b, T, H, generator=g) * 0.5 + 1e-3  # dt > 0
    A = -(torch.rand(H, generator=g) * 3 + 0.05)  # A < 0: 0 < a_t < 1
    B = torch.randn(b, T, G, N, generator=g)
    C = torch.randn(b, T, G, N, generator=g)
    h0 = torch.randn(b, H, P, N, generator=g)
    return tuple(t.to(device) for t in (X, dt, A, B, C, h0))


@pytest.mark.parametrize("chunk", [1, 3, 8, 16, 64])
@pytest.mark.parametrize("T", [1, 5, 17, 64, 100])
@pytest.mark.parametrize("groups", [1, 4])
def test_chunked_scan_equals_sequential_recurrence(chunk: int, T: int, groups: int) -> None:
    X, dt, A, B, C, _ = scan_inputs(2, T, 4, 3, 5, groups, seed=T * 100 + chunk)
    Y_ref, h_ref = ssd_sequential(*(t.double() for t in (X, dt, A, B, C)))  # float64 oracle
    Y, h = ssd_chunked(X, dt, A, B, C, chunk)
    assert Y.shape == Y_ref.shape and h.shape == h_ref.shape
    assert rel_err(Y, Y_ref) < SCAN_RTOL
    assert rel_err(h, h_ref) < SCAN_RTOL


@pytest.mark.parametrize("chunk", [4, 16, 64])
@pytest.mark.parametrize("T", [13, 48])
def test_chunked_scan_continues_from_an_initial_state(chunk: int, T: int) -> None:
    X, dt, A, B, C, h0 = scan_inputs(3, T, 2, 4, 6, 1, seed=T + chunk)
    Y_ref, h_ref = ssd_sequential(*(t.double() for t in (X, dt, A, B, C, h0)))
    Y, h = ssd_chunked(X, dt, A, B, C, chunk, h0)
    assert rel_err(Y, Y_ref) < SCAN_RTOL
    assert rel_err(h, h_ref) < SCAN_RTOL


def test_sequential_oracle_in_float32_agrees_with_float64() -> None:
    X, dt, A, B, C, h0 = scan_inputs(2, 64, 4, 3, 5, 1, seed=5)
    Y32, h32 = ssd_sequential(X, dt, A, B, C, h0)
    Y64, h64 = ssd_sequential(*(t.double() for t in (X, dt, A, B, C, h0)))
    assert rel_err(Y32, Y64) < SCAN_RTOL and rel_err(h32, h64) < SCAN_RTOL


def test_segment_log_decay_is_the_log_of_the_product_of_decays() -> None:
    X, dt, A, B, C, _ = scan_inputs(2, 30, 3, 2, 2, 1, seed=7)
    a = torch.exp(dt.double() * A.double())  # (b, T, H)
    expected = torch.log(a.prod(dim=1))
    torch.testing.assert_close(segment_log_decay(dt, A).double(), expected, rtol=1e-5, atol=1e-6)


def make_layer(seed: int, chunk: int) -> SSDLayer:
    torch.manual_seed(seed)
    return SSDLayer(d_model=16, d_state=8, headdim=8, expand=2, chunk_size=chunk).eval()


@pytest.mark.parametrize("cut", [1, 9, 16, 31])
def test_layer_split_with_carried_state_equals_whole_sequence(cut: int) -> None:
    layer = make_layer(0, chunk=8)
    u = torch.randn(2, 40, 16)
    with torch.no_grad():
        y, s = layer(u)
        y1, s1 = layer(u[:, :cut])
        y2, s2 = layer(u[:, cut:], s1)
    assert rel_err(torch.cat([y1, y2], dim=1), y) < SCAN_RTOL
    assert rel_err(s2.h, s.h) < SCAN_RTOL
    torch.testing.assert_close(s2.log_decay, s.log_decay, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cut", [5, 16, 27])
def test_composed_segment_states_equal_the_state_of_the_concatenation(cut: int) -> None:
    layer = make_layer(1, chunk=16)
    u = torch.randn(3, 48, 16)
    with torch.no_grad():
        _, whole = layer(u)
        _, s1 = layer(u[:, :cut])  # both segments start from h0 = 0, as on two nodes
        _, s2 = layer(u[:, cut:])
    composed = compose(s1, s2)
    assert rel_err(composed.h, whole.h) < COMPOSE_RTOL
    torch.testing.assert_close(composed.log_decay, whole.log_decay, rtol=1e-6, atol=1e-6)


def test_layer_state_shape_matches_its_declared_state_shape() -> None:
    layer = make_layer(2, chunk=8)
    with torch.no_grad():
        _, s = layer(torch.randn(5, 11, 16))
    assert isinstance(s, LayerState)
    assert tuple(s.h.shape) == (5, *layer.state_shape)
    assert tuple(s.log_decay.shape) == (5, layer.state_shape[0])
    assert bool((s.log_decay <= 0).all())


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device on this machine; the CPU scan is checked against the oracle above",
)
def test_chunked_scan_on_cuda_matches_the_cpu_oracle() -> None:
    X, dt, A, B, C, h0 = scan_inputs(2, 100, 4, 8, 16, 1, seed=11)
    Y_ref, h_ref = ssd_sequential(X, dt, A, B, C, h0)
    cuda = scan_inputs(2, 100, 4, 8, 16, 1, seed=11, device="cuda")
    Y, h = ssd_chunked(*cuda[:5], 32, cuda[5])
    assert Y.device.type == "cuda"
    assert rel_err(Y.cpu(), Y_ref) < SCAN_RTOL
    assert rel_err(h.cpu(), h_ref) < SCAN_RTOL
    layer = make_layer(3, chunk=16)
    u = torch.randn(2, 40, 16)
    with torch.no_grad():
        y_cpu, s_cpu = layer(u)
        y_gpu, s_gpu = layer.to("cuda")(u.to("cuda"))
    assert rel_err(y_gpu.cpu(), y_cpu) < 1e-4  # TF32/cuBLAS differ from CPU BLAS in rounding
    assert rel_err(s_gpu.h.cpu(), s_cpu.h) < 1e-4
