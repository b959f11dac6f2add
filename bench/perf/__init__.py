"""Performance runs: time, throughput, CPU and memory of the service and its parts.
Each is run as `python -m bench.perf.<name> [--help]` from the repository root."""
