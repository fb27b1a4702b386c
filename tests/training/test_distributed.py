"""Training on several processes: real processes joined by gloo on CPU, the tiny model in fp32.

Two processes (DDP and FSDP) take the same global steps as one and must give its losses step by step
and its final weights; a SIGTERM on one rank stops both with one checkpoint, which resumes on two
processes and on one to the uninterrupted run's weights; the rank split deals every item once. FSDP's
options (activation checkpointing, CPU offload) change memory, not losses; an out of memory on one
rank makes every rank shrink its micro-batch and redo the step.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from rich.console import Console
from safetensors.torch import load_file, save_file

from afina.config.schema import LoraMethod, TrainingConfig
from afina.data.formats import normalize_row
from afina.data.tokenize import tokenize_records
from afina.models.loading import load_model, load_tokenizer
from afina.models.methods import apply_method, decoder_layers
from afina.sealing import is_sealed
from afina.training.checkpoints import latest_checkpoint
from afina.training.distributed import ObjectiveLoss, is_sharded, micro_batches_per_rank, rank_share, shard_model
from afina.training.loop import train
from afina.training.metrics import read_metrics
from afina.training.objectives import token_objective
from tests.scripted import ScriptedObjective

QUIET = Console(quiet=True)
HANG_SECONDS = 300
SETTINGS = {"max_steps": 5, "row_length": 128, "rows_per_batch": 1, "gradient_accumulation": 3, "learning_rate": 1e-2,
            "warmup_ratio": 0.0, "save_every": 100, "eval_every": 100, "keep_checkpoints": 5, "precision": "fp32"}


def tiny_data(model_dir: Path, rows: list[dict]) -> list:
    tokenizer = load_tokenizer(str(model_dir))
    return tokenize_records([normalize_row(r, i + 1)[0] for i, r in enumerate(rows)], tokenizer, 512)


OUT_OF_MEMORY = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class OutOfMemoryAfterForward:
    """An objective whose `at`-th training loss runs out of memory once the model's forward is done (at
    the output projection and loss, a step's largest tensors), when every FSDP gather is behind it."""

    def __init__(self, objective, at: int):
        self.objective, self.at, self.calls = objective, at, 0

    def __getattr__(self, name: str):
        return getattr(self.objective, name)

    def loss_sum(self, model, batch) -> torch.Tensor:
        loss = self.objective.loss_sum(model, batch)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.at:
                raise OUT_OF_MEMORY
        return loss


def run_training(model_dir: Path, rows: list[dict], run_dir: Path, parallel: str, fault: tuple = (),
                 **settings) -> dict:
    """One process's run: LoRA without dropout (the ranks' dropout masks would differ from one
    process's). `fault` (what, call): at its micro-batch `call` this process sends itself SIGTERM
    ("sigterm"), or runs out of memory before its forward ("oom") or after it ("oom_after_forward").
    Returns the trained weights."""
    torch.manual_seed(0)
    model = apply_method(load_model(str(model_dir)), LoraMethod(r=4, alpha=8, dropout=0.0))
    tokenizer = load_tokenizer(str(model_dir))
    what, at = fault or ("", 0)

    def script(call: int, batch) -> None:
        if call == at and what == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        if call == at and what == "oom":
            raise OUT_OF_MEMORY

    objective = ScriptedObjective(token_objective(128), script)
    if what == "oom_after_forward":
        objective = OutOfMemoryAfterForward(token_objective(128), at)
    config = TrainingConfig(**{**SETTINGS, **settings}, parallel=parallel)
    result = train(model, tiny_data(model_dir, rows), [], config, run_dir, tokenizer.pad_token_id, QUIET,
                   objective=objective)
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return {"status": result.status, "steps": result.steps, "weights": weights}


def rank_main(rank: int, world: int, port: int, model_dir: Path, rows: list, run_dir: Path, parallel: str,
              fault_rank: int, fault: tuple, settings: dict, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from afina.training.distributed import start_process_group

    start_process_group()
    try:
        with sealed_when_keyed():
            result = run_training(model_dir, rows, run_dir, parallel, fault if rank == fault_rank else (), **settings)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in result["weights"].items()}, out / "weights.safetensors")
            (out / "result.json").write_text(json.dumps({"status": result["status"], "steps": result["steps"]}))
    finally:
        torch.distributed.destroy_process_group()


