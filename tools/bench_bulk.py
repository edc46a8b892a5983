#!/usr/bin/env python3
"""Benchmark bulk throughput on one peer pair: 256 MiB one way over 127.0.0.1.

    .venv/bin/python tools/bench_bulk.py --repeats 7 --hivemind-python /tmp/hm-venv/bin/python

Paths, each measured in the same run, interleaved (repeat r starts at path r mod P):
  tcp       raw trio TCP: the ceiling of any path on this machine.
  trio-ssl  trio.SSLStream over TCP: TLS 1.3 with libp2p certificates, no libp2p at all.
  tls       the same TLS through fflnode.p2p.tlsstream.TlsStream (what the fast path uses).
  libp2p    one py-libp2p stream (TCP + Noise + yamux) with fflnode's tuning (host.py).
  fastpath  fflnode.p2p.fastpath: offer over libp2p, then libp2p-TLS 1.3 on its own TCP.
  hivemind  hivemind 1.1.12's P2P: two Go p2pd daemons, one stream from a binary handler.

Every transfer runs between two fresh processes (receiver, then sender): each end has its
own interpreter and event loop, as two nodes would. The sender times from its first byte
to the receiver's one-byte acknowledgement, sent once all bytes arrived; the setup (dial,
handshakes, stream open) is timed apart and shown in its own column. The table shows
medians with min-max in MB/s (10**6 bytes/s), and fastpath / hivemind from the medians.
It also shows each end's CPU seconds over the transfer: on a shared machine throughput
follows the CPU the two ends get, CPU seconds per byte do not; read both.

The hivemind path runs this same file with the Python given by --hivemind-python; it
imports only asyncio and hivemind there (no trio, no fflnode). This script installs
nothing. Make that venv once:

    python3 -m venv /tmp/hm-venv
    /tmp/hm-venv/bin/pip install torch==2.13.0   # first: other torch specs pull CUDA wheels
    /tmp/hm-venv/bin/pip install hivemind==1.1.12

The hivemind role starts two P2P instances in one asyncio process (each P2P runs its own
p2pd daemon, so each end's transport is a process of its own) and moves the bytes through
`add_binary_stream_handler` / `call_binary_stream_handler`. Its CPU columns are each
daemon's CPU plus half of the shared Python process's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PATHS = ("tcp", "trio-ssl", "tls", "libp2p", "fastpath", "hivemind")
PIECE_BYTES = 1 << 20  # the sender's write size, as fflnode.p2p.streams.BULK_WRITE_BYTES
TCP_RECV_BYTES = 1 << 18  # raw TCP: one receive_some per 256 KiB
# trio.SSLStream returns one TLS record (16 KiB) per call and allocates what it is asked
# for: asking for more only costs.
TRIO_SSL_RECV_BYTES = 16 << 10
BENCH_PROTOCOL = "/fflnode/bench-bulk/1.0.0"
TRIAL_TIMEOUT_S = 300  # one transfer; 256 MiB at the slowest path seen (~35 MB/s) is ~8 s
READY_TIMEOUT_S = 60  # a receiver process importing torch-free fflnode starts in ~2 s
ACK = b"k"


# -- orchestration (runs in fflnode's venv) --------------------------------------------


def trial(path: str, nbytes: int, hivemind_python: str | None) -> dict:
    """One transfer; returns {"seconds", "setup_s"} measured by the sender."""
    here = os.path.abspath(__file__)
    if path == "hivemind":
        assert hivemind_python
        out = subprocess.run(
            [hivemind_python, here, "--role", "hivemind", "--bytes", str(nbytes)],
            capture_output=True,
            text=True,
            timeout=TRIAL_TIMEOUT_S,
        )
        return _last_json(out.stdout, out.stderr, out.returncode, path)
    role = [sys.executable, here, "--path", path, "--bytes", str(nbytes), "--role"]
    recv = subprocess.Popen(role + ["recv"], stdout=subprocess.PIPE, text=True)
    try:
        line = _readline(recv, READY_TIMEOUT_S)
        ready = json.loads(line)
        out = subprocess.run(
            role + ["send", "--addr", ready["addr"]],
            capture_output=True,
            text=True,
            timeout=TRIAL_TIMEOUT_S,
        )
        result = _last_json(out.stdout, out.stderr, out.returncode, path)
        recv.wait(timeout=TRIAL_TIMEOUT_S)
        rest = recv.stdout.read() if recv.stdout else ""
        got = json.loads(rest.strip().splitlines()[-1])
        if got.get("received") != nbytes:
            sys.exit(f"{path}: receiver got {got.get('received')} of {nbytes} bytes")
        result["recv_cpu_s"] = got["recv_cpu_s"]
        return result
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()


def _busy(res: dict, key: str) -> str:
    """CPU seconds of one end over the transfer's wall seconds (1.0 = one core saturated)."""
    return f"{res[key] / res['seconds']:.2f}" if key in res else "n/a"


