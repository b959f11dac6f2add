"""How the kernel spreads bursts of connections over SO_REUSEPORT sockets (`serve --workers N`,
service/web/workers.py): N listening sockets made as the server makes them, bursts of
`--burst` connections opened back to back from one client, the connections each socket
got counted. No server process: this measures the kernel's placement alone.

    .venv/bin/python -m bench.perf.reuseport_spread [--sockets 2] [--burst 32] [--bursts 500]

Record: bench/results/reuseport-spread.json.
"""

from __future__ import annotations

import argparse
import socket
from collections import Counter

from bench.harness import header, spread, write_record
from service.web.workers import reuseport_socket


def one_burst(listeners: list[socket.socket], port: int, burst: int) -> list[int]:
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(burst)]
    got = Counter()
    for i, s in enumerate(listeners):
        while True:
            try:
                conn, _ = s.accept()
            except BlockingIOError:
                break
            conn.close()
            got[i] += 1
    for c in clients:
        c.close()
    return [got[i] for i in range(len(listeners))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sockets", type=int, default=2)
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--bursts", type=int, default=500)
    args = ap.parse_args()
    m = header(vars(args))
    first = reuseport_socket("127.0.0.1", 0)
    port = first.getsockname()[1]
    listeners = [first] + [reuseport_socket("127.0.0.1", port) for _ in range(args.sockets - 1)]
    for s in listeners:
        s.listen(4096)
        s.setblocking(False)
    shares = []
    for _ in range(args.bursts):
        counts = one_burst(listeners, port, args.burst)
        assert sum(counts) == args.burst, counts  # every connection landed in one queue
        shares.append(max(counts) / args.burst)
    for s in listeners:
        s.close()
    over = sum(x > 2 / 3 for x in shares) / len(shares)
    results = {"largest_share": spread(shares), "bursts_over_two_thirds": over,
               "largest_share_histogram": dict(sorted(Counter(round(x * args.burst) for x in shares).items()))}
    print(f"largest share per burst: median {results['largest_share']['median']:.3f}, "
          f"max {results['largest_share']['max']:.3f}; bursts with one socket over 2/3: {over:.1%}")
    write_record("reuseport-spread", vars(args), results, m)


if __name__ == "__main__":
    main()
