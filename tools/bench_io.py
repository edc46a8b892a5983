#!/usr/bin/env python3
"""Prism I/O benchmark: see fflnode/prism/bench.py (also `fflnode bench io FILE`).

Usage: .venv/bin/python tools/bench_io.py [FILE] [--size-gib 2] [--repeats 3] [--depth 8]

Needs fio for the device-limit rows (apt-get install fio). Run as root for honest cold
reads and for fio's huge-page row: it then sets vm.nr_hugepages for the run and always
sets it back.
"""

import sys

from fflnode.prism.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
