"""LoRAs through the command line: the images equal diffusers' pipeline with the same LoRAs fused by its own
`load_lora_weights` + `fuse_lora`; prompt files switch LoRA sets without reloading; the PNG records them.

The LoRA files are random kohya-ss files named from the reference pipeline's own modules (see test_lora).
"""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image
from safetensors.torch import load_file, save_file
from test_lora import reference_pipe, write_kohya_lora

from sdcli.checkpoint import load_model, reload_weights
from sdcli.extra_networks import LoraRef, strip_extra_networks
from sdcli.images import read_png_parameters
from sdcli.infotext import parse_infotext
from sdcli.lora_sets import ActiveLoras, LoraLibrary

SEED, STEPS, CFG, SIZE = 77, 4, 5.0, 64


@pytest.fixture
def peft():
    return pytest.importorskip("peft", reason="peft (a test extra) is needed for diffusers' load_lora_weights")


@pytest.fixture(scope="module")
def lora_dir(tiny_checkpoint, tmp_path_factory):
    """A LoRA folder with two random kohya LoRAs for the tiny checkpoint: style (rank 4), detail (rank 2)."""
    folder = tmp_path_factory.mktemp("loras")
    pipe = reference_pipe(tiny_checkpoint)
    write_kohya_lora(pipe, folder / "style.safetensors", seed=21, rank=4)
    (folder / "sub").mkdir()
    write_kohya_lora(pipe, folder / "sub" / "detail.safetensors", seed=22, rank=2, alpha=lambda i: 1.0)
    return folder


def generate(checkpoint, out: Path, prompt: str, *extra) -> np.ndarray:
    result = run_cli(
        "txt2img", prompt, "-m", checkpoint, "-W", SIZE, "-H", SIZE, "--steps", STEPS, "--cfg", CFG,
        "--seed", SEED, "--sampler", "ddim", "--dtype", "fp32", "-o", out, *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.float64) / 255


def fused_reference_image(checkpoint, prompt: str, loras) -> np.ndarray:
    """diffusers' pipeline with each (file, weight) LoRA loaded and fused; a weight is a number or
    {"text_encoder": w, "unet": w}."""
    pipe = reference_pipe(checkpoint)
    if len(loras) == 1 and not isinstance(loras[0][1], dict):
        pipe.load_lora_weights(str(loras[0][0]))
        pipe.fuse_lora(lora_scale=loras[0][1])
    else:
        names = [f"l{i}" for i in range(len(loras))]
        for name, (path, _) in zip(names, loras, strict=True):
            pipe.load_lora_weights(str(path), adapter_name=name)
        pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
        pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
    return pipe(
        strip_extra_networks(prompt), height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
    ).images[0]  # fmt: skip


