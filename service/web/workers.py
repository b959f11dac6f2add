"""Several server processes on one port, each listening on its own socket (SO_REUSEPORT).

With one listening socket shared by every process, whichever event loop wakes first accepts
a whole burst of new connections and keeps them (the thundering herd). Here every process
binds its own socket to the same address with SO_REUSEPORT: the kernel gives each new
connection to one of the sockets by a hash of the connection's addresses, so each process
has its own accept queue and nothing has to be counted or moved. The hash spreads
connections like coin flips, not in turns: many connections split evenly, a few may not.

A process joins the group when it starts listening, which uvicorn does after the app's
start-up (model loaded, memory restored): no connection waits in the queue of a process
that is still starting. A process that dies is started again; connections waiting in its
queue at that moment are reset (the kernel does not hand them to the others). Any process
of the same user may bind into the group: run the service under its own user.

The supervisor (this module's `run_workers`) holds a bound socket that never listens: it
checks the address is free before anything starts (a clear error, not N failing processes)
and fixes the port when 0 was asked for.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import threading
import time

log = logging.getLogger(__name__)
APP_FACTORY = "service.web.app:create_app_from_environment"  # settings from SERVICE_CONFIG_JSON
STOP_TIMEOUT = 35.0  # seconds a process has to finish after SIGTERM (uvicorn's graceful 30 s + margin)


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) in the address's SO_REUSEPORT group, not listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def serve_one(host: str, port: int, server: dict, listening) -> None:
    """One server process: its own socket in the group, the app built by the factory;
    `listening` (an Event) is set once it accepts connections."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)  # the app's start-up, then listen
            if not self.should_exit:
                listening.set()

    sock = reuseport_socket(host, port)
    Server(uvicorn.Config(APP_FACTORY, factory=True, **server)).run(sockets=[sock])


def run_workers(workers: int, host: str, port: int, server: dict) -> int:
    """Run `workers` server processes until SIGINT/SIGTERM; restart any that dies after it
    listened. Returns the exit status (1 when a process died before it listened: it failed
    to start, and another would too)."""
    try:
        probe = reuseport_socket(host, port)
    except OSError as e:
        log.error("cannot bind %s:%d: %s", host, port, e)
        return 1
    port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def start():
        listening = context.Event()
        p = context.Process(target=serve_one, args=(host, port, server, listening), name="server", daemon=False)
        p.start()
        return p, listening

    procs = [start() for _ in range(workers)]
    log.info("%d server processes on %s:%d (SO_REUSEPORT): %s", workers, host, port, [p.pid for p, _ in procs])
    status = 0
    try:
        while not stop.wait(0.5):
            for i, (p, listening) in enumerate(procs):
                if p.is_alive() or stop.is_set():  # a Ctrl-C reaches the processes too
                    continue
                if not listening.is_set():
                    log.error("server process %d exited with %s while starting: stopping", p.pid, p.exitcode)
                    status = 1
                    stop.set()
                    break
                log.warning("server process %d exited with %s: starting another", p.pid, p.exitcode)
                procs[i] = start()
    finally:
        for p, _ in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: uvicorn finishes the requests in flight
        deadline = time.monotonic() + STOP_TIMEOUT
        for p, _ in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        probe.close()
    return status
