"""Hostile and careless input to the generating commands: refused up front with one line, nothing written outside
the output folder, no black image reported as a success, results listed in prompt-file order."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TINY_SD1, run_cli, tiny_state_dict
from PIL import Image

import sdcli.run_files as run_files
import sdcli.run_load as run_load
from sdcli.batch import job_requests
from sdcli.errors import UsageError
from sdcli.images import read_png_parameters, save_png
from sdcli.infotext import parse_infotext
from sdcli.outputs import check_name_template
from sdcli.request import MAX_SEED

FAST = ["--steps", "1", "-W", "64", "-H", "64"]


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if the model's weights are loaded: the error must come before."""

    def refuse(*_args):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(run_load, "load_run_model", refuse)


def png_with(tmp_path: Path, parameters: str) -> Path:
    return save_png(Image.new("RGB", (8, 8)), tmp_path / "made.png", parameters)


# --- refused before any work -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cfg", "nan"], "cfg must be a number between 0 and 100, got nan"),
        (["--cfg", "inf"], "cfg must be a number"),
        (["--cfg", "1e30"], "cfg must be a number"),
        (["-W", "0"], "width must be a multiple of 8 and at least 64, got 0"),
        (["-W", "100000", "-H", "100000"], "megapixels"),
        (["--n", "1000000000"], "n must be between 1 and 10000"),
        (["--clip-skip", "99"], f"at most {TINY_SD1.max_clip_skip}"),
        (["--name", "{seed:>100000}"], "simple format"),
        (["--name", "{seed.__class__}"], "unknown field 'seed.__class__'"),
        (["--name", "{seed!r}"], "simple format"),
        (["--name", "{index:{seed}}"], "simple format"),
    ],
)
def test_bad_numbers_and_templates_are_refused_before_loading(tiny_checkpoint, tmp_path, no_loading, args, message):
    result = run_cli("txt2img", "x", "-m", tiny_checkpoint, "--steps", 1, "--outdir", tmp_path / "o", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_mask_blur_above_the_maximum_is_refused(tiny_checkpoint, tmp_path, no_loading):
    init = tmp_path / "i.png"
    Image.new("RGB", (64, 64), "white").save(init)
    result = run_cli("inpaint", "x", "-m", tiny_checkpoint, "--init", init, "--mask", init, "--mask-blur", 100000)
    assert result.exit_code == 2 and "mask blur must be between 0 and 256" in result.stderr


def test_a_1x1_init_without_a_size_is_a_clear_error(tiny_checkpoint, tmp_path, no_loading):
    init = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(init)
    result = run_cli("img2img", "x", "-m", tiny_checkpoint, "--init", init, "-o", tmp_path / "o.png")
    assert result.exit_code == 1 and "is 1x1" in result.stderr and "--width and --height" in result.stderr


def test_an_unwritable_output_folder_is_found_before_loading(tiny_checkpoint, tmp_path, no_loading):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_cli("txt2img", "x", "-m", tiny_checkpoint, *FAST, "--outdir", blocker / "sub")
    assert result.exit_code == 1 and f"cannot write into {blocker / 'sub'}" in result.stderr


def test_prompt_file_lines_with_bad_numbers_or_too_many_images_are_that_lines_error(tiny_checkpoint, tmp_path):
    lines = [
        {"prompt": "ok"},
        {"prompt": "zero", "width": 0},
        {"prompt": "many", "n": 1000000},
        {"prompt": "nan", "cfg": float("nan")},  # json.dumps writes NaN, which json.loads reads back
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    out = tmp_path / "o"
    result = run_cli("txt2img", "--prompt-file", "-", "-m", tiny_checkpoint, *FAST, "--outdir", out, input=text)
    assert result.exit_code == 1
    assert "line 2: width must be a multiple of 8 and at least 64, got 0" in result.stderr
    assert "line 3: n must be between 1 and 10000" in result.stderr
    assert "line 4: cfg must be a number" in result.stderr
    assert len(list(out.glob("*.png"))) == 1


def test_max_images_caps_the_whole_run(tiny_checkpoint, tmp_path, no_loading):
    result = run_cli("txt2img", "--prompt-file", "-", "-m", tiny_checkpoint, *FAST, "--outdir", tmp_path,
                     "--max-images", 3, input="a\nb\nc\nd\n")  # fmt: skip
    assert result.exit_code == 2 and "more than 3 images" in result.stderr


@pytest.mark.parametrize(
    ("params", "message"),
    [("CFG scale: nan, Size: 64x64", "cfg must be a number"), ("CFG scale: 7, Size: 0x0", "width must be")],
)
def test_bad_numbers_in_a_png_are_refused(tiny_checkpoint, tmp_path, no_loading, params, message):
    png = png_with(tmp_path, f"a cat\nSteps: 1, Sampler: Euler, Seed: 1, {params}, Model: tiny-sd1")
    result = run_cli("txt2img", "--from-png", png, "-m", tiny_checkpoint, "-o", tmp_path / "again.png")
    assert result.exit_code == 2 and message in result.stderr


def test_from_png_on_a_folder_says_it_is_a_folder(tiny_checkpoint, tmp_path):
    result = run_cli("txt2img", "--from-png", tmp_path, "-m", tiny_checkpoint)
    assert result.exit_code == 1 and "is a folder" in result.stderr


def test_seed_error_says_image_for_one_image():
    with pytest.raises(UsageError, match="for 1 image, got"):
        job_requests({"prompt": "x"}, MAX_SEED + 1)


# --- where images go -------------------------------------------------------------------------------------


def test_prompt_file_outputs_stay_inside_the_output_folder_and_never_replace_other_files(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.png").write_text("not an image")
    lines = [
        {"prompt": "abs", "output": str(tmp_path / "elsewhere" / "a.png")},
        {"prompt": "up", "output": "../up.png"},
        {"prompt": "script", "output": "run.sh"},
        {"prompt": "clobber", "output": "notes.png"},
        {"prompt": "good", "output": "sub/good.png"},
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    result = run_cli("txt2img", "--prompt-file", "-", "-m", tiny_checkpoint, *FAST, "--outdir", out, "--overwrite",
                     input=text)  # fmt: skip
    assert result.exit_code == 1
    assert 'line 1: "output" \'' in result.stderr and "is outside" in result.stderr
    assert "line 2:" in result.stderr and 'line 3: "output" must name a .png file' in result.stderr
    assert "line 4:" in result.stderr and "is not a PNG image" in result.stderr
    assert result.stdout.split() == [str(out / "sub" / "good.png")]
    assert (out / "notes.png").read_text() == "not an image"
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "up.png").exists()


def test_from_png_looks_the_model_up_by_name_in_the_weights_folder_only(tiny_checkpoint, tmp_path, monkeypatch):
    import sdcli.weights as weights

    hashed = []

    original_compute = weights._compute_sha256
    monkeypatch.setattr(weights, "_compute_sha256", lambda path: hashed.append(Path(path)) or original_compute(path))
    outside = tmp_path / "outside"
    outside.mkdir()
    elsewhere = outside / "secret.safetensors"
    elsewhere.write_bytes(Path(tiny_checkpoint).read_bytes())
    png = png_with(
        tmp_path,
        f"a cat\nSteps: 1, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Model hash: 0, Model: {elsewhere}",
    )
    empty = tmp_path / "weights"
    empty.mkdir()
    refused = run_cli("txt2img", "--from-png", png, "--weights-dir", empty, "-o", tmp_path / "r.png")
    assert refused.exit_code == 1 and "'secret.safetensors', which is not in" in refused.stderr
    assert elsewhere.resolve() not in [p.resolve() for p in hashed]

    (empty / "secret.safetensors").write_bytes(Path(tiny_checkpoint).read_bytes())
    found = run_cli("txt2img", "--from-png", png, "--weights-dir", empty, "-o", tmp_path / "f.png", "--dtype", "fp32")
    assert found.exit_code == 0, found.output
    assert elsewhere.resolve() not in [p.resolve() for p in hashed]


def test_without_a_size_the_model_familys_default_size_is_used(tiny_checkpoint, tmp_path, monkeypatch):
    real_family = run_files.model_family
    monkeypatch.setattr(run_files, "model_family", lambda *args: replace(real_family(*args), default_size=72))
    result = run_cli("txt2img", "x", "-m", tiny_checkpoint, "--steps", 1, "-W", 64, "-o", tmp_path / "a.png")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "a.png").size == (64, 72)


# --- failures during a run ---------------------------------------------------------------------------------


def test_a_checkpoint_with_nan_weights_fails_its_images_instead_of_writing_black(tmp_path):
    from safetensors.torch import save_file

    state = tiny_state_dict(TINY_SD1)
    state["model.diffusion_model.out.2.bias"] = torch.full_like(state["model.diffusion_model.out.2.bias"], torch.nan)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    out = tmp_path / "o"
    result = run_cli("txt2img", "x", "-m", path, *FAST, "--dtype", "fp32", "--outdir", out, "--seed", 1)
    assert result.exit_code == 1
    assert "the model produced NaN/inf values" in result.stderr and "--dtype fp32" in result.stderr
    assert list(out.glob("*.png")) == []


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried..."), MemoryError()])
def test_out_of_memory_is_the_jobs_one_line_error(tiny_checkpoint, tmp_path, monkeypatch, error):
    import sdcli.batch as batch

    def out_of_memory(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(batch, "generate", out_of_memory)
    result = run_cli("txt2img", "x", "-m", tiny_checkpoint, *FAST, "--outdir", tmp_path)
    assert result.exit_code == 1
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "ran out of memory" in line and "--vae-tiling" in line and "--low-memory" in line


# --- what is reported ---------------------------------------------------------------------------------------


def test_results_are_listed_in_prompt_file_order_though_batched_by_size(tiny_checkpoint, tmp_path):
    lines = [{"prompt": f"p{i}", "width": 64 if i % 2 else 72, "seed": i} for i in range(5)]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    result = run_cli("txt2img", "--prompt-file", "-", "-m", tiny_checkpoint, "--steps", 1, "-H", 64,
                     "--batch-size", 2, "--outdir", tmp_path, input=text)  # fmt: skip
    assert result.exit_code == 0, result.output
    prompts = [parse_infotext(read_png_parameters(path))[0] for path in result.stdout.split()]
    assert prompts == ["p0", "p1", "p2", "p3", "p4"]


def test_a_seed_of_minus_one_in_a_prompt_file_counts_on_from_the_runs_seed(tiny_checkpoint, tmp_path):
    text = '--prompt "a" --seed -1\n--prompt "b" --seed -1\n'
    result = run_cli("txt2img", "--prompt-file", "-", "-m", tiny_checkpoint, *FAST, "--outdir", tmp_path, "--json",
                     input=text)  # fmt: skip
    assert result.exit_code == 0, result.output
    seed = int(result.stderr.split("seed: ")[1].split()[0])  # the run's random seed, printed
    assert [json.loads(line)["seed"] for line in result.stdout.splitlines()] == [seed, seed + 1]


def test_the_json_record_holds_every_setting_that_shapes_the_image(tiny_checkpoint, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 30, 10)).save(init)
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 0).save(mask)  # inverted: repaint everything
    result = run_cli("inpaint", "x", "-m", tiny_checkpoint, "--init", init, "--mask", mask, "--steps", 1,
                     "--clip-skip", 2, "--mask-blur", 3, "--invert-mask", "--resize", "fit", "--strength", 0.5,
                     "--outdir", tmp_path / "o", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert {k: record[k] for k in ("clip_skip", "strength", "mask_blur", "invert_mask", "resize")} == {
        "clip_skip": 2, "strength": 0.5, "mask_blur": 3, "invert_mask": True, "resize": "fit",
    }  # fmt: skip
    assert record["init"] == str(init) and record["mask"] == str(mask)


def test_a_huge_prompt_in_the_name_gives_a_legal_file_name(tiny_checkpoint, tmp_path):
    # 900 tokens: 4,500 bytes of prompt, within the 1,000 tokens a prompt may have.
    result = run_cli("txt2img", "word " * 900, "-m", tiny_checkpoint, *FAST, "--outdir", tmp_path, "--name",
                     "{prompt}")  # fmt: skip
    assert result.exit_code == 0, result.stderr[:300]
    assert len(Path(result.stdout.strip()).name.encode()) <= 255


def test_seed_minus_one_on_the_command_line_is_random_too(tiny_checkpoint, tmp_path):
    result = run_cli("txt2img", "x", "-m", tiny_checkpoint, *FAST, "--seed", -1, "--outdir", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["seed"] == int(result.stderr.split("seed: ")[1].split()[0])


@pytest.mark.parametrize("template", ["{index:05d}-{seed}", "{prompt:.40}", "{cfg:.1f}", "{seed:>12}", "{date}_{time}"])
def test_plain_format_specs_of_the_documented_fields_are_accepted(template):
    check_name_template(template)


@pytest.mark.parametrize("template", ["{prompt:.1000}", "{seed:0300d}", "{seed[0]}", "{}", "{0}", "{seed", "{x}"])
def test_other_templates_are_refused_with_the_list_of_fields(template):
    with pytest.raises(UsageError, match="fields: index, seed, prompt"):
        check_name_template(template)
