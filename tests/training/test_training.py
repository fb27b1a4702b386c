import json
import shutil

import pytest
import torch
from rich.console import Console

from afina.config.schema import LoraMethod, TrainingConfig
from afina.data.formats import normalize_row
from afina.data.tokenize import tokenize_records
from afina.errors import AfinaError
from afina.models.methods import apply_method, trainable_parameters
from afina.models.loading import load_model
from afina.training.checkpoints import latest_checkpoint, list_checkpoints
from afina.training.validation import evaluate_loss
from afina.training.loop import train
from afina.training.objectives import token_objective
from tests.scripted import ScriptedObjective

QUIET = Console(quiet=True)


def examples(tokenizer, rows):
    return tokenize_records([normalize_row(r, i + 1)[0] for i, r in enumerate(rows)], tokenizer, 512)


def lora_model(model_dir):
    torch.manual_seed(0)
    return apply_method(load_model(str(model_dir)), LoraMethod(r=4, alpha=8, dropout=0.1))


def config(**changes):
    values = dict(max_steps=12, row_length=256, learning_rate=5e-3, eval_every=4, save_every=4, warmup_ratio=0.1,
                  keep_checkpoints=10, precision="fp32")
    return TrainingConfig(**(values | changes))


def test_short_run_lowers_loss_trains_every_lora_weight_and_no_base_weight(tiny_model_dir, tiny_tokenizer,
                                                                          ticket_rows, tmp_path):
    data = examples(tiny_tokenizer, ticket_rows)
    model = lora_model(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before, _ = evaluate_loss(model, data, token_objective(256), 1, tiny_tokenizer.pad_token_id)
    result = train(model, data, data[:8], config(max_steps=30, learning_rate=2e-2), tmp_path / "run",
                   tiny_tokenizer.pad_token_id, QUIET)
    loss_after, _ = evaluate_loss(model, data, token_objective(256), 1, tiny_tokenizer.pad_token_id)
    assert result.steps == 30 and loss_after < loss_before * 0.8
    trainable = trainable_parameters(model)
    assert trainable and all("lora_" in n for n in trainable)
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), f"{name} did not change"
        else:
            assert torch.equal(param, before[name]), f"base weight {name} changed"
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"validation"') == 8


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_model_dir, tiny_tokenizer, ticket_rows, tmp_path):
    data = examples(tiny_tokenizer, ticket_rows)
    pad = tiny_tokenizer.pad_token_id
    straight = lora_model(tiny_model_dir)
    train(straight, data, data[:4], config(gradient_accumulation=2), tmp_path / "straight", pad, QUIET)

    # a run killed right after its step-4 checkpoint: only that checkpoint exists
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-0000004", resumed_dir / "checkpoints" / "step-0000004")
    resumed = lora_model(tiny_model_dir)
    torch.manual_seed(1234)  # a different RNG state (dropout): the checkpoint must restore its own
    result = train(resumed, data, data[:4], config(gradient_accumulation=2), resumed_dir, pad, QUIET)
    assert result.resumed_from == 4 and result.steps == 12
    for (name, a), (_, b) in zip(trainable_parameters(straight).items(), trainable_parameters(resumed).items()):
        assert torch.equal(a, b), name


def test_resume_skips_a_corrupted_newest_checkpoint(tiny_model_dir, tiny_tokenizer, ticket_rows, tmp_path):
    data = examples(tiny_tokenizer, ticket_rows)
    run = tmp_path / "run"
    train(lora_model(tiny_model_dir), data, [], config(max_steps=8), run, tiny_tokenizer.pad_token_id, QUIET)
    newest = list_checkpoints(run / "checkpoints")[-1]
    with (newest / "trainable.safetensors").open("r+b") as handle:
        handle.seek(200)
        handle.write(b"\xff\xff\xff\xff")
    (run / "checkpoints" / ".staging-step-0000012").mkdir()  # a half-written one is never considered
    assert latest_checkpoint(run / "checkpoints").step == 4


