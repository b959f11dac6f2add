"""ML experiments: what the memory, the taught rows and early exit buy, settings chosen on
validation data. Each is run as `python -m bench.experiments.<name> [--help]`."""
