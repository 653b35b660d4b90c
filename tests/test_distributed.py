"""sdcli.distributed: ranks from the launcher's environment, the dealing of images, and whole runs under
torchrun and under Slurm's variables on the CPU (gloo, loopback only) against one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from sdcli.distributed import Group, Launch, deal, joined, launch_from_env, place
from sdcli.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
# Seven images, 64x64; --steps 2 unless a line says otherwise. Global indices: line 1 -> 0, line 2 -> 1..3,
# line 3 -> 4..5, line 4 -> 6. UNet steps (the cost dealt): [2, 3, 3, 3, 2, 2, 2].
SEVEN = "\n".join(
    json.dumps(line)
    for line in (
        {"prompt": "a red cat"},
        {"prompt": "a dog", "n": 3, "steps": 3},
        {"prompt": "a bird", "n": 2},
        {"prompt": "a tree", "seed": 77},
    )
)
# Dealing SEVEN's costs to 2 ranks by hand (costliest first, ties by index; to the least loaded rank, ties to
# rank 0): 1->r0 (3,0), 2->r1 (3,3), 3->r0 (6,3), 0->r1 (6,5), 4->r1 (6,7), 5->r0 (8,7), 6->r1 (8,9).
SEVEN_OWNERS = [1, 0, 1, 0, 1, 0, 1]
GENERATE = ("txt2img", "--dtype", "fp32", "--device", "cpu", "--steps", "2", "-W", "64", "-H", "64", "--seed", "5")
GENERATE += ("--json", "--progress", "none")


# ---------------------------------------------------------------------------------------------------------
# Ranks and dealing


def test_single_process_without_launcher_variables():
    assert launch_from_env({}) == Launch(0, 1, 0)
    assert not launch_from_env({}).distributed


def test_torchrun_variables_give_rank_world_and_local_rank():
    launch = launch_from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert launch == Launch(5, 8, 1) and launch.distributed


def test_slurm_variables_alone_give_rank_world_and_local_rank():
    assert launch_from_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}) == Launch(3, 4, 1)


def test_torchrun_variables_win_over_slurm_ones():
    # torchrun started inside a Slurm job: its own ranks are the ones that count.
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert launch_from_env(env) == Launch(1, 2, 1)


@pytest.mark.parametrize(
    "env",
    [{"RANK": "x", "WORLD_SIZE": "2"}, {"RANK": "2", "WORLD_SIZE": "2"}, {"SLURM_PROCID": "0", "SLURM_NTASKS": "0"}],
)
def test_bad_launcher_variables_are_refused(env):
    with pytest.raises(UsageError):
        launch_from_env(env)


def test_each_process_uses_the_gpu_of_its_local_rank_among_those_it_sees(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert place(torch.device("cuda"), Launch(11, 16, 3)) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU per task (--gpus-per-task=1)
    assert place(torch.device("cuda"), Launch(11, 16, 3)) == torch.device("cuda", 0)
    assert chosen == [torch.device("cuda", 3), torch.device("cuda", 0)]
    assert place(torch.device("cpu"), Launch(1, 2, 1)) == torch.device("cpu")
    assert place(torch.device("cuda"), Launch()) == torch.device("cuda")  # one process: as without a launcher


def test_deal_gives_the_hand_derived_owners():
    assert deal([2, 3, 3, 3, 2, 2, 2], 2) == SEVEN_OWNERS


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_deal_balances_steps_within_the_largest_cost(world_size):
    g = torch.Generator().manual_seed(world_size)
    costs = torch.randint(1, 50, (101,), generator=g).tolist()
    owners = deal(costs, world_size)
    assert owners == deal(costs, world_size)  # the same on every process
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(world_size)]
    # Greedy dealing, costliest first: each item goes to the least loaded rank, so no rank ends more than
    # one item's cost above another.
    assert sum(loads) == sum(costs) and max(loads) - min(loads) <= max(costs)


def test_more_ranks_than_images_leaves_ranks_without_work():
    assert deal([4, 4, 4], 8) == [0, 1, 2]


def test_a_single_process_group_answers_for_itself():
    group = Group(Launch())
    assert group.from_rank0([3, 4]) == [3, 4]
    assert group.gather([1, 2]) == [[1, 2]]


def test_several_processes_without_a_master_address_get_a_one_line_error(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(UsageError, match="MASTER_ADDR and MASTER_PORT"), joined(Launch(1, 2, 0)):
        pass


def test_a_file_that_cannot_be_written_fails_its_job_only(tmp_path, tiny_checkpoint):
    # A name longer than the file system allows: the write fails, the other jobs are still written.
    lines = [{"prompt": "one"}, {"prompt": "two", "output": "x" * 300 + ".png"}, {"prompt": "three"}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in lines))
    result = run_cli(*GENERATE, "--model", tiny_checkpoint, "--prompt-file", prompts, "--outdir", tmp_path / "out")
    assert result.exit_code == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000-5.png", "00002-7.png"]
    assert "p.jsonl line 2: cannot write" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# Whole runs in subprocesses: one process, torchrun, Slurm's variables


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("MASTER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"  # an image's bytes may depend on the thread count: the same in every run
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo talks over loopback only
    return {**env, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sdcli(*args) -> list[str]:
    return [sys.executable, "-m", "sdcli", *map(str, args)]


def _torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sdcli"] + [
        str(a) for a in args
    ]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _slurm_run(args, ntasks: int = 2) -> list[subprocess.CompletedProcess]:
    """`ntasks` processes with only Slurm's variables (as srun starts them) and a loopback rendezvous."""
    port = str(_free_port())
    processes = [
        subprocess.Popen(
            _sdcli(*args),
            env=_env(
                SLURM_PROCID=str(r),
                SLURM_NTASKS=str(ntasks),
                SLURM_LOCALID=str(r),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(ntasks)
    ]
    done = []
    for p in processes:
        stdout, stderr = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done


@pytest.fixture(scope="module")
def seven(tmp_path_factory, tiny_checkpoint):
    """The seven-image prompt file and the files one process writes from it."""
    folder = tmp_path_factory.mktemp("seven")
    prompts = folder / "seven.jsonl"
    prompts.write_text(SEVEN)
    one = folder / "one"
    args = (*GENERATE, "--model", tiny_checkpoint, "--prompt-file", prompts, "--outdir", one)
    result = subprocess.run(_sdcli(*args), env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [r["index"] for r in _records(result.stdout)] == list(range(7))
    assert {r["rank"] for r in _records(result.stdout)} == {0}
    return prompts, _files(one), args[:-1]


def test_torchrun_two_processes_write_the_same_files_as_one(seven, tmp_path):
    prompts, expected, args = seven
    result = subprocess.run(_torchrun(*args, tmp_path / "two"), env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert _files(tmp_path / "two") == expected
    records = _records(result.stdout)
    assert sorted(r["index"] for r in records) == list(range(7))
    assert [r["rank"] for r in sorted(records, key=lambda r: r["index"])] == SEVEN_OWNERS
    assert "run of 2 processes: 7 written, 0 skipped (already written), 0 failed; rank 0: 3 written" in result.stderr


def test_slurm_variables_alone_partition_the_same_way(seven, tmp_path):
    prompts, expected, args = seven
    ranks = _slurm_run((*args, tmp_path / "two"))
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr for r in ranks]
    assert _files(tmp_path / "two") == expected
    for rank, result in enumerate(ranks):
        records = _records(result.stdout)
        assert {r["rank"] for r in records} == {rank}
        assert sorted(r["index"] for r in records) == [i for i, o in enumerate(SEVEN_OWNERS) if o == rank]
    assert "run of 2 processes" in ranks[0].stderr and "run of 2 processes" not in ranks[1].stderr


def test_a_failing_line_on_one_rank_makes_every_rank_exit_1(tmp_path, tiny_checkpoint):
    # Three images for four processes: ranks 0-2 make one each, rank 3 none (it only joins the report).
    lines = [{"prompt": "one"}, {"prompt": "two", "output": "x" * 300 + ".png"}, {"prompt": "three"}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in lines))
    args = (*GENERATE, "--model", tiny_checkpoint, "--prompt-file", prompts, "--outdir", tmp_path / "o")
    ranks = _slurm_run(args, ntasks=4)
    assert [r.returncode for r in ranks] == [1, 1, 1, 1], [r.stderr for r in ranks]
    assert sum("p.jsonl line 2: cannot write" in r.stderr for r in ranks) == 1  # reported by its rank only
    assert "2 written, 0 skipped (already written), 1 failed" in ranks[0].stderr
    assert "rank 1: 0 written, 1 failed; rank 2: 1 written, 0 failed; rank 3: 0 written, 0 failed" in ranks[0].stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["00000-5.png", "00002-7.png"]


def _worker(parent: int, rank: int) -> int:
    """The pid of torchrun's worker process with this rank (Linux: read from /proc)."""
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker with rank {rank}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_killed_worker_then_skip_existing_completes_the_set(tmp_path, tiny_checkpoint):
    # Costs [2, 2, 100, 100] dealt to 2 ranks: 2->r0, 3->r1, 0->r0, 1->r1. Each rank makes its short image
    # first (its kind comes first in the plan), then its long one: rank 1 is killed outright right after its
    # short image is written, while it samples the long one; torchrun then stops rank 0 with SIGTERM.
    lines = [{"prompt": "short", "n": 2}, {"prompt": "long", "n": 2, "steps": 100}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in lines))
    out = tmp_path / "out"
    args = (*GENERATE, "--model", tiny_checkpoint, "--prompt-file", prompts, "--outdir", out, "--skip-existing")
    launcher = subprocess.Popen(_torchrun(*args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in launcher.stdout:
            if json.loads(line)["rank"] == 1:
                os.kill(_worker(launcher.pid, 1), signal.SIGKILL)
                break
        launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    first = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    # Rank 1's short image is there, its long one is not; rank 0 may or may not have finished its own. Nothing
    # else: no partial file, no temporary.
    assert "00001-6.png" in first and set(first) <= {"00000-5.png", "00001-6.png", "00002-7.png"}
    time.sleep(0.01)  # a file written again would show a later modification time

    result = subprocess.run(_torchrun(*args), env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["00000-5.png", "00001-6.png", "00002-7.png", "00003-8.png"]
    assert {name: (out / name).stat().st_ino for name in first} == {n: ino for n, (ino, _) in first.items()}
    assert {name: (out / name).stat().st_mtime_ns for name in first} == {n: m for n, (_, m) in first.items()}
    assert sorted(r["index"] for r in _records(result.stdout)) == [i for i in range(4) if f"0000{i}" not in str(first)]
    assert f"{4 - len(first)} written, {len(first)} skipped (already written), 0 failed" in result.stderr
