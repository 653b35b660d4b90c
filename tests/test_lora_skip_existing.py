"""A run that resumes with --skip-existing loads the model with the LoRA set of the first image it makes."""

from conftest import run_cli
from test_lora_cli import lora_dir  # noqa: F401 (a fixture)

import sdcli.checkpoint


def test_the_model_loads_with_the_set_of_the_first_image_left_to_make(tiny_checkpoint, lora_dir, tmp_path, monkeypatch):  # noqa: F811
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text("a cat <lora:style:1>\na dog\n")
    args = ("txt2img", "--prompt-file", prompts, "-m", tiny_checkpoint, "-W", 64, "-H", 64, "--steps", 2,
            "--seed", 5, "--outdir", out, "--lora-dir", lora_dir, "--skip-existing")  # fmt: skip
    assert run_cli(*args).exit_code == 0
    (dog,) = [path for path in out.iterdir() if path.name.startswith("00001-")]
    dog.unlink()
    reloads = []
    real_reload = sdcli.checkpoint.reload_weights
    monkeypatch.setattr(sdcli.checkpoint, "reload_weights", lambda *a: reloads.append(a) or real_reload(*a))
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "0 failed" in result.stderr and dog.is_file()
    assert reloads == []  # the plain weights were read once, not the LoRA's first and then the plain ones again
