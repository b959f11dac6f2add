"""What the tests and the benchmarks share: real processes to test against.

- `testkit.live`: `Server`, a real `python -m service serve` process (or another server
  command) on a free loopback port; `free_port`; `copy_sqlite`; `ROOT`, the repository.
- `testkit.postgres`: `Postgres`, a throwaway PostgreSQL cluster; `pg_bin`; `wait_until`.

tests/ and bench/ import this package; neither imports the other's helpers.
"""
