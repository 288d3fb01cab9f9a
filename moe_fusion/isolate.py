"""Run OpenVINO work in worker processes, so that a native crash or abort inside the runtime (seen: SIGSEGV
in the CPU plugin on a block whose scatter indices fall out of range) costs one answer, not the caller.

`Worker.call(fn, *args)` runs a module-level function in a long-lived child started with this Python
(`python -c ...`, not multiprocessing's spawn, which would re-run the caller's main script)
and returns its result. The child sees the caller's sys.path. A Python exception in the child comes back as
itself when it pickles (else `WorkerError` with its one useful line); the child's death (a signal, an exit)
as `WorkerCrash` naming the signal and the child's last words on stderr, and the next call starts a fresh
child. `run_isolated(fn, *args)` is one call in a child of its own, whose memory goes back to the system
when it ends.
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

from moe_fusion.io import first_line


class WorkerError(RuntimeError):
    """The function raised in the worker; the message is its one useful line."""


class WorkerCrash(RuntimeError):
    """The worker process died while running the function (a native crash, an abort, out of memory):
    the message reads "killed by SIGSEGV" (or "ended with exit 1"); `signal` is the signal's name."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.signal = signal_name


def _describe(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


class Worker:
    """One worker process, started on first use and again after a crash."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._jobs = 0  # jobs sent; replies carry their job's number, so a stale reply is never taken
        self._conn: Connection | None = None
        self._stderr = None

    def start(self) -> None:
        """Start the worker now, if it is not running (it imports OpenVINO while the caller works on)."""
        if self._process is None or self._process.poll() is not None:
            self._start()

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
        self.start()
        self._jobs += 1
        with contextlib.suppress(OSError):  # died before: receive() reports how
            self._conn.send((self._jobs, fn, args))

    def receive(self):
        try:
            job, ok, value = self._conn.recv()
            while job != self._jobs:  # the reply to a job whose caller gave up on it
                job, ok, value = self._conn.recv()
        except (EOFError, OSError) as error:
            name = _describe(self._process.wait())
            words = self._last_words()
            self._close()
            hint = " (out of memory?)" if name == "SIGKILL" else ""
            how = f"killed by {name}{hint}" if name.startswith("SIG") else f"ended with {name}"
            raise WorkerCrash(f"{how}{words}", name) from error
        if not ok:
            raise value
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
        """End the worker (the next call starts a new one)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._close()


def run_isolated(fn, *args):
    """`fn(*args)` in a child process of its own: its result, its exception, or `WorkerCrash`."""
    worker = Worker()
    try:
        return worker.call(fn, *args)
    finally:
        worker.stop()


def _sendable(error: Exception) -> Exception:
    """The exception itself when it survives pickling, else its one useful line as a WorkerError."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return WorkerError(first_line(error))


def serve(fd: int) -> None:
    """The worker's loop: run what arrives on `fd` until the caller hangs up."""
    conn = Connection(fd)
    while True:
        try:
            job, fn, args = conn.recv()
        except EOFError:  # the caller is gone
            return
        try:
            reply = (job, True, fn(*args))
        except Exception as error:  # reported to the caller, which declines with it
            reply = (job, False, _sendable(error))
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError) as error:
            conn.send((job, False, WorkerError(f"result cannot be sent back: {error}")))

