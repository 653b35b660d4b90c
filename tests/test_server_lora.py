"""`sdcli serve` with LoRAs and textual-inversion embeddings: prompts' `<lora:NAME:W>` tags and embedding words
give the very bytes the CLI writes for the same prompt, LoRA sets switch across requests (and models) as fresh
runs, bad tags are 422s, and A1111's /loras and /embeddings list the folders.

The LoRAs are random kohya-ss files named from the reference pipeline's modules (see test_lora); the embeddings
random vectors (see test_embeddings).
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from safetensors.torch import load_file, save_file
from test_embeddings import vectors, write
from test_lora import reference_pipe, write_kohya_lora
from test_server import CLI_SMALL, SMALL, b64, cli_images, images_of, make_service, running

import sdcli.server
from sdcli.errors import SdcliError
from sdcli.lora_sets import lora_hash
from sdcli.weights import sha256_file


@pytest.fixture(scope="module")
def folders(tiny_checkpoint, tmp_path_factory):
    """The weights folder (with a copy of the checkpoint, "other"), its loras/ and embeddings/ folders.

    loras/: style (with kohya metadata), sub/detail, and xl (an SDXL LoRA: it does not fit).
    embeddings/: sparkle (2 vectors of the tiny text encoder's width) and wide (another width).
    """
    weights = tmp_path_factory.mktemp("weights")
    shutil.copy(tiny_checkpoint, weights / "other.safetensors")
    loras, embeddings = weights / "loras", weights / "embeddings"
    (loras / "sub").mkdir(parents=True)
    embeddings.mkdir()
    pipe = reference_pipe(tiny_checkpoint)
    write_kohya_lora(pipe, loras / "sub" / "detail.safetensors", seed=22, rank=2, alpha=lambda i: 1.0)
    write_kohya_lora(pipe, weights / "style.safetensors", seed=21, rank=4)
    style = load_file(str(weights / "style.safetensors"))
    save_file(style, str(loras / "style.safetensors"), metadata={"ss_output_name": "my style"})
    (weights / "style.safetensors").unlink()
    save_file({"lora_te2_" + k.removeprefix("lora_te_"): v for k, v in style.items()}, str(loras / "xl.safetensors"))
    write(embeddings / "sparkle.safetensors", {"emb_params": vectors(2, seed=5) * 5})
    write(embeddings / "wide.safetensors", {"emb_params": vectors(1, width=64)})
    return weights


@pytest.fixture(scope="module")
def served(tiny_checkpoint, folders):
    """(client, service) of a server started with the default folders of `folders`."""
    service = make_service(tiny_checkpoint, folders)
    with running(service) as client:
        yield client, service


def txt2img(client, prompt: str, **extra):
    return client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "seed": 5, "sampler_name": "Euler", **SMALL,
                                                   **extra})  # fmt: skip


def cli(checkpoint, folders, prompt: str, tmp_path) -> bytes:
    (image,) = cli_images("txt2img", prompt, "--seed", 5, "--sampler", "Euler", "--model", checkpoint,
                          "--lora-dir", folders / "loras", "--embeddings-dir", folders / "embeddings",
                          "--outdir", tmp_path, *CLI_SMALL)  # fmt: skip
    return image


@pytest.mark.parametrize(
    ("prompt", "recorded"),
    [
        ("a cat <lora:detail:0.8:-0.5>", 'Lora hashes: "detail: {lora}"'),
        ("a sparkle cat", 'TI hashes: "sparkle: {ti}"'),
    ],
    ids=["lora", "embedding"],
)
def test_lora_tags_and_embeddings_give_the_cli_bytes_and_hashes(served, tiny_checkpoint, folders, tmp_path, prompt,
                                                                 recorded):  # fmt: skip
    client, _ = served
    response = txt2img(client, prompt)
    assert images_of(response) == [cli(tiny_checkpoint, folders, prompt, tmp_path)]
    plain = images_of(txt2img(client, "a cat"))
    assert plain != images_of(response)  # the LoRA, or the embedding, does change the image
    hashes = {"lora": lora_hash(folders / "loras" / "sub" / "detail.safetensors"),
              "ti": sha256_file(folders / "embeddings" / "sparkle.safetensors")[:12]}  # fmt: skip
    assert recorded.format(**hashes) in json.loads(response.json()["info"])["infotexts"][0]


def test_img2img_with_a_lora_tag_gives_the_cli_bytes(served, tiny_checkpoint, folders, tmp_path):
    client, _ = served
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(8).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(init)
    prompt = "a harbour <lora:style:0.6> sparkle"
    payload = {"prompt": prompt, "seed": 4, **SMALL, "init_images": [b64(init)], "denoising_strength": 0.6}
    cli = cli_images("img2img", prompt, "--seed", 4, "--init", init, "--strength", 0.6, "--model", tiny_checkpoint,
                     "--lora-dir", folders / "loras", "--embeddings-dir", folders / "embeddings",
                     "--outdir", tmp_path / "out", *CLI_SMALL)  # fmt: skip
    assert images_of(client.post("/sdapi/v1/img2img", json=payload)) == cli


def test_lora_sets_switch_across_requests_and_models_as_fresh_runs(served, tiny_checkpoint, folders, tmp_path):
    client, service = served
    style, both, plain = "a cat <lora:style:0.7>", "a cat <lora:detail:1:-0.3> <lora:style:0.5>", "a cat"
    expected = {p: cli(tiny_checkpoint, folders, p, tmp_path / str(i)) for i, p in enumerate((style, both, plain))}
    model = service.models.model
    for prompt in (style, both, plain, style, both):
        assert images_of(txt2img(client, prompt)) == [expected[prompt]], prompt
    assert service.models.model is model  # switched in place, never reloaded
    other = {"override_settings": {"sd_model_checkpoint": "other"}}
    (image,) = images_of(txt2img(client, style, **other))
    (fresh,) = cli_images("txt2img", style, "--seed", 5, "--sampler", "Euler", "--model", folders / "other.safetensors",
                          "--lora-dir", folders / "loras", "--outdir", tmp_path / "other", *CLI_SMALL)  # fmt: skip
    assert image == fresh and service.models.model.path.name == "other.safetensors"
    assert images_of(txt2img(client, plain)) == [expected[plain]]  # back to the startup model, without LoRAs


def test_disable_extra_networks_removes_the_tags_without_applying_them(served):
    client, _ = served
    (disabled,) = images_of(txt2img(client, "a cat <lora:style:0.7>", disable_extra_networks=True))
    (plain,) = images_of(txt2img(client, "a cat"))
    assert np.array_equal(pixels(disabled), pixels(plain))
    assert "Lora hashes" not in Image.open(io.BytesIO(disabled)).info["parameters"]
    assert txt2img(client, "a cat <lora:nowhere:1>", disable_extra_networks=True).status_code == 200


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a cat <lora:style:strong>", "is not a number"),
        ("a cat <lora:nowhere:1>", "LoRA 'nowhere' not found"),
        ("a cat <lora:../style:1>", "is not a file name"),
        ("a cat <lora:style:1> <lora:style:0.5>", "twice"),
        ("a cat <lora:xl:1>", "xl.safetensors"),
        ("a cat <hypernet:x:1>", "not supported"),
        ("a wide cat", "wide.safetensors"),
    ],
)
def test_bad_loras_and_embeddings_are_422_with_one_line_and_leave_the_weights_plain(
    served, tiny_checkpoint, prompt, message
):
    client, service = served
    before = images_of(txt2img(client, "a cat"))
    response = txt2img(client, prompt)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert message in detail and "\n" not in detail
    assert service.models.active.loras == ()
    assert images_of(txt2img(client, "a cat")) == before


def test_loras_and_embeddings_are_listed_as_a1111_does(served, folders):
    client, _ = served
    loras = client.get("/sdapi/v1/loras").json()
    assert [lora["name"] for lora in loras] == ["detail", "style", "xl"]
    style = loras[1]
    assert style == {"name": "style", "alias": "style", "path": "style.safetensors",
                     "metadata": {"ss_output_name": "my style"}}  # fmt: skip
    assert loras[0]["path"] == "sub/detail.safetensors" and loras[0]["metadata"] == {}
    embeddings = client.get("/sdapi/v1/embeddings").json()
    assert embeddings["loaded"] == {
        "sparkle": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 128, "vectors": 2}
    }
    assert list(embeddings["skipped"]) == ["wide"]
    assert client.post("/sdapi/v1/refresh-loras").status_code == 200
    assert client.post("/sdapi/v1/refresh-embeddings").status_code == 200


def test_the_folders_can_be_given(tiny_checkpoint, folders, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    service = make_service(tiny_checkpoint, folders, lora_dir=empty, embeddings_dir=folders / "loras" / "sub")
    with running(service) as client:
        assert client.get("/sdapi/v1/loras").json() == []
        assert txt2img(client, "a cat <lora:style:1>").status_code == 422
        assert list(client.get("/sdapi/v1/embeddings").json()["skipped"]) == ["detail"]


def test_serve_passes_its_folders_or_the_weights_folder_defaults(tiny_checkpoint, folders, tmp_path, monkeypatch):
    seen = []

    class Stop:  # records the settings, then stops before anything loads
        def __init__(self, settings) -> None:
            seen.append(settings)

        def load(self) -> None:
            raise SdcliError("stopped")

    monkeypatch.setattr(sdcli.server, "Service", Stop)
    common = ("serve", "--port", 0, "--model", tiny_checkpoint, "--weights-dir", folders)
    for extra in ((), ("--lora-dir", tmp_path / "l", "--embeddings-dir", tmp_path / "e")):
        result = run_cli(*common, *extra)
        assert result.exit_code == 1 and "error: stopped" in result.output
    assert (seen[0].lora_dir, seen[0].embeddings_dir) == (folders / "loras", folders / "embeddings")
    assert (seen[1].lora_dir, seen[1].embeddings_dir) == (tmp_path / "l", tmp_path / "e")