@contextmanager
def sealed_when_keyed():
    """This process reads and writes files at rest sealed while the block runs, when a master key is
    set (as afina's commands arrange for theirs)."""
    from afina.sealing import sealed_files, use_sealed_files
    from afina.security.encryption import use_encryption

    previous = sealed_files()
    if os.environ.get("AFINA_MASTER_KEY"):
        use_encryption()
    try:
        yield
    finally:
        use_sealed_files(previous)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def on_processes(world: int, model_dir: Path, rows: list, run_dir: Path, parallel: str, out: Path,
                 fault_rank: int = -1, fault: tuple = (), **settings) -> tuple[dict, dict]:
    """Train on `world` real processes; rank 0's result and weights. Ranks left waiting for each
    other in a collective fail the test after HANG_SECONDS instead of hanging it."""
    out.mkdir(parents=True, exist_ok=True)
    ranks = mp.start_processes(rank_main, args=(world, free_port(), model_dir, rows, run_dir, parallel, fault_rank,
                                                fault, settings, out), nprocs=world, start_method="spawn", join=False)
    deadline = time.monotonic() + HANG_SECONDS
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"the ranks were still running after {HANG_SECONDS}s: waiting for each other")
    return json.loads((out / "result.json").read_text()), load_file(out / "weights.safetensors")


def step_losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir / "metrics.jsonl") if m["split"] == "train"]


