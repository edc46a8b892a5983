"""What runs beside the daemon, never inside it: the testnet, demos, fault injection,
network-namespace harnesses and benchmark helpers.

Rule: nothing under `fflnode/` imports this package at module level. `fflnode run`
must start without loading it (tests/test_import_graph.py checks `sys.modules`); the CLI
imports it lazily for the commands that need it.
"""
