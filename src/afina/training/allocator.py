"""The memory allocator afina's processes run under (tcmalloc where the system has it), and how their
OpenMP threads wait.

A training micro-batch allocates and frees thousands of tensors, of sizes that change with every
packed row. glibc's malloc serves them from a heap it seldom hands back, in fragments around the
long-lived kernels oneDNN caches, and spends time sorting its free lists. tcmalloc keeps freed
blocks in lists by size and gives the most recently freed (still in cache) back first. On the
default model afina trains about 1.1x faster under it (1.08-1.17x), in 12% less memory (README,
Benchmarks).

A process cannot change its allocator once it runs, so the `afina` command starts itself again with
the allocator preloaded (`LD_PRELOAD`) before it imports anything heavy. It leaves the process alone
where the user has set `LD_PRELOAD` themselves (`LD_PRELOAD= afina train ...` runs under glibc's
malloc), off Linux, and where no allocator is installed (Debian and Ubuntu: `apt-get install
libtcmalloc-minimal4`; jemalloc, the second choice, is `libjemalloc2`).

PyTorch's CPU kernels run on OpenMP threads, which spin for a while when they wait. afina keeps
that (on an idle machine sleeping instead cost training and generation up to 1.9x) and keeps its
share of a busy machine by running fewer threads while other processes use cores
(`afina.training.cpu_share`). OpenMP's wait settings a user sets (WAIT_SETTINGS) are theirs: with
any of them, or OMP_NUM_THREADS, set, afina leaves the threads alone.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

ALLOCATORS = ("tcmalloc_minimal", "tcmalloc", "jemalloc")  # in order of preference
# tcmalloc reports every allocation over 1 GiB on stderr; loading a large model makes dozens
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**62)}
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "KMP_LIBRARY")  # a user's own wins


def installed_allocator() -> str | None:
    """The library (a name the dynamic loader finds) of the first of ALLOCATORS installed; None off Linux."""
    if sys.platform != "linux":
        return None
    for name in ALLOCATORS:
        library = ctypes.util.find_library(name)
        if library:
            return library
    return None


def allocator_environment() -> dict[str, str]:
    """The variables that start a process under the installed allocator; empty where the user set
    `LD_PRELOAD` (even to nothing) or none is installed."""
    if "LD_PRELOAD" in os.environ:
        return {}
    library = installed_allocator()
    return {"LD_PRELOAD": library, **QUIET} if library else {}


def running_allocator() -> str:
    """The allocator this process runs under, as a label: the preloaded library, or glibc."""
    return os.environ.get("LD_PRELOAD") or "glibc"


def run_under_allocator() -> None:
    """Replace this process with itself, same arguments, under the installed allocator (before any
    import of torch); returns only where there is nothing to change (already under it, the user's
    choice, or none installed)."""
    environment = allocator_environment()
    if environment and sys.executable:  # an embedded interpreter has no executable to start again
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **environment})


def missing_allocator_hint() -> str | None:
    """What to install, where this Linux process runs under glibc's malloc only because no allocator is
    installed; None where one is, where the user set `LD_PRELOAD`, and off Linux."""
    if sys.platform != "linux" or "LD_PRELOAD" in os.environ or installed_allocator():
        return None
    return ("tcmalloc is not installed, so training runs under glibc's malloc; afina trains about 1.1x faster "
            "under tcmalloc (Debian, Ubuntu: apt-get install libtcmalloc-minimal4)")
