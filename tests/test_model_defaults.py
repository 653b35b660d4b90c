"""A registry checkpoint's recommended settings (SD-Turbo: 1 step, no guidance, ...) apply to the options the
user does not give, and are recorded in --json and the PNG. Tested with a tiny SD 1.x file under a test alias."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from sdcli import model_specs
from sdcli.images import read_png_parameters
from sdcli.infotext import parse_infotext
from sdcli.request import model_settings

DEFAULTS = {"steps": 2, "cfg": 1.0, "sampler": "euler_a", "schedule": "trailing", "width": 64, "height": 72}


@pytest.fixture
def turbo(tiny_checkpoint, tmp_path, monkeypatch):
    """A weights folder holding a tiny checkpoint registered as `tiny-turbo` with recommended settings."""
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(tiny_checkpoint, weights / "tiny_turbo.safetensors")
    entry = model_specs.RegistryEntry(
        "tiny-turbo", "test/tiny-turbo", "tiny_turbo.safetensors", "sd1", None, "test model", DEFAULTS
    )
    monkeypatch.setitem(model_specs.REGISTRY, "tiny-turbo", entry)
    return weights


def generate(weights, out, *extra):
    result = run_cli("txt2img", "a fox", "-m", "tiny-turbo", "--weights-dir", weights, "--seed", 9, "--dtype", "fp32",
                     "--json", "-o", out, *extra)  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_recommended_settings_apply_and_are_recorded(turbo, tmp_path):
    record = generate(turbo, tmp_path / "a.png")
    assert (record["steps"], record["cfg"], record["sampler"], record["schedule"], record["size"]) == (
        2, 1.0, "Euler a", "trailing", "64x72",
    )  # fmt: skip
    assert record["model_defaults"] == sorted(DEFAULTS)
    params = parse_infotext(read_png_parameters(tmp_path / "a.png"))[2]
    assert (params["Steps"], params["CFG scale"], params["Sampler"], params["Schedule type"], params["Size"]) == (
        "2", "1.0", "Euler a", "Trailing", "64x72",
    )  # fmt: skip
    # The same settings typed out make the same image, and nothing is then the model's.
    typed = generate(turbo, tmp_path / "b.png", "--steps", 2, "--cfg", 1, "--sampler", "euler_a",
                     "--schedule", "trailing", "-W", 64, "-H", 72)  # fmt: skip
    assert "model_defaults" not in typed
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_options_given_win_and_another_sampler_keeps_its_own_grid(turbo, tmp_path):
    record = generate(turbo, tmp_path / "a.png", "--steps", 3, "--sampler", "euler")
    assert (record["steps"], record["sampler"], record["schedule"], record["cfg"]) == (3, "Euler", "normal", 1.0)
    assert record["model_defaults"] == ["cfg", "height", "width"]


def test_a_file_not_in_the_registry_gets_the_usual_defaults(tiny_checkpoint, tmp_path):
    result = run_cli("txt2img", "a fox", "-m", tiny_checkpoint, "-W", 64, "-H", 64, "--steps", 1, "--dtype", "fp32",
                     "--json", "-o", tmp_path / "a.png")  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert "model_defaults" not in record and record["cfg"] == 7.5 and record["sampler"] == "DPM++ 2M Karras"


def test_model_settings():
    assert model_settings(DEFAULTS, set()) == DEFAULTS
    assert model_settings(DEFAULTS, {"steps", "schedule"}) == {
        k: v for k, v in DEFAULTS.items() if k not in ("steps", "schedule")
    }
    assert "schedule" not in model_settings(DEFAULTS, {"sampler"})
    assert model_settings(DEFAULTS, {"sampler", "schedule"}) == {"steps": 2, "cfg": 1.0, "width": 64, "height": 72}


def test_distilled_aliases_carry_their_defaults():
    for name in ("sd-turbo", "sdxl-turbo"):
        defaults = model_specs.REGISTRY[name].defaults
        assert (defaults["steps"], defaults["cfg"], defaults["width"], defaults["height"]) == (1, 1.0, 512, 512)
    for name in ("lcm-lora-sd15", "lcm-lora-sdxl"):
        entry = model_specs.REGISTRY[name]
        assert entry.kind == "lora" and entry.defaults["sampler"] == "lcm"
        assert model_specs.resolve_spec(name).path_in_repo == "pytorch_lora_weights.safetensors"


def test_img2img_keeps_the_init_images_size(turbo, tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), (90, 120, 200)).save(tmp_path / "init.png")
    result = run_cli("img2img", "a fox", "--init", tmp_path / "init.png", "-m", "tiny-turbo", "--weights-dir", turbo,
                     "--dtype", "fp32", "--json", "-o", tmp_path / "a.png")  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["size"] == "64x64" and record["steps"] == 2
    assert record["model_defaults"] == ["cfg", "sampler", "schedule", "steps"]


@pytest.fixture
def lcm_lora(tiny_checkpoint, tmp_path, monkeypatch):
    """A LoRA folder holding a random LoRA for the tiny checkpoint, registered as an LCM-LoRA (steps 3, cfg 1, lcm)."""
    from test_lora import reference_pipe, write_kohya_lora

    folder = tmp_path / "loras"
    folder.mkdir()
    write_kohya_lora(reference_pipe(tiny_checkpoint), folder / "tiny-lcm.safetensors", seed=5, rank=2)
    entry = model_specs.RegistryEntry(
        "tiny-lcm", "test/tiny-lcm", "tiny-lcm.safetensors", "sd1", None, "test LoRA", LCM, kind="lora"
    )
    monkeypatch.setitem(model_specs.REGISTRY, "tiny-lcm", entry)
    return folder


LCM = {"steps": 3, "cfg": 1.0, "sampler": "lcm"}


def lcm_run(checkpoint, folder, out, prompt, *extra):
    result = run_cli("txt2img", prompt, "-m", checkpoint, "--lora-dir", folder, "-W", 64, "-H", 64, "--seed", 4,
                     "--dtype", "fp32", "--json", "-o", out, *extra)  # fmt: skip
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_an_lcm_lora_brings_its_recommended_settings(tiny_checkpoint, lcm_lora, tmp_path):
    (tag,) = lcm_run(tiny_checkpoint, lcm_lora, tmp_path / "a.png", "a fox <lora:tiny-lcm:1>")
    assert (tag["steps"], tag["cfg"], tag["sampler"], tag["model_defaults"]) == (
        3,
        1.0,
        "LCM",
        ["cfg", "sampler", "steps"],
    )
    # --lora FILE does the same; what the user types wins.
    lora_file = lcm_lora / "tiny-lcm.safetensors"
    (option,) = lcm_run(tiny_checkpoint, lcm_lora, tmp_path / "b.png", "a fox", "--lora", lora_file, "--steps", 2)
    assert (option["steps"], option["sampler"], option["model_defaults"]) == (2, "LCM", ["cfg", "sampler"])
    # The same settings typed out make the same image as the LoRA's defaults.
    lcm_run(tiny_checkpoint, lcm_lora, tmp_path / "c.png", "a fox <lora:tiny-lcm:1>", "--steps", 3, "--cfg", 1,
            "--sampler", "lcm")  # fmt: skip
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "c.png").read_bytes()


def test_lcm_lora_defaults_apply_only_to_the_prompt_file_lines_that_use_it(tiny_checkpoint, lcm_lora, tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text(
        'a fox <lora:tiny-lcm:1>\n--prompt "a cat" --steps 2\n--prompt "a dog <lora:tiny-lcm:1>" --cfg_scale 2\n'
    )
    result = run_cli("txt2img", "--prompt-file", lines, "-m", tiny_checkpoint, "--lora-dir", lcm_lora, "-W", 64,
                     "-H", 64, "--seed", 4, "--dtype", "fp32", "--json", "--outdir", tmp_path / "out")  # fmt: skip
    assert result.exit_code == 0, result.output
    fox, cat, dog = [json.loads(line) for line in result.stdout.splitlines()]
    assert (fox["steps"], fox["cfg"], fox["sampler"]) == (3, 1.0, "LCM")
    assert (cat["steps"], cat["cfg"], cat["sampler"]) == (2, 7.5, "DPM++ 2M Karras") and "model_defaults" not in cat
    assert (dog["steps"], dog["cfg"], dog["sampler"], dog["model_defaults"]) == (3, 2.0, "LCM", ["sampler", "steps"])


def test_lora_defaults_by_file_name():
    entry = model_specs.REGISTRY["lcm-lora-sd15"]
    assert model_specs.lora_defaults([Path("x") / entry.filename]) == entry.defaults
    assert model_specs.lora_defaults([Path("other.safetensors")]) == {}
