"""Long runs that survive: out-of-memory recovery, full disks, cost budgets, kill -9 at any moment."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from afina.errors import AfinaError
from afina.devices import is_out_of_memory
from afina.models.methods import trainable_parameters
from afina.training import checkpoints
from afina.training.checkpoints import latest_checkpoint, list_checkpoints
from afina.training.cost import load_price_table, price_per_hour
from afina.training.loop import train
from afina.training.objectives import token_objective
from afina.training.oom import MicroBatching
from tests.scripted import ScriptedObjective
from tests.training.test_training import QUIET, config, examples, lora_model


def lora_model_without_dropout(model_dir):
    """Dropout masks depend on the micro-batch shapes; without dropout the gradient does not."""
    from afina.config.schema import LoraMethod
    from afina.models.methods import apply_method
    from afina.models.loading import load_model

    torch.manual_seed(0)
    return apply_method(load_model(str(model_dir)), LoraMethod(r=4, alpha=8, dropout=0.0))


def read_events(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "event"]


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(tiny_model_dir, tiny_tokenizer,
                                                                            ticket_rows, tmp_path):
    data = examples(tiny_tokenizer, ticket_rows)
    pad = tiny_tokenizer.pad_token_id
    cfg = config(max_steps=6, row_length=64, rows_per_batch=4, gradient_accumulation=1)
    straight = lora_model_without_dropout(tiny_model_dir)
    train(straight, data, [], cfg, tmp_path / "straight", pad, QUIET)

    def oom_on_big_batches_from_step_3(call, batch):
        if call > 2 and batch.input_ids.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    recovered = lora_model_without_dropout(tiny_model_dir)
    result = train(recovered, data, [], cfg, tmp_path / "recovered", pad, QUIET,
                   objective=ScriptedObjective(token_objective(64), oom_on_big_batches_from_step_3))
    assert result.status == "completed" and result.steps == 6
    events = read_events(tmp_path / "recovered")
    oom = [e for e in events if e["kind"] == "out_of_memory"]
    # 4 rows -> 2 rows x 2 -> 1 row x 4, checkpointing on; both changes are recorded
    assert [(e["rows_per_micro_batch"], e["gradient_accumulation"]) for e in oom] == [(2, 2), (1, 4)]
    assert all(e["gradient_checkpointing"] for e in oom) and oom[0]["step"] == 2
    # same rows per optimizer step, so the same training up to floating-point summation order
    for (name, a), (_, b) in zip(trainable_parameters(straight).items(),
                                 trainable_parameters(recovered).items()):
        assert torch.allclose(a, b, atol=1e-5), name
    assert latest_checkpoint(tmp_path / "recovered" / "checkpoints").state["rows_per_micro_batch"] == 1


def test_out_of_memory_at_one_row_with_checkpointing_gives_up_clearly(tiny_model_dir, tiny_tokenizer, ticket_rows,
                                                                    tmp_path):
    data = examples(tiny_tokenizer, ticket_rows)

    def always_oom(call, batch):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    with pytest.raises(AfinaError) as error:
        train(lora_model(tiny_model_dir), data, [], config(max_steps=3, rows_per_batch=2), tmp_path / "run",
              tiny_tokenizer.pad_token_id, QUIET, objective=ScriptedObjective(token_objective(256), always_oom))
    assert error.value.code == "out_of_memory"
    events = read_events(tmp_path / "run")
    assert [e["rows_per_micro_batch"] for e in events if e["kind"] == "out_of_memory"] == [1]


def test_memory_error_detection_and_shrinking():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert MicroBatching(8, False).smaller() == MicroBatching(4, True)
    assert MicroBatching(1, False).smaller() == MicroBatching(1, True)
    assert MicroBatching(1, True).smaller() is None


def test_full_disk_fails_cleanly_and_keeps_the_last_good_checkpoint(tiny_model_dir, tiny_tokenizer, ticket_rows,
                                                                    tmp_path, monkeypatch):
    data = examples(tiny_tokenizer, ticket_rows)
    real = checkpoints.save_file
    calls = {"n": 0}

    def disk_fills_on_second_checkpoint(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(path, "wb") as handle:  # a partial file, as a full disk leaves one
                handle.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(checkpoints, "save_file", disk_fills_on_second_checkpoint)
    run = tmp_path / "run"
    with pytest.raises(AfinaError) as error:
        train(lora_model(tiny_model_dir), data, [], config(max_steps=12), run, tiny_tokenizer.pad_token_id, QUIET)
    assert error.value.code == "disk_full"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000004"]  # no staging left behind
    assert latest_checkpoint(run / "checkpoints").step == 4


def test_cost_budget_stops_with_a_checkpoint_and_cost_is_logged(tiny_model_dir, tiny_tokenizer, ticket_rows,
                                                                tmp_path):
    data = examples(tiny_tokenizer, ticket_rows)
    cfg = config(max_steps=50, price_per_hour=3600.0, max_cost=1e-9)  # a dollar a second: the first step spends it
    result = train(lora_model(tiny_model_dir), data, [], cfg, tmp_path / "run", tiny_tokenizer.pad_token_id, QUIET)
    assert result.status == "cost_limit" and result.steps == 1 and result.cost > 0
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").step == 1
    events = read_events(tmp_path / "run")
    assert events[-1]["kind"] == "cost_limit" and events[-1]["cost"] == pytest.approx(result.cost, rel=0.5)
    train_rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                  if '"train"' in line]
    assert train_rows[0]["cost"] > 0


def test_price_table_ships_cloud_machines_and_the_user_can_edit_it(afina_home):
    prices = load_price_table()
    assert {"aws-p4d.24xlarge", "aws-p5.48xlarge", "aws-g5.xlarge", "aws-g6.xlarge"} <= set(prices)
    afina_home.mkdir()
    (afina_home / "prices.yaml").write_text("machines:\n  aws-g5.xlarge: {price_per_hour: 0.5}\n  my-box: {price_per_hour: 2}\n")
    assert price_per_hour("aws-g5.xlarge", None) == 0.5 and price_per_hour("my-box", None) == 2
    assert price_per_hour("my-box", 9.0) == 9.0 and price_per_hour(None, None) == 0.0
    with pytest.raises(AfinaError) as error:
        price_per_hour("aws-p5.48xlarg", None)
    assert error.value.code == "unknown_machine" and "aws-p5.48xlarge" in error.value.hint


CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    from afina.training import checkpoints
    from afina.training.loop import train
    from afina.training.objectives import token_objective
    from tests.scripted import ScriptedObjective
    from tests.training.test_training import QUIET, config, examples, lora_model
    from tests.conftest import chat_row
    from afina.models.loading import load_tokenizer
    import json

    model_dir, run_dir, when = sys.argv[1], sys.argv[2], sys.argv[3]
    tokenizer = load_tokenizer(model_dir)
    rows = [json.loads(line) for line in open(sys.argv[4])]
    data = examples(tokenizer, rows)
    if when.startswith("write:"):  # die between two files of a checkpoint being written
        target = int(when[6:])
        real = checkpoints.save_file
        def dying_save(tensors, path):
            real(tensors, path)
            if f"step-{target:07d}" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
        checkpoints.save_file = dying_save
        script = lambda call, batch: None
    else:  # die as the next step starts (2 micro-batches a step): right after step kill_at and its checkpoint
        kill_at = int(when)
        latest = checkpoints.latest_checkpoint(__import__("pathlib").Path(run_dir) / "checkpoints")
        resumed_at = latest.step if latest else 0  # this process trains from there
        def script(call, batch):
            if call == 2 * (kill_at - resumed_at) + 1:
                os.kill(os.getpid(), signal.SIGKILL)
    objective = ScriptedObjective(token_objective(256), script)
    train(lora_model(model_dir), data, data[:4], config(save_every=2, gradient_accumulation=2), __import__("pathlib").Path(run_dir),
          tokenizer.pad_token_id, QUIET, objective=objective)
""")


