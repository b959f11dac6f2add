"""service/web/workers.py: server processes on one port, each with its own SO_REUSEPORT socket."""

import socket
from collections import Counter

import pytest

from service.web.workers import reuseport_socket, run_workers


def test_two_reuseport_sockets_listen_on_one_port_and_both_get_connections():
    a = reuseport_socket("127.0.0.1", 0)
    port = a.getsockname()[1]
    b = reuseport_socket("127.0.0.1", port)
    a.listen(128)
    b.listen(128)
    a.setblocking(False)
    b.setblocking(False)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(96)]
    try:
        got = Counter()
        for name, s in (("a", a), ("b", b)):
            while True:
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    break
                conn.close()
                got[name] += 1
        assert sum(got.values()) == 96  # every connection in one of the two accept queues
        # the kernel's hash spreads them like coin flips: more than 2/3 on one of 96 has p < 0.001
        assert max(got.values()) <= 64, got
    finally:
        for c in clients:
            c.close()
        a.close()
        b.close()


def test_an_address_held_by_a_plain_listener_is_refused_before_any_process_starts(caplog):
    plain = socket.socket()
    plain.bind(("127.0.0.1", 0))
    plain.listen(1)
    try:
        with pytest.raises(OSError):
            reuseport_socket("127.0.0.1", plain.getsockname()[1])
        assert run_workers(2, "127.0.0.1", plain.getsockname()[1], {}) == 1
        assert "cannot bind" in caplog.text
    finally:
        plain.close()
