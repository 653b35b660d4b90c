"""Stopping a run on SIGINT or SIGTERM: the first signal asks the run to stop, a second one stops at once.

The first signal is recorded and announced; the run checks it before each sampler step and before
decoding, drops the image in progress and exits with 128 + the signal's number. A second signal exits
at once with that code, after removing the temporary file of any PNG being written, so finished images
are kept and nothing partial remains.

Python runs signal handlers only in the main thread, between bytecodes: a main thread inside one long
tensor operation would not see a signal for minutes. So the handlers also wake a watcher thread (through
`signal.set_wakeup_fd`, written by the C-level handler the moment a signal arrives), and that thread
announces the first signal and carries out the second even while the main thread is busy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

STOPPING = "stopping: the image being sampled is dropped, finished images are kept; send the signal again to stop now"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def stopped_message(signum: int, written: int, total: int, dropped: bool, batch_size: int = 1) -> str:
    """The last line of a run stopped by `signum`: what was written, and what happened to the rest."""
    if written == total:  # the signal came while the last image was being decoded or written
        return f"stopped by {signal_name(signum)}: all {total} images written"
    in_progress = "the images in progress were" if batch_size > 1 else "the image in progress was"
    rest = f"{in_progress} dropped, the rest not started" if dropped else "the rest were not started"
    return f"stopped by {signal_name(signum)}: {written} of {total} images written; {rest}"


def temporaries_being_written(frame: FrameType | None) -> list[Path]:
    """The temporary files of the PNGs `sdcli.images` is writing in `frame`'s stack (innermost first).

    `save_png` writes to a hidden temporary file (the local `temporary`) and renames it when complete;
    a process ending in between must remove that file itself.
    """
    found = []
    while frame is not None:
        temporary = frame.f_locals.get("temporary") if frame.f_globals.get("__name__") == "sdcli.images" else None
        if isinstance(temporary, Path):
            found.append(temporary)
        frame = frame.f_back
    return found


class _SignalStop:
    """The state shared by the main thread's handler and the watcher thread."""

    def __init__(self) -> None:
        self.received = 0
        self._lock = threading.RLock()  # re-entrant: a handler may interrupt the main thread inside `record`

    def record(self, signum: int) -> None:
        """The first signal: remember it and say what happens (once, whichever thread sees it first)."""
        with self._lock:
            if self.received:
                return
            self.received = signum
        sys.stderr.write(STOPPING + "\n")
        sys.stderr.flush()

    def exit_now(self, signum: int) -> None:
        """The second signal: remove the PNG being written, if any, and end the process."""
        main = sys._current_frames().get(threading.main_thread().ident)  # the main thread's stack, as it is
        for temporary in temporaries_being_written(main):
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
        # os.write rather than sys.stderr: the main thread may hold the stream's lock.
        os.write(2, f"\nstopped at once by {signal_name(signum)}: finished images are kept\n".encode())
        os._exit(128 + signum)

    def watch(self, wakeups: socket.socket) -> None:
        """Count the signals as the C-level handler reports them (one byte each) until the socket closes."""
        count = 0
        while data := wakeups.recv(64):
            for signum in data:
                if signum not in STOP_SIGNALS:
                    continue
                count += 1
                if count == 1:
                    self.record(signum)
                else:
                    self.exit_now(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], int]]:
    """Within the block, SIGINT and SIGTERM stop the run as the module docstring says.

    Yields a function returning the number of the first signal received, or 0. Outside the main thread
    (where handlers cannot be installed) the function always returns 0.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return
    stop = _SignalStop()
    wakeups, wakeup_writer = socket.socketpair()
    wakeup_writer.setblocking(False)
    watcher = threading.Thread(target=stop.watch, args=(wakeups,), name="sdcli-signals", daemon=True)
    watcher.start()
    previous_handlers = {s: signal.signal(s, lambda signum, _frame: stop.record(signum)) for s in STOP_SIGNALS}
    previous_fd = signal.set_wakeup_fd(wakeup_writer.fileno(), warn_on_full_buffer=False)
    try:
        yield lambda: stop.received
    finally:
        signal.set_wakeup_fd(previous_fd)
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        wakeup_writer.close()  # the watcher reads what is left, then the end of the stream
        watcher.join()
        wakeups.close()
