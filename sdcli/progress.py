"""Progress on stderr that says where the time goes (loading, sampling, decoding), and a summary at the end.

Modes (`--progress`): "bar", a rich progress display for terminals; "plain", short lines for logs (loading,
each image written, and a status line whenever `PLAIN_EVERY` seconds passed without one); "json", one
object per sampler step and stage, for front-ends; "none", only the summary; "auto", bar on a terminal,
else plain. `--quiet` prints nothing at all.

JSON objects carry "stage" ("load", "loaded", "sample", "decode", "written", "done") and "elapsed" (seconds
since the run started); "sample" adds "image" (the first image of the batch, counting from 1 in the order
they are made), "images", "batch", "step" (from 1) and "steps"; "decode" and "written" add "image" and
"images"; "written" adds "path" and "seconds"; "done" adds "written", "images", "seconds",
"seconds_per_image" and "load_seconds".
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Literal

Mode = Literal["auto", "bar", "plain", "json", "none"]
PLAIN_EVERY = 15.0  # seconds between two status lines in plain mode


def format_rate(seconds_per_step: float) -> str:
    """A step rate: "2.50 it/s" when a step takes under a second, else "14.29 s/it" (not "0.07 it/s")."""
    if seconds_per_step < 1:
        return f"{1 / seconds_per_step:.2f} it/s"
    return f"{seconds_per_step:.2f} s/it"


def format_duration(seconds: float) -> str:
    """A duration for people: "0.8 s", "42.0 s", "3m05s", "1h02m"."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def sampling_steps(request) -> int:
    """The sampler steps a request runs: an init image at strength < 1 runs only the last
    int(steps * strength) steps of the schedule (see `sdcli.pipeline.sample`)."""
    if request.init is not None and request.strength < 1.0:
        return min(int(request.steps * request.strength), request.steps)
    return request.steps


