"""What the estimate knows of the machine it runs on: its device, the memory this process already
holds, the memory left, and what loading a model file maps."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from afina.models.loading import resolve_model_dir

GiB = 2**30
CUDA_CONTEXT_BYTES = GiB // 2  # the CUDA context and kernels, before any tensor


@dataclass(frozen=True)
class Machine:
    """What the estimate knows of the machine it runs on."""

    device: torch.device
    runtime: int  # bytes the process holds before the model loads
    capacity: int  # bytes a run may use: GPU memory, or available RAM plus what this process holds

    @classmethod
    def here(cls, capacity: int | None = None) -> Machine:
        """This machine now; call it before the model loads (the runtime is measured then)."""
        device = training_device()
        if device.type == "cuda":
            return cls(device, CUDA_CONTEXT_BYTES, capacity or torch.cuda.get_device_properties(device).total_memory)
        resident = resident_bytes()
        return cls(device, resident, capacity or available_ram() + resident)


def training_device() -> torch.device:
    """Where the loop trains: accelerate's choice for a single process."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resident_bytes() -> int:
    """This process's resident memory now (what peak RSS will be compared against)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak so far is the closest figure
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_ram() -> int:
    """MemAvailable from /proc/meminfo: free memory plus the page cache the kernel can drop."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def mapped_while_loading(model_name: str, dtype: torch.dtype) -> int:
    """Bytes of safetensors file mapped while the weights are copied out of it. transformers maps the
    file and, when it already holds the load dtype, uses its pages as the weights (nothing extra);
    otherwise the converted copy and the mapped shard are resident together."""
    directory = Path(resolve_model_dir(model_name))
    files = sorted(directory.glob("*.safetensors"), key=lambda f: f.stat().st_size) if directory.is_dir() else []
    if not files:
        return 0  # a hub id: nothing local to measure
    largest = files[-1]
    stored = safetensors_dtype(largest)
    wanted = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}.get(dtype)
    return 0 if stored == wanted else largest.stat().st_size


def safetensors_dtype(path: Path) -> str | None:
    """The dtype most tensors of a safetensors file are stored in (`F32`, `BF16`, ...), from its header."""
    from collections import Counter

    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        counts = Counter(handle.get_slice(name).get_dtype() for name in handle.keys())
    return counts.most_common(1)[0][0] if counts else None
