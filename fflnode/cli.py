"""The `fflnode` command line: run, testnet, doctor, bench, sketch, status, states."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fflnode", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a node daemon from a TOML config")
    run.add_argument("--config", required=True, help="path to the node's TOML config")

    tn = sub.add_parser("testnet", help="launch N local nodes, train, merge, report")
    from fflnode_harness.testnet import add_arguments

    add_arguments(tn)

    sub.add_parser("doctor", help="report the environment: backends, libraries, limits")

    st = sub.add_parser("status", help="ask a running node how it is doing")
    from fflnode.status import add_arguments as status_arguments

    status_arguments(st)

    sk = sub.add_parser(
        "sketch",
        help="sketch a safetensors model of any size with bounded memory",
        add_help=False,
    )
    sk.add_argument("args", nargs=argparse.REMAINDER, help="FILE --k K [options]; --help")

    sts = sub.add_parser("states", help="F-SSD demo: N nodes pull and merge MQAR states")
    from fflnode_harness.states_demo import add_arguments as states_arguments

    states_arguments(sts)

    bench = sub.add_parser("bench", help="benchmarks: `fflnode bench io FILE`")
    bench.add_argument("what", choices=["io"], help="io: Prism read backends vs the rest")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="FILE [options]; --help")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Commands that own their arguments get them untouched (argparse's REMAINDER
    # mis-parses a leading option such as --help).
    if argv[:1] == ["sketch"]:
        from fflnode.sketch import model_sketch

        return model_sketch.main(argv[1:])
    if argv[:2] == ["bench", "io"]:
        from fflnode.prism import bench

        return bench.main(argv[2:])
    if argv[:1] == ["run"]:  # the daemon: parsed alone, so it never imports the harness
        run = argparse.ArgumentParser(prog="fflnode run", description="run a node daemon")
        run.add_argument("--config", required=True, help="path to the node's TOML config")
        from fflnode import daemon

        daemon.exit_now(daemon.main(run.parse_args(argv[1:]).config))
    args = build_parser().parse_args(argv)
    if args.command == "run":
        from fflnode import daemon

        daemon.exit_now(daemon.main(args.config))
    if args.command == "testnet":
        from fflnode_harness import testnet

        return testnet.main(args)
    if args.command == "status":
        from fflnode import status

        return status.main(args)
    if args.command == "states":
        from fflnode_harness import states_demo

        return states_demo.main(args)
    if args.command == "doctor":
        from fflnode import doctor

        return doctor.main()
    return 2


if __name__ == "__main__":
    sys.exit(main())
