"""SIGINT and SIGTERM: the first drops the image in progress and keeps finished ones, a second stops at once.

The subprocess tests patch the child so that each signal lands at a known moment (a UNet call, a PNG being
written) and wait for markers on its stderr, never for fixed times.
"""

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from sdcli.images import save_png
from sdcli.signals import STOPPING, stop_on_signals, stopped_message, temporaries_being_written

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# Runs the CLI with the UNet's (or PNG writer's) n-th call replaced by ACTION.
CHILD = """
import os, signal, sys, time
import PIL.Image
from sdcli.models.unet import UNetModel

TARGET, WHEN, ACTION = sys.argv[1], int(sys.argv[2]), sys.argv[3]
calls = 0

def block_forever():
    if ACTION == "mask-and-block":  # the main thread never runs a Python handler again, as in a long C call
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.stderr.write("BLOCKED\\n")
    sys.stderr.flush()
    while True:
        time.sleep(3600)

def patch(cls, name):
    original = getattr(cls, name)

    def patched(self, *args, **kwargs):
        global calls
        calls += 1
        if calls == WHEN:
            if ACTION.startswith("SIG"):
                os.kill(os.getpid(), getattr(signal, ACTION))
            elif name == "save":
                args[0].write(b"\\x89PNG partial")
                args[0].flush()
                block_forever()
            else:
                block_forever()
        return original(self, *args, **kwargs)

    setattr(cls, name, patched)

patch(UNetModel, "forward") if TARGET == "unet" else patch(PIL.Image.Image, "save")
from sdcli.cli import app
app(prog_name="sdcli", args=sys.argv[4:])
"""


class Child:
    """The CLI in a subprocess, its stderr read line by line in the background."""

    def __init__(self, tmp_path: Path, checkpoint: str, target: str, when: int, action: str, n: int = 3) -> None:
        self.out = tmp_path / "out"
        args = ["txt2img", "x", "-m", checkpoint, "--steps", 3, "--sampler", "euler", "-W", 64, "-H", 64,
                "--n", n, "--outdir", self.out, "--progress", "json"]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, target, str(when), action, *map(str, args)], cwd=tmp_path, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float = 300) -> None:
        while True:
            line = self.lines.get(timeout=timeout)
            assert line is not None, f"exited before {prefix!r}: {self.stderr}"
            self.stderr.append(line)
            if line.startswith(prefix):
                return

    def finish(self, timeout: float = 300) -> tuple[int, list[str], list[str]]:
        stdout = self.proc.stdout.read()
        self.proc.wait(timeout=timeout)
        while (line := self.lines.get(timeout=timeout)) is not None:
            self.stderr.append(line)
        return self.proc.returncode, stdout.split(), self.stderr

    def files(self) -> list[str]:
        return sorted(p.name for p in self.out.iterdir())


def test_first_signal_drops_the_image_being_sampled_keeps_finished_ones_and_says_so(tiny_checkpoint, tmp_path):
    signum = signal.SIGINT  # a first SIGTERM: tests/test_scripts.py
    # The signal arrives during UNet call 5: image 2's second step (3 steps of one call each per image).
    child = Child(tmp_path, tiny_checkpoint, "unet", 5, signum.name)
    code, stdout, stderr = child.finish()
    assert code == 128 + signum, stderr
    assert STOPPING in stderr
    assert stderr[-1] == f"stopped by {signum.name}: 1 of 3 images written; the image in progress was dropped, " \
        "the rest not started"  # fmt: skip
    assert child.files() == [Path(stdout[0]).name]  # the finished image, whole; no temporary file
    Image.open(stdout[0]).load()
    events = [line for line in stderr if line.startswith('{"stage": "sample", "image": 2')]
    assert len(events) == 1  # stopped at the step after the signal: nothing more of image 2 ran


def test_second_signal_stops_at_once_while_the_main_thread_is_stuck_in_a_step(tiny_checkpoint, tmp_path):
    # UNet call 4 (image 2's first step) never returns, and the main thread no longer runs signal handlers.
    child = Child(tmp_path, tiny_checkpoint, "unet", 4, "mask-and-block")
    child.wait_for("BLOCKED")
    child.proc.send_signal(signal.SIGINT)
    child.wait_for("stopping:")  # announced although the main thread is busy
    child.proc.send_signal(signal.SIGTERM)
    code, stdout, stderr = child.finish()
    assert code == 128 + signal.SIGTERM, stderr
    assert stderr[-1] == "stopped at once by SIGTERM: finished images are kept"
    assert child.files() == [Path(stdout[0]).name]


def test_second_signal_while_a_png_is_written_removes_its_temporary_file(tiny_checkpoint, tmp_path):
    # The second image's PNG writer stops half-way; the first image is already written.
    child = Child(tmp_path, tiny_checkpoint, "save", 2, "block", n=2)
    child.wait_for("BLOCKED")
    finished = [name for name in child.files() if not name.startswith(".")]
    assert len(finished) == 1 and len(child.files()) == 2  # the finished image and the temporary file
    child.proc.send_signal(signal.SIGTERM)
    child.wait_for("stopping:")
    child.proc.send_signal(signal.SIGINT)
    code, stdout, stderr = child.finish()
    assert code == 128 + signal.SIGINT, stderr
    assert child.files() == finished and [Path(p).name for p in stdout] == finished


class _ImageThatLooksAtItsWriter:
    """Stands in for a PIL image: when saved, notes the temporary files being written at that moment."""

    def save(self, file, **_options) -> None:
        file.write(b"\x89PNG")
        self.seen = temporaries_being_written(sys._getframe())
        self.existed = [path.exists() for path in self.seen]


def test_temporaries_being_written_finds_the_file_save_png_writes(tmp_path):
    image = _ImageThatLooksAtItsWriter()
    save_png(image, tmp_path / "a.png")
    assert len(image.seen) == 1 and image.existed == [True]
    assert image.seen[0].parent == tmp_path and image.seen[0].name.startswith(".a.png.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]  # the temporary name is gone afterwards


def test_first_signal_is_recorded_and_announced_once_and_handlers_are_restored(capsys):
    handler_before = signal.getsignal(signal.SIGINT)
    wakeup_fd_before = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup_fd_before)
    with stop_on_signals() as stopped:
        assert stopped() == 0
        os.kill(os.getpid(), signal.SIGINT)
        assert stopped() == signal.SIGINT  # the handler ran before the next line: the next step check sees it
    assert stopped() == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is handler_before
    assert signal.set_wakeup_fd(wakeup_fd_before) == wakeup_fd_before
    assert capsys.readouterr().err.count(STOPPING) == 1  # by the handler or the watcher thread, not both


def test_outside_the_main_thread_signals_are_left_alone():
    seen = []
    thread = threading.Thread(target=lambda: seen.append(stop_on_signals().__enter__()()))
    thread.start()
    thread.join()
    assert seen == [0]


def test_stop_messages_say_what_happened_to_each_image():
    assert stopped_message(signal.SIGTERM, 3, 40, dropped=True) == (
        "stopped by SIGTERM: 3 of 40 images written; the image in progress was dropped, the rest not started"
    )
    assert stopped_message(signal.SIGINT, 3, 40, dropped=False).endswith(
        "3 of 40 images written; the rest were not started"
    )
    assert "the images in progress were dropped" in stopped_message(signal.SIGINT, 2, 8, dropped=True, batch_size=2)
    assert stopped_message(signal.SIGTERM, 2, 2, dropped=False) == "stopped by SIGTERM: all 2 images written"
