"""Running one command as several processes (torchrun, Slurm's srun): who this process is, which images are
its share, and the two moments the processes must agree (the start, the final report).

The launcher starts the processes and restarts them; sdcli only reads where it stands from the environment
(`RANK`, `WORLD_SIZE`, `LOCAL_RANK` from torchrun, else `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`).
Every process reads the whole prompt file and plans every image the same way; `torch.distributed` (NCCL on
GPUs, gloo on CPUs) carries only a few integers from rank 0 at the start and the counts at the end. A single
process never initialises it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from sdcli.errors import SdcliError, UsageError

# Ranks finish their shares at different times and then wait for the others in the final report; a rank
# that dies is ended by the launcher (torchrun, srun --kill-on-bad-exit), not by this timeout.
TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Launch:
    """This process's place in the run: its rank among `world_size` processes, and its rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _number(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UsageError(f"the environment variable {name} must be a whole number, got {value!r}") from None


def launch_from_env(environ: Mapping[str, str] = os.environ) -> Launch:
    """Where this process stands: torchrun's variables, else Slurm's, else a single process."""
    if "WORLD_SIZE" in environ:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_NTASKS" in environ:
        names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    else:
        return Launch()
    rank, world_size, local_rank = (_number(environ, name, 0) for name in names)
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise UsageError(f"{names[0]}={rank}, {names[1]}={world_size}: a rank must be at least 0 and below the size")
    return Launch(rank, world_size, local_rank)


def place(device: torch.device, launch: Launch) -> torch.device:
    """The device of this process: its own GPU, `cuda:LOCAL_RANK`, when several processes share a node.

    Counted among the GPUs the process sees: when the launcher gives each process one GPU (Slurm's
    --gpus-per-task=1 sets CUDA_VISIBLE_DEVICES per task) that GPU is cuda:0.
    """
    if device.type == "cuda" and launch.distributed:
        device = torch.device("cuda", launch.local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    return device


def deal(costs: Sequence[int], world_size: int) -> list[int]:
    """The rank that makes each item, so each rank's total cost (UNet steps) is nearly equal.

    Items are dealt costliest first (ties: lower index first), each to the rank with the least cost so far
    (ties: the lower rank): the same costs always give the same owners, on every process.
    """
    owners = [0] * len(costs)
    loads = [0] * world_size
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


class Group:
    """The processes of one run, or this one alone: what rank 0 decides, and what every rank counted."""

    def __init__(self, launch: Launch, device: torch.device | None = None) -> None:
        self.launch = launch
        self.device = device if device is not None and device.type == "cuda" else torch.device("cpu")

    def from_rank0(self, values: Sequence[int]) -> list[int]:
        """Rank 0's `values` (same length on every rank), on every rank."""
        if not self.launch.distributed:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        with self._lost_contact():
            torch.distributed.broadcast(tensor, src=0)
        return tensor.tolist()

    def gather(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's `values` (same length on every rank), by rank, on every rank."""
        if not self.launch.distributed:
            return [list(values)]
        mine = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.launch.world_size)]
        with self._lost_contact():
            torch.distributed.all_gather(every, mine)
        return [t.tolist() for t in every]

    @contextmanager
    def _lost_contact(self) -> Iterator[None]:
        try:
            yield
        except RuntimeError as e:  # a process ended early (killed, or failed before the report)
            reason = " ".join(str(e).split())[:200]
            raise SdcliError(f"process {self.launch.rank} lost contact with the others of the run: {reason}") from None


@contextmanager
def joined(launch: Launch, device: torch.device | None = None) -> Iterator[Group]:
    """The run's process group, set up on entry (only with several processes) and taken down on exit.

    MASTER_ADDR and MASTER_PORT say where rank 0 listens: torchrun sets them, under Slurm the job script does.
    Raises SdcliError when the processes cannot meet.
    """
    group = Group(launch, device)
    if not launch.distributed:
        yield group
        return
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise UsageError(
            f"process {launch.rank} of {launch.world_size} needs {' and '.join(missing)}: set MASTER_ADDR to the "
            "first node's address and MASTER_PORT to a free port (torchrun sets both), or run one process"
        )
    backend = "nccl" if group.device.type == "cuda" else "gloo"
    try:
        torch.distributed.init_process_group(
            backend, init_method="env://", rank=launch.rank, world_size=launch.world_size, timeout=TIMEOUT
        )
    except (RuntimeError, ValueError, OSError) as e:
        address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        reason = " ".join(str(e).split())
        raise SdcliError(f"process {launch.rank} could not join the others at {address}: {reason}") from None
    try:
        yield group
    finally:
        torch.distributed.destroy_process_group()