def test_checkpoint_retention_keeps_the_last_k(tiny_model_dir, tiny_tokenizer, ticket_rows, tmp_path):
    data = examples(tiny_tokenizer, ticket_rows)
    run = tmp_path / "run"
    train(lora_model(tiny_model_dir), data, [], config(max_steps=12, keep_checkpoints=2), run,
          tiny_tokenizer.pad_token_id, QUIET)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-0000008", "step-0000012"]


def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(tiny_model_dir, tiny_tokenizer, ticket_rows,
                                                                     tmp_path):
    import os
    import signal

    data = examples(tiny_tokenizer, ticket_rows)
    pad = tiny_tokenizer.pad_token_id
    straight = lora_model(tiny_model_dir)
    train(straight, data, data[:4], config(), tmp_path / "straight", pad, QUIET)

    def terminate_in_step_6(call, batch):
        if call == 6:  # the signal lands mid-step; the loop finishes step 6 then stops
            os.kill(os.getpid(), signal.SIGTERM)

    run = tmp_path / "interrupted"
    sigterm = ScriptedObjective(token_objective(256), terminate_in_step_6)
    stopped = train(lora_model(tiny_model_dir), data, data[:4], config(), run, pad, QUIET, objective=sigterm)
    assert stopped.status == "interrupted" and stopped.steps == 6
    assert latest_checkpoint(run / "checkpoints").step == 6
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed = lora_model(tiny_model_dir)
    result = train(resumed, data, data[:4], config(), run, pad, QUIET)
    assert result.status == "completed" and result.resumed_from == 6
    for (name, a), (_, b) in zip(trainable_parameters(straight).items(), trainable_parameters(resumed).items()):
        assert torch.equal(a, b), name


def test_a_stop_event_set_in_a_worker_thread_stops_after_that_step_with_a_checkpoint(tiny_model_dir, tiny_tokenizer,
                                                                                      ticket_rows, tmp_path):
    import threading

    from afina.training.loop import stop_when

    data = examples(tiny_tokenizer, ticket_rows)
    cancel = threading.Event()
    cancel_in_step_5 = ScriptedObjective(token_objective(256), lambda call, batch: cancel.set() if call == 5 else None)
    results = []

    def work():
        with stop_when(cancel):
            results.append(train(lora_model(tiny_model_dir), data, [], config(), tmp_path / "run",
                                 tiny_tokenizer.pad_token_id, QUIET, objective=cancel_in_step_5))

    thread = threading.Thread(target=work)  # signals cannot reach a thread: the event does
    thread.start()
    thread.join()
    assert results[0].status == "interrupted" and results[0].steps == 5
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").step == 5


def test_non_finite_losses_are_skipped_then_stop_the_run(tiny_model_dir, tiny_tokenizer, ticket_rows, tmp_path):
    data = examples(tiny_tokenizer, ticket_rows)
    one_spike = ScriptedObjective(token_objective(256), lambda call, batch: float("nan") if call == 3 else None)
    model = lora_model(tiny_model_dir)
    result = train(model, data, [], config(max_steps=6), tmp_path / "one", tiny_tokenizer.pad_token_id, QUIET,
                   objective=one_spike)
    assert result.status == "completed" and result.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in trainable_parameters(model).values())

    poisoned = ScriptedObjective(token_objective(256), lambda call, batch: float("nan") if call >= 3 else None)
    model = lora_model(tiny_model_dir)
    result = train(model, data, [], config(max_steps=12, save_every=2), tmp_path / "many", tiny_tokenizer.pad_token_id,
                   QUIET, objective=poisoned)
    assert result.status == "diverged" and result.skipped_steps == 4 and result.steps == 6
    assert latest_checkpoint(tmp_path / "many" / "checkpoints").step == 2  # the last good step, nothing after it
    assert all(torch.isfinite(p).all() for p in trainable_parameters(model).values())


