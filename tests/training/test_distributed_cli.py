"""Several processes from the command line: `afina run --devices 2` on the tiny model (gloo, CPU), and
the runs several processes cannot do refused before any process starts, with one error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from afina.cli.main import app
from afina.config.methods import LoraMethod, QloraMethod
from afina.config.schema import TrainingConfig
from afina.errors import AfinaError
from afina.store import open_store
from afina.training.distributed import check_parallel_supported, parallel_of
from afina.training.metrics import read_metrics
from tests.training.test_workflow import write_config


def test_afina_run_trains_on_two_processes_and_does_the_rest_in_one(tiny_model_dir, ticket_rows, tmp_path, afina_home):
    config = write_config(tmp_path, tiny_model_dir, ticket_rows, max_steps=4, save_every=2, eval_every=4,
                          parallel="fsdp")
    done = subprocess.run([sys.executable, "-c", "from afina.cli import main; main()", "run", config, "--devices", "2"],
                          env={**os.environ, "PYTHONPATH": os.getcwd()}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("2 processes, training.parallel: fsdp") == 1  # printed by rank 0 only
    with open_store() as store:
        [run] = store.list_runs()
        stages = store.stages(run.id)
        assert [s.name for s in stages] == ["validate", "split", "train", "evaluate", "gate", "register", "notify"]
        assert all(s.status == "succeeded" for s in stages)
        train = next(s for s in stages if s.name == "train")
        assert train.figures["steps"] == 4 and train.figures["status"] == "completed"
        assert run.status in ("succeeded", "discarded")
    metrics = read_metrics(Path(run.run_dir) / "metrics.jsonl")  # rank 0's: one line per step
    assert [m["step"] for m in metrics if m["split"] == "train"] == [1, 2, 3, 4]


def test_qlora_on_several_processes_without_cuda_is_one_clear_error(tiny_model_dir, ticket_rows, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: qlora can run")
    config = write_config(tmp_path, tiny_model_dir, ticket_rows, parallel="fsdp")
    for command in (["train", config, "method=qlora", "--devices", "2"], ["run", config, "method=qlora", "--devices", "2"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert "cuda_required" in result.output and "Traceback" not in result.output
        assert "afina: a training process failed" not in result.output  # refused before torchrun starts


def test_what_several_processes_cannot_run_is_refused_before_they_start(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the CUDA check, to the parallel ones
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: object())
    with pytest.raises(AfinaError) as error:
        check_parallel_supported(LoraMethod(load_in_8bit=True), TrainingConfig(parallel="fsdp"), 2)
    assert error.value.code == "unsupported_parallel" and error.value.location == "training.parallel"
    with pytest.raises(AfinaError) as error:
        check_parallel_supported(QloraMethod(), TrainingConfig(fsdp_cpu_offload=True), 2)
    assert error.value.location == "training.fsdp_cpu_offload"
    check_parallel_supported(QloraMethod(), TrainingConfig(parallel="fsdp"), 2)
    check_parallel_supported(LoraMethod(load_in_8bit=True), TrainingConfig(parallel="ddp"), 2)
    check_parallel_supported(LoraMethod(load_in_8bit=True), TrainingConfig(parallel="fsdp"), 1)  # one process


def test_fsdp_options_make_auto_fsdp_and_are_refused_with_ddp():
    assert parallel_of(TrainingConfig()) == "ddp"
    assert parallel_of(TrainingConfig(fsdp_cpu_offload=True)) == "fsdp"
    assert parallel_of(TrainingConfig(fsdp_activation_checkpointing=True)) == "fsdp"
    with pytest.raises(ValueError, match="fsdp_cpu_offload need parallel fsdp"):
        TrainingConfig(parallel="ddp", fsdp_cpu_offload=True)
