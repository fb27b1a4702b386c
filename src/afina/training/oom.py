"""Out-of-memory recovery: pick the next smaller setting after an allocation failure.

A CUDA out-of-memory error and a failed CPU allocation both surface as exceptions that leave the
process usable (`afina.devices.is_out_of_memory`), so a step can be retried with a smaller
micro-batch instead of losing the run.

Under several processes every rank must give the step up together: a rank that redid it alone would
wait forever in a collective the others never join. After each forward and each backward the ranks
agree (`agreed_out_of_memory`, one all-reduce of a number) on whether any ran out of memory, and all
then shrink the same way. What this cannot rescue is an allocation failing inside one of DDP's or
FSDP's own collectives (a layer's weight gather, a gradient reduction): the other ranks are already
waiting in it, and the run ends at the process group's timeout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class MicroBatching:
    """How an optimizer step's rows are cut into micro-batches. The rows per step never change,
    so the effective batch (and the gradient) is the same whatever the micro-batch size."""

    rows_per_micro_batch: int
    gradient_checkpointing: bool

    def smaller(self) -> "MicroBatching | None":
        """Half the micro-batch (so twice the accumulation) with checkpointing on; None once
        there is nothing left to give up (one row per micro-batch, checkpointing already on)."""
        if self.rows_per_micro_batch == 1 and self.gradient_checkpointing:
            return None
        return MicroBatching(max(1, self.rows_per_micro_batch // 2), True)


def checkpointing_enabled(model) -> bool:
    """Whether the method turned gradient checkpointing on (`method.gradient_checkpointing`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_activation_checkpointing", False) or getattr(base, "is_gradient_checkpointing", False))


def set_gradient_checkpointing(model, enabled: bool) -> None:
    """Recompute layer activations in backward instead of keeping them (transformers models)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "gradient_checkpointing_enable"):
        return
    if enabled:
        # non-reentrant checkpointing works with frozen inputs (LoRA), so no input-grad hook is needed
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing_enabled(model):
        base.gradient_checkpointing_disable()


class RankOutOfMemory(RuntimeError):
    """The out-of-memory error every rank acts on when one of them ran out of memory."""

    def __init__(self, rank: int):
        super().__init__(f"rank {rank} ran out of memory")
        self.rank = rank


def agreed_out_of_memory(error: BaseException | None, ranks) -> BaseException | None:
    """`error` (this rank's out of memory, or None) as every rank must act on it: under several
    processes (`afina.training.distributed.Ranks`), a `RankOutOfMemory` on every rank when any ran
    out of memory (the lowest such rank named), None on every rank otherwise."""
    if not ranks.distributed:
        return error
    lowest = torch.tensor([ranks.rank if error is not None else ranks.world])
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    rank = int(lowest.item())
    if rank == ranks.world:
        return None
    agreed = RankOutOfMemory(rank)
    agreed.__cause__ = error
    return agreed
