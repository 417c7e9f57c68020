"""gunicorn config for the baselines: one SO_REUSEPORT listening socket per worker, as productd has.

Without it, which worker accepts which keep-alive connection is a race, and one worker can end up
with all of them (measured: the same server swings by 2x from run to run). productd spreads
connections with one socket per worker; the baselines get the same, so that the ratios compare
request handling, not accept luck. The address comes from BENCH_BIND (HOST:PORT).
"""

import os
import socket

_host, _, _port = os.environ["BENCH_BIND"].rpartition(":")
_workers = int(os.environ["BENCH_BASELINE_WORKERS"])
_sockets = []
for _ in range(_workers):
    _sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    _sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    _sock.bind((_host, int(_port)))
    _sock.listen(2048)
    _sockets.append(_sock)

bind = [f"fd://{sock.fileno()}" for sock in _sockets]
workers = _workers


def pre_fork(server, worker):
    taken = {getattr(w, "bench_slot", -1) for w in server.WORKERS.values()}
    worker.bench_slot = next(i for i in range(len(_sockets) + len(taken) + 1) if i not in taken)


def post_fork(server, worker):
    worker.sockets = [worker.sockets[worker.bench_slot % len(worker.sockets)]]