def test_kill_9_at_random_steps_and_during_a_checkpoint_write_then_resume_matches(tiny_model_dir, tiny_tokenizer,
                                                                                   ticket_rows, tmp_path):
    data = examples(tiny_tokenizer, ticket_rows)
    pad = tiny_tokenizer.pad_token_id
    cfg = config(save_every=2, gradient_accumulation=2)
    straight = lora_model(tiny_model_dir)
    train(straight, data, data[:4], cfg, tmp_path / "straight", pad, QUIET)

    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in ticket_rows))
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}

    def kill_child(when: str) -> None:
        done = subprocess.run([sys.executable, "-c", CHILD, str(tiny_model_dir), str(run), when, str(rows_file)],
                              env=env, capture_output=True, text=True)
        assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]

    rng = random.Random(7)
    first = rng.randint(1, 5)
    kill_child(str(first))  # kill -9 right after a random step
    assert latest_checkpoint(run / "checkpoints").step == first // 2 * 2
    writing = first // 2 * 2 + 2
    kill_child(f"write:{writing}")  # kill -9 in the middle of writing a checkpoint
    assert (run / "checkpoints" / f".staging-step-{writing:07d}").is_dir()
    assert latest_checkpoint(run / "checkpoints").step == writing - 2  # the half-written one is never taken
    kill_child(str(rng.randint(writing + 1, 11)))  # and once more, later
    resumed = lora_model(tiny_model_dir)
    result = train(resumed, data, data[:4], cfg, run, pad, QUIET)
    assert result.status == "completed" and result.resumed_from == 6 and result.steps == 12
    for (name, a), (_, b) in zip(trainable_parameters(straight).items(),
                                 trainable_parameters(resumed).items()):
        assert torch.equal(a, b), name
    assert list_checkpoints(run / "checkpoints")[-1].name == "step-0000012"
