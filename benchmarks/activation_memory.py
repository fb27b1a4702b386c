"""Where a training micro-batch's memory goes: saved activations, the heap around them, peak RSS.

    python benchmarks/activation_memory.py             # afina's micro-batches: one packed row each
    python benchmarks/activation_memory.py --rows 2    # two of afina's rows in one micro-batch
    python benchmarks/activation_memory.py --model path/to/tiny --micro-batches 2   # smoke run

Builds the model as `train_speed.py`'s afina and runs forward and backward over consecutive packed
rows. For the first micro-batch it sums the bytes autograd keeps for backward, by shape (parameters
excluded). After each micro-batch it reads the process's resident memory, its peak so far, and, under
glibc, the heap malloc holds: how much of it is in use and how much is free but kept (for the first
micro-batch also at the end of its forward pass, when the saved activations peak). Free memory
kept inside the heap still counts as resident, so a peak that grows after the first micro-batch while
malloc holds hundreds of MB free is fragmentation, not more live tensors.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import sys
from pathlib import Path


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_mib() -> tuple[float, float, float] | None:
    """glibc's heap: (size, in use, free), all arenas, in MiB; None without glibc's mallinfo2."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return info.arena / 2**20, info.uordblks / 2**20, info.fordblks / 2**20


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--rows", type=int, default=1, help="packed rows per micro-batch")
    parser.add_argument("--micro-batches", type=int, default=6)
    args = parser.parse_args()

    import torch

    from afina.data.packing import collate_rows, pack_examples
    from afina.training.losses import sft_loss_sum

    sys.path.insert(0, str(Path(__file__).parent))
    from train_speed import afina_in_training, afina_row_length, peak_rss_mib

    examples, tokenizer, model, bf16 = afina_in_training(args.model)
    rows = pack_examples(examples, afina_row_length(examples), share_prefixes=True)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple[int, tuple, torch.dtype]] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = (storage.nbytes(), tuple(tensor.shape), tensor.dtype)
        return tensor

    print(f"loaded: {rss_mib():,.0f} MiB resident")
    for index in range(args.micro_batches):
        batch = collate_rows(rows[index * args.rows : (index + 1) * args.rows], tokenizer.pad_token_id,
                             share_prefixes=True)
        watch = torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t) if index == 0 else contextlib.nullcontext()
        with watch, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = sft_loss_sum(model, batch)
        forward_heap = heap_mib()
        loss.backward()
        del loss
        model.zero_grad(set_to_none=True)
        heap = heap_mib()
        held = f"; heap {heap[0]:,.0f} MiB, {heap[1]:,.0f} in use, {heap[2]:,.0f} free" if heap else ""
        print(f"micro-batch {index + 1} ({batch.tokens} tokens): {rss_mib():,.0f} MiB resident, peak "
              f"{peak_rss_mib():,.0f}{held}")
        if index == 0:
            if forward_heap:
                print(f"  at the end of its forward pass: heap {forward_heap[0]:,.0f} MiB, {forward_heap[1]:,.0f} "
                      f"in use, {forward_heap[2]:,.0f} free")
            by_shape = collections.Counter()
            for size, shape, dtype in saved.values():
                by_shape[(shape, str(dtype).removeprefix("torch."))] += size
            total = sum(by_shape.values())
            print(f"  kept for backward: {total / 2**20:,.0f} MiB ({total / batch.tokens / 1024:,.1f} KiB per token); "
                  "largest by shape:")
            for (shape, dtype), size in by_shape.most_common(6):
                print(f"    {shape} {dtype}: {size / 2**20:,.1f} MiB")


if __name__ == "__main__":
    main()
