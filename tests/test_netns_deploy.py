"""README.md, "Deploy across hosts", followed to the letter: three hosts from the shipped config.

Each "host" is a Linux network namespace on one bridge (198.51.100.10-12). Its config is
configs/node.toml with only the keys the doc's table names changed, and the run is
started as the doc says: the first node alone, its address read from its node.json, that
address the others' only bootstrap. The daemons are plain `fflnode run` processes, told
READY=1 over NOTIFY_SOCKET as systemd would be. The run must end with every node exiting
0 and a merge equal, bit for bit, to the mean recomputed here from the premerge files
(fflnode_harness.testnet.reference_merge: safetensors and torch, not fflnode's merge).
Skipped with the reason where namespaces cannot be created, unless FFLNODE_REQUIRE_NETNS=1.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import socket
import subprocess
import time
import tomllib
from contextlib import ExitStack
from pathlib import Path

import pytest

from fflnode import config as cfgmod
from fflnode_harness import netns
from fflnode_harness.netns import Bridge
from fflnode_harness.testnet import merged_equals, reference_merge
from tests.conftest import REPO, fflnode_cmd

# One bridge subnet (198.51.100.0/24) and one stale-namespace sweep for all of these:
# under pytest-xdist they run on one worker, one after another.
pytestmark = pytest.mark.xdist_group("netns")

AVAILABLE, WHY_NOT = netns.netns_available()
if not AVAILABLE and os.environ.get("FFLNODE_REQUIRE_NETNS") == "1":
    raise RuntimeError(f"FFLNODE_REQUIRE_NETNS=1 but {WHY_NOT}")
needs_netns = pytest.mark.skipif(not AVAILABLE, reason=f"network namespaces: {WHY_NOT}")

DOC = REPO / "README.md"  # its "Deploy across hosts" section
TEMPLATE = REPO / "configs" / "node.toml"
HOSTS = 3
ROUNDS = 4  # the shipped 600 would take hours; the doc says to choose it
# A daemon imports torch and libp2p before it listens: seconds on a quiet machine, up
# to a minute on the shared 2-core one under load. The limit only catches a hung start.
READY_TIMEOUT_S = 120.0
# The whole run after the last start: ~30 s here for 4 rounds and the merge; the limit
# only stops a hung run.
RUN_TIMEOUT_S = 300.0
NOTIFY_DGRAM_BYTES = 4096  # one sd_notify datagram: a few KEY=VALUE lines
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL (the daemon promises 5 s)


def documented_keys() -> set[tuple[str, str]]:
    """(section, key) pairs the doc's "What to change" table names."""
    text = DOC.read_text()
    table = text.split("**What to change in `node.toml`, per host.**", 1)[1].split("\n\n")[1]
    keys = set()
    for row in table.splitlines()[2:]:  # past the header and the |---| line
        cell = row.split("|")[1]
        section = re.match(r"\s*`\[(\w+)\] (\w+)`", cell)
        assert section, row
        for key in re.findall(r"`(?:\[\w+\] )?(\w+)`", cell):
            keys.add((section.group(1), key))
    return keys


def edit(template: str, values: dict[tuple[str, str], object]) -> str:
    """The template with each (section, key) line's value replaced, comments kept."""
    out, section, done = [], "", set()
    for line in template.splitlines(keepends=True):
        header = re.match(r"\[(\w+)\]\s*$", line)
        if header:
            section = header.group(1)
        key = re.match(r"(\w+)\s*=", line)
        if key and (section, key.group(1)) in values:
            out.append(f"{key.group(1)} = {json.dumps(values[section, key.group(1)])}\n")
            done.add((section, key.group(1)))
            if line.rstrip().endswith("["):  # a multi-line list: skip to its "]"
                section = "+skip+" + section
            continue
        if section.startswith("+skip+"):
            if line.startswith("]"):
                section = section[len("+skip+") :]
            continue
        out.append(line)
    assert done == set(values), f"not in the template: {set(values) - done}"
    return "".join(out)


def host_config(tmp: Path, i: int, bootstrap: list[str]) -> Path:
    values = {
        ("node", "data_dir"): str(tmp / f"host{i}" / "data"),
        ("node", "bootstrap"): bootstrap,
        ("run", "run_id"): "deploy-try",
        ("run", "nodes"): HOSTS,
        ("run", "rounds"): ROUNDS,
        ("train", "partition_index"): i,
    }
    assert set(values) <= documented_keys()
    text = edit(TEMPLATE.read_text(), values)
    shipped, edited = tomllib.loads(TEMPLATE.read_text()), tomllib.loads(text)
    keys = {(s, k) for table in (shipped, edited) for s in table for k in table[s]}
    changed = {(s, k) for s, k in keys if shipped.get(s, {}).get(k) != edited.get(s, {}).get(k)}
    assert changed <= set(values), changed  # nothing else moved
    path = tmp / f"host{i}" / "node.toml"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


