"""fflnode.metrics.LoopLag: how late the trio loop wakes a sleeping task, the figure that
tells a daemon's (or the fuzzer's own) saturated loop from a slow network."""

from __future__ import annotations

import time

import trio

from fflnode.metrics import LoopLag

BLOCK_S = 0.3  # the loop is held this long by a synchronous call


async def test_a_loop_held_by_a_synchronous_call_shows_as_lag_in_its_window_only():
    lag = LoopLag(period_s=0.02, window_s=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(lag.run)
        await trio.sleep(0.1)
        before = trio.current_time()
        time.sleep(BLOCK_S)  # noqa: ASYNC251 - the point: the loop cannot run meanwhile
        await trio.sleep(0.1)
        after = trio.current_time()
        nursery.cancel_scope.cancel()
    assert lag.max_s >= BLOCK_S * 0.9
    assert lag.worst_between(before, after) == lag.max_s
    assert lag.worst_between(0.0, before - 0.001) < BLOCK_S / 2
    assert lag.recent_s() == lag.max_s
