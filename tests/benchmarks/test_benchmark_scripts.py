"""The benchmark scripts in benchmarks/ run end to end on a tiny model (opt-in: `pytest -m benchmark`).

They measure nothing here; they keep the scripts working between real benchmark runs.
"""

import json
import shutil

import pytest

from afina.training.allocator import running_allocator
from tests.unit.test_speed_levers import ROOT, command_allocator, run_script

pytestmark = pytest.mark.benchmark


def test_speed_levers_benchmark_runs_on_a_tiny_model(tiny_model_dir, tmp_path):
    done = run_script(ROOT / "benchmarks" / "speed_levers.py", "--model", tiny_model_dir, "--steps", "1",
                      "--repeats", "1", "--only", "plain,+packing,+trained_logits,+short_rows,+allocator,"
                      "+shared_prefixes", "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert all(results[name].get("tokens_per_second", 0) > 0 for name in ("plain", "+packing", "+trained_logits",
                                                                           "+short_rows", "+allocator",
                                                                           "+shared_prefixes")), results
    # every lever before the allocator runs under glibc's malloc; that one under the afina command's allocator
    assert results["+short_rows"]["allocator"] == "glibc"
    assert results["+allocator"]["allocator"] == command_allocator()
    assert "| +short_rows |" in (tmp_path / "results.md").read_text()


def test_dropout_masks_benchmark_runs_on_a_tiny_model(tiny_model_dir):
    done = run_script(ROOT / "benchmarks" / "dropout_masks.py", "--model", tiny_model_dir, "--steps", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bernoulli_ masks:" in done.stdout and "afina / bernoulli_:" in done.stdout


def test_micro_batch_cost_benchmark_runs_on_a_tiny_model(tiny_model_dir):
    done = run_script(ROOT / "benchmarks" / "micro_batch_cost.py", "--model", tiny_model_dir, "--rounds", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(f" {4 * size} tokens:" in done.stdout for size in (8, 32, 64, 128)), done.stdout
    assert "ms per micro-batch +" in done.stdout and "of its time is the fixed part" in done.stdout


def test_activation_memory_benchmark_runs_on_a_tiny_model(tiny_model_dir):
    done = run_script(ROOT / "benchmarks" / "activation_memory.py", "--model", tiny_model_dir, "--rows", "2",
                      "--micro-batches", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "micro-batch 1 (" in done.stdout and "micro-batch 2 (" in done.stdout, done.stdout
    per_token = float(done.stdout.split("MiB (")[1].split(" KiB per token")[0])
    assert per_token > 0, done.stdout  # autograd keeps activations for backward, and the hooks saw them


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "clang++")), reason="inductor compiles C++ kernels")
def test_compile_layers_benchmark_runs_on_a_tiny_model(tiny_model_dir):
    done = run_script(ROOT / "benchmarks" / "compile_layers.py", "--model", tiny_model_dir, "--rounds", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(f"  {setting} " in done.stdout for setting in ("eager", "eager_padded", "compiled")), done.stdout
    drift = float(done.stdout.split("compiled and the eager loss: ")[1].split()[0])
    assert drift < 5e-2, done.stdout  # the compiled layers compute the same function, up to rounding


def test_train_speed_benchmark_runs_on_a_tiny_model_against_trl(tiny_model_dir, tmp_path):
    pytest.importorskip("trl", reason="the benchmark compares against TRL (installed with the dev extras)")
    done = run_script(ROOT / "benchmarks" / "train_speed.py", "--model", tiny_model_dir, "--quick", "--variants",
                      "fp32,no_checkpointing+packing+allocator", "--control-env", "LD_PRELOAD=", "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "results.json").read_text())
    results = report["results"]
    assert {"afina", "afina_unshared", "afina_again", "trl_default", "trl_best"} <= set(results)
    assert results["afina_again"]["variant"] == "LD_PRELOAD="
    # afina runs under the allocator the afina command starts under; an empty LD_PRELOAD means glibc's malloc
    expected = command_allocator()
    assert results["afina"]["runs"][0]["allocator"] == expected
    assert results["afina_again"]["runs"][0]["allocator"] == "glibc"
    # TRL runs as its users run it, except a variant named +allocator: under afina's allocator
    variants = report["variants"]
    assert {run["allocator"] for run in results["trl_default"]["runs"] + variants["fp32"]["runs"]} == \
        {running_allocator()}
    assert variants["no_checkpointing+packing+allocator"]["runs"][0]["allocator"] == expected
    assert "allocators: afina " in (tmp_path / "results.md").read_text()
    assert results["afina_unshared"]["tokens_per_second"] > 0
    # one packed row per step: sharing prefixes, afina's rows are shorter than afina_unshared's for the same examples
    assert results["afina"]["runs"][0]["row_length"] < results["afina_unshared"]["runs"][0]["row_length"]
    for name in ("afina", "trl_default", "trl_best"):
        assert results[name]["tokens_per_second"] > 0 and results[name]["peak_rss_mib"] > 0, results[name]
        assert results[name]["epoch"]["validation_loss"] > 0
    assert (tmp_path / "chart.png").stat().st_size > 0
    report_md = (tmp_path / "results.md").read_text()
    assert "afina / system" in report_md and "run in lockstep with it" in report_md
    # afina runs once beside each other system (afina_unshared, itself, TRL's defaults, two variants), in alternating steps
    assert len(results["afina"]["runs"]) == 5
    assert all(len(results[name]["runs"]) == 1 for name in ("afina_unshared", "afina_again", "trl_default"))
    assert results["trl_default"]["runs"][0]["afina_tokens_per_second"] > 0
    # TRL runs with oneDNN's own kernel-cache bound, as its users do, not the one importing afina sets
    assert results["trl_default"]["runs"][0]["onednn_cache_capacity"] == "1024"
    assert results["afina"]["runs"][0]["onednn_cache_capacity"] == "64"


def test_jobs_api_latency_benchmark_runs_against_a_real_server(tmp_path):
    done = run_script(ROOT / "benchmarks" / "jobs_api_latency.py", "--clients", "3", "--seconds", "1",
                      "--warmup", "0.2", "--out", tmp_path / "latency.json", env={"AFINA_DATABASE_URL": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads((tmp_path / "latency.json").read_text())
    for kind in ("list jobs", "get job", "list events", "create job", "all"):
        assert figures["afina"][kind]["requests"] > 0 and figures["afina"][kind]["p99_ms"] > 0, kind
    assert figures["floor"]["all"]["requests"] > 0 and "afina / floor:" in done.stdout
