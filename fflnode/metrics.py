"""Prometheus metrics, served over HTTP from the node's own trio loop.

Owns the exposition: a snapshot function builds the text format (version 0.0.4) from
the node's live state on every scrape, so nothing is double-booked and there is no
registry to keep in sync. The server is deliberately tiny: GET /metrics and GET /healthz
on a local address, one request per connection, bounded reads, a deadline per client.
`fflnode status` reads the same endpoint and prints a human summary.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192  # a scrape request is one short GET line plus a few headers
CLIENT_TIMEOUT_S = 5.0  # a client that has not sent its request by then is dropped
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The event loop's lateness is sampled this often: a task sleeps this long and measures
# how much later than asked it woke. Ten wake-ups a second cost nothing measurable and
# resolve stalls far below the deadlines that matter (10 s and more).
LOOP_LAG_PERIOD_S = 0.1
# "recent" lag is the worst over this window: what a scrape every few seconds sees.
LOOP_LAG_WINDOW_S = 10.0


@dataclass
class Sample:
    name: str
    kind: str  # "gauge" | "counter"
    help: str
    values: list[tuple[dict[str, str], float]] = field(default_factory=list)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(samples: list[Sample]) -> str:
    out = []
    for s in samples:
        out.append(f"# HELP {s.name} {s.help}")
        out.append(f"# TYPE {s.name} {s.kind}")
        for labels, value in s.values:
            lab = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
            out.append(f"{s.name}{{{lab}}} {value!r}" if lab else f"{s.name} {value!r}")
    return "\n".join(out) + "\n"


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Parse the exposition we render (for `fflnode status` and tests)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, labels = head, {}
        if "{" in head:
            name, _, rest = head.partition("{")
            for part in rest.rstrip("}").split('",'):
                if part:
                    k, _, v = part.partition('="')
                    labels[k] = v.rstrip('"')
        out.setdefault(name, []).append((labels, float(value)))
    return out


class LoopLag:
    """How late this trio loop runs a task that asked to wake up: the one figure that
    says whether a slow answer was the loop (saturated by work) or the network.

    `run` is the sampling task; `max_s` is the worst lateness since it started,
    `recent_s()` the worst over the last `window_s`, `worst_between(t0, t1)` the worst
    of the samples taken in [t0, t1] (trio.current_time()), kept for `window_s`."""

    def __init__(self, period_s: float = LOOP_LAG_PERIOD_S, window_s: float = LOOP_LAG_WINDOW_S):
        self.period_s, self.window_s = period_s, window_s
        self.max_s = 0.0
        self.samples: deque[tuple[float, float]] = deque()  # (woke at, lateness s)

    def add(self, woke: float, lag_s: float) -> None:
        self.max_s = max(self.max_s, lag_s)
        self.samples.append((woke, lag_s))
        while self.samples and woke - self.samples[0][0] > self.window_s:
            self.samples.popleft()

    def worst_between(self, t0: float, t1: float) -> float:
        return max((lag for t, lag in self.samples if t0 <= t <= t1), default=0.0)

    def recent_s(self) -> float:
        return max((lag for _, lag in self.samples), default=0.0)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            asked = trio.current_time() + self.period_s
            await trio.sleep_until(asked)  # the sampling period, not synchronisation
            woke = trio.current_time()
            self.add(woke, woke - asked)


async def serve(
    host: str,
    port: int,
    snapshot: Callable[[], list[Sample]],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /metrics until cancelled; reports the bound port through task_status."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    task_status.started(bound)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(CLIENT_TIMEOUT_S):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST_BYTES:
                    data = await stream.receive_some(MAX_REQUEST_BYTES)
                    if not data:
                        return
                    request += data
                line = request.split(b"\r\n", 1)[0].decode("latin-1", "replace").split()
                if len(line) < 2 or line[0] != "GET":
                    await _reply(stream, 405, "only GET is served\n", "text/plain")
                elif line[1] == "/metrics":
                    await _reply(stream, 200, render(snapshot()), CONTENT_TYPE)
                elif line[1] == "/healthz":
                    await _reply(stream, 200, "ok\n", "text/plain")
                else:
                    await _reply(stream, 404, "try /metrics\n", "text/plain")

    await trio.serve_listeners(handle, listeners)


async def _reply(stream: trio.SocketStream, code: int, body: str, ctype: str) -> None:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[code]
    data = body.encode("utf-8")
    head = (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(head + data)


async def fetch(host: str, port: int, timeout_s: float = CLIENT_TIMEOUT_S) -> str:
    """GET /metrics from a node (used by `fflnode status`)."""
    with trio.fail_after(timeout_s):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            chunks = []
            while data := await stream.receive_some(1 << 16):
                chunks.append(data)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise OSError(f"metrics endpoint answered {head.splitlines()[0]!r}")
    return body.decode("utf-8")
