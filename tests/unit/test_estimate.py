"""The pre-launch estimate on the tiny model: its arithmetic against the prepared model, its
activation formula against what autograd really saves, the fit check and its suggestions, and
`afina estimate` end to end (table, JSON, bad input, nothing written)."""

import itertools
import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from afina.cli.estimate import estimate_command
from afina.cli.main import user_errors
from afina.config.loading import validate_config
from afina.config.methods import FullMethod, LoraMethod
from afina.errors import AfinaError
from afina.models.methods import apply_method, body_and_head, trainable_parameters
from afina.models.attention import IMPLEMENTATION
from afina.models.loading import load_model, model_config
from afina.pipeline.prepare import prepare_data
from afina.estimate import Machine, check_before_launch, check_fits, estimate_run
from afina.estimate.activations import (MicroBatch, ModelShape, activation_bytes, attention_keeps_scores,
                                        layer_activation_bytes, prepare_on_meta)
from afina.estimate.fit import FIT_HEADROOM, variant
from afina.estimate.memory import CACHED_SHAPES
from afina.training.loop import total_steps
from afina.training.objectives import objective_for
from tests.conftest import write_jsonl

CPU = torch.device("cpu")
NO_RUNTIME = Machine(CPU, runtime=0, capacity=2**40)  # figures without this process's own memory: exact


def make_config(tiny_model_dir, tmp_path, ticket_rows, method="lora", **training):
    data = write_jsonl(tmp_path / "tickets.jsonl", ticket_rows)
    return validate_config({"model": str(tiny_model_dir), "data": {"path": str(data), "validation": 0.1, "test": 0.1},
                            "method": {"name": method} if isinstance(method, str) else method,
                            "training": {"row_length": 128, "precision": "fp32", **training}})


