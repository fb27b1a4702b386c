"""Keeping afina's share of a busy CPU: fewer threads while other processes use some of the cores.

    with share_cpu(model):                   # training or generating with `model` in this block
        ...

PyTorch's OpenMP threads spin for a while when they wait for each other, which makes small kernels
fast on an idle machine (afina's training step and generation lose up to 1.9x on a 2-core machine
when they sleep instead; README, Performance). Beside another busy process the same spinning is
ruinous: a parallel region waits for its slowest thread, and a thread the kernel has paused for the
other process holds up the rest while they spin through the cores that process needs (a step took
17x its time alone beside one `yes` on 2 cores). So afina keeps OpenMP's spinning and instead runs
as many threads as there are cores the other processes leave free: it reads how busy this
process's cores were (`/proc/stat`) less what this process used, about once a second, and after two
readings in a row that agree, sets `torch.set_num_threads` to the cores left (at least one, at most
the threads it started with). OpenMP's thread count belongs to the thread that sets it, so the check
runs where the work is issued: before each decoder layer in training, between decode steps in
evaluation.

A user who sets OMP_NUM_THREADS (or any of OpenMP's wait settings) keeps exactly that; several
processes training together (torchrun) keep their threads, as their steps must stay in lockstep.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from afina.training.allocator import WAIT_SETTINGS

PERIOD_SECONDS = 1.0  # how often the cores' load is read
USER_SETTINGS = ("OMP_NUM_THREADS", *WAIT_SETTINGS)  # the user's own thread or wait settings: left alone


def threads_to_use(threads: int, others: float) -> int:
    """Threads for a process that starts with `threads` (one per core) when other processes keep
    `others` cores busy: one per core they leave, counting a core as taken from half its time on."""
    return max(1, min(threads, threads - int(others + 0.5)))


def busy_seconds(cpus: set[int], stat: str) -> float:
    """CPU seconds the listed cores spent on any work (all but idle and I/O wait), from /proc/stat's text."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for line in stat.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(values) - values[3] - values[4]
    return total / ticks


class CpuShare:
    """Threads set from the other processes' load on this process's cores (see the module's text)."""

    def __init__(self, cpus: set[int], read_stat=lambda: Path("/proc/stat").read_text(), clock=time.monotonic,
                 own_seconds=time.process_time):
        self.cpus, self.read_stat, self.clock, self.own_seconds = cpus, read_stat, clock, own_seconds
        self.threads = torch.get_num_threads()
        self.started_with = self.threads
        self.candidate: int | None = None
        self.last = self.reading()

    @classmethod
    def for_this_process(cls) -> "CpuShare | None":
        """A share for this process's cores; None where the user set the threads or OpenMP's wait,
        without /proc/stat, or with one thread."""
        if any(key in os.environ for key in USER_SETTINGS) or not Path("/proc/stat").exists():
            return None
        if torch.get_num_threads() < 2:
            return None
        return cls(os.sched_getaffinity(0))

    def reading(self) -> tuple[float, float, float]:
        return self.clock(), busy_seconds(self.cpus, self.read_stat()), self.own_seconds()

    def check(self) -> None:
        """Read the load if a period has passed; change the threads once two readings agree."""
        now = self.clock()
        if now - self.last[0] < PERIOD_SECONDS:
            return
        reading = self.reading()
        wall, busy, own = (b - a for a, b in zip(self.last, reading))
        self.last = reading
        others = max(0.0, busy - own) / wall if wall > 0 else 0.0
        wanted = threads_to_use(self.started_with, others)
        if wanted != self.threads and wanted == self.candidate:
            self.threads = wanted
            torch.set_num_threads(wanted)
        self.candidate = wanted

    def hook(self, model: torch.nn.Module) -> list:
        """Check before the forward of every module held in a ModuleList (a transformer's layers);
        returns the hooks' handles."""
        layers = [m for lst in model.modules() if isinstance(lst, torch.nn.ModuleList) for m in lst]
        return [layer.register_forward_pre_hook(lambda *_: self.check()) for layer in layers]

    def restore(self) -> None:
        """Back to the threads this share started with."""
        if self.threads != self.started_with:
            torch.set_num_threads(self.started_with)
            self.threads = self.started_with


@contextmanager
def share_cpu(model: torch.nn.Module, enabled: bool = True):
    """Within the block, `model`'s layers check the machine's load (`CpuShare.hook`) where this process
    may share its cores (`CpuShare.for_this_process`); afterwards, the threads it started with."""
    share = CpuShare.for_this_process() if enabled else None
    hooks = share.hook(model) if share else []
    try:
        yield share
    finally:
        for handle in hooks:
            handle.remove()
        if share:
            share.restore()
