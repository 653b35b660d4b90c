"""--rng through the command line: per prompt-file line, and read back from a PNG."""

from __future__ import annotations

import numpy as np
from conftest import run_cli
from PIL import Image

from sdcli.images import read_png_parameters, save_png
from sdcli.infotext import parse_infotext

ARGS = ("-W", 64, "-H", 64, "--steps", 3, "--cfg", 7, "--sampler", "Euler a", "--dtype", "fp32")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_a_prompt_file_line_sets_its_own_rng(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        '--prompt "a cat" --seed 3 --rng cuda\n--prompt "a cat" --seed 3\n--prompt "a cat" --rng gpu\n'
        '{"prompt": "a cat", "seed": 3, "rng": "cuda"}\n'
    )
    result = run_cli("txt2img", "--prompt-file", prompts, "-m", tiny_checkpoint, *ARGS, "--outdir", tmp_path / "out")
    assert result.exit_code == 1
    assert "prompts.txt line 3: rng must be one of cpu, cuda, got 'gpu'" in result.stderr
    cuda, cpu = (tmp_path / "out" / name for name in ("00000-3.png", "00001-3.png"))
    assert [parse_infotext(read_png_parameters(p))[2]["RNG"] for p in (cuda, cpu)] == ["NV", "CPU"]
    alone = tmp_path / "alone.png"
    result = run_cli("txt2img", "a cat", "-m", tiny_checkpoint, *ARGS, "--seed", 3, "--rng", "cuda", "-o", alone)
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(cuda), pixels(alone))
    assert not np.array_equal(pixels(cpu), pixels(alone))


def test_from_png_of_an_a1111_gpu_image_draws_the_cuda_noise_unless_rng_is_given(tiny_checkpoint, tmp_path):
    made = tmp_path / "made.png"
    result = run_cli("txt2img", "a cat", "-m", tiny_checkpoint, *ARGS, "--seed", 9, "--rng", "cuda", "-o", made)
    assert result.exit_code == 0, result.output
    # As A1111 writes an image made with its default noise source: no RNG key.
    a1111 = save_png(
        Image.new("RGB", (64, 64)), tmp_path / "a1111.png",
        "a cat\nSteps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 9, Size: 64x64, "
        "Version: v1.10.1",
    )  # fmt: skip
    again = tmp_path / "again.png"
    result = run_cli("txt2img", "--from-png", a1111, "-m", tiny_checkpoint, "--dtype", "fp32", "-o", again)
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(again), pixels(made))
    on_cpu = tmp_path / "cpu.png"
    result = run_cli("txt2img", "--from-png", a1111, "-m", tiny_checkpoint, "--dtype", "fp32", "--rng", "cpu",
                     "-o", on_cpu)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert parse_infotext(read_png_parameters(on_cpu))[2]["RNG"] == "CPU"
