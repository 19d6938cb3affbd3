r"""math-verify's equivalence check (\frac{1}{2} = 0.5, sets, intervals, ...) in worker processes that are
killed and replaced when a check runs past its time limit.

Why processes: a hostile answer (a 5000-deep \frac, 9^{9^{9^9}}, (10^{10})!) can keep sympy busy for hours,
and a thread cannot be stopped: a thread pool's timeout only stops the waiting, while the thread keeps a core
busy, holds a pool slot and blocks interpreter exit. A process can be killed. verl and open-r1 guard
math-verify the same way.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle

MATH_TIMEOUT_S = 5.0
_ZYGOTE_START_S = 120.0  # a math-verify process that is not ready by then is broken, not slow


def _math_check(gold: str, predicted: str) -> bool:
    """math-verify's verdict, gold parsed first as its API wants; whatever the parser raises means wrong."""
    from math_verify import parse, verify

    def wrap(s: str) -> str:
        return s if "$" in s or "\\boxed" in s else f"${s}$"

    try:  # math-verify's own timeouts are off: killing the worker is the limit
        gold_parsed = parse(wrap(gold), parsing_timeout=None)
        pred_parsed = parse(wrap(predicted), parsing_timeout=None)
        return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except Exception:  # noqa: BLE001 - a malformed answer is a wrong answer
        return False


def _serve(conn: Connection) -> None:
    """A worker: answer (gold, predicted) pairs from the pipe with a verdict, until the pipe closes."""
    while True:
        try:
            gold, predicted = conn.recv()
        except EOFError:
            return
        conn.send(_math_check(gold, predicted))


def _zygote_main(conn: Connection) -> None:
    """The zygote process: warm math-verify once, then serve ("fork", _) with a pipe end passed alongside
    (answered with the new worker's pid) and ("kill", pid) (not answered), in order, until the parent goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which then ends us
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its warning that timeouts are off: the kill is ours
    _math_check("\\frac{1}{2}", "0.5")  # its parser's lazy setup: ~0.2 s of CPU, paid here once, not per worker
    conn.send("ready")
    dying: set[int] = set()  # killed workers; reaped only once killed, so no pid the parent holds is reused
    while True:
        try:
            request, pid = conn.recv()
        except EOFError:  # the parent has gone; our workers go with us (PR_SET_PDEATHSIG)
            return
        dying -= {gone for gone in dying if os.waitpid(gone, os.WNOHANG)[0]}
        if request == "kill":
            os.kill(pid, signal.SIGKILL)
            dying.add(pid)
            continue
        worker_fd = recv_handle(conn)
        pid = os.fork()  # safe: the zygote has one thread
        if pid == 0:
            try:
                conn.close()
                if sys.platform == "linux":  # die with the zygote, even when it is killed mid-check
                    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
                _serve(Connection(worker_fd))
            finally:
                os._exit(0)  # never return into the zygote's loop
        os.close(worker_fd)
        conn.send(pid)


class _Zygote:
    """The process that workers fork from: a fresh interpreter (the parent may run torch threads, so no fork of
    it) with math-verify imported and warmed, so a new worker, say after a kill, is ready in milliseconds."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_zygote_main, args=(child_conn,), name="math-verify", daemon=True)
        self.process.start()
        child_conn.close()
        self.lock = threading.Lock()  # one request at a time
        try:
            ready = self.conn.poll(_ZYGOTE_START_S) and self.conn.recv() == "ready"
        except EOFError:  # it died starting up; its traceback is on stderr
            ready = False
        if not ready:
            self.process.kill()
            raise RuntimeError("the math-verify worker process did not start (see any error above): is math-verify "
                               'installed, and does the main script guard its code with `if __name__ == '
                               '"__main__":`?')

    def fork(self) -> _Worker:
        ours, theirs = multiprocessing.Pipe()
        with self.lock:
            self.conn.send(("fork", 0))
            send_handle(self.conn, theirs.fileno(), self.process.pid)
            pid = self.conn.recv()
        theirs.close()
        return _Worker(self, pid, ours)

    def kill(self, pid: int) -> None:
        with self.lock:
            try:
                self.conn.send(("kill", pid))  # not waited for: a killed process can take a while to go
            except OSError:
                pass  # the zygote is gone, and its workers with it


