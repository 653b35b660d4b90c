"""The command line's options, help and completion: familiar aliases, `sdcli samplers`, truthful help."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import typer
from conftest import run_cli

from sdcli.cli import _complete_model, _complete_sampler, app
from sdcli.sampler_names import SAMPLERS

FAST = ["--steps", "2", "-W", "64", "-H", "64"]
GENERATING = ("txt2img", "img2img", "inpaint")


def one_line(text: str) -> str:
    """Help text with its line wrapping undone."""
    return " ".join(text.split())


def test_familiar_option_names_set_the_same_settings(tiny_checkpoint, tmp_path):
    result = run_cli(
        "txt2img", "x", "-m", tiny_checkpoint, *FAST, "--negative-prompt", "blurry", "--cfg-scale", 3,
        "--sampling-method", "euler_a", "-s", 9, "-b", 2, "--outdir", tmp_path, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["seed"] for r in records] == [9, 10]  # -b is the number of images, as stable-diffusion.cpp's
    assert {(r["negative"], r["cfg"], r["sampler"]) for r in records} == {("blurry", 3.0, "Euler a")}


def test_seed_minus_one_is_a_random_seed_printed_on_stderr(tiny_checkpoint, tmp_path):
    result = run_cli("txt2img", "x", "-m", tiny_checkpoint, *FAST, "--seed", -1, "-o", tmp_path / "a.png", "--json")
    assert result.exit_code == 0, result.stderr
    (printed,) = [line.split()[1] for line in result.stderr.splitlines() if line.startswith("seed: ")]
    assert json.loads(result.stdout)["seed"] == int(printed)


def test_seed_minus_one_with_from_png_draws_a_new_seed(tiny_checkpoint, tmp_path):
    original = tmp_path / "original.png"
    assert run_cli("txt2img", "x", "-m", tiny_checkpoint, *FAST, "--seed", 4, "-o", original).exit_code == 0
    again = run_cli(
        "txt2img", "--from-png", original, "-m", tiny_checkpoint, "-s", -1, "-o", tmp_path / "b.png", "--json"
    )
    assert again.exit_code == 0, again.stderr
    (printed,) = [int(line.split()[1]) for line in again.stderr.splitlines() if line.startswith("seed: ")]
    record = json.loads(again.stdout)
    assert record["seed"] == printed and record["steps"] == 2  # the PNG's settings, a new seed


@pytest.mark.parametrize("seed", [-2, -100])
def test_negative_seeds_other_than_minus_one_are_usage_errors(seed):
    result = run_cli("txt2img", "x", "--seed", seed)
    assert result.exit_code == 2 and "-1 for a random one" in result.stderr


@pytest.mark.parametrize("command", [*GENERATING, "download", "models", "samplers"])
def test_no_option_name_is_used_twice(command):
    cli = typer.main.get_command(app)
    names = [name for p in cli.commands[command].params for name in [*p.opts, *p.secondary_opts]]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


ALIASES = [("-s", "seed"), ("-b", "n"), ("--cfg-scale", "cfg"), ("--negative-prompt", "negative"),
           ("--sampling-method", "sampler")]  # fmt: skip


@pytest.mark.parametrize("alias,name", ALIASES)
def test_aliases_belong_to_the_same_option_in_every_generating_command(alias, name):
    cli = typer.main.get_command(app)
    for command in GENERATING:
        (param,) = [p for p in cli.commands[command].params if alias in p.opts]
        assert param.name == name


def test_samplers_command_lists_every_sampler_with_its_a1111_name_and_kind():
    text = run_cli("samplers")
    assert text.exit_code == 0
    rows = text.stdout.splitlines()[1:]
    assert len(rows) == len(SAMPLERS)
    for row, spec in zip(rows, SAMPLERS.values(), strict=True):
        assert row.split()[0] == spec.name and spec.display_name in row and spec.description in row
    as_json = run_cli("samplers", "--json")
    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(r["name"], r["a1111_name"], r["stochastic"]) for r in records] == [
        (s.name, s.display_name, s.stochastic) for s in SAMPLERS.values()
    ]


@pytest.mark.parametrize("command", GENERATING)
def test_sampler_list_prints_the_samplers_and_exits_0(command):
    result = run_cli(command, "--sampler", "list")
    assert result.exit_code == 0
    assert "dpmpp_2m_karras" in result.stdout and "DPM++ 2M Karras" in result.stdout


@pytest.mark.parametrize("command", GENERATING)
def test_help_points_to_the_sampler_list_and_says_where_the_size_comes_from(command):
    help_text = one_line(run_cli(command, "--help").stdout)
    assert "`sdcli samplers`" in help_text
    assert "[default: the model's size, 512 for SD 1.x; img2img/inpaint: the init image's size]" in help_text
    assert "[default: 512]" not in help_text


def test_sampler_completion_offers_our_names_with_a1111_names_as_help():
    offered = dict(_complete_sampler("dpmpp_2m"))
    assert offered["dpmpp_2m_karras"] == "DPM++ 2M Karras"
    assert set(offered) == {n for n in SAMPLERS if n.startswith("dpmpp_2m")}
    assert [name for name, _ in _complete_sampler("LI")] == ["list"]


def test_model_completion_offers_the_weights_folder_models(tmp_path):
    for name in ("sd15.safetensors", "my-finetune.safetensors", ".hidden.safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    ctx = SimpleNamespace(params={"weights_dir": tmp_path})
    assert _complete_model(ctx, "") == ["my-finetune", "sd15"]
    assert _complete_model(ctx, "my") == ["my-finetune"]


def test_model_completion_completes_safetensors_paths_and_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"")
    ctx = SimpleNamespace(params={})
    assert _complete_model(ctx, f"{tmp_path}/") == [f"{tmp_path}/model.safetensors", f"{tmp_path}/sub/"]
    assert _complete_model(ctx, f"{tmp_path}/mo") == [f"{tmp_path}/model.safetensors"]


@pytest.mark.parametrize("ctx,incomplete", [(None, "x"), (SimpleNamespace(params={}), "/no/such/folder/x")])
def test_model_completion_never_raises(ctx, incomplete, tmp_path, monkeypatch):
    monkeypatch.setenv("SDCLI_WEIGHTS_DIR", str(tmp_path / "missing"))
    assert _complete_model(ctx, incomplete) == []


def complete(words: str, weights_dir) -> list[str]:
    """What bash completion offers after `words`, from a fresh process; fails if that imported torch."""
    code = (
        "import sys, atexit; atexit.register(lambda: 'torch' in sys.modules and print('TORCH IMPORTED')); "
        "from sdcli.cli import app; app(prog_name='sdcli')"
    )
    env = {**os.environ, "_SDCLI_COMPLETE": "complete_bash", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split()) - 1), "SDCLI_WEIGHTS_DIR": str(weights_dir)}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "TORCH IMPORTED" not in done.stdout, done.stderr
    return done.stdout.split()


def test_shell_completion_completes_models_and_samplers_without_importing_torch(tmp_path):
    (tmp_path / "local-model.safetensors").write_bytes(b"")
    assert complete("sdcli txt2img --model lo", tmp_path) == ["local-model"]
    assert complete("sdcli img2img --sampler euler_a", tmp_path) == ["euler_a", "euler_a_karras", "euler_a_exponential"]
    # `--sampler list` among the words typed so far must not print the table into the completion.
    assert complete("sdcli txt2img --sampler list --model lo", tmp_path) == ["local-model"]


def test_show_completion_prints_a_script_for_the_shell():
    result = run_cli("--show-completion", "bash")
    assert result.exit_code == 0 and "_SDCLI_COMPLETE=complete_bash" in result.stdout
