"""afina keeps its share of a busy machine by running fewer threads while other processes use cores
(`afina.training.cpu_share`), and leaves OpenMP's spinning alone, which is faster on an idle one."""

import os
import subprocess
import sys

import pytest
import torch

from afina.training import cpu_share
from afina.training.cpu_share import USER_SETTINGS, CpuShare, busy_seconds, share_cpu, threads_to_use


def run_child(code: str, env: dict) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in USER_SETTINGS}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**environment, **env})


def test_threads_follow_the_cores_other_processes_leave():
    assert threads_to_use(2, 0.0) == 2
    assert threads_to_use(2, 0.4) == 2  # a little background work keeps both
    assert threads_to_use(2, 0.67) == 1  # one busy process beside two spinning threads gets about 2/3 of a core
    assert threads_to_use(2, 1.0) == 1
    assert threads_to_use(2, 3.0) == 1  # never fewer than one
    assert threads_to_use(16, 4.2) == 12


class FakeMachine:
    """/proc/stat and the clocks of a machine whose other processes' load the test sets."""

    def __init__(self, cores: int):
        self.cores, self.now, self.others_busy, self.own, self.idle = cores, 0.0, 0.0, 0.0, 0.0

    def run(self, seconds: float, others: float, own: float) -> None:
        self.now += seconds
        self.others_busy += others * seconds
        self.own += own * seconds
        self.idle += max(0.0, self.cores - others - own) * seconds

    def stat(self) -> str:
        ticks = os.sysconf("SC_CLK_TCK")
        busy, idle = round((self.others_busy + self.own) * ticks), round(self.idle * ticks)
        lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]  # the total line is not read
        lines += [f"cpu{i} {busy // self.cores} 0 0 {idle // self.cores} 0 0 0 0 0 0" for i in range(self.cores)]
        return "\n".join(lines) + "\nintr 0\n"


def test_a_busy_process_takes_a_thread_after_two_readings_and_gives_it_back_when_it_stops(monkeypatch):
    machine = FakeMachine(2)
    calls = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    share = CpuShare({0, 1}, read_stat=machine.stat, clock=lambda: machine.now, own_seconds=lambda: machine.own)
    machine.run(1.5, others=0.1, own=1.9)
    share.check()
    assert calls == []
    machine.run(1.5, others=0.7, own=1.3)  # `yes` starts: one reading is not enough
    share.check()
    assert calls == []
    machine.run(0.5, others=0.7, own=1.3)  # within a period: not read
    share.check()
    assert calls == []
    machine.run(1.5, others=0.7, own=1.3)
    share.check()
    assert calls == [1] and share.threads == 1
    machine.run(1.5, others=1.0, own=1.0)
    share.check()
    machine.run(1.5, others=0.0, own=1.0)  # it stops
    share.check()
    machine.run(1.5, others=0.0, own=1.0)
    share.check()
    assert calls == [1, 2] and share.threads == 2


def test_busy_seconds_count_only_this_process_cores():
    ticks = os.sysconf("SC_CLK_TCK")
    stat = f"cpu  9 9 9 9 9 9 9 9\ncpu0 {ticks} 0 0 {5 * ticks} {ticks} 0 0 {ticks}\ncpu1 {7 * ticks} 0 0 0 0 0 0 0\n"
    assert busy_seconds({0}, stat) == 2.0  # user and steal; idle and I/O wait are not work
    assert busy_seconds({0, 1}, stat) == 9.0


def test_the_user_s_own_thread_or_wait_settings_turn_the_share_off(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for key in USER_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat on this system: afina never shares there")
    assert CpuShare.for_this_process() is not None
    for key in USER_SETTINGS:
        monkeypatch.setenv(key, "1")
        assert CpuShare.for_this_process() is None, key
        monkeypatch.delenv(key)


def test_the_share_checks_before_each_layer_and_restores_the_threads(monkeypatch, tiny_model):
    checks = []
    monkeypatch.setattr(CpuShare, "check", lambda self: checks.append(1))
    monkeypatch.setattr(CpuShare, "for_this_process", classmethod(lambda cls: cls({0}, read_stat=lambda: "")))
    threads = torch.get_num_threads()
    with share_cpu(tiny_model) as share, torch.no_grad():
        tiny_model(torch.tensor([[1, 2, 3]]))
        share.threads = threads + 1  # as a check would have set
    assert len(checks) == tiny_model.config.num_hidden_layers
    assert torch.get_num_threads() == threads
    tiny_model(torch.tensor([[1, 2, 3]]))
    assert len(checks) == tiny_model.config.num_hidden_layers  # the hooks are gone


def test_the_command_sets_no_wait_policy_and_imports_no_torch_before_its_allocator():
    done = run_child("import os, sys, afina.cli, afina.training.allocator as a; print('torch' in sys.modules); "
                     "a.installed_allocator = lambda: None; a.run_under_allocator(); "
                     "print(os.environ.get('OMP_WAIT_POLICY'))", {})
    assert done.returncode == 0 and done.stdout.split() == ["False", "None"], done.stderr
    assert cpu_share.PERIOD_SECONDS <= 2  # a busy neighbour is noticed within seconds
