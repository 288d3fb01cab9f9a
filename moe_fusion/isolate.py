"""Run OpenVINO work in worker processes, so that a native crash or abort inside the runtime (seen: SIGSEGV
in the CPU plugin on a block whose scatter indices fall out of range) costs one answer, not the caller.

`Worker.call(fn, *args)` runs a module-level function in a long-lived child started with this Python
(`python -c ...`, not multiprocessing's spawn, which would re-run the caller's main script)
and returns its result. The child sees the caller's sys.path. A Python exception in the child comes back as
`WorkerError` with its one useful line; the child's death (a signal, an exit) as `WorkerCrash` naming the
signal and the child's last words on stderr, and the next call starts a fresh child. Memory the child took
for one job is returned to the system when it dies; `stop()` ends it deliberately.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
from multiprocessing.connection import Connection


class WorkerError(RuntimeError):
    """The function raised in the worker; the message is its one useful line."""


class WorkerCrash(RuntimeError):
    """The worker process died while running the function (a native crash, an abort, out of memory)."""


def _describe(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class Worker:
    """One worker process, started on first use and again after a crash."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._stderr = None

    def _start(self) -> None:
        parent, child = socket.socketpair()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (kept open for the process's lifetime)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p and os.path.isdir(p)))
        self._process = subprocess.Popen(
            [sys.executable, "-c", f"from moe_fusion.isolate import serve; serve({child.fileno()})"],
            pass_fds=[child.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the caller, which decides; not the worker mid-job
        )
        child.close()
        self._conn = Connection(parent.detach())

    def call(self, fn, *args):
        self.send(fn, *args)
        return self.receive()

    def send(self, fn, *args) -> None:
        """Start `fn(*args)` in the worker; `receive()` waits for its result (other work may run meanwhile)."""
        if self._process is None or self._process.poll() is not None:
            self._start()
        with contextlib.suppress(OSError):  # died before: receive() reports how
            self._conn.send((fn, args))

    def receive(self):
        try:
            ok, value = self._conn.recv()
        except (EOFError, OSError) as error:
            code = self._process.wait()
            words = self._last_words()
            self._close()
            raise WorkerCrash(f"the OpenVINO worker process died ({_describe(code)}){words}") from error
        if not ok:
            raise WorkerError(value)
        return value

    def _last_words(self) -> str:
        self._stderr.seek(0)
        lines = [ln.strip() for ln in self._stderr.read().decode(errors="replace").splitlines() if ln.strip()]
        return f": {lines[-1][:200]}" if lines else ""

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._stderr is not None:
            self._stderr.close()
        self._process = self._conn = self._stderr = None

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._close()


def _one_line(error: BaseException) -> str:
    from moe_fusion.io import first_line

    return first_line(error)


def serve(fd: int) -> None:
    """The worker's loop: run what arrives on `fd` until the caller hangs up."""
    conn = Connection(fd)
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:  # the caller is gone
            return
        try:
            reply = (True, fn(*args))
        except Exception as error:  # reported to the caller, which declines with it
            reply = (False, _one_line(error))
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError) as error:
            conn.send((False, f"result cannot be sent back: {error}"))

