"""Made for scripts and cron: prompt files, --json, no-clobber names, exit codes, signals, --from-png."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image

from sdcli.images import read_png_parameters
from sdcli.infotext import parse_infotext

FAST = ["--steps", "2", "-W", "64", "-H", "64"]


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def test_text_prompt_file_with_a_bad_line_writes_the_good_images_and_exits_1(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two cats and a typo\na red cat\n--prompt x --width 100\n\na blue cat\n")
    out = tmp_path / "out"
    result = run_cli("txt2img", "--prompt-file", prompts, "-m", tiny_checkpoint, *FAST, "--outdir", out, "--seed", 5)
    assert result.exit_code == 1
    assert f"error: {prompts} line 3: width must be a multiple of 8" in result.stderr
    written = [Path(p) for p in result.stdout.split()]
    assert written == pngs(out) and len(written) == 2
    prompts_seeds = [parse_infotext(read_png_parameters(p))[0:3:2] for p in written]
    assert [(p, s["Seed"]) for p, s in prompts_seeds] == [("a red cat", "5"), ("a blue cat", "6")]


def test_jsonl_prompt_file_with_a_bad_line_and_json_output(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "jobs.jsonl"
    prompts.write_text(
        '{"prompt": "a cat", "seed": 11, "n": 2, "sampler": "Euler a"}\n'
        '{"prompt": "broken",\n'
        '{"prompt": "a dog", "negative": "blur", "cfg": 3, "steps": 3, "output": "dog.png"}\n'
    )
    result = run_cli(
        "txt2img", "--prompt-file", prompts, "-m", tiny_checkpoint, *FAST, "--outdir", tmp_path / "o", "--json"
    )
    assert result.exit_code == 1
    assert f"{prompts} line 2: invalid JSON" in result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["prompt"], r["line"]) for r in records] == [("a cat", 1), ("a cat", 1), ("a dog", 3)]
    assert [r["seed"] for r in records[:2]] == [11, 12]  # the third job's seed is random
    for r in records:
        assert Path(r["path"]).is_file()
        assert set(r) >= {
            "path",
            "prompt",
            "negative",
            "seed",
            "steps",
            "sampler",
            "cfg",
            "size",
            "model",
            "model_hash",
            "seconds",
        }
    assert records[0]["sampler"] == "Euler a" and records[2]["path"] == str(tmp_path / "o" / "dog.png")
    assert records[2]["negative"] == "blur" and records[2]["cfg"] == 3.0 and records[2]["steps"] == 3


def test_fail_fast_stops_at_the_first_bad_line_before_generating(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"nope": 1}\n{"prompt": "b"}\n')
    out = tmp_path / "out"
    result = run_cli("txt2img", "--prompt-file", prompts, "-m", tiny_checkpoint, *FAST, "--outdir", out, "--fail-fast")
    assert result.exit_code == 1 and "line 2" in result.stderr
    assert not out.exists()


def test_prompts_from_stdin_share_one_model_load(tiny_checkpoint, tmp_path, monkeypatch):
    import sdcli.run_load as run_load

    loads = []
    real_load = run_load.load_run_model
    monkeypatch.setattr(run_load, "load_run_model", lambda *a: loads.append(1) or real_load(*a))
    result = run_cli(
        "txt2img", "--prompt-file", "-", "-m", tiny_checkpoint, *FAST, "--outdir", tmp_path, input="a\nb\nc\n"
    )
    assert result.exit_code == 0, result.output
    assert len(result.stdout.split()) == 3 and loads == [1]


def test_jobs_of_one_size_are_batched(tiny_checkpoint, tmp_path, monkeypatch):
    import sdcli.batch as batch

    sizes = []
    real_generate = batch.generate
    monkeypatch.setattr(
        batch, "generate", lambda model, reqs, **kw: sizes.append(len(reqs)) or real_generate(model, reqs, **kw)
    )
    text = "".join(f'{{"prompt": "p{i}", "width": {64 if i % 2 else 72}}}\n' for i in range(5))
    result = run_cli(
        "txt2img",
        "--prompt-file",
        "-",
        "-m",
        tiny_checkpoint,
        *FAST,
        "--outdir",
        tmp_path,
        "--batch-size",
        2,
        input=text,
    )
    assert result.exit_code == 0, result.output
    assert sorted(sizes) == [1, 2, 2]  # three 72-wide jobs (2 + 1) and two 64-wide (2)


def test_existing_files_get_a_suffix_unless_overwrite(tiny_checkpoint, tmp_path):
    out = tmp_path / "a.png"
    args = ["txt2img", "x", "-m", tiny_checkpoint, *FAST, "-o", out]
    assert run_cli(*args, "--seed", 1).stdout.strip() == str(out)
    assert run_cli(*args, "--seed", 2).stdout.strip() == str(tmp_path / "a-1.png")
    assert run_cli(*args, "--seed", 3, "--overwrite").stdout.strip() == str(out)
    assert parse_infotext(read_png_parameters(out))[2]["Seed"] == "3"
    assert parse_infotext(read_png_parameters(tmp_path / "a-1.png"))[2]["Seed"] == "2"


def test_name_template_and_counting_across_runs(tiny_checkpoint, tmp_path):
    args = ["txt2img", "A Cat: on/the mat!", "-m", tiny_checkpoint, *FAST, "--outdir", tmp_path, "--seed", 9]
    first = run_cli(*args, "--name", "{index:04d}-{seed}-{prompt:.12}-{sampler}-{steps}-{width}x{height}")
    assert first.exit_code == 0, first.output
    assert Path(first.stdout.strip()).name == "0000-9-A-Cat-on-the-dpmpp_2m_karras-2-64x64.png"
    second = run_cli(*args)
    assert Path(second.stdout.strip()).name == "00001-9.png"
    bad = run_cli(*args, "--name", "{nope}")
    assert bad.exit_code == 2 and "fields: index, seed, prompt" in bad.stderr


def test_stdout_holds_only_results_when_not_a_terminal(tiny_checkpoint, tmp_path):
    result = run_cli("txt2img", "x", "-m", tiny_checkpoint, *FAST, "--outdir", tmp_path)
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [str(pngs(tmp_path)[0])]
    assert "seed:" in result.stderr and "sampling" not in result.stderr
    quiet = run_cli("txt2img", "x", "-m", tiny_checkpoint, *FAST, "--outdir", tmp_path, "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_from_png_reproduces_the_identical_image_and_options_override(tiny_checkpoint, tmp_path, monkeypatch):
    original = tmp_path / "original.png"
    made = run_cli("txt2img", "a cat", "-n", "dog", "-m", tiny_checkpoint, "--steps", 3, "-W", 64, "-H", 72,
                   "--sampler", "Euler a", "--cfg", 4, "--seed", 1234, "-o", original)  # fmt: skip
    assert made.exit_code == 0, made.output
    again = run_cli("txt2img", "--from-png", original, "-m", tiny_checkpoint, "-o", tmp_path / "again.png")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "again.png").read_bytes() == original.read_bytes()

    # Without --model, the model the image names is looked up in the weights folder.
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / Path(tiny_checkpoint).name).write_bytes(Path(tiny_checkpoint).read_bytes())
    by_name = run_cli("txt2img", "--from-png", original, "--weights-dir", weights, "-o", tmp_path / "by-name.png")
    assert by_name.exit_code == 0, by_name.output
    assert (tmp_path / "by-name.png").read_bytes() == original.read_bytes()

    changed = run_cli("txt2img", "--from-png", original, "-m", tiny_checkpoint, "--steps", 2, "-o", tmp_path / "c.png")
    prompt, negative, params = parse_infotext(read_png_parameters(tmp_path / "c.png"))
    assert (prompt, negative, params["Steps"], params["Seed"], params["Size"]) == ("a cat", "dog", "2", "1234", "64x72")
    assert changed.exit_code == 0


def test_from_png_with_an_unknown_model_says_pass_model(tiny_checkpoint, tmp_path):
    original = tmp_path / "o.png"
    assert run_cli("txt2img", "x", "-m", tiny_checkpoint, *FAST, "-o", original).exit_code == 0
    result = run_cli("txt2img", "--from-png", original, "--weights-dir", tmp_path / "empty", "-o", tmp_path / "n.png")
    assert result.exit_code == 1 and "pass --model" in result.stderr


def sdcli_process(*args, cwd) -> subprocess.Popen:
    """sdcli in its own process. It does not see the machine conftest fakes, so device and precision are pinned."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = (*args, "--device", "cpu", "--dtype", "fp32")
    return subprocess.Popen(
        [sys.executable, "-m", "sdcli", *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_two_concurrent_runs_into_one_folder_lose_nothing(tiny_checkpoint, tmp_path):
    out = tmp_path / "shared"
    args = ["txt2img", "x", "-m", tiny_checkpoint, *FAST, "--outdir", out, "--seed", 1, "--n", 3]
    runs = [sdcli_process(*args, cwd=tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outputs
    written = [line for stdout, _ in outputs for line in stdout.split()]
    assert len(set(written)) == 6 and sorted(map(Path, written)) == pngs(out)


def test_sigterm_mid_batch_stops_with_143_and_leaves_only_whole_images(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(40)))
    proc = sdcli_process("txt2img", "--prompt-file", prompts, "-m", tiny_checkpoint, "--steps", 30, "-W", 64, "-H", 64,
                         "--outdir", out, cwd=tmp_path)  # fmt: skip
    deadline = time.monotonic() + 240
    while not pngs(out) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    written = pngs(out)
    assert 1 <= len(written) < 40
    assert sorted(map(Path, stdout.split())) == written
    for path in written:
        Image.open(path).load()  # whole, readable images
    assert [p.name for p in out.iterdir() if p.suffix != ".png"] == []  # no temporary files


@pytest.mark.parametrize("args", [["x", "--prompt-file", "p.txt"], []])
def test_prompt_and_prompt_file_are_exclusive_and_one_is_needed(tiny_checkpoint, tmp_path, args):
    result = run_cli("txt2img", *args, "-m", tiny_checkpoint, "-o", tmp_path / "x.png")
    assert result.exit_code == 2 and "PROMPT" in result.stderr


def test_img2img_and_inpaint_take_prompt_files_with_per_line_images(tiny_checkpoint, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(init)
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    lines = [
        {"prompt": "a", "init": str(init), "strength": 0.5},
        {"prompt": "b", "init": str(tmp_path / "missing.png")},
        {"prompt": "c"},  # no init on the line and none on the command line
    ]
    prompts = tmp_path / "jobs.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run_cli(
        "img2img", "--prompt-file", prompts, "-m", tiny_checkpoint, "--steps", 2, "--outdir", tmp_path / "o", "--json"
    )
    assert result.exit_code == 1
    assert "line 2: image not found" in result.stderr and "line 3: img2img needs an init image" in result.stderr
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["prompt"] == "a" and record["strength"] == 0.5

    inpaint = tmp_path / "inpaint.jsonl"
    inpaint.write_text(json.dumps({"prompt": "d", "mask": str(mask)}) + "\n")
    result = run_cli("inpaint", "--prompt-file", inpaint, "--init", init, "-m", tiny_checkpoint, "--steps", 2,
                     "--outdir", tmp_path / "i")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(pngs(tmp_path / "i")) == 1
