"""What the device offers, shared by models, evaluation and training: the compute precision (bf16
autocast only where the hardware runs it fast), and telling an out-of-memory error from others."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable

import torch


def cpu_has_fast_bf16() -> bool:
    # Without native bf16 instructions (AVX512-BF16 or AMX) CPU autocast emulates bf16 and runs
    # an order of magnitude slower than fp32 (measured: 115 vs 6 tokens/s on an AVX2 EPYC).
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` -> `bf16` on CUDA with bf16 or a CPU with native bf16, else `fp32`. A CUDA device on a
    machine without CUDA is a target the estimate describes (`--gpu-gib`): bf16, as on every data
    centre GPU since Ampere."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `tensor` run in: autocast's where it is on for the tensor's device, else its own."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for the resolved precision (a no-op context for fp32).

    Plain `torch.autocast` rather than accelerate's mixed-precision flag: accelerate keeps that flag
    in a process-wide singleton, so two runs with different precisions in one process would clash.
    """
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


MEMORY_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory", "cannot allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error or a failed CPU allocation: both leave the process usable."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in MEMORY_MESSAGES)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
