"""py-libp2p's own warnings reach the node's log at most once per call site a minute.

Found by tools/fuzz_daemon.py: one attacker made a daemon write 1,314 library lines in
25 s (one per hostile input: "Cannot flush pending messages for <peer>", "Received an
invalid-signed-record", "Error processing identify/push from <peer>: ..."), while fflnode
promises a bounded log per offending peer.
"""

from __future__ import annotations

import logging

from fflnode.p2p.host import LIBRARY_LOG_WINDOW_S, LibraryLogLimit, route_libp2p_logging


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(name: str, level: int, msg: str, lineno: int, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, level, "/lib/site.py", lineno, msg, args, None)


def test_a_library_call_site_writes_one_line_per_window_then_says_how_many_it_held():
    clock = Clock()
    limit = LibraryLogLimit(clock=clock)
    site = [
        record("libp2p.pubsub", logging.WARNING, "flush %s", 7, f"peer{i}") for i in range(1000)
    ]
    passed = [r for r in site if limit.filter(r)]
    assert len(passed) == 1 and limit.held == 999
    clock.now += LIBRARY_LOG_WINDOW_S
    late = record("libp2p.pubsub", logging.WARNING, "flush %s", 7, "peer")
    assert limit.filter(late)
    assert late.getMessage() == "flush peer (999 similar lines held back)"
    assert not limit.filter(record("libp2p.pubsub", logging.WARNING, "flush %s", 7, "x"))


def test_other_sites_levels_and_loggers_pass_untouched():
    limit = LibraryLogLimit(clock=Clock())
    assert limit.filter(record("libp2p.pubsub", logging.ERROR, "a", 1))
    assert limit.filter(record("libp2p.pubsub", logging.ERROR, "b", 2))  # another line
    assert limit.filter(record("libp2p.yamux", logging.ERROR, "a", 1))  # another logger
    for _ in range(100):
        assert limit.filter(record("libp2p.pubsub", logging.INFO, "routine", 1))
        assert limit.filter(record("fflnode.p2p.bulk", logging.WARNING, "ours", 1))


def test_route_libp2p_logging_limits_library_warnings_on_the_node_handlers():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, rec: logging.LogRecord) -> None:
            lines.append(rec.getMessage())

    try:
        root.handlers[:] = [Keep()]
        route_libp2p_logging(logging.INFO)
        route_libp2p_logging(logging.INFO)  # idempotent: one filter per handler
        assert sum(isinstance(f, LibraryLogLimit) for f in root.handlers[0].filters) == 1
        lib = logging.getLogger("libp2p.fuzzed.site")
        for i in range(500):
            lib.warning("cannot parse what peer %d sent", i)
        logging.getLogger("fflnode.test").warning("our own line")
        assert lines == ["cannot parse what peer 0 sent", "our own line"]
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
