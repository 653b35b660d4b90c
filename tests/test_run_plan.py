"""The run plan made before any weights load: requests, seeds and paths, and failed jobs handed to callbacks."""

import pytest

import sdcli.cli_generate as cli_generate
from sdcli.distributed import Group, Launch
from sdcli.errors import UsageError
from sdcli.run_jobs import read_jobs
from sdcli.run_plan import plan_run
from tests.conftest import run_cli


def parsed_options(monkeypatch, *args) -> dict:
    """The options the CLI passes on for `args`, as it parses them."""
    seen = {}
    monkeypatch.setattr(cli_generate, "generate_command", lambda command, opts: seen.update(opts) or 0)
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    return seen


def plan(opts: dict, warnings: list, failures: list):
    jobs, source, png = read_jobs("txt2img", opts)
    return plan_run("txt2img", opts, jobs, source, png, Group(Launch()), warnings.append,
                    lambda where, message: failures.append((where, message)))  # fmt: skip


def test_a_prompt_files_jobs_get_consecutive_seeds_and_paths_and_a_bad_line_is_handed_to_fail(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    prompts = tmp_path / "prompts.jsonl"
    lines = ['{"prompt": "a cat", "n": 2}', '{"prompt": "a dog", "steps": 0}', '{"prompt": "a bird", "seed": 7}']
    prompts.write_text("\n".join(lines) + "\n")
    args = ("txt2img", "--prompt-file", prompts, "-m", tiny_checkpoint, "--seed", 100, "--outdir", tmp_path / "o")
    opts = parsed_options(monkeypatch, *args)
    warnings, failures = [], []
    result = plan(opts, warnings, failures)
    assert [p.request.prompt for p in result.planned] == ["a cat", "a cat", "a bird"]
    # The run's seed counts on over the jobs without their own: the cat's two images, then nothing else.
    assert [p.request.seed for p in result.planned] == [100, 101, 7]
    assert len({p.target for p in result.planned}) == 3
    assert all(p.target.parent == tmp_path / "o" for p in result.planned)
    assert result.run_seed == 100 and result.run_seed_used
    assert [where for where, _ in failures] == [f"{prompts} line 2"] and "steps" in failures[0][1]
    assert not (tmp_path / "o").exists()
    assert capsys.readouterr() == ("", "")  # the plan prints nothing: its callbacks report


def test_with_fail_fast_the_plan_stops_at_the_first_bad_job(tiny_checkpoint, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a dog", "steps": 0}\n{"prompt": "a cat"}\n')
    args = ("txt2img", "--prompt-file", prompts, "-m", tiny_checkpoint, "--fail-fast", "--outdir", tmp_path)
    failures = []
    assert plan(parsed_options(monkeypatch, *args), [], failures) is None
    assert len(failures) == 1


def test_a_single_command_line_jobs_error_is_raised(tiny_checkpoint, tmp_path, monkeypatch):
    opts = parsed_options(monkeypatch, "txt2img", "x", "-m", tiny_checkpoint, "--outdir", tmp_path)
    opts["steps"] = 0
    failures = []
    with pytest.raises(UsageError, match="steps"):
        plan(opts, [], failures)
    assert failures == []