@dataclass
class _Worker:
    zygote: _Zygote
    pid: int
    conn: Connection

    def stop(self) -> None:
        self.conn.close()
        self.zygote.kill(self.pid)


def _check_args(gold: object, predicted: object, timeout: object) -> None:
    for name, value in (("gold", gold), ("predicted", predicted)):
        if not isinstance(value, str):
            raise TypeError(f"math_equal: {name} must be a str, not {type(value).__name__}")
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"math_equal: timeout must be a number of seconds > 0, not {timeout!r}")


class MathVerifyPool:
    """math-verify checks in worker processes; a check that runs past its time limit is killed (see above).

    Workers are long-lived (a check costs a pipe round trip), started lazily, and forked from a zygote process
    that has math-verify warmed (`_Zygote`), so replacing a killed one is cheap. The zygote is daemonic, so it
    is ended at interpreter exit, and its workers die with it. Thread-safe: each check has a worker to itself;
    callers beyond `workers` wait for a free one.
    """

    def __init__(self, workers: int = 8) -> None:
        if workers < 1:
            raise ValueError(f"MathVerifyPool: workers must be >= 1, not {workers}")
        self.workers = workers
        self._slots = threading.Semaphore(workers)  # one per worker, started or not
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._zygote: _Zygote | None = None

    def check(self, gold: str, predicted: str, timeout: float = MATH_TIMEOUT_S) -> bool:
        """True when math-verify finds `predicted` equal to `gold` within `timeout` seconds of work.

        A check past `timeout` has its worker killed and scores False. The limit counts from when a worker
        takes the check: a caller may first wait for a free worker (only when more threads check at once
        than there are workers) or for one to start (the first check, a few seconds; a fork after a kill).
        """
        _check_args(gold, predicted, timeout)
        with self._slots:
            worker = self._take()
            verdict = None
            try:
                worker.conn.send((gold, predicted))
                if worker.conn.poll(timeout):
                    verdict = worker.conn.recv()
            except (EOFError, OSError):  # the worker died mid-check (say, a C stack overflow)
                pass
            finally:  # on KeyboardInterrupt too: a worker abandoned mid-check would run on
                if verdict is None:
                    worker.stop()
                else:
                    with self._lock:
                        self._idle.append(worker)
            return bool(verdict)

    def check_many(self, pairs: Sequence[tuple[str, str]], timeout: float = MATH_TIMEOUT_S) -> list[bool]:
        """check() of each (gold, predicted) pair, `workers` pairs at a time; each pair has `timeout` seconds."""
        for gold, predicted in pairs:
            _check_args(gold, predicted, timeout)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="math-verify") as threads:
            return list(threads.map(lambda pair: self.check(*pair, timeout), pairs))

    def _take(self) -> _Worker:
        """An idle worker, else a new one (the caller holds a slot, so there is room for it)."""
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if not worker.conn.poll():  # an idle worker says nothing: readable means it died
                    return worker
                worker.stop()
            if self._zygote is None or not self._zygote.process.is_alive():
                self._zygote = _Zygote()
            zygote = self._zygote
        return zygote.fork()


# A check waits on the clock more than on the CPU (a hostile one is killed after `timeout`, however little CPU it
# got), so more workers than cores let a batch's hostile answers run out their time side by side.
_math_pool = MathVerifyPool(workers=8)


def math_equal(gold: str, predicted: str, timeout: float = MATH_TIMEOUT_S) -> bool:
    r"""math-verify's equivalence (\frac{1}{2} = 0.5, sets, intervals, ...); False past `timeout` seconds.

    Runs in the module's `MathVerifyPool`, so a hostile answer costs at most `timeout` seconds and leaves
    nothing running. Raises TypeError for a non-str answer, ValueError for a timeout <= 0.
    """
    return _math_pool.check(gold, predicted, timeout)


def math_equal_many(pairs: Sequence[tuple[str, str]], timeout: float = MATH_TIMEOUT_S) -> list[bool]:
    """math_equal of each (gold, predicted) pair, checked concurrently over the module's pool."""
    return _math_pool.check_many(pairs, timeout)
