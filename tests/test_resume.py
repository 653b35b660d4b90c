"""sdcli.resume and --skip-existing: a re-run makes only the images that are missing."""

from __future__ import annotations

import json

from conftest import run_cli
from PIL import Image

from sdcli.images import save_png
from sdcli.resume import already_written

GENERATE = ("txt2img", "--dtype", "fp32", "--device", "cpu", "--steps", "2", "-W", "64", "-H", "64")
GENERATE += ("--progress", "none")


def _png(path, parameters):
    return save_png(Image.new("RGB", (8, 8)), path, parameters)


def test_an_image_with_the_same_parameters_is_already_written(tmp_path):
    assert already_written(
        _png(tmp_path / "a.png", "a cat\nSteps: 2, Seed: 1, Size: 8x8"), "a cat\nSteps: 2, Seed: 1, Size: 8x8"
    )


def test_other_parameters_a_missing_file_or_not_an_image_are_not(tmp_path):
    parameters = "a cat\nSteps: 2, Seed: 1, Size: 8x8"
    assert not already_written(_png(tmp_path / "a.png", "a cat\nSteps: 2, Seed: 2, Size: 8x8"), parameters)
    assert not already_written(_png(tmp_path / "b.png", None), parameters)
    assert not already_written(tmp_path / "missing.png", parameters)
    (tmp_path / "c.png").write_text("not an image")
    assert not already_written(tmp_path / "c.png", parameters)


def _stamps(folder):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}


def test_a_rerun_skips_what_exists_and_makes_only_what_is_missing(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    args = (*GENERATE, "--model", tiny_checkpoint, "--seed", "3", "--n", "3", "--outdir", out, "--json")
    first = run_cli(*args, "a lighthouse", "--skip-existing")
    assert first.exit_code == 0, first.stderr
    made = _stamps(out)
    assert sorted(made) == ["00000-3.png", "00001-4.png", "00002-5.png"]

    again = run_cli(*args, "a lighthouse", "--skip-existing")
    assert again.exit_code == 0, again.stderr
    assert again.stdout == "" and "0 written, 3 skipped (already written), 0 failed" in again.stderr
    assert _stamps(out) == made  # not one file touched

    (out / "00001-4.png").unlink()
    resumed = run_cli(*args, "a lighthouse", "--skip-existing")
    assert resumed.exit_code == 0, resumed.stderr
    records = [json.loads(line) for line in resumed.stdout.splitlines()]
    assert [(r["index"], r["seed"]) for r in records] == [(1, 4)]
    assert _stamps(out).keys() == made.keys()
    assert (out / "00001-4.png").read_bytes() == made["00001-4.png"][2]  # the same image as the first time


def test_a_file_of_another_prompt_under_the_same_name_is_not_skipped(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    args = (*GENERATE, "--model", tiny_checkpoint, "--seed", "3", "--outdir", out, "--skip-existing")
    assert run_cli(*args, "a lighthouse").exit_code == 0
    result = run_cli(*args, "a harbour")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["00000-3-1.png", "00000-3.png"]  # never overwritten


def test_names_start_at_zero_with_skip_existing(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00041-1.png").write_bytes(b"")  # without --skip-existing the next name would be 00042-...
    result = run_cli(*GENERATE, "--model", tiny_checkpoint, "--seed", "3", "--outdir", out, "--skip-existing", "x")
    assert result.exit_code == 0, result.stderr
    assert (out / "00000-3.png").is_file()


def test_skip_existing_needs_a_seed(tmp_path, tiny_checkpoint):
    result = run_cli(*GENERATE, "--model", tiny_checkpoint, "--outdir", tmp_path, "--skip-existing", "a lighthouse")
    assert result.exit_code == 2
    assert "--skip-existing" in result.stderr and "--seed" in result.stderr


def test_a_run_with_embeddings_is_skipped_too(tmp_path, tiny_checkpoint):
    # The images carry `TI hashes`: the parameters compared must too, or every such image is made again.
    import torch
    from safetensors.torch import save_file

    embeddings, out = tmp_path / "emb", tmp_path / "out"
    embeddings.mkdir()
    save_file(
        {"emb_params": torch.randn(2, 128, generator=torch.Generator().manual_seed(0))}, embeddings / "sty.safetensors"
    )
    args = (*GENERATE, "--model", tiny_checkpoint, "--seed", "3", "--outdir", out, "--embeddings-dir", embeddings)
    first = run_cli(*args, "a lighthouse in sty", "--skip-existing")
    assert first.exit_code == 0, first.stderr
    made = _stamps(out)
    again = run_cli(*args, "a lighthouse in sty", "--skip-existing")
    assert again.exit_code == 0, again.stderr
    assert "0 written, 1 skipped (already written), 0 failed" in again.stderr
    assert _stamps(out) == made
