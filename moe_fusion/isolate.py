"""Run a function in a spawned child process: a native crash or abort inside OpenVINO (SIGSEGV, SIGABRT,
the OOM killer's SIGKILL) becomes a one-line error in the caller instead of killing it, and whatever the
child allocated goes back to the system when it ends.

`fn` and its arguments must pickle (a module-level function; paths rather than `ov.Model` objects), and
so must its result. The child is spawned, not forked: a fork of a process that has OpenVINO's thread pool
running may deadlock.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class IsolatedError(RuntimeError):
    """The child died without returning: `signal` is the signal's name (or "exit N")."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.signal = signal_name


def _child(connection, fn: Callable, args: tuple) -> None:
    try:
        result = (True, fn(*args))
    except BaseException as error:  # everything goes back to the caller
        result = (False, error)
    try:
        connection.send(result)
    except Exception as error:  # an unpicklable result or exception: its one line instead
        connection.send((False, RuntimeError(f"{type(error).__name__}: {error}")))
    connection.close()


def _describe(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit {exitcode}"


def run_isolated(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a spawned child: its result, or its exception re-raised here, or `IsolatedError`
    naming the signal that killed it ("killed by SIGSEGV"; SIGKILL usually means out of memory)."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, fn, args), daemon=True)
    process.start()
    send.close()
    try:
        ok, value = receive.recv()  # before join: a large result would block the child's send
    except EOFError:
        process.join()
        name = _describe(process.exitcode)
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        message = f"killed by {name}{hint}" if name.startswith("SIG") else f"ended with {name}"
        raise IsolatedError(message, name) from None
    finally:
        receive.close()
    process.join()
    if ok:
        return value
    raise value