def test_early_stopping_returns_the_best_checkpoint(tiny_model_dir, tiny_tokenizer, ticket_rows, tmp_path):
    from safetensors.torch import load_file

    data = examples(tiny_tokenizer, ticket_rows)
    model = lora_model(tiny_model_dir)
    # a min_delta no run can beat: the first validation is the best, the next one ends the run
    cfg = config(max_steps=30, eval_every=3, save_every=100, early_stopping_patience=1, early_stopping_min_delta=10.0,
                 keep_checkpoints=1)
    result = train(model, data, data[:8], cfg, tmp_path / "run", tiny_tokenizer.pad_token_id, QUIET)
    assert result.status == "early_stopped" and result.steps == 6 and result.best_step == 3
    best = load_file(tmp_path / "run" / "checkpoints" / "step-0000003" / "trainable.safetensors")
    for name, param in trainable_parameters(model).items():
        assert torch.equal(param, best[name]), name


def test_time_budget_stops_with_a_checkpoint(tiny_model_dir, tiny_tokenizer, ticket_rows, tmp_path):
    data = examples(tiny_tokenizer, ticket_rows)
    result = train(lora_model(tiny_model_dir), data, [], config(max_steps=50, max_time_minutes=1e-6),
                   tmp_path / "run", tiny_tokenizer.pad_token_id, QUIET)
    assert result.status == "time_limit" and result.steps == 1
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").step == 1


def test_time_budget_stops_before_a_step_that_would_end_past_it():
    from types import SimpleNamespace

    from afina.training.loop import StopRequest, stop_reason

    def reason(seconds: float, step: int, minutes: float) -> str:
        trainer = SimpleNamespace(config=TrainingConfig(max_time_minutes=minutes),
                                  state=SimpleNamespace(seconds=seconds, evals_without_improvement=0), step=step)
        return stop_reason(trainer, StopRequest(), 0.0, False)

    # 5 steps in 50 s: the next one would end at about 60 s
    assert reason(50.0, 5, 61 / 60) == "completed"
    assert reason(50.0, 5, 59 / 60) == "time_limit"
    assert reason(50.0, 5, 50 / 60) == "time_limit"


def test_continued_pretraining_trains_every_token_of_raw_text(tiny_model_dir, tmp_path, afina_home):
    from afina.config.loading import validate_config
    from afina.pipeline.stages import evaluate_run, run_training
    from tests.conftest import write_jsonl

    rows = [{"text": f"the printer in office {i} is jammed again and the vpn não conecta"} for i in range(30)]
    path = write_jsonl(tmp_path / "docs.jsonl", rows)
    config = validate_config({"model": str(tiny_model_dir), "data": {"path": str(path)},
                              "objective": {"name": "cpt", "block_length": 16, "overlap": 4},
                              "training": {"max_steps": 15, "row_length": 64, "learning_rate": 1e-2, "eval_every": 5,
                                           "precision": "fp32"}})
    run_dir, result = run_training(config, QUIET)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"validation"' in line]
    assert result.steps == 15 and losses[-1] < losses[0]
    report = evaluate_run(run_dir, QUIET)
    assert report["tuned"]["loss"] < report["base"]["loss"] and report["tuned"]["predictions"] == []

    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "q", "completion": "a"}] * 3)
    with pytest.raises(AfinaError) as error:
        run_training(validate_config({"model": str(tiny_model_dir), "data": {"path": str(chat)}, "objective": "cpt"}),
                     QUIET)
    assert error.value.code == "wrong_data_for_objective"


def test_the_optimizer_is_fused_adamw_and_updates_like_plain_adamw():
    from afina.training.optimizer import make_optimizer

    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    fused = make_optimizer(weights, 1e-2, 0.01)
    plain = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.01, foreach=False)
    assert fused.defaults["fused"]
    for _ in range(3):
        for group in (weights, copies):
            for w in group:
                w.grad = torch.ones_like(w) * w.detach().sum()
        fused.step()
        plain.step()
    for w, c in zip(weights, copies):
        assert torch.allclose(w, c, atol=1e-6)