def addnet_hash(path: Path) -> str:
    """kohya-ss's hash as A1111 records it: sha256 of the bytes after the 8-byte length and the JSON header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()[:12]


def test_prompt_tag_equals_diffusers_fused_lora(peft, tiny_checkpoint, lora_dir, tmp_path):
    prompt = "a photo of a cat <lora:style:0.7>"
    ours = generate(tiny_checkpoint, tmp_path / "a.png", prompt, "--lora-dir", lora_dir)
    expected = fused_reference_image(tiny_checkpoint, prompt, [(lora_dir / "style.safetensors", 0.7)])
    plain = generate(tiny_checkpoint, tmp_path / "plain.png", "a photo of a cat ")
    assert np.abs(ours - expected).mean() < 1 / 255
    assert np.abs(ours - plain).mean() > 4 / 255  # the LoRA does change the image


def test_two_stacked_loras_and_the_png_parameters(peft, tiny_checkpoint, lora_dir, tmp_path):
    style = lora_dir / "style.safetensors"
    prompt = "a red house <lora:detail:0.8:-0.5>"
    out = tmp_path / "two.png"
    ours = generate(tiny_checkpoint, out, prompt, "--lora-dir", lora_dir, "--lora", f"{style}:0.6")
    expected = fused_reference_image(
        tiny_checkpoint,
        prompt,
        [(lora_dir / "sub" / "detail.safetensors", {"text_encoder": 0.8, "unet": -0.5}), (style, 0.6)],
    )
    assert np.abs(ours - expected).mean() < 1 / 255

    recorded, _, params = parse_infotext(read_png_parameters(out))
    assert recorded == prompt + " <lora:style:0.6>"  # --lora is recorded as a tag, so --from-png finds it
    detail_hash = addnet_hash(lora_dir / "sub" / "detail.safetensors")
    assert params["Lora hashes"] == f"detail: {detail_hash}, style: {addnet_hash(style)}"
    assert f'Lora hashes: "detail: {detail_hash}, ' in read_png_parameters(out)  # quoted, as A1111 writes it

    again = tmp_path / "again.png"
    result = run_cli(
        "txt2img", "--from-png", out, "-m", tiny_checkpoint, "--lora-dir", lora_dir, "--dtype", "fp32",
        "-o", again, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    record = json.loads(result.stdout)
    assert [(r["name"], r["te"], r["unet"], r["hash"]) for r in record["loras"]] == [
        ("detail", 0.8, -0.5, detail_hash), ("style", 0.6, 0.6, addnet_hash(style))
    ]  # fmt: skip
    assert np.asarray(Image.open(again)).tobytes() == np.asarray(Image.open(out)).tobytes()
    assert parse_infotext(read_png_parameters(again))[0] == recorded


def test_from_png_warns_when_a_lora_found_by_name_is_another_file(tiny_checkpoint, lora_dir, tmp_path):
    out = tmp_path / "a.png"
    generate(tiny_checkpoint, out, "a cat <lora:style:0.5>", "--lora-dir", lora_dir)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(lora_dir / "sub" / "detail.safetensors", other / "style.safetensors")
    result = run_cli(
        "txt2img", "--from-png", out, "-m", tiny_checkpoint, "--lora-dir", other, "--steps", 1, "-o", tmp_path / "b.png"
    )
    assert result.exit_code == 0, result.output
    assert "style.safetensors is not the LoRA the image was made with" in result.stderr


def test_prompt_file_alternating_lora_sets_equals_separate_runs(tiny_checkpoint, lora_dir, tmp_path, monkeypatch):
    style = lora_dir / "style.safetensors"
    lines = [  # (prompt-file line, the same job as a command line)
        ("a cat <lora:style:1>", ("a cat <lora:style:1>",)),
        (f'--prompt "a cat" --lora {style}:0.5', ("a cat", "--lora", f"{style}:0.5")),
        ("a cat", ("a cat",)),
        ("a dog <lora:detail:0.7> <lora:style:0.3>", ("a dog <lora:detail:0.7> <lora:style:0.3>",)),
        ("a dog <lora:style:1>", ("a dog <lora:style:1>",)),
    ]
    common = ("-m", tiny_checkpoint, "-W", SIZE, "-H", SIZE, "--steps", STEPS, "--cfg", CFG, "--sampler", "ddim",
              "--dtype", "fp32", "--lora-dir", lora_dir)  # fmt: skip
    alone = []
    for i, (_, args) in enumerate(lines):  # a prompt file's line i uses the run's seed + i
        out = tmp_path / f"alone-{i}.png"
        result = run_cli("txt2img", *args, *common, "--seed", SEED + i, "-o", out)
        assert result.exit_code == 0, result.output
        alone.append(Image.open(out).tobytes())

    import sdcli.checkpoint

    loads = []
    monkeypatch.setattr(sdcli.checkpoint, "load_model", lambda *a, **k: loads.append(a) or load_model(*a, **k))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(line for line, _ in lines) + "\n")
    result = run_cli(
        "txt2img",
        "--prompt-file",
        prompts,
        *common,
        "--seed",
        SEED,
        "--outdir",
        tmp_path / "batch",
        "--name",
        "{index}",
    )
    assert result.exit_code == 0, result.output
    assert len(loads) == 1  # the checkpoint is read once; sets switch by re-reading their weights
    for i, expected in enumerate(alone):
        assert Image.open(tmp_path / "batch" / f"{i}.png").tobytes() == expected, f"line {i + 1}"


def test_prompt_file_lines_carry_loras_in_either_form():
    from sdcli.jobs import parse_prompt_file

    jobs, errors = parse_prompt_file('--prompt "a" --lora x.safetensors:0.5 --lora y.safetensors\n')
    assert not errors and jobs[0].values["lora"] == ["x.safetensors:0.5", "y.safetensors"]
    jobs, errors = parse_prompt_file('{"prompt": "a", "lora": ["x.safetensors"]}\n{"prompt": "b", "lora": [1]}\n')
    assert jobs[0].values["lora"] == ["x.safetensors"] and errors[0].line == 2


def test_switching_lora_sets_rereads_only_their_weights_and_equals_a_fresh_load(tiny_checkpoint, lora_dir):
    library = LoraLibrary(lora_dir, Path(tiny_checkpoint))
    first = (LoraRef("style", 0.5, 0.5, lora_dir / "style.safetensors"),)
    second = (LoraRef("detail", 1.0, -0.3, lora_dir / "sub" / "detail.safetensors"),)
    model = load_model(tiny_checkpoint, patch=library.patch(first))
    active = ActiveLoras(library, model, first)
    untouched = model.vae.decoder.conv_out.weight
    active.use(second)
    fresh = load_model(tiny_checkpoint, patch=library.patch(second))
    for ours, theirs in ((model.unet, fresh.unet), (model.text_encoder, fresh.text_encoder)):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    assert model.vae.decoder.conv_out.weight is untouched
    active.use(())
    plain = load_model(tiny_checkpoint)
    for a, b in zip(model.unet.state_dict().values(), plain.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not a weight"):
        reload_weights(model, ["model_ema.decay"], None)


def with_unknown_module(tensors: dict) -> dict:
    zeros = {"lora_down.weight": torch.zeros(2, 4), "lora_up.weight": torch.zeros(4, 2)}
    return {**tensors, **{f"lora_unet_nothing_here.{k}": v for k, v in zeros.items()}}


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("pickle", ("a cat <lora:old:1>",), "old.pt"),
        ("missing", ("a cat <lora:nowhere:1>",), "LoRA 'nowhere' not found"),
        ("sdxl", ("a cat <lora:xl:1>",), "xl.safetensors"),
        ("unknown", ("a cat <lora:extra:1>",), "--lora-ignore-unknown"),
        ("bad tag", ("a cat <lora:style:strong>",), "is not a number"),
        ("hypernet", ("a cat <hypernet:x:1>",), "not supported"),
        ("twice", ("a cat <lora:style:1> <lora:style:0.5>",), "twice"),
    ],
)
def test_bad_loras_are_one_line_errors_before_anything_is_made(
    tiny_checkpoint, lora_dir, tmp_path, setup, args, message
):
    folder = tmp_path / "loras"
    shutil.copytree(lora_dir, folder)
    (folder / "old.pt").write_bytes(b"\x80\x02}q\x00.")  # a pickle's first bytes
    style = load_file(str(lora_dir / "style.safetensors"))
    save_file({"lora_te2_" + k.removeprefix("lora_te_"): v for k, v in style.items()}, str(folder / "xl.safetensors"))
    save_file(with_unknown_module(style), str(folder / "extra.safetensors"))
    out = tmp_path / "out.png"
    result = run_cli("txt2img", *args, "-m", tiny_checkpoint, "-W", SIZE, "-H", SIZE, "--steps", 1,
                     "--lora-dir", folder, "-o", out)  # fmt: skip
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not out.exists()


def test_lora_ignore_unknown_skips_modules_that_match_nothing(tiny_checkpoint, lora_dir, tmp_path):
    style = load_file(str(lora_dir / "style.safetensors"))
    extra = tmp_path / "extra.safetensors"
    save_file(with_unknown_module(style), str(extra))
    ours = generate(tiny_checkpoint, tmp_path / "a.png", "a cat", "--lora", extra, "--lora-ignore-unknown")
    same = generate(tiny_checkpoint, tmp_path / "b.png", "a cat", "--lora", lora_dir / "style.safetensors")
    assert np.array_equal(ours, same)
