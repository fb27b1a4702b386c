"""The `afina` command starts with OpenMP's threads sleeping while they wait (so that a busy machine
slows training by its share of the cores, not several times), unless the user set OpenMP's wait
settings themselves."""

import os
import subprocess
import sys

import pytest

from afina.training.allocator import WAIT_SETTINGS, openmp_environment

# through the command's start: wait policy set, then torch imported; CPU time burnt while the main
# thread sleeps after a parallel region is what spinning threads cost a busy machine
SLEEPING = """
import os, sys, time
from afina.training import allocator
allocator.installed_allocator = lambda: None  # no restart: the environment alone is under test
assert "torch" not in sys.modules
allocator.run_under_allocator()
import torch
torch.set_num_threads(2)
x = torch.ones(4_000_000)
for _ in range(20):
    x.mul_(1.0)  # a parallel region on both threads
cpu = time.process_time()
time.sleep(0.5)
print(os.environ.get("OMP_WAIT_POLICY"), os.environ.get("KMP_BLOCKTIME"), round(time.process_time() - cpu, 2))
"""


def run_child(code: str, env: dict) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in WAIT_SETTINGS}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**environment, **env})


def test_threads_wait_passively_unless_the_user_said_otherwise(monkeypatch):
    for key in WAIT_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    assert openmp_environment() == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
    for key in WAIT_SETTINGS:
        monkeypatch.setenv(key, "1")
        assert openmp_environment() == {}, key
        monkeypatch.delenv(key)


def test_the_command_imports_no_torch_before_setting_the_wait_policy():
    done = run_child("import sys, afina.cli, afina.training.allocator; print('torch' in sys.modules)", {})
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores to see a second thread spin")
def test_waiting_threads_burn_no_cpu_unless_the_user_asks_them_to_spin():
    ours = run_child(SLEEPING, {})
    assert ours.returncode == 0, ours.stderr
    policy, blocktime, cpu = ours.stdout.split()
    assert (policy, blocktime) == ("PASSIVE", "0") and float(cpu) < 0.1
    spinning = run_child(SLEEPING, {"OMP_WAIT_POLICY": "ACTIVE"})  # the user's own setting is kept
    assert spinning.returncode == 0, spinning.stderr
    policy, blocktime, cpu = spinning.stdout.split()
    assert (policy, blocktime) == ("ACTIVE", "None") and float(cpu) > 0.2  # a thread spun through the sleep