def wait_for(
    procs: list[subprocess.Popen], notify: socket.socket, timeout_s: float, until_ready: bool
) -> None:
    """Until every process in `procs` exited (or, `until_ready`, one said READY=1),
    draining the notify socket meanwhile so no daemon finds it full. Woken by a
    datagram or a process exit (pidfd), never by a timer."""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(notify, selectors.EVENT_READ, None)
        pidfds = [os.pidfd_open(p.pid) for p in procs]
        try:
            for fd, p in zip(pidfds, procs, strict=True):
                sel.register(fd, selectors.EVENT_READ, p)
            running = len(procs)
            while running:
                left = deadline - time.monotonic()
                assert left > 0, f"not done within {timeout_s:g} s"
                for key, _ in sel.select(left):
                    if key.data is None:
                        said = notify.recv(NOTIFY_DGRAM_BYTES).decode(errors="replace")
                        if until_ready and "READY=1" in said.splitlines():
                            return
                    else:
                        sel.unregister(key.fd)
                        key.data.wait()
                        running -= 1
                        assert not until_ready, f"exited {key.data.returncode} before READY=1"
        finally:
            for fd in pidfds:
                os.close(fd)


@needs_netns
@pytest.mark.slow
def test_three_hosts_deployed_as_the_doc_says_merge_exactly(tmp_path: Path) -> None:
    procs: list[subprocess.Popen] = []
    with ExitStack() as stack:
        bridge = stack.enter_context(Bridge(HOSTS))

        @stack.callback
        def stop_all() -> None:  # before the bridge goes: no daemon outlives the test
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

        notify = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        notify_path = tmp_path / "notify.sock"
        notify.bind(str(notify_path))

        def start(i: int, bootstrap: list[str]) -> Path:
            conf = host_config(tmp_path, i, bootstrap)
            log = conf.parent / "node.log"
            env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), PYTHONUNBUFFERED="1")
            argv = bridge.node_cmd(i, fflnode_cmd("run", "--config", str(conf)))
            with open(log, "wb") as logf:
                procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=logf, stderr=logf))
            return log

        # "Start the first node alone with an empty bootstrap."
        log0 = start(0, [])
        try:
            wait_for(procs, notify, READY_TIMEOUT_S, until_ready=True)
        except AssertionError as e:
            raise AssertionError(f"{e}: {log0.read_text()[-3000:]}") from None
        # "jq -r '.addrs[0]' /var/lib/fflnode/node.json"
        first = json.loads((tmp_path / "host0" / "data" / "node.json").read_text())["addrs"][0]
        assert re.fullmatch(r"/ip4/198\.51\.100\.10/tcp/4001/p2p/12D3KooW\w+", first), first
        # "Put that string in every other host's bootstrap and start them in any order."
        logs = [log0] + [start(i, [first]) for i in range(1, HOSTS)]
        try:
            wait_for(procs, notify, RUN_TIMEOUT_S, until_ready=False)
        except AssertionError as e:
            raise AssertionError(f"{e}: {[log.read_text()[-2000:] for log in logs]}") from None
        for p, log in zip(procs, logs, strict=True):
            assert p.returncode == 0, log.read_text()[-4000:]

    assert not [ns for ns in netns.list_netns() if ns.startswith(bridge.name + "-")]
    data = [tmp_path / f"host{i}" / "data" for i in range(HOSTS)]
    results = [json.loads((d / "result.json").read_text()) for d in data]
    assert len(results[0]["merge"]["members"]) == HOSTS
    ref = reference_merge(
        [d / "premerge.safetensors" for d in data],
        results,
        cfgmod.load(tmp_path / "host0" / "node.toml"),
    )
    assert ref["hash"] and all(r["merged_hash"] == ref["hash"] for r in results)
    assert all(merged_equals(d / "merged.safetensors", ref["tensors"]) for d in data)
    for r in results:  # the merge's bytes took the second port the doc opens, 4002
        assert r["fast_path"]["opened"] > 0 and not r["fast_path"]["fallbacks"], r["fast_path"]
    for i, log in enumerate(logs):  # each advertised its bridge address, never 0.0.0.0
        text = log.read_text()
        assert f"listening on /ip4/198.51.100.{10 + i}/tcp/4001/p2p/" in text
        assert "fast path listening on 0.0.0.0:4002" in text
        assert "0.0.0.0" not in "".join(ln for ln in text.splitlines() if "advertis" in ln)
