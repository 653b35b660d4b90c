"""Progress on stderr: rates and durations for people, steps counted as the pipeline runs them, the events
of each mode, and the summary line."""

import json
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image

from sdcli import progress
from sdcli.batch import Planned, Written
from sdcli.jobs import Job
from sdcli.pipeline import GenerationRequest
from sdcli.progress import (
    BarProgress,
    JsonProgress,
    PlainProgress,
    Report,
    format_duration,
    format_rate,
    progress_report,
    sampling_steps,
)

FAST = ["--steps", "2", "-W", "64", "-H", "64"]


@pytest.mark.parametrize(
    "seconds_per_step,text",
    [
        (0.4, "2.50 it/s"),  # 1 / 0.4
        (1 / 0.07, "14.29 s/it"),  # 0.07 it/s is one step every 1 / 0.07 = 14.2857 s
        (1.0, "1.00 s/it"),
        (250.0, "250.00 s/it"),
    ],
)
def test_rates_are_steps_per_second_when_fast_and_seconds_per_step_when_slow(seconds_per_step, text):
    assert format_rate(seconds_per_step) == text


@pytest.mark.parametrize(
    "seconds,text", [(0.84, "0.8 s"), (59.94, "59.9 s"), (185, "3m05s"), (3725, "1h02m")]
)  # 185 s = 3 * 60 + 5; 3725 s = 62 min 5 s
def test_durations_read_as_seconds_minutes_or_hours(seconds, text):
    assert format_duration(seconds) == text


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    from sdcli.checkpoint import load_model

    return load_model(tiny_checkpoint)


@pytest.mark.parametrize(
    "sampler,steps,strength", [("euler", 4, 1.0), ("euler", 10, 0.75), ("ddim", 10, 0.5), ("heun", 3, 0.34)]
)
def test_sampling_steps_count_the_callbacks_the_pipeline_makes(tiny_model, sampler, steps, strength):
    from sdcli.pipeline import generate

    model = tiny_model
    init = Image.new("RGB", (64, 64), (200, 30, 30)) if strength < 1 else None
    request = GenerationRequest("x", width=64, height=64, steps=steps, sampler=sampler, init=init, strength=strength)
    events = []
    generate(model, [request], callback=events.append)
    assert [e.get("stage", "sample") for e in events] == ["sample"] * sampling_steps(request) + ["decode"]