def train_examples(config):
    return prepare_data(config).examples["train"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_weights_gradients_and_optimizer_match_the_prepared_model(method, tiny_model_dir, tmp_path, ticket_rows):
    config = make_config(tiny_model_dir, tmp_path, ticket_rows, method)
    estimate = check_fits(config, train_examples(config), machine=NO_RUNTIME)
    model = apply_method(load_model(str(tiny_model_dir)), config.method)
    parameters = {id(p): p for p in model.parameters()}.values()
    trainable = trainable_parameters(model).values()
    count = sum(p.numel() for p in parameters)
    trained = sum(p.numel() for p in trainable)
    assert (estimate.parameters, estimate.trainable_parameters) == (count, trained)
    assert estimate.memory.weights == 4 * count  # fp32 run: every weight in fp32
    assert estimate.memory.gradients == 4 * trained
    assert estimate.memory.optimizer == 2 * 4 * trained  # AdamW: two fp32 moments
    assert (trained == count) == (method == "full")


def test_a_frozen_base_under_bf16_is_counted_in_bf16(tiny_model_dir, tmp_path, ticket_rows):
    config = make_config(tiny_model_dir, tmp_path, ticket_rows, "lora", precision="bf16")
    estimate = check_fits(config, train_examples(config), machine=NO_RUNTIME)
    frozen = estimate.parameters - estimate.trainable_parameters
    assert estimate.memory.weights == 2 * frozen + 4 * estimate.trainable_parameters  # adapters stay fp32
    full = check_fits(variant(config, ["method=full"]), train_examples(config), machine=NO_RUNTIME)
    assert full.memory.weights == 4 * full.parameters  # trained weights stay fp32 under autocast


def test_data_summary_matches_the_loop(tiny_model_dir, tmp_path, ticket_rows):
    config = make_config(tiny_model_dir, tmp_path, ticket_rows, rows_per_batch=2, gradient_accumulation=2, epochs=3)
    examples = train_examples(config)
    data = check_fits(config, examples, machine=NO_RUNTIME).data
    objective = objective_for(config)
    assert data.tokens == sum(len(e.input_ids) for e in examples)
    assert data.total_steps == total_steps(examples, config.training, objective) == 3 * data.steps_per_epoch
    # what the loop's batches hold and compute: the tickets share their system prompt
    batches = [objective.collate(step[i : i + 2], 0) for step in objective.epoch_steps(examples, config.training, 0)
               for i in range(0, len(step), 2)]
    held = sum(b.tokens - int(b.examples[:, 3].sum()) for b in batches)
    assert data.rows == sum(b.input_ids.shape[0] for b in batches)
    assert data.shared_share == pytest.approx(1 - held / data.tokens) and data.shared_share > 0.1
    assert data.padding_share == pytest.approx(1 - held / sum(b.input_ids.numel() for b in batches))


SAVED_CASES = [("lora", LoraMethod(r=4), torch.float32, False), ("lora no dropout", LoraMethod(r=4, dropout=0.0),
               torch.float32, False), ("full", FullMethod(), torch.float32, False),
               ("full under bf16 autocast", FullMethod(), torch.float32, True),
               ("lora on a bf16 base", LoraMethod(r=4), torch.bfloat16, True)]


@pytest.mark.parametrize("name,method,dtype,bf16", SAVED_CASES, ids=[c[0] for c in SAVED_CASES])
def test_layer_formula_equals_what_autograd_saves(name, method, dtype, bf16):
    """Saved-tensor hooks count the bytes a forward keeps for backward; one layer's share is the
    difference between a 2-layer and a 1-layer model on the same packed rows."""
    from transformers import LlamaConfig

    def hf_config(layers):
        return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=80, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)

    rows, length = 2, 24
    config = hf_config(2)
    shape = ModelShape.from_config(config)
    scores = attention_keeps_scores(CPU, torch.bfloat16 if bf16 else dtype, shape.heads, shape.head_dim)
    for shared in (0, 4):  # the second example of each row reading the first's first 4 tokens, or not
        measured = saved_bytes(hf_config(2), method, dtype, bf16, rows, length, shared) - \
            saved_bytes(hf_config(1), method, dtype, bf16, rows, length, shared)
        batch = MicroBatch(rows, length, 8, examples=2 * rows, longest=(length + shared) // 2, copied=rows * shared)
        predicted = layer_activation_bytes(shape, prepare_on_meta(config, method, dtype), batch, bf16, scores)
        assert predicted == measured, shared


def saved_bytes(config, method, dtype, bf16, rows, length, shared=0) -> int:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config._attn_implementation = IMPLEMENTATION  # as load_model loads
    model = apply_method(AutoModelForCausalLM.from_config(config, dtype=dtype), method).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    body, _ = body_and_head(model)
    # two examples per row, position ids restarting as in packed rows; blocks of one length (the formula
    # does not count block padding)
    half = (length + shared) // 2
    positions = torch.cat([torch.arange(half), torch.arange(shared, shared + length - half)]).expand(rows, -1)
    # `Batch.examples`: per example (start, length, shared prefix start, shared prefix length)
    table = torch.tensor([[r * length, half, r * length, 0] for r in range(rows)]
                         + [[r * length + half, length - half, r * length, shared] for r in range(rows)])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        body(input_ids=torch.randint(0, 64, (rows, length)), position_ids=positions, examples=table)
    return sum(kept.values())


def test_activations_grow_with_rows_and_row_length(tiny_model_dir):
    from afina.models.loading import model_config

    config = model_config(str(tiny_model_dir))
    shape = ModelShape.from_config(config)
    model = prepare_on_meta(config, LoraMethod(), torch.float32)

    def activations(rows, length):
        return activation_bytes(shape, model, MicroBatch(rows, length, 16), False, False, False)

    assert activations(1, 128) < activations(2, 128) < activations(4, 128)
    assert activations(1, 128) < activations(1, 256) < activations(1, 512)


def test_more_rows_per_micro_batch_predict_more_memory(tiny_model_dir, tmp_path, ticket_rows):
    config = make_config(tiny_model_dir, tmp_path, ticket_rows, row_length=64)
    examples = train_examples(config)
    one, two = (check_fits(variant(config, [f"training.rows_per_batch={n}"]), examples, machine=NO_RUNTIME)
                for n in (1, 2))
    assert two.micro_batch.tokens > one.micro_batch.tokens
    assert two.memory.activations > one.memory.activations and two.memory.peak > one.memory.peak


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_lowers_the_activation_estimate(method, tiny_model_dir, tmp_path, ticket_rows):
    config = make_config(tiny_model_dir, tmp_path, ticket_rows, method, rows_per_batch=2)
    examples = train_examples(config)
    plain = check_fits(config, examples, machine=NO_RUNTIME)
    checkpointed = check_fits(variant(config, ["method.gradient_checkpointing=true"]), examples, machine=NO_RUNTIME)
    assert checkpointed.gradient_checkpointing and not plain.gradient_checkpointing
    assert checkpointed.memory.activations < plain.memory.activations
    assert checkpointed.memory.weights == plain.memory.weights


def test_a_run_too_big_for_the_machine_gets_settings_that_fit(tiny_model_dir, tmp_path, ticket_rows):
    config = make_config(tiny_model_dir, tmp_path, ticket_rows, "full", rows_per_batch=4, row_length=128)
    examples = train_examples(config)
    checkpointing = ["method.gradient_checkpointing=true"]
    peak = check_fits(config, examples, machine=NO_RUNTIME).memory.peak
    lower = check_fits(variant(config, checkpointing), examples, machine=NO_RUNTIME).memory.peak
    capacity = int((peak + lower) / 2 / FIT_HEADROOM)  # checkpointing fits, the run as configured does not
    estimate = check_fits(config, examples, machine=Machine(CPU, 0, capacity))
    assert not estimate.fits and estimate.suggestions
    fitting = [s for s in estimate.suggestions if s.fits]
    assert checkpointing in [s.overrides for s in fitting]
    keys = {o.split("=")[0] for s in estimate.suggestions for o in s.overrides}
    assert {"training.rows_per_batch", "training.row_length", "method"} <= keys
    for suggestion in fitting:  # each suggestion, applied, is a config that fits
        again = check_fits(variant(config, suggestion.overrides), examples, machine=Machine(CPU, 0, capacity))
        assert again.fits and again.memory.peak == suggestion.peak
    with pytest.raises(AfinaError) as error:
        estimate.require_fit()
    assert error.value.code == "does_not_fit" and " ".join(fitting[0].overrides) in error.value.hint


def test_a_run_nothing_can_save_is_refused(tiny_model_dir, tmp_path, ticket_rows):
    config = make_config(tiny_model_dir, tmp_path, ticket_rows, "full", rows_per_batch=2)
    estimate = check_fits(config, train_examples(config), machine=Machine(CPU, 0, 1024))
    assert not estimate.fits and not estimate.recoverable
    assert estimate.suggestions and not any(s.fits for s in estimate.suggestions)
    with pytest.raises(AfinaError, match="does not fit"):
        estimate.require_fit()
    assert check_fits(config, train_examples(config), machine=NO_RUNTIME).require_fit() is None


def test_the_launch_check_passes_a_small_run_and_leaves_preference_objectives_alone(tiny_model_dir, tmp_path,
                                                                                   ticket_rows):
    config = make_config(tiny_model_dir, tmp_path, ticket_rows)
    assert check_before_launch(config, train_examples(config)) is None  # fits this machine easily
    dpo = variant(config, ["objective=dpo"])
    assert check_before_launch(dpo, []) is None
    with pytest.raises(AfinaError) as error:
        check_fits(dpo, [])
    assert error.value.code == "estimate_unsupported"


def test_calibration_times_real_steps_without_touching_the_afina_home(tiny_model_dir, tmp_path, ticket_rows,
                                                                     afina_home):
    config = make_config(tiny_model_dir, tmp_path, ticket_rows, gradient_accumulation=2,
                         price_per_hour=3.6)
    data = prepare_data(config)
    estimate = estimate_run(config, data.examples["train"], data.tokenizer.pad_token_id)
    time = estimate.time
    assert time.source.startswith("calibrated") and time.seconds_per_epoch > 0
    assert time.total_seconds == pytest.approx(time.seconds_per_epoch)  # one epoch
    assert time.total_cost == pytest.approx(time.total_seconds / 3600 * 3.6)
    assert not afina_home.exists()
    table_only = estimate_run(config, data.examples["train"], data.tokenizer.pad_token_id, calibrate=False)
    assert table_only.time.seconds_per_epoch is None and "calibrate" in table_only.time.source


@pytest.mark.skipif(torch.cuda.is_available(), reason="the table answers for the GPU here, not the named machine")
def test_without_calibration_a_priced_cloud_machine_is_timed_from_the_gpu_table(tiny_model_dir, tmp_path,
                                                                               ticket_rows):
    config = make_config(tiny_model_dir, tmp_path, ticket_rows, machine="aws-g6.xlarge")  # one L4
    data = prepare_data(config)
    time = estimate_run(config, data.examples["train"], data.tokenizer.pad_token_id, calibrate=False).time
    assert "L4" in time.source and time.seconds_per_epoch > 0 and time.price_per_hour == pytest.approx(0.805)
    assert time.total_cost == pytest.approx(time.total_seconds / 3600 * 0.805)


def cli():
    """`afina estimate` as main.py registers it (or the same registration, until it does)."""
    from afina.cli.main import app

    if "estimate" in {c.name for c in app.registered_commands}:
        return app
    local = typer.Typer()
    local.callback()(lambda: None)
    local.command("estimate")(user_errors(estimate_command))
    return local


def test_cli_prints_the_table_and_json(tiny_model_dir, tmp_path, ticket_rows, afina_home):
    config = tmp_path / "run.yaml"
    write_jsonl(tmp_path / "tickets.jsonl", ticket_rows)
    config.write_text(f"model: {tiny_model_dir}\ndata: {{path: tickets.jsonl}}\ntraining: {{row_length: 128}}\n")
    result = CliRunner().invoke(cli(), ["estimate", str(config), "training.rows_per_batch=2"])
    assert result.exit_code == 0, result.output
    for text in ("peak", "weights", "activations", "optimizer steps", "time per epoch", "fits"):
        assert text in result.output
    result = CliRunner().invoke(cli(), ["estimate", str(config), "--json", "--no-calibrate"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["fits"] and report["memory"]["peak"] >= report["memory"]["weights"] > 0
    assert report["micro_batch"]["rows"] == 1 and report["time"]["seconds_per_epoch"] is None
    assert not afina_home.exists()


@pytest.mark.parametrize("case", ["missing_config", "invalid_config", "missing_data"])
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(case, tiny_model_dir, tmp_path, afina_home):
    config = tmp_path / "run.yaml"
    if case == "invalid_config":
        config.write_text(f"model: {tiny_model_dir}\ndata: {{path: x.jsonl}}\ntraining: {{rows_per_bach: 2}}\n")
    elif case == "missing_data":
        config.write_text(f"model: {tiny_model_dir}\ndata: {{path: nope.jsonl}}\n")
    result = CliRunner().invoke(cli(), ["estimate", str(config)])
    code = {"missing_config": "file_not_found", "invalid_config": "invalid_config", "missing_data": "file_not_found"}
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"error[{code[case]}]"), result.output
    assert "Traceback" not in result.output
    assert not afina_home.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shape caches are those of bf16 matmuls on CPU")
def test_bf16_on_cpu_counts_the_kernel_caches_of_micro_batch_shapes_up_to_their_bound(tiny_model_dir, tmp_path,
                                                                                   ticket_rows):
    config = make_config(tiny_model_dir, tmp_path, ticket_rows, precision="bf16", row_length=64,
                         gradient_accumulation=1)
    examples = train_examples(config)
    one, whole = (check_fits(variant(config, [f"training.max_steps={n}"] if n else []), examples,
                             machine=NO_RUNTIME).memory.shape_caches for n in (1, None))
    assert one > 0 and whole == CACHED_SHAPES * one  # one step, one shape; the epoch's many lengths, bounded
    fp32 = config.model_copy(update={"training": config.training.model_copy(update={"precision": "fp32"})})
    assert check_fits(fp32, examples, machine=NO_RUNTIME).memory.shape_caches == 0


def test_train_refuses_a_run_that_cannot_fit_before_loading_anything(tiny_model_dir, tmp_path, ticket_rows,
                                                                    afina_home, monkeypatch):
    from afina.cli.main import app
    from afina.estimate import machine

    config = tmp_path / "run.yaml"
    write_jsonl(tmp_path / "tickets.jsonl", ticket_rows)
    config.write_text(f"model: {tiny_model_dir}\ndata: {{path: tickets.jsonl}}\n"
                      "training: {row_length: 128, rows_per_batch: 4}\n")
    monkeypatch.setattr(machine, "available_ram", lambda: 0)  # a machine with nothing left to give
    loaded = []
    monkeypatch.setattr("afina.pipeline.stages.load_model", lambda *a, **k: loaded.append(a))
    result = CliRunner().invoke(app, ["train", str(config)])
    errors = [line for line in result.output.splitlines() if line.startswith("error[")]
    assert result.exit_code == 2 and len(errors) == 1 and errors[0].startswith("error[does_not_fit]"), result.output
    assert "rows_per_batch" in result.output or "smaller model" in result.output  # what would fit, or why nothing does
    assert not loaded and not (afina_home / "runs").exists()


@pytest.mark.parametrize("shape,method,fits_one,needs_fsdp", [("llama-1b", "lora", True, False),
                                                              ("llama-8b", "full", False, True),
                                                              ("llama-70b", "lora", False, True)])
def test_memory_per_device_for_llama_shapes_from_their_configs_alone(shape, method, fits_one, needs_fsdp):
    from afina.estimate.machine import CUDA_CONTEXT_BYTES
    from afina.estimate.parallel import advice, device_memory_table, llama_config, synthetic_examples

    config = validate_config({"model": "default", "data": {"path": "unused.jsonl"},
                              "method": {"name": method, "gradient_checkpointing": True},
                              "training": {"row_length": 2048, "precision": "bf16"}})
    gpus = Machine(torch.device("cuda"), CUDA_CONTEXT_BYTES, 80 * 2**30)
    rows = device_memory_table(config, synthetic_examples(config), gpus, llama_config(shape))
    ddp = [r for r in rows if r.parallel == "ddp"]
    fsdp = [r for r in rows if r.parallel == "fsdp"]
    assert [r.devices for r in ddp] == [r.devices for r in fsdp] == [1, 2, 4, 8]
    assert ddp[0].peak == fsdp[0].peak and ddp[0].fits == fits_one
    assert all(r.sharded == ddp[0].sharded for r in ddp)  # DDP: every device holds everything
    for r in fsdp[1:]:  # FSDP: 1/N of the weights, gradients and optimizer state
        assert r.sharded == pytest.approx(ddp[0].sharded / r.devices, rel=1e-6)
    assert all(a.peak > b.peak for a, b in itertools.pairwise(fsdp))
    assert ("needs FSDP" in advice(rows)) == needs_fsdp


def measure_fsdp_shards(rank: int, port: int, model_dir, out) -> None:
    """A rank of a 2-process FSDP run of the tiny model (full fine-tuning, fp32): one optimizer step,
    then the bytes of the shards it holds (weights, gradients, AdamW moments)."""
    import os

    import torch.distributed as dist

    from afina.training.distributed import current_ranks, start_process_group, wrap_for_parallel
    from afina.training.objectives import token_objective

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    start_process_group()
    model = apply_method(load_model(str(model_dir)), FullMethod())
    _, objective = wrap_for_parallel(model, token_objective(64), current_ranks("fsdp"), torch.device("cpu"))
    trainable = trainable_parameters(model)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    ids = torch.arange(1, 33).unsqueeze(0)
    objective.loss_sum(model, _tiny_batch(ids)).backward()
    optimizer.step()
    local = [p.to_local() for p in model.parameters()] + [p.grad.to_local() for p in trainable.values()]
    local += [v.to_local() for s in optimizer.state.values() for v in s.values() if hasattr(v, "to_local")]
    (out / f"rank{rank}.txt").write_text(str(sum(t.numel() * t.element_size() for t in local)))
    dist.destroy_process_group()


def _tiny_batch(ids):
    from afina.data.packing import collate_rows
    from afina.data.tokenize import Example

    return collate_rows([[Example(ids[0].tolist(), [True] * ids.shape[1], 1)]], 0)


def test_fsdp_memory_per_device_on_two_processes_is_within_25_percent_of_the_measured_shards(
        tiny_model_dir, tmp_path, ticket_rows):
    """Measured: the tensor bytes each rank holds between steps (its shards of the weights, gradients
    and AdamW moments), not peak RSS: on the tiny model the Python runtime would be most of that."""
    import socket

    import torch.multiprocessing as mp

    from afina.estimate.parallel import device_memory_table

    config = make_config(tiny_model_dir, tmp_path, ticket_rows, "full")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(measure_fsdp_shards, args=(port, tiny_model_dir, tmp_path), nprocs=2, start_method="spawn")
    measured = [int((tmp_path / f"rank{r}.txt").read_text()) for r in (0, 1)]
    hf_config = model_config(str(tiny_model_dir))
    row = device_memory_table(config, train_examples(config), NO_RUNTIME, hf_config, (2,))[-1]
    assert row.parallel == "fsdp"
    for bytes_held in measured:
        assert abs(row.sharded - bytes_held) <= 0.25 * bytes_held, (row.sharded, bytes_held)


def test_shape_table_from_a_config_with_auto_training_fields(tmp_path, afina_home):
    config = tmp_path / "run.yaml"
    config.write_text("model: x\ndata: {path: tickets.jsonl}\n"
                      "training: {epochs: auto, learning_rate: auto, gradient_accumulation: auto, row_length: 512}\n")
    result = CliRunner().invoke(cli(), ["estimate", str(config), "--shape", "llama-1b", "--gpu-gib", "24", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {(row["parallel"], row["devices"]) for row in rows} >= {("ddp", 1), ("fsdp", 8)}


def test_a_gpu_table_drawn_without_a_gpu_assumes_bf16_for_auto_precision():
    from afina.devices import resolve_precision

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: auto follows its GPU")
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"


def test_the_allocator_s_share_follows_the_allocator_afina_runs_under(tiny_model_dir, tmp_path, ticket_rows,
                                                                      monkeypatch):
    from afina.estimate import memory

    config = make_config(tiny_model_dir, tmp_path, ticket_rows)
    examples = train_examples(config)
    shares = {}
    for allocator in ("glibc", "libtcmalloc_minimal.so.4"):
        monkeypatch.setattr(memory, "running_allocator", lambda: allocator)
        estimate = check_fits(config, examples, machine=NO_RUNTIME).memory
        shares[allocator] = estimate.allocator / estimate.activations
    assert shares["glibc"] == pytest.approx(memory.CPU_GLIBC_SHARE, rel=1e-3)
    assert shares["libtcmalloc_minimal.so.4"] == pytest.approx(memory.CPU_ALLOCATOR_SHARE, rel=1e-3)
