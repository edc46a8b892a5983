"""`fflnode run`: the node as a long-running service.

Owns process-level concerns only: loading the config (a bad one is one line on stderr
and exit code 2, never a traceback), logging (text or JSON lines, py-libp2p's logger
routed in), SIGINT/SIGTERM (cancel the node's nursery; STOPPING=1 to the supervisor;
gone within SHUTDOWN_DEADLINE_S), and the exit code.

Exit codes: 0 the run completed and the merge verified; 1 the run failed; 2 bad
configuration or identity; 3 the merge failed (hash mismatch, too few contributions);
130/143 stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import time
import traceback

import trio

from fflnode import config
from fflnode.compose import Composition, compose
from fflnode.errors import ConfigError, FflError, IdentityError, MergeError, leaf_error
from fflnode.node import Node
from fflnode.p2p.host import route_libp2p_logging
from fflnode.sdnotify import Notifier

log = logging.getLogger("fflnode")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_MERGE = 0, 1, 2, 3
# systemd's default TimeoutStopSec is 90 s; the brief promises 5 s. Cancellation of the
# nursery normally finishes in well under a second; past this the process exits hard.
SHUTDOWN_DEADLINE_S = 4.5


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    lvl = getattr(logging, level.upper())
    root.setLevel(lvl)
    route_libp2p_logging(lvl)


# glibc malloc tuning. Every worker thread that touches torch gets its own malloc arena
# and keeps its freed memory; two arenas serve one event loop and its few workers.
# Measured on a 4-node, 200-round testnet: peak RSS per node 536 -> 485 MB, wall time
# unchanged. Also mmap'ing blocks from 128 KiB up saved 80 MB more but cost 27 % wall
# time (the SSD's 256 KiB activations were mapped and unmapped at every op).
M_ARENA_MAX = -8  # mallopt parameter number, <malloc.h>
MALLOC_ARENAS = 2


def tune_malloc() -> bool:
    """Apply the glibc setting above; False where this is not glibc."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, MALLOC_ARENAS) == 1
    except (OSError, AttributeError):
        return False


def main(config_path: str) -> int:
    tune_malloc()
    try:
        cfg = config.load(config_path)
    except ConfigError as e:
        print(f"fflnode: {e}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg.node.log_level, cfg.node.log_format)
    try:  # everything checkable without the network: task, model, codec, keys
        comp = compose(cfg)
    except (ConfigError, IdentityError) as e:
        print(f"fflnode: {e}", file=sys.stderr)
        return EXIT_CONFIG
    notifier = Notifier()
    try:
        return trio.run(serve, comp, notifier)
    finally:
        notifier.close()


def exit_now(code: int) -> None:
    """End the process once `main` returned: every file, socket and stream is closed.

    Measured: CPython's finalization of torch and py-libp2p state after that takes
    0.2 to 6 s on this machine, which would break the 5 s shutdown promise; it holds
    nothing of ours, so skip it.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def serve(comp: Composition, notifier: Notifier) -> int:
    node = Node(comp, notifier)
    outcome: dict[str, int] = {}

    async def run_node(cancel: trio.CancelScope) -> None:
        try:
            await node.run()
            outcome["code"] = EXIT_OK
        except (ConfigError, IdentityError) as e:
            print(f"fflnode: {e}", file=sys.stderr)
            outcome["code"] = EXIT_CONFIG
        except MergeError as e:
            log.error("merge failed: %s", e)
            node.record_failure(e)
            outcome["code"] = EXIT_MERGE
        except FflError as e:
            log.error("run failed: %s", e)
            node.record_failure(e)
            outcome["code"] = EXIT_FAILED
        except trio.Cancelled:
            raise
        except Exception as e:  # a bug, or one of ours inside an exception group
            leaf = leaf_error(e)
            if isinstance(leaf, FflError) and leaf is not e:
                code = EXIT_MERGE if isinstance(leaf, MergeError) else EXIT_FAILED
                code = EXIT_CONFIG if isinstance(leaf, (ConfigError, IdentityError)) else code
                log.error("run failed: %s", leaf)
                node.record_failure(leaf)
                outcome["code"] = code
            else:
                log.error("node crashed:\n%s", traceback.format_exc())
                node.record_failure(leaf)
                outcome["code"] = EXIT_FAILED
        finally:
            cancel.cancel()

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_node, nursery.cancel_scope)
            async for signum in signals:
                name = signal.Signals(signum).name
                log.info("received %s: shutting down", name)
                notifier.stopping(f"stopping on {name}")
                outcome["code"] = 128 + signum
                _arm_hard_exit(128 + signum)
                nursery.cancel_scope.cancel()
                break
    if "code" not in outcome:
        outcome["code"] = EXIT_FAILED
    if outcome["code"] == EXIT_OK:
        notifier.stopping("run complete")
    return outcome["code"]


def _arm_hard_exit(code: int) -> None:
    """Exit no later than SHUTDOWN_DEADLINE_S after a stop signal, whatever hangs."""
    import threading

    def hard_exit() -> None:
        sys.stderr.write(f"fflnode: shutdown exceeded {SHUTDOWN_DEADLINE_S} s; exiting\n")
        sys.stderr.flush()
        os._exit(code)

    timer = threading.Timer(SHUTDOWN_DEADLINE_S, hard_exit)
    timer.daemon = True
    timer.start()
