"""One generation at a time: a bounded queue of jobs that one worker thread runs in order.

The job in flight can be interrupted (it stops at its next sampler step, which asks `interrupted()`), and
closing the queue interrupts it and cancels every job still waiting, so a server can stop promptly.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class QueueFull(Exception):
    """Every place in the queue is taken."""


class QueueClosed(Exception):
    """The server is stopping: the job was cancelled, or never queued."""


class JobQueue:
    """Runs submitted callables one at a time, in order, on a worker thread; at most `size` wait."""

    def __init__(self, size: int) -> None:
        self._waiting: queue.Queue[tuple[Callable[[], Any], Future] | None] = queue.Queue(maxsize=size)
        self._interrupt = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.RLock()  # close() may run in a signal handler that interrupted submit()
        self.busy = False
        self._thread = threading.Thread(target=self._work, name="sdcli-generation", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """How many jobs wait behind the one in flight."""
        return self._waiting.qsize()

    def submit(self, work: Callable[[], Any]) -> Future:
        """Queue `work`; its future holds what it returns or raises. Raises QueueFull or QueueClosed."""
        future: Future = Future()
        with self._lock:
            if self._closed.is_set():
                raise QueueClosed
            try:
                self._waiting.put_nowait((work, future))
            except queue.Full:
                raise QueueFull from None
        return future

    def interrupted(self) -> bool:
        """Whether the job in flight was asked to stop (interrupt, or the queue closing)."""
        return self._interrupt.is_set() or self._closed.is_set()

    def interrupt(self) -> bool:
        """Ask the job in flight, if any, to stop at its next step; True when one was running."""
        if self.busy:
            self._interrupt.set()
        return self.busy

    def close(self, timeout: float | None = None) -> None:
        """Interrupt the job in flight, cancel those waiting, and end the worker (waiting up to `timeout`)."""
        with self._lock:
            self._closed.set()
            while True:
                try:
                    item = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if item is not None and item[1].set_running_or_notify_cancel():
                    item[1].set_exception(QueueClosed())
            self._waiting.put_nowait(None)  # wakes the worker; the queue was just emptied
        self._thread.join(timeout)

    def _work(self) -> None:
        while (item := self._waiting.get()) is not None:
            work, future = item
            if not future.set_running_or_notify_cancel():
                continue
            self._interrupt.clear()
            self.busy = True
            try:
                result = work()
            except Exception as error:  # handed to the request that submitted the job
                future.set_exception(error)
            else:
                future.set_result(result)
            finally:
                self.busy = False