def assert_same_weights(a: dict, b: dict) -> None:
    """Equal up to rounding: gradients summed over ranks round differently, and AdamW's division by
    the root of the second moment enlarges that where gradients are near zero (a LoRA A early on),
    to about 1e-5 here, on weights of about 0.1."""
    assert a.keys() == b.keys() and a
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    """The reference: the same run on one process."""
    from tests.conftest import chat_row

    rows = ticket_rows_for_module(chat_row)
    run_dir = tmp_path_factory.mktemp("one")
    result = run_training(tiny_model_dir, rows, run_dir, "auto")
    assert result["status"] == "completed" and result["steps"] == SETTINGS["max_steps"]
    return rows, step_losses(run_dir), result["weights"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_give_one_process_losses_and_weights_across_a_sigterm_and_a_resume_on_one(
        parallel, one_process, tiny_model_dir, tmp_path, monkeypatch):
    """FSDP's run has a master key: its sharded checkpoint is sealed at rest, and read back on two
    processes and on one."""
    rows, losses, weights = one_process
    run_dir = tmp_path / parallel
    if parallel == "fsdp":
        monkeypatch.setenv("AFINA_MASTER_KEY", secrets.token_hex(32))
        monkeypatch.delenv("AFINA_MASTER_KEY_FILE", raising=False)
    with sealed_when_keyed():  # this process reads the checkpoints too
        # rank 1 gets SIGTERM during its 4th micro-batch (step 2 of 5): both ranks stop after step 2
        result, _ = on_processes(2, tiny_model_dir, rows, run_dir, parallel, tmp_path / "out1", fault_rank=1,
                                 fault=("sigterm", 4))
        assert result == {"status": "interrupted", "steps": 2}
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        assert checkpoint.step == 2 and is_sharded(checkpoint.path) == (parallel == "fsdp")
        if parallel == "fsdp":
            shards = [p for p in checkpoint.path.iterdir() if p.name != "manifest.json"]
            assert any(p.suffix == ".distcp" for p in shards) and all(is_sealed(p) for p in shards)
        shutil.copytree(run_dir / "checkpoints", tmp_path / "copy" / "checkpoints")  # to resume on one process too

        resumed, two = on_processes(2, tiny_model_dir, rows, run_dir, parallel, tmp_path / "out2")
        assert resumed == {"status": "completed", "steps": SETTINGS["max_steps"]}
        assert step_losses(run_dir) == pytest.approx(losses, abs=1e-5)  # steps 1-2, then 3-5 after the resume
        assert_same_weights(two, weights)

        one = run_training(tiny_model_dir, rows, tmp_path / "copy", "auto")
        assert one["steps"] == SETTINGS["max_steps"]
        assert_same_weights(one["weights"], weights)


def test_fsdp_options_change_memory_not_losses(one_process, tiny_model_dir, tmp_path):
    """Plain FSDP gives one process's losses within 1e-5 (above); so must FSDP with both options on
    (one run for the two: each costs a launch of two processes)."""
    rows, losses, weights = one_process
    result, two = on_processes(2, tiny_model_dir, rows, tmp_path / "run", "fsdp", tmp_path / "out",
                               fsdp_activation_checkpointing=True, fsdp_cpu_offload=True)
    assert result == {"status": "completed", "steps": SETTINGS["max_steps"]}
    assert step_losses(tmp_path / "run") == pytest.approx(losses, abs=1e-5)
    assert_same_weights(two, weights)


def test_fsdp_options_reach_every_decoder_layer(tiny_model_dir, tmp_path):
    """Equal losses cannot tell an option that was ignored: sharded with both, on a process group of
    one, every decoder layer is checkpointed and its unit offloaded to CPU memory."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import CPUOffloadPolicy

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                         world_size=1)
    try:
        model = apply_method(load_model(str(tiny_model_dir)), LoraMethod(r=4, alpha=8, dropout=0.0))
        shard_model(ObjectiveLoss(model, token_objective(128)), model, torch.device("cpu"), checkpointing=True,
                    cpu_offload=True)
        layers = list(decoder_layers(model))
        assert layers and all(checkpoint.state(layer) is not None for layer in layers)
        assert all(isinstance(layer._get_fsdp_state()._fsdp_param_group.offload_policy, CPUOffloadPolicy)
                   for layer in layers)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("parallel,fault", [("ddp", ("oom", 2)), ("fsdp", ("oom_after_forward", 2))],
                         ids=["ddp-before-forward", "fsdp-after-forward"])
def test_out_of_memory_on_one_rank_makes_every_rank_shrink_and_redo_the_step(parallel, fault, one_process,
                                                                             tiny_model_dir, tmp_path):
    """The same 3 rows per step as one process, in one micro-batch (2 rows on rank 0, 1 on rank 1).
    Rank 1 runs out of memory in step 2: both ranks go to 1 row per micro-batch (rank 1 adding a
    zero-weighted copy), checkpointing on, and redo the step; the run keeps one process's losses.
    Without the agreement rank 0 would go on alone and wait forever in the step's next collective."""
    rows, losses, weights = one_process
    run_dir = tmp_path / "run"
    result, two = on_processes(2, tiny_model_dir, rows, run_dir, parallel, tmp_path / "out", fault_rank=1,
                               fault=fault, rows_per_batch=3, gradient_accumulation=1)
    assert result == {"status": "completed", "steps": SETTINGS["max_steps"]}
    events = [m for m in read_metrics(run_dir / "metrics.jsonl") if m["split"] == "event"]
    assert [(e["kind"], e["step"], e["rows_per_micro_batch"]) for e in events] == [("out_of_memory", 1, 1)]
    assert "on rank 1" in events[0]["message"]
    assert step_losses(run_dir) == pytest.approx(losses, abs=1e-5)
    assert_same_weights(two, weights)


def ticket_rows_for_module(chat_row) -> list[dict]:
    """The `ticket_rows` fixture's rows, for a module-scoped reference run."""
    return [chat_row(f"ticket {i}: the {c} is broken", json.dumps({"category": c, "n": i % 3}), system="classify")
            for i, c in ((i, ["network", "printer", "access", "email"][i % 4]) for i in range(40))]


@pytest.mark.parametrize("items,world", [(12, 2), (11, 2), (10, 3), (1, 2), (7, 8)])
def test_the_rank_split_deals_every_item_of_every_step_exactly_once(items, world):
    step = list(range(items))
    shares = [rank_share(step, rank, world) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == step
    assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1
    for rows_per_micro_batch in (1, 2, 4):
        needed = micro_batches_per_rank(items, world, rows_per_micro_batch)
        assert all(-(-len(share) // rows_per_micro_batch) <= needed for share in shares)


def test_an_epoch_split_by_rank_sees_every_example_once(tiny_model_dir, one_process):
    data = tiny_data(tiny_model_dir, one_process[0])
    objective = token_objective(128)
    training = TrainingConfig(**SETTINGS)
    seen = [id(example) for step in objective.epoch_steps(data, training, 0) for rank in range(2)
            for row in rank_share(step, rank, 2) for example in row]
    assert sorted(seen) == sorted(id(example) for example in data)
