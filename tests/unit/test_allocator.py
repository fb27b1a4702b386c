"""The `afina` command starts itself again under tcmalloc (or jemalloc) where the system has one,
with the same arguments, once; the user's own LD_PRELOAD, even empty, is left alone."""

import os
import subprocess
import sys

import pytest

from afina.training import allocator
from afina.training.allocator import allocator_environment, installed_allocator, missing_allocator_hint

# a child that stands in a loader-findable library (libc, already loaded, so harmless) for the allocator
RESTART = """
import os, sys
from afina.training import allocator
allocator.installed_allocator = lambda: "libc.so.6"
print("started", os.environ.get("LD_PRELOAD"), os.environ.get("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"),
      sys.argv[1:], flush=True)
allocator.run_under_allocator()
print("running", os.environ.get("LD_PRELOAD"), sys.argv[1:], flush=True)
"""


def run_child(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env={**environment, **(env or {})})


def test_the_process_starts_again_once_under_the_allocator_with_its_arguments():
    done = run_child(RESTART, "train", "config.yaml", "training.epochs=2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "started None None ['train', 'config.yaml', 'training.epochs=2']",  # glibc's malloc: start again
        f"started libc.so.6 {2**62} ['train', 'config.yaml', 'training.epochs=2']",  # now preloaded: carry on
        "running libc.so.6 ['train', 'config.yaml', 'training.epochs=2']",
    ]


@pytest.mark.parametrize("preload", ["", "/opt/my/libprofiler.so"])
def test_a_user_set_preload_is_left_alone(preload):
    done = run_child(RESTART, "demo", env={"LD_PRELOAD": preload})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"started {preload} None ['demo']", f"running {preload} ['demo']"]


def test_the_first_installed_allocator_is_chosen(monkeypatch):
    installed = {"jemalloc": "libjemalloc.so.2"}
    monkeypatch.setattr(allocator.ctypes.util, "find_library", installed.get)
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert installed_allocator() == "libjemalloc.so.2"
    installed["tcmalloc_minimal"] = "libtcmalloc_minimal.so.4"
    assert allocator_environment()["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
    installed.clear()
    assert installed_allocator() is None and allocator_environment() == {}
    installed["tcmalloc_minimal"] = "libtcmalloc_minimal.so.4"
    monkeypatch.setattr(allocator.sys, "platform", "darwin")  # no LD_PRELOAD there
    assert allocator_environment() == {}


@pytest.mark.skipif(installed_allocator() is None, reason="neither tcmalloc nor jemalloc is installed here")
def test_the_afina_command_runs_under_the_installed_allocator():
    """The real library, through the command's entry point: mapped into the process that runs the command."""
    code = ("from afina.training.allocator import run_under_allocator; run_under_allocator(); "
            "print(open('/proc/self/maps').read())")
    done = run_child(code)
    assert done.returncode == 0, done.stderr
    assert installed_allocator().split(".so")[0] in done.stdout
    entry = run_child("from afina.cli import main; main()", "--help")
    assert entry.returncode == 0 and "train" in entry.stdout, entry.stderr


def test_training_without_an_installed_allocator_says_what_to_install(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    assert "apt-get install libtcmalloc-minimal4" in missing_allocator_hint()
    monkeypatch.setenv("LD_PRELOAD", "")  # the user chose glibc's malloc
    assert missing_allocator_hint() is None
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: "libjemalloc.so.2")
    assert missing_allocator_hint() is None
