"""The load benchmark's comparison servers, each run as its own process by
bench.harness.launch: `python -m bench.servers.litserve_server`, `python -m bench.servers.plain_server`."""
