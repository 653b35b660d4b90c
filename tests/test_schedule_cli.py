"""--schedule on the command line, in prompt files and PNGs: the sampler walks the grid asked for, the PNG
records it as A1111 1.9 does ("Sampler: DPM++ 2M, Schedule type: Karras") and --from-png reads it back;
cfg <= 1 runs no unconditional pass."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from PIL import Image

import sdcli.samplers
import sdcli.samplers_fast
from sdcli.images import read_png_parameters
from sdcli.infotext import SCHEDULE_LABELS, parse_infotext, schedule_from_label
from sdcli.schedules import SCHEDULES, alphas_cumprod_sd, make_sigmas, sigmas_from_alphas_cumprod

STEPS = 4
MODEL_SIGMAS = sigmas_from_alphas_cumprod(alphas_cumprod_sd())


def txt2img(checkpoint, out, *extra):
    result = run_cli(
        "txt2img", "a cat", "-m", checkpoint, "-W", 64, "-H", 64, "--steps", STEPS, "--seed", 7, "--dtype", "fp32",
        "-o", out, *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result


def pixels(path) -> bytes:
    return Image.open(path).convert("RGB").tobytes()


@pytest.fixture
def walked(monkeypatch):
    """The sigmas each call of a sampler function walked, by function name."""
    seen: dict[str, list[torch.Tensor]] = {}

    def spy(module, name):
        original = getattr(module, name)

        def wrapper(denoiser, x, sigmas, **kwargs):
            seen.setdefault(name, []).append(sigmas.clone())
            return original(denoiser, x, sigmas, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    spy(sdcli.samplers, "sample_euler")
    spy(sdcli.samplers, "sample_dpmpp_2m")
    spy(sdcli.samplers_fast, "sample_lcm")
    return seen


@pytest.mark.parametrize("schedule", ["trailing", "beta", "sgm_uniform"])
def test_schedule_option_sets_the_grid_the_sampler_walks(tiny_checkpoint, tmp_path, walked, schedule):
    txt2img(tiny_checkpoint, tmp_path / "a.png", "--sampler", "euler", "--schedule", schedule)
    assert torch.equal(walked["sample_euler"][0], make_sigmas(schedule, STEPS, MODEL_SIGMAS))
    params = parse_infotext(read_png_parameters(tmp_path / "a.png"))[2]
    assert (params["Sampler"], params["Schedule type"]) == ("Euler", SCHEDULE_LABELS[schedule])


def test_lcm_without_schedule_walks_lcm_timesteps(tiny_checkpoint, tmp_path, walked):
    txt2img(tiny_checkpoint, tmp_path / "a.png", "--sampler", "lcm", "--cfg", 1)
    # LCMScheduler's own 4 steps: 999, 759, 499, 259, then 0.
    expected = torch.cat([MODEL_SIGMAS[[999, 759, 499, 259]], torch.zeros(1)])
    assert torch.equal(walked["sample_lcm"][0], expected)


def test_scheduler_alias_and_name_suffix_give_the_same_image(tiny_checkpoint, tmp_path):
    txt2img(tiny_checkpoint, tmp_path / "a.png", "--sampler", "dpmpp_2m", "--scheduler", "karras")
    txt2img(tiny_checkpoint, tmp_path / "b.png", "--sampler", "dpmpp_2m_karras")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    params = parse_infotext(read_png_parameters(tmp_path / "a.png"))[2]
    assert (params["Sampler"], params["Schedule type"]) == ("DPM++ 2M", "Karras")


def test_from_png_reads_the_schedule_back(tiny_checkpoint, tmp_path, walked):
    txt2img(tiny_checkpoint, tmp_path / "a.png", "--sampler", "euler", "--schedule", "simple", "--json")
    again = run_cli("txt2img", "--from-png", tmp_path / "a.png", "-m", tiny_checkpoint, "--dtype", "fp32",
                    "-o", tmp_path / "b.png", "--json")  # fmt: skip
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["schedule"] == "simple"
    assert torch.equal(walked["sample_euler"][1], make_sigmas("simple", STEPS, MODEL_SIGMAS))
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_prompt_file_jobs_set_their_own_schedule(tiny_checkpoint, tmp_path, walked):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a", "schedule": "exponential"}\n{"prompt": "b"}\n')
    result = run_cli("txt2img", "--prompt-file", jobs, "-m", tiny_checkpoint, "-W", 64, "-H", 64, "--steps", STEPS,
                     "--sampler", "euler", "--seed", 1, "--dtype", "fp32", "--outdir", tmp_path, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["schedule"] for r in records] == ["exponential", "normal"]
    grids = sorted((len(s), s[0].item(), s[-2].item()) for s in walked["sample_euler"])
    expected = sorted((len(s), s[0].item(), s[-2].item()) for s in
                      (make_sigmas(name, STEPS, MODEL_SIGMAS) for name in ("exponential", "normal")))  # fmt: skip
    assert grids == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--schedule", "cosine"), "unknown schedule 'cosine'"),
        (("--sampler", "ddim", "--schedule", "karras"), "walks its own leading timesteps"),
    ],
)
def test_bad_schedule_is_one_line_usage_error(tiny_checkpoint, tmp_path, args, message):
    result = run_cli("txt2img", "a", "-m", tiny_checkpoint, "-o", tmp_path / "x.png", *args)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()


def test_schedule_labels_read_back_as_a1111_writes_them():
    assert all(schedule_from_label(label) == name for name, label in SCHEDULE_LABELS.items())
    assert set(SCHEDULE_LABELS) == set(SCHEDULES)
    assert schedule_from_label("Automatic") is None
    assert schedule_from_label("Uniform") == "normal"  # A1111's name for k-diffusion's get_sigmas
    assert schedule_from_label("KL Optimal") == "KL Optimal"  # unknown: left for the request check to name


def test_cfg_at_or_below_one_runs_no_unconditional_pass(tiny_checkpoint, tmp_path, monkeypatch):
    """cfg <= 1 means no guidance (as diffusers): the UNet sees one copy of each image per call."""
    import sdcli.pipeline

    batch_sizes = []
    original = sdcli.pipeline.encode_schedule

    def counting(model, prompts, *args):
        batch_sizes.append(len(prompts))
        return original(model, prompts, *args)

    monkeypatch.setattr(sdcli.pipeline, "encode_schedule", counting)
    txt2img(tiny_checkpoint, tmp_path / "half.png", "--cfg", 0.5, "--sampler", "euler")
    assert batch_sizes == [1]  # the prompt only: no negative prompt encoded, no unconditional half
    txt2img(tiny_checkpoint, tmp_path / "one.png", "--cfg", 1, "--sampler", "euler")
    txt2img(tiny_checkpoint, tmp_path / "two.png", "--cfg", 2, "--sampler", "euler")
    assert batch_sizes == [1, 1, 1, 1]  # cfg 2 encodes the prompt and the negative prompt
    assert pixels(tmp_path / "half.png") == pixels(tmp_path / "one.png")
    assert pixels(tmp_path / "half.png") != pixels(tmp_path / "two.png")