class Report:
    """Follows a run (loading, each sampler step, decoding, each image written) and shows it; this base
    class shows only the summary (mode "none"), or nothing at all when `summary` is False (--quiet).

    The sampler's callback gives no image numbers: a batch starts at its first step (i == 0) or, for a
    batch with no steps, at its decode; batches come in the order `sdcli.batch.batches` makes them.
    """

    def __init__(self, summary: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.start = clock()
        self.show_summary = summary
        self.load_seconds = 0.0
        self.images = 0
        self.written_count = 0
        self.steps_done = 0
        self.total_steps = 0
        self._batches: list[list] = []
        self._number: dict[int, int] = {}  # id(planned) -> its number in the order images are made
        self._batch = -1
        self._open = self._sampled = False
        self._last_step: float | None = None
        self._step_seconds: deque[float] = deque(maxlen=8)

    # What subclasses draw.
    def show(self, event: dict) -> None:
        """Show one event (see the module docstring)."""

    def begin(self, kind: str) -> None:
        """A stage starts: "load" or "sample"."""

    def end(self, kind: str) -> None:
        """A stage ends."""

    # What the run calls.
    @contextlib.contextmanager
    def loading(self, name: str) -> Iterator[None]:
        """Around loading the model `name`."""
        started = self.clock()
        self.begin("load")
        self.show({"stage": "load", "model": name})
        try:
            yield
        finally:
            self.end("load")
        self.load_seconds = self.clock() - started
        self.show({"stage": "loaded", "model": name, "seconds": round(self.load_seconds, 3)})

    @contextlib.contextmanager
    def sampling(self, planned: list, batch_size: int) -> Iterator[Report]:
        """Around `sdcli.batch.run` over `planned`; yields self, whose `step` is the sampler's callback."""
        from sdcli.batch import batches

        self._batches = [[item for _, item in batch] for batch in batches(planned, batch_size)]
        order = [p for batch in self._batches for p in batch]
        self._number = {id(p): i + 1 for i, p in enumerate(order)}
        self.images = len(order)
        self.total_steps = sum(sampling_steps(batch[0].request) for batch in self._batches)
        self.begin("sample")
        try:
            yield self
        finally:
            self.end("sample")

    def step(self, info: dict) -> None:
        """The pipeline's callback: a sampler step ({"i": ...}) or a stage ({"stage": "decode"})."""
        stage = info.get("stage", "sample")
        if not self._open or (stage == "sample" and info.get("i") == 0 and self._sampled):
            self._batch = min(self._batch + 1, len(self._batches) - 1)
            self._open, self._sampled, self._last_step = True, False, None
        batch = self._batches[self._batch] if self._batches else []
        where = {"image": self._number.get(id(batch[0]), 0) if batch else 0, "images": self.images}
        now = self.clock()
        if stage == "sample":
            if self._last_step is not None:
                self._step_seconds.append(now - self._last_step)
            self._last_step = now
            self._sampled = True
            self.steps_done += 1
            steps = sampling_steps(batch[0].request) if batch else 0
            event = {"stage": "sample", **where, "batch": len(batch), "step": info.get("i", 0) + 1, "steps": steps}
        else:
            self._open = False
            event = {"stage": stage, **where}
        self.show(event)

    def written(self, result) -> None:
        """An image was written (a `sdcli.batch.Written`)."""
        self.written_count += 1
        number = self._number.get(id(result.planned), 0)
        self.show({"stage": "written", "image": number, "images": self.images, "path": str(result.path),
                   "seconds": round(result.seconds, 3)})  # fmt: skip

    def seconds_per_step(self) -> float | None:
        """The mean of the last few step times, or None before two steps of a batch."""
        return sum(self._step_seconds) / len(self._step_seconds) if self._step_seconds else None

    def summary(self) -> None:
        """The last line: images written, total time, time per image and loading time."""
        total = self.clock() - self.start
        per_image = (total - self.load_seconds) / self.written_count if self.written_count else None
        self.show({"stage": "done", "written": self.written_count, "images": self.images, "seconds": round(total, 3),
                   "seconds_per_image": None if per_image is None else round(per_image, 3),
                   "load_seconds": round(self.load_seconds, 3)})  # fmt: skip

    def summary_line(self, event: dict) -> str:
        count = f"{event['written']} of {event['images']}" if event["written"] < event["images"] else event["written"]
        line = f"wrote {count} image{'' if event['images'] == 1 else 's'} in {format_duration(event['seconds'])}"
        details = []
        if event["seconds_per_image"] is not None:
            details.append(f"{format_duration(event['seconds_per_image'])}/image")
        if event["load_seconds"]:
            details.append(f"loading {format_duration(event['load_seconds'])}")
        return line + (f" ({', '.join(details)})" if details else "")

    def _print_summary(self, event: dict) -> None:
        if event["stage"] == "done" and self.show_summary:
            _write(self.summary_line(event))


class NoProgress(Report):
    """Mode "none": the summary only."""

    def show(self, event: dict) -> None:
        self._print_summary(event)


class PlainProgress(Report):
    """Mode "plain": a few short lines, for logs."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._last_line = self.start

    def say(self, line: str) -> None:
        self._last_line = self.clock()
        _write(line)

    def show(self, event: dict) -> None:
        stage = event["stage"]
        if stage == "load":
            self.say(f"loading {event['model']}")
        elif stage == "loaded":
            self.say(f"loaded in {format_duration(event['seconds'])}")
        elif stage == "written":
            rate = self.seconds_per_step()
            speed = f", {format_rate(rate)}" if rate else ""
            self.say(f"image {event['image']}/{event['images']} written ({format_duration(event['seconds'])}{speed})")
        elif stage == "done":
            self._print_summary(event)
        elif self.clock() - self._last_line >= PLAIN_EVERY:  # a slow stretch: say what is going on
            where = f"image {event['image']}/{event['images']}"
            if stage == "sample":
                rate = self.seconds_per_step()
                speed = f" ({format_rate(rate)})" if rate else ""
                self.say(f"{where}: step {event['step']}/{event['steps']}{speed}")
            else:
                self.say(f"{where}: {stage}")


class JsonProgress(Report):
    """Mode "json": one JSON object per line, for front-ends."""

    def show(self, event: dict) -> None:
        _write(json.dumps({**event, "elapsed": round(self.clock() - self.start, 3)}))


class BarProgress(Report):
    """Mode "bar": a rich display on stderr, cleared when done; then the summary line."""

    def __init__(self, force_terminal: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        from rich.console import Console

        self.console = Console(stderr=True, force_terminal=force_terminal or None)
        self._progress = None
        self._task = None

    def begin(self, kind: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        if kind == "load":
            columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        else:
            columns = (
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("{task.fields[eta]}"),
            )  # fmt: skip
        # Lines printed on stdout go above the display when stdout is the terminal too, and stay on stdout
        # (never moved to stderr) when it is a pipe or a file.
        self._progress = Progress(
            *columns, console=self.console, transient=True, redirect_stdout=sys.stdout.isatty(), redirect_stderr=True
        )
        self._progress.start()
        total = None if kind == "load" else max(self.total_steps, 1)
        self._task = self._progress.add_task("loading" if kind == "load" else "sampling", total=total, rate="", eta="")

    def end(self, kind: str) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def show(self, event: dict) -> None:
        stage = event["stage"]
        if stage == "done":
            self._print_summary(event)
            return
        if self._progress is None:
            return
        if stage == "load":
            self._progress.update(self._task, description=f"loading {event['model']}")
        elif stage in ("sample", "decode"):
            rate = self.seconds_per_step()
            fields = {"rate": format_rate(rate) if rate else ""}
            if rate:
                fields["eta"] = f"{format_duration(rate * (self.total_steps - self.steps_done))} left"
            what = "sampling" if stage == "sample" else "decoding"
            description = f"image {event['image']}/{event['images']} {what}"
            self._progress.update(self._task, completed=self.steps_done, description=description, **fields)


def progress_report(mode: Mode, quiet: bool) -> Report:
    """The report for `--progress MODE` (and `--quiet`, which silences everything)."""
    if quiet:
        return Report(summary=False)
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "plain"
    if mode == "bar":
        return BarProgress(force_terminal=not sys.stderr.isatty())
    return {"plain": PlainProgress, "json": JsonProgress, "none": NoProgress}[mode]()


def _write(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