def _readline(proc: subprocess.Popen, timeout_s: float) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    assert proc.stdout is not None
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout_s):
        raise RuntimeError(f"receiver not ready within {timeout_s} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"receiver exited before it was ready (exit {proc.wait()})")
    return line


def _last_json(stdout: str, stderr: str, rc: int, path: str) -> dict:
    lines = [x for x in stdout.strip().splitlines() if x.startswith("{")]
    if rc != 0 or not lines:
        sys.exit(f"{path} failed (exit {rc}):\n{stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=("recv", "send", "hivemind"), help=argparse.SUPPRESS)
    p.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    p.add_argument("--addr", help=argparse.SUPPRESS)
    p.add_argument("--bytes", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--mib", type=int, default=256, help="bytes moved per transfer, in MiB")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--hivemind-python", help="a python with hivemind 1.1.12 (see above)")
    a = p.parse_args(argv)
    if a.role == "hivemind":
        return hivemind_role(a.bytes)
    if a.role:
        import trio

        trio.run(ROLES[a.path][a.role], a)
        return 0

    paths = [x for x in a.paths.split(",") if x]
    for x in paths:
        if x not in PATHS:
            p.error(f"unknown path {x!r}; choose from {', '.join(PATHS)}")
    if "hivemind" in paths and not a.hivemind_python:
        print("no --hivemind-python: skipping the hivemind path", file=sys.stderr)
        paths.remove("hivemind")
    nbytes = a.mib << 20
    results: dict[str, list[dict]] = {x: [] for x in paths}
    for r in range(a.repeats):
        order = paths[r % len(paths) :] + paths[: r % len(paths)]
        for path in order:
            res = trial(path, nbytes, a.hivemind_python)
            results[path].append(res)
            print(
                f"repeat {r + 1}/{a.repeats} {path:9s} {nbytes / res['seconds'] / 1e6:8.0f} MB/s"
                f"  setup {res['setup_s'] * 1e3:6.0f} ms  CPU busy: sender "
                f"{_busy(res, 'send_cpu_s')}, receiver {_busy(res, 'recv_cpu_s')}",
                file=sys.stderr,
                flush=True,
            )
    print(f"\n{a.mib} MiB one way, 127.0.0.1, {a.repeats} interleaved repeats, medians (min-max)")
    print("| path | MB/s | setup ms | CPU s, sender | CPU s, receiver |")
    print("|---|---|---|---|---|")
    med: dict[str, float] = {}
    for path in paths:
        rows = results[path]
        rates = [nbytes / x["seconds"] / 1e6 for x in rows]
        med[path] = statistics.median(rates)
        setup = statistics.median(x["setup_s"] * 1e3 for x in rows)
        if "open_s" in rows[0]:
            open_ms = statistics.median(x["open_s"] * 1e3 for x in rows)
            setup_ms = f"{setup:,.0f} (open {open_ms:.0f})"
        else:
            setup_ms = f"{setup:,.0f}"
        send_cpu = statistics.median(x["send_cpu_s"] for x in rows)
        recv_cpu = statistics.median(x["recv_cpu_s"] for x in rows)
        print(
            f"| {path} | {med[path]:,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) "
            f"| {setup_ms} | {send_cpu:.2f} | {recv_cpu:.2f} |"
        )
    print(
        "setup: dial + handshakes + stream (fastpath: 'open' is FastPath.open on a connected"
        " pair); hivemind: stream open on connected daemons. CPU: seconds over the transfer,"
        " whole process (hivemind: each p2pd, plus half the shared Python process)."
    )
    for a_, b_ in (("fastpath", "hivemind"), ("fastpath", "libp2p"), ("libp2p", "hivemind")):
        if a_ in med and b_ in med:
            print(f"{a_} / {b_}: {med[a_] / med[b_]:.2f}x")
    return 0


# -- roles (each runs in its own process) ----------------------------------------------


def _report(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def tcp_recv(a: argparse.Namespace) -> None:
    import trio

    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    _report(addr=f"127.0.0.1:{listener.socket.getsockname()[1]}")
    stream = await listener.accept()
    got = await _drain(stream.receive_some, a.bytes, TCP_RECV_BYTES)
    await stream.send_all(ACK)
    await stream.aclose()
    _report(received=got, recv_cpu_s=RECV_CPU_S)


async def tcp_send(a: argparse.Namespace) -> None:
    import trio

    host, port = a.addr.rsplit(":", 1)
    t0 = time.perf_counter()
    stream = await trio.open_tcp_stream(host, int(port))
    await _timed_send(stream.send_all, stream.receive_some, a.bytes, time.perf_counter() - t0)
    await stream.aclose()


async def tls_recv(a: argparse.Namespace) -> None:
    import tempfile
    from pathlib import Path

    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair

    from fflnode.p2p import libp2p_tls

    # Both ends use one throwaway key pair's certificate, passed through a temp dir: the
    # point is the cost of TLS itself, not of exchanging certificates.
    d = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    ident = libp2p_tls.TlsIdentity.generate(create_new_key_pair())
    chain = d / "chain.pem"
    chain.write_bytes(ident.key_pem + ident.cert_pem)
    ctx = libp2p_tls.server_context(chain, [ident.cert_der])
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    _report(addr=f"127.0.0.1:{listener.socket.getsockname()[1]}:{chain}")
    tcp = await listener.accept()
    stream = _tls_driver(a.path)(tcp, ctx, server_side=True)
    await stream.do_handshake()
    if a.path == "trio-ssl":
        got = await _drain(stream.receive_some, a.bytes, TRIO_SSL_RECV_BYTES)
    else:
        got = await _drain_into(stream.receive_into, a.bytes)
    await stream.send_all(ACK)
    await stream.aclose()
    chain.unlink()
    d.rmdir()
    _report(received=got, recv_cpu_s=RECV_CPU_S)


def _tls_driver(path: str):
    import trio

    from fflnode.p2p.tlsstream import TlsStream

    return trio.SSLStream if path == "trio-ssl" else TlsStream


async def tls_send(a: argparse.Namespace) -> None:
    import ssl

    import trio

    from fflnode.p2p import libp2p_tls

    host, port, chain = a.addr.split(":", 2)
    with open(chain, "rb") as f:
        pem = f.read()
    cert_der = ssl.PEM_cert_to_DER_cert(pem[pem.index(b"-----BEGIN CERTIFICATE") :].decode())
    t0 = time.perf_counter()
    tcp = await trio.open_tcp_stream(host, int(port))
    ctx = libp2p_tls.client_context(chain, cert_der)
    stream = _tls_driver(a.path)(tcp, ctx, server_side=False)
    await stream.do_handshake()
    await _timed_send(stream.send_all, stream.receive_some, a.bytes, time.perf_counter() - t0)
    await stream.aclose()


async def libp2p_recv(a: argparse.Namespace) -> None:
    import multiaddr
    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair

    from fflnode.p2p import streams
    from fflnode.p2p.host import build_host, running_host

    done = trio.Event()
    got = 0

    async def handler(stream) -> None:
        nonlocal got
        got = await _drain(stream.read, a.bytes, streams.READ_PIECE_BYTES)
        await stream.write(ACK)
        await stream.close()
        done.set()

    host = build_host(create_new_key_pair())
    async with running_host(host, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        host.set_stream_handler(BENCH_PROTOCOL, handler)
        _report(addr=str(host.get_addrs()[0]))
        await done.wait()
        await trio.sleep(0.2)  # let the ack leave before the host closes
    _report(received=got, recv_cpu_s=RECV_CPU_S)


async def libp2p_send(a: argparse.Namespace) -> None:
    import multiaddr
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.peerinfo import info_from_p2p_addr

    from fflnode.p2p.host import build_host, running_host

    host = build_host(create_new_key_pair())
    async with running_host(host, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        info = info_from_p2p_addr(multiaddr.Multiaddr(a.addr))
        t0 = time.perf_counter()
        await host.connect(info)
        stream = await host.new_stream(info.peer_id, [BENCH_PROTOCOL])
        await _timed_send(stream.write, stream.read, a.bytes, time.perf_counter() - t0)
        await stream.close()


async def fastpath_recv(a: argparse.Namespace) -> None:
    import multiaddr
    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair

    from fflnode.p2p.fastpath import FastPath
    from fflnode.p2p.host import build_host, running_host

    done = trio.Event()
    got = 0

    async def handler(peer, channel) -> None:
        nonlocal got
        got = await _drain_into(channel.receive_into, a.bytes)
        await channel.send_all(ACK)
        done.set()

    key_pair = create_new_key_pair()
    host = build_host(key_pair)
    fast = FastPath(host, key_pair, handler, listen_host="127.0.0.1")
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with running_host(host, listen), trio.open_nursery() as nursery:
        await nursery.start(fast.serve)
        _report(addr=str(host.get_addrs()[0]))
        await done.wait()
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    if fast.stats.accepted != 1:
        sys.exit("fastpath: the transfer did not arrive over TLS")
    _report(received=got, recv_cpu_s=RECV_CPU_S)


async def fastpath_send(a: argparse.Namespace) -> None:
    import multiaddr
    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.peerinfo import info_from_p2p_addr

    from fflnode.p2p.fastpath import FastPath
    from fflnode.p2p.host import build_host, running_host

    async def no_inbound(peer, channel) -> None:
        pass

    key_pair = create_new_key_pair()
    host = build_host(key_pair)
    fast = FastPath(host, key_pair, no_inbound, listen_host="127.0.0.1")
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with running_host(host, listen), trio.open_nursery() as nursery:
        await nursery.start(fast.serve)
        info = info_from_p2p_addr(multiaddr.Multiaddr(a.addr))
        t0 = time.perf_counter()
        await host.connect(info)
        t1 = time.perf_counter()
        channel = await fast.open(info.peer_id, fallback=False)
        setup, open_s = time.perf_counter() - t0, time.perf_counter() - t1
        await _timed_send(channel.send_all, channel.receive_some, a.bytes, setup, open_s=open_s)
        await channel.aclose()
        nursery.cancel_scope.cancel()


async def _drain_into(receive_into, nbytes: int) -> int:
    """Receive nbytes into one reused buffer, as an adopter reads a body into place."""
    global RECV_CPU_S
    buf = memoryview(bytearray(TCP_RECV_BYTES))
    got = 0
    c0 = None
    while got < nbytes:
        n = await receive_into(buf[: min(len(buf), nbytes - got)])
        if c0 is None:
            c0 = time.process_time()
        if n == 0:
            break
        got += n
    RECV_CPU_S = time.process_time() - (c0 or 0.0)
    return got


async def _drain(receive, nbytes: int, piece: int) -> int:
    """Receive up to nbytes; records the CPU seconds this process spent doing it."""
    global RECV_CPU_S
    got = 0
    c0 = None
    while got < nbytes:
        data = await receive(min(piece, nbytes - got))
        if c0 is None:
            c0 = time.process_time()
        if not data:
            break
        got += len(data)
    RECV_CPU_S = time.process_time() - (c0 or 0.0)
    return got


RECV_CPU_S = 0.0


async def _timed_send(send, receive, nbytes: int, setup_s: float, **extra: float) -> None:
    piece = bytes(PIECE_BYTES)
    t0, c0 = time.perf_counter(), time.process_time()
    left = nbytes
    while left > 0:
        await send(piece if left >= PIECE_BYTES else piece[:left])
        left -= PIECE_BYTES
    ack = await receive(1)
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    if bytes(ack) != ACK:
        sys.exit(f"no acknowledgement (got {bytes(ack)!r})")
    _report(seconds=seconds, setup_s=setup_s, send_cpu_s=cpu_s, **extra)


ROLES = {
    "tcp": {"recv": tcp_recv, "send": tcp_send},
    "trio-ssl": {"recv": tls_recv, "send": tls_send},
    "tls": {"recv": tls_recv, "send": tls_send},
    "libp2p": {"recv": libp2p_recv, "send": libp2p_send},
    "fastpath": {"recv": fastpath_recv, "send": fastpath_send},
}


# -- hivemind (runs in the hivemind venv: asyncio and hivemind only) -------------------


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` and its reaped children, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:13]) / os.sysconf("SC_CLK_TCK")


def hivemind_role(nbytes: int) -> int:
    import asyncio

    from hivemind.p2p import P2P

    async def run() -> None:
        server = await P2P.create()
        client = await P2P.create(initial_peers=await server.get_visible_maddrs())
        done = asyncio.Event()
        got = 0

        async def handler(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
            nonlocal got
            while got < nbytes:
                data = await reader.read(min(PIECE_BYTES, nbytes - got))
                if not data:
                    break
                got += len(data)
            writer.write(ACK)
            await writer.drain()
            writer.close()
            done.set()

        try:
            await server.add_binary_stream_handler(BENCH_PROTOCOL, handler)
            t0 = time.perf_counter()
            _, reader, writer = await client.call_binary_stream_handler(
                server.peer_id, BENCH_PROTOCOL
            )
            setup = time.perf_counter() - t0
            piece = bytes(PIECE_BYTES)
            daemons = [server._child.pid, client._child.pid]
            c0 = [_proc_cpu_s(pid) for pid in daemons], time.process_time()
            t0 = time.perf_counter()
            left = nbytes
            while left > 0:
                writer.write(piece if left >= PIECE_BYTES else piece[:left])
                await writer.drain()
                left -= PIECE_BYTES
            ack = await reader.readexactly(1)
            seconds = time.perf_counter() - t0
            c1 = [_proc_cpu_s(pid) for pid in daemons], time.process_time()
            # The Python process holds both ends' handlers; each p2pd is one end's daemon.
            python_s = c1[1] - c0[1]
            server_d, client_d = (b - a for a, b in zip(c0[0], c1[0], strict=True))
            await asyncio.wait_for(done.wait(), 10)
            writer.close()
            if ack != ACK or got != nbytes:
                sys.exit(f"hivemind: ack {ack!r}, received {got} of {nbytes}")
            _report(
                seconds=seconds,
                setup_s=setup,
                send_cpu_s=client_d + python_s / 2,
                recv_cpu_s=server_d + python_s / 2,
            )
        finally:
            await client.shutdown()
            await server.shutdown()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
