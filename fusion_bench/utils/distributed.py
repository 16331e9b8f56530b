"""Data parallelism through the program's ``lightning.Fabric``: shards, exact sums, rank 0.

With ``fabric.strategy=ddp fabric.devices=N`` the program runs once per device (Fabric starts
the processes, or SLURM/torchrun does). Evaluation and test-time methods then split their data:

* :class:`ShardSampler` gives each rank every ``world_size``-th index, **without** the padding
  duplicates of ``torch.utils.data.DistributedSampler``; :func:`sum_across_ranks` adds the
  ranks' integer counts and float64 sums, so metrics equal one device's exactly.
* :func:`shard_batch` splits one per-step batch (drawn identically on every rank from the same
  seeded stream) and returns the weight for the local *mean* loss such that DDP's gradient
  average (``fabric.setup`` + ``fabric.backward``) equals the gradient of the full batch's mean.

Without a Fabric, or on one device, every function is the identity.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Sequence

import torch
from torch.utils.data import Sampler

if TYPE_CHECKING:
    import lightning

__all__ = [
    "ShardSampler",
    "RankShard",
    "world_size",
    "global_rank",
    "is_global_zero",
    "started_as_rank_zero",
    "shard_batch",
    "sum_across_ranks",
    "end_process_group",
    "launch_environment",
    "LAUNCH_VARIABLES",
]

LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "RANK", "WORLD_SIZE")


def world_size(fabric: "lightning.Fabric | None") -> int:
    """The number of processes (1 without a Fabric)."""
    return 1 if fabric is None else int(fabric.world_size)


def global_rank(fabric: "lightning.Fabric | None") -> int:
    """This process's rank (0 without a Fabric)."""
    return 0 if fabric is None else int(fabric.global_rank)


def started_as_rank_zero() -> bool:
    """Whether this process is rank 0 as far as its environment says, before any Fabric exists
    (ranks started by Lightning, torchrun or SLURM carry ``LOCAL_RANK``/``RANK``/``SLURM_PROCID``)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def is_global_zero(fabric: "lightning.Fabric | None") -> bool:
    """Whether this process prints and writes the outputs (rank 0)."""
    return global_rank(fabric) == 0


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of ``range(num_samples)``: every sample on exactly one rank.

    Args:
        num_samples: the dataset's length (or the first ``num_samples`` rows to use).
        rank: this process's rank.
        world_size: the number of processes.
    """

    def __init__(self, num_samples: int, *, rank: int, world_size: int) -> None:
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class RankShard(NamedTuple):
    """This rank's part of a batch and the weight of its mean loss (see :func:`shard_batch`)."""

    batch: Any
    weight: float


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_size(next(iter(batch.values())))
    return _batch_size(batch[0])


def _take(batch: Any, index: slice) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[index]
    if isinstance(batch, dict):
        return {k: _take(v, index) for k, v in batch.items()}
    return type(batch)(_take(v, index) for v in batch)


def shard_batch(batch: Any, fabric: "lightning.Fabric | None") -> RankShard:
    """This rank's contiguous share of a per-step batch, and the weight of its mean loss.

    Rank ``r`` of ``W`` takes rows ``[r·B//W, (r+1)·B//W)`` of every tensor in ``batch`` (a tensor,
    tuple/list or dict of tensors with the same first dimension ``B``). Multiply the *mean* loss
    over the local rows by ``weight = W·b_r/B``: DDP averages gradients over ranks, so the result is
    the gradient of the mean over all ``B`` rows, as on one device. One device: ``(batch, 1.0)``.

    Args:
        batch: the step's batch, identical on every rank.
        fabric: the program's Fabric (None: one process).

    Returns:
        ``RankShard(batch, weight)``.
    """
    size, rank = world_size(fabric), global_rank(fabric)
    if size == 1:
        return RankShard(batch, 1.0)
    total = _batch_size(batch)
    start, stop = rank * total // size, (rank + 1) * total // size
    return RankShard(_take(batch, slice(start, stop)), size * (stop - start) / total)


def sum_across_ranks(fabric: "lightning.Fabric | None", values: Sequence[float]) -> list[float]:
    """Each value summed over all ranks (float64; integer counts stay exact up to 2**53).

    Args:
        fabric: the program's Fabric (None: one process, values returned as they are).
        values: this rank's partial sums.

    Returns:
        the global sums, in the same order.
    """
    if world_size(fabric) == 1:
        return [float(v) for v in values]
    local = torch.tensor([float(v) for v in values], dtype=torch.float64, device=fabric.device)
    return fabric.all_reduce(local, reduce_op="sum").tolist()


def launch_environment() -> dict[str, str | None]:
    """The variables Lightning sets when it starts processes, as they are now (see :func:`end_process_group`)."""
    return {k: os.environ.get(k) for k in LAUNCH_VARIABLES}


def end_process_group(fabric: "lightning.Fabric | None", environment: dict[str, str | None]) -> None:
    """Close the process group and restore the launch variables after a multi-process run.

    In a multirun the next job runs in the same process: without this it would find ``LOCAL_RANK``
    set, take its processes for started by someone else, and wait for ranks that never come.

    Args:
        fabric: the run's Fabric.
        environment: :func:`launch_environment` from before ``fabric.launch()``.
    """
    if world_size(fabric) > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        fabric.barrier()
        torch.distributed.destroy_process_group()
    for key, value in environment.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
