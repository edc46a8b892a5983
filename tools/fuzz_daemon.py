"""Fuzz real `fflnode run` daemons over real libp2p connections, for as long as asked.

    python tools/fuzz_daemon.py --inputs 1000000 --seed 1 --out fuzz-out

Runs sessions one after another (fflnode_harness/fuzz_daemon.py says what a session is
and what its oracle checks): two honest daemons training a digits run, attacked from
this process until the session's run ends, then judged; the modes (outsider, insider,
ban) and the exchange codecs (none, holo, topk) rotate from session to session.
Stops after --inputs inputs, or at the first session whose oracle fails (its daemons'
logs and data stay under --out). Prints one line per session, then the summary table,
and writes it with every figure to OUT/summary.txt and OUT/summary.json.

Exit code: 0 when every session passed and no input hung, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fflnode_harness import fuzz_daemon as fd  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--inputs", type=int, default=1_000_000, help="inputs to try in all")
    p.add_argument("--seed", type=int, default=1, help="the generator's seed (replays a run)")
    p.add_argument("--out", type=Path, default=Path("fuzz-out"), help="daemons' files, summary")
    p.add_argument(
        "--rounds", type=int, default=2000,
        help="rounds of each session's run (the fuzzing lasts while they train and merge)",
    )  # fmt: skip
    p.add_argument("--modes", default=",".join(fd.MODES), help="outsider,insider,ban")
    p.add_argument("--codecs", default=",".join(fd.CODECS), help="none,holo,topk")
    p.add_argument("--workers", type=int, default=fd.WORKERS, help="concurrent attacker tasks")
    p.add_argument("--sessions", type=int, default=100, help="stop after this many sessions")
    p.add_argument(
        "--families", default="",
        help="attack families, default all: " + ",".join(fd.FAMILY_WEIGHTS),
    )  # fmt: skip
    a = p.parse_args(argv)
    modes = tuple(m for m in a.modes.split(",") if m)
    codecs = tuple(c for c in a.codecs.split(",") if c)
    if not set(modes) <= set(fd.MODES) or not set(codecs) <= set(fd.CODECS):
        p.error(f"--modes from {fd.MODES}, --codecs from {fd.CODECS}")
    families = None
    if a.families:
        names = [f for f in a.families.split(",") if f]
        if not set(names) <= set(fd.FAMILY_WEIGHTS):
            p.error(f"--families from {tuple(fd.FAMILY_WEIGHTS)}")
        families = {f: fd.FAMILY_WEIGHTS[f] for f in names}
    if a.rounds <= fd.LEAVE_BEFORE_END_ROUNDS * 2:
        p.error(f"--rounds must exceed {fd.LEAVE_BEFORE_END_ROUNDS * 2} (the insider leaves early)")
    a.out.mkdir(parents=True, exist_ok=True)
    fd.quiet_attacker_logs()
    t0 = time.monotonic()
    stats, verdicts = trio.run(
        lambda: fd.campaign(
            a.inputs, a.seed, a.out, rounds=a.rounds, modes=modes, codecs=codecs,
            workers=a.workers, max_sessions=a.sessions, say=lambda s: print(s, flush=True),
            families=families,
        )
    )  # fmt: skip
    wall = time.monotonic() - t0
    table = fd.summary(stats, verdicts, wall)
    print(table)
    (a.out / "summary.txt").write_text(table + "\n")
    doc = fd.summary_json(stats, verdicts, wall) | {"seed": a.seed, "argv": sys.argv[1:]}
    (a.out / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
    ok = all(v.ok for v in verdicts) and stats.hang_count == 0 and stats.total >= a.inputs
    ok = ok and not stats.violations
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
