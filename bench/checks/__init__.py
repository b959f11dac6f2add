"""Correctness checks at full scale: served accuracy, crash recovery, save/load round trips.
Each is run as `python -m bench.checks.<name> [--help]`."""