def planned_run(count: int, steps: int = 3) -> list[Planned]:
    return [Planned(Job(), GenerationRequest("x", steps=steps, seed=i), Path(f"{i}.png")) for i in range(count)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(report: Report, clock: FakeClock, planned: list[Planned], batch_size: int, step_seconds: float) -> None:
    """Play a run through `report` as cli_generate does: load for 2 s, then each batch's steps and decode."""
    with report.loading("tiny.safetensors"):
        clock.now += 2
    with report.sampling(planned, batch_size) as run:
        for start in range(0, len(planned), batch_size):
            batch = planned[start : start + batch_size]
            for i in range(batch[0].request.steps):
                clock.now += step_seconds
                run.step({"i": i})
            run.step({"stage": "decode"})
            clock.now += 1
            for item in batch:
                run.written(Written(item, item.target, step_seconds))
    report.summary()


def test_json_events_number_images_in_batches_and_steps(capsys):
    clock = FakeClock()
    drive(JsonProgress(clock=clock), clock, planned_run(3, steps=2), batch_size=2, step_seconds=1)
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    brief = [(e["stage"], e.get("image"), e.get("batch"), e.get("step")) for e in events]
    assert brief == [
        ("load", None, None, None), ("loaded", None, None, None),
        ("sample", 1, 2, 1), ("sample", 1, 2, 2), ("decode", 1, None, None), ("written", 1, None, None),
        ("written", 2, None, None),
        ("sample", 3, 1, 1), ("sample", 3, 1, 2), ("decode", 3, None, None), ("written", 3, None, None),
        ("done", None, None, None),
    ]  # fmt: skip
    assert {e["images"] for e in events if "images" in e} == {3} and events[2]["steps"] == 2
    # 2 s loading, then per batch 2 steps of 1 s and 1 s of decoding and writing: 2 + 3 + 3 = 8 s.
    assert events[-1] == {"stage": "done", "written": 3, "images": 3, "seconds": 8.0, "seconds_per_image": 2.0,
                          "load_seconds": 2.0, "elapsed": 8.0}  # fmt: skip


def test_plain_lines_are_one_per_image_plus_a_status_line_when_slow(capsys):
    clock = FakeClock()
    drive(PlainProgress(clock=clock), clock, planned_run(2, steps=3), batch_size=1, step_seconds=7)
    lines = capsys.readouterr().err.splitlines()
    # "loaded" at 2 s; image 1's steps end at 9, 16, 23 s (23 - 2 >= 15: a status line), written at 24 s;
    # image 2's steps end at 31, 38, 45 s (45 - 24 >= 15: a status line), written at 46 s, the end.
    # Per image: (46 - 2) / 2 = 22 s.
    assert lines == [
        "loading tiny.safetensors",
        "loaded in 2.0 s",
        "image 1/2: step 3/3 (7.00 s/it)",
        "image 1/2 written (7.0 s, 7.00 s/it)",
        "image 2/2: step 3/3 (7.00 s/it)",
        "image 2/2 written (7.0 s, 7.00 s/it)",
        "wrote 2 images in 46.0 s (22.0 s/image, loading 2.0 s)",
    ]


def test_a_fast_run_in_plain_mode_prints_no_status_lines(capsys):
    clock = FakeClock()
    drive(PlainProgress(clock=clock), clock, planned_run(2, steps=20), batch_size=1, step_seconds=0.05)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split()[0] for line in lines] == ["loading", "loaded", "image", "image", "wrote"]
    assert "20.00 it/s" in lines[2]


def test_the_summary_counts_what_was_written_of_what_was_planned():
    event = {"written": 2, "images": 3, "seconds": 30.0, "seconds_per_image": 12.5, "load_seconds": 5.0}
    assert Report().summary_line(event) == "wrote 2 of 3 images in 30.0 s (12.5 s/image, loading 5.0 s)"
    nothing = {"written": 0, "images": 1, "seconds": 4.0, "seconds_per_image": None, "load_seconds": 0.0}
    assert Report().summary_line(nothing) == "wrote 0 of 1 image in 4.0 s"


def test_auto_is_a_bar_on_a_terminal_and_plain_lines_elsewhere(monkeypatch):
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    assert type(progress_report("auto", quiet=False)) is PlainProgress
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    assert type(progress_report("auto", quiet=False)) is BarProgress
    assert type(progress_report("json", quiet=True)) is Report  # --quiet: only errors


def test_cli_json_progress_reports_every_stage(tiny_checkpoint, tmp_path):
    result = run_cli("txt2img", "x", "-m", tiny_checkpoint, *FAST, "--n", 2, "--outdir", tmp_path, "--progress", "json")
    assert result.exit_code == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    stages = [e["stage"] for e in events]
    assert stages == ["load", "loaded"] + ["sample", "sample", "decode", "written"] * 2 + ["done"]
    assert [e["path"] for e in events if e["stage"] == "written"] == result.stdout.split()


@pytest.mark.parametrize("mode", ["bar", "none", "plain"])
def test_cli_progress_keeps_stdout_for_results_and_ends_with_the_summary(tiny_checkpoint, tmp_path, mode):
    result = run_cli("txt2img", "x", "-m", tiny_checkpoint, *FAST, "-o", tmp_path / "a.png", "--progress", mode)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'a.png'}\n"
    assert "wrote 1 image in " in result.stderr.splitlines()[-1]  # after the bar's escape codes
    if mode == "none":
        assert [line.split()[0] for line in result.stderr.splitlines()] == ["seed:", "wrote"]
