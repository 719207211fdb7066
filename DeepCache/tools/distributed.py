"""Which process this is when a tool runs under ``accelerate launch`` or ``torchrun``, and how work is split.

A thin layer over ``accelerate.PartialState`` (imported only when the process was launched by one of them, so
single-process runs need no ``accelerate``): :func:`process_info` gives the rank, the number of processes and the
device each process uses (``cuda:<local rank>``, or the CPU with the gloo backend). :func:`shard` is the one rule
that splits work: element ``k`` goes to process ``k % world_size``, a pure function of the list. Tools deal out whole
:func:`global_batches` (batch ``j`` is items ``j*B`` to ``j*B+B-1``), so which items share a batch, and with it every
pixel, does not depend on the number of processes.

On a machine without a GPU, ``accelerate launch --cpu --num_processes 2`` starts *one* process (accelerate 1.x); start
two CPU processes with::

    CUDA_VISIBLE_DEVICES="" accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no -m DeepCache generate ...
    torchrun --nproc_per_node 2 -m DeepCache generate ...

Example::

    >>> from DeepCache.tools.distributed import shard
    >>> shard(list(range(7)), rank=1, world_size=3)
    [1, 4]
    >>> shard(global_batches(5, batch_size=2), rank=0, world_size=2)
    [[0, 1], [4]]
    >>> process_info(device="cpu").world_size   # not launched: one process
    1
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence, TypeVar

import torch

__all__ = ["ProcessInfo", "barrier", "gather", "global_batches", "is_launched", "process_info", "shard"]

T = TypeVar("T")

#: Environment variables a launcher (accelerate, torchrun, MPI) sets for every process it starts.
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """This process among ``world_size``: its global ``rank``, its ``local_rank`` on its machine, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, shows progress and writes shared files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_launched() -> bool:
    """Whether a launcher started this process as one of several (``WORLD_SIZE`` > 1 or the like)."""
    return any(int(os.environ.get(name, "1") or 1) > 1 for name in _WORLD_SIZE_VARIABLES)


def process_info(device: str | None = "auto") -> ProcessInfo:
    """Rank, world size and device of this process; initialises the process group when launched.

    ``device``: ``auto`` (or ``None``) -> ``cuda:<local rank>`` when CUDA is available, else the CPU; ``cpu`` forces
    the CPU; ``cuda`` means ``cuda:<local rank>``; ``cuda:N`` is taken as given (one process only).
    """
    from .pipelines import resolve_device

    if not is_launched():
        return ProcessInfo(device=resolve_device(device))
    try:
        from accelerate import PartialState
    except ImportError:
        raise ValueError("several processes were launched but accelerate is not installed; "
                         "`pip install DeepCache[distributed]`.") from None
    # accelerate picks gloo on the CPU only when asked to (cpu=True); otherwise it finds no backend and reports
    # one process.
    use_cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=use_cpu)
    if use_cpu:
        chosen = torch.device("cpu")
    elif device in (None, "auto", "cuda"):
        chosen = torch.device("cuda", state.local_process_index)
    else:
        raise ValueError(f"--device {device} with {state.num_processes} processes: each process uses its own GPU; "
                         "pass --device auto (cuda:<local rank>) or cpu.")
    return ProcessInfo(state.process_index, state.num_processes, state.local_process_index, chosen)


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The items process ``rank`` of ``world_size`` handles: every ``world_size``-th, starting at ``rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}.")
    return list(items[rank::world_size])


def global_batches(num_items: int, batch_size: int) -> list[list[int]]:
    """Item indices in batches of ``batch_size`` over the whole list (the last may be shorter).

    >>> global_batches(5, 2)
    [[0, 1], [2, 3], [4]]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    return [list(range(first, min(first + batch_size, num_items))) for first in range(0, num_items, batch_size)]


def barrier(info: ProcessInfo) -> None:
    """Wait until every process gets here (nothing to wait for with one process)."""
    if info.distributed:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def gather(info: ProcessInfo, obj: Any) -> list[Any] | None:
    """Every process's ``obj`` in rank order on the main process, ``None`` on the others (one process: ``[obj]``)."""
    if not info.distributed:
        return [obj]
    gathered: list[Any] | None = [None] * info.world_size if info.is_main else None
    torch.distributed.gather_object(obj, gathered, dst=0)
    return gathered
