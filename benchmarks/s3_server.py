"""moto's S3 server at 127.0.0.1 for the benchmarks, in a child process at a chosen niceness, or on
cores of its own.

A real S3 endpoint does not run on the trainer's machine; moto does, and its request handling (part
hashing, XML, copying) takes CPU the trainer and its checkpoint writer would otherwise get. At nice 19
it takes only what they leave; at nice 0 it competes. Neither keeps it off training's cores: on cores
of its own (the trainer kept off them, `confined`) it models a remote endpoint as this machine can.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator

MOTO_CHILD = """
import logging, os, sys
os.nice(int(sys.argv[1]))  # before any thread starts: on Linux a thread's niceness is its own, inherited
if sys.argv[2]:  # likewise its CPU affinity
    os.sched_setaffinity(0, {int(core) for core in sys.argv[2].split(",")})
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print("%s %d" % server.get_host_and_port(), flush=True)
sys.stdin.read()  # until the benchmark closes our stdin
server.stop()
"""


@dataclass(frozen=True)
class MotoServer:
    environ: dict[str, str]  # what a trainer pod gets from its Secret
    pid: int | None  # the server's process (None: it runs in this one)


def _environ(host: str, port: int | str) -> dict[str, str]:
    return {"KONTINUE_S3_ENDPOINT": f"http://{host}:{port}", "KONTINUE_S3_ACCESS_KEY": "bench-access",
            "KONTINUE_S3_SECRET_KEY": "bench-secret-value", "KONTINUE_S3_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_server(nice: int = 0, in_process: bool = False, cores: set[int] | None = None) -> Iterator[MotoServer]:
    """moto's ThreadedMotoServer in a child process at niceness `nice`, on `cores` only if given, or
    in this process (`nice` and `cores` do not apply; its request handling then takes this
    process's GIL)."""
    if in_process:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            yield MotoServer(_environ(*server.get_host_and_port()), None)
        finally:
            server.stop()
        return
    core_list = ",".join(map(str, sorted(cores or ())))
    child = subprocess.Popen([sys.executable, "-c", MOTO_CHILD, str(nice), core_list], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline().split()
    if len(line) != 2:
        child.kill()
        raise RuntimeError(f"moto's server process did not start (exit code {child.wait()})")
    try:
        yield MotoServer(_environ(*line), child.pid)
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@contextlib.contextmanager
def confined(cores: set[int], others: Iterable[int | None] = ()) -> Iterator[None]:
    """Every thread of this process and of the processes `others` (pids; None is skipped) on
    `cores` only, and so every thread and process they start (loader workers); all of them back on
    this process's cores afterwards."""
    before = os.sched_getaffinity(0)
    pids = ["self", *(str(pid) for pid in others if pid is not None)]

    def tasks() -> Iterator[int]:
        for pid in pids:
            with contextlib.suppress(OSError):  # a process that ended meanwhile
                yield from map(int, os.listdir(f"/proc/{pid}/task"))

    def pin(mask: set[int]) -> None:
        for task in tasks():
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                os.sched_setaffinity(task, mask)

    def strays() -> list[int]:
        found = []
        for task in tasks():
            with contextlib.suppress(OSError):
                if os.sched_getaffinity(task) != cores:
                    found.append(task)
        return found

    pin(cores)
    try:
        yield
    finally:
        if outside := strays():  # a thread started elsewhere: the figures are not what they claim
            print(f"  warning: threads not confined to cores {sorted(cores)}: {', '.join(map(str, outside))}",
                  flush=True)
        pin(before)
