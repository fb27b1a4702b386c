"""Every fine-tuning method on the tiny Llama: what trains and what stays, how many numbers train,
saving and reloading, the base model inside the tuned one, merging, and the CUDA-only methods.

Expected trainable-parameter counts are written out from the tiny config (hidden 32, MLP 64,
2 layers, 4 heads of 8 with 2 key/value heads, tied embeddings), not read back from the code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console

from afina.config.loading import validate_config
from afina.config.methods import (AdapterMethod, DoraMethod, FreezeMethod, FullMethod, Ia3Method, LoraMethod,
                                  LoreftMethod, PrefixMethod, PromptMethod, QloraMethod, RsloraMethod)
from afina.config.schema import TrainingConfig
from afina.data.formats import normalize_row
from afina.data.packing import collate_rows, pack_examples
from afina.data.tokenize import tokenize_records
from afina.errors import AfinaError
from afina.models.methods import (apply_method, base_model, body_and_head, check_method_supported,
                                   trainable_parameters)
from afina.models.artifacts import load_trained, merge_trained, save_trained
from afina.models.loading import load_model
from afina.models.loreft import prompt_end_positions, prompt_mask_from_targets, segment_ids
from afina.training.validation import evaluate_loss
from afina.training.loop import train
from afina.training.objectives import token_objective

QUIET = Console(quiet=True)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/training/conftest.py
CONFIGS = Path(__file__).parents[2] / "configs"

# method, learning rate, steps: enough for each method to cut the loss on the tiny model
CASES = {
    "full": (FullMethod(), 3e-3, 10),
    "freeze": (FreezeMethod(train_last_layers=1, train_modules=["norms", "lm_head"]), 3e-3, 10),
    "lora": (LoraMethod(r=4, alpha=8, dropout=0.1), 2e-2, 10),
    "dora": (DoraMethod(r=4, alpha=8, dropout=0.1), 2e-2, 10),
    "rslora": (RsloraMethod(r=4, alpha=8, dropout=0.1), 2e-2, 10),
    "ia3": (Ia3Method(), 5e-2, 10),
    "prefix": (PrefixMethod(num_virtual_tokens=4), 2e-1, 10),
    "prompt": (PromptMethod(num_virtual_tokens=4), 2e-1, 20),
    "loreft": (LoreftMethod(r=2, positions="all", dropout=0.0), 2e-2, 10),
    "adapter": (AdapterMethod(bottleneck=8), 2e-2, 10),
}


def expected_trainable(name: str) -> int:
    """Trainable numbers of each CASES method on the tiny Llama, from its config."""
    hidden, mlp, layers, vocab, kv = 32, 64, 2, 400, 2 * 8  # kv: key/value heads x head size
    linears = {"q": (hidden, hidden), "k": (hidden, kv), "v": (hidden, kv), "o": (hidden, hidden),
               "gate": (hidden, mlp), "up": (hidden, mlp), "down": (mlp, hidden)}  # (in, out)
    layer = sum(i * o for i, o in linears.values()) + 2 * hidden  # weights and two RMSNorms
    lora = layers * sum(4 * (i + o) for i, o in linears.values())  # r (in + out) per targeted linear
    return {
        "full": vocab * hidden + layers * layer + hidden,
        "freeze": vocab * hidden + layer + (layers - 1) * 2 * hidden + hidden,  # tied head = embeddings
        "lora": lora,
        "dora": lora + layers * sum(o for _, o in linears.values()),  # plus a magnitude per output
        "rslora": lora,
        "ia3": layers * (kv + kv + mlp),  # k and v outputs, down-projection input
        "prefix": 4 * layers * 2 * kv,  # a key and a value per virtual token, layer and kv head
        "prompt": 4 * hidden,
        "loreft": layers * (2 * 2 * hidden + 2),  # R (r x d), W (r x d), b (r)
        "adapter": layers * 2 * (2 * hidden * 8 + 8 + hidden),  # down and up with biases, twice
    }[name]


def examples(tokenizer, rows):
    return tokenize_records([normalize_row(r, i + 1)[0] for i, r in enumerate(rows)], tokenizer, 512)


def build(model_dir: Path, method):
    torch.manual_seed(0)
    return apply_method(load_model(str(model_dir)), method)


def packed_logits(model, batch) -> torch.Tensor:
    """Logits over a packed batch through the same body and head the loss uses."""
    body, head = body_and_head(model)
    mask = prompt_mask_from_targets(batch.targets, batch.position_ids)
    with torch.no_grad():
        return head(body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                         prompt_mask=mask).last_hidden_state)


def plain_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def perturb(model, scale: float = 0.3) -> None:
    """Move every trainable parameter, as training would, without spending the time."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in trainable_parameters(model).values():
            parameter.add_(torch.randn_like(parameter) * scale)


@pytest.mark.parametrize("name", list(CASES))
def test_method_trains_only_its_parameters_saves_and_reloads(name, tiny_model_dir, tiny_tokenizer, ticket_rows,
                                                             tmp_path):
    method, learning_rate, steps = CASES[name]
    data = examples(tiny_tokenizer, ticket_rows)
    pad = tiny_tokenizer.pad_token_id
    probe = collate_rows(pack_examples(data[:6], 256), pad)
    single = torch.tensor([data[0].input_ids])
    base = load_model(str(tiny_model_dir)).eval()
    base_packed, base_single = packed_logits(base, probe), plain_logits(base, single)

    model = build(tiny_model_dir, method)
    trainable = trainable_parameters(model)
    assert sum(p.numel() for p in trainable.values()) == expected_trainable(name)
    assert method.freezes_base == (name not in ("full", "freeze"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before, _ = evaluate_loss(model, data, token_objective(256, method.shares_prefixes), 1, pad)
    config = TrainingConfig(max_steps=steps, row_length=256, learning_rate=learning_rate, warmup_ratio=0.0,
                            schedule="constant", eval_every=100, save_every=100, precision="fp32")
    train(model, data, [], config, tmp_path / "run", pad, QUIET)
    loss_after, _ = evaluate_loss(model, data, token_objective(256, method.shares_prefixes), 1, pad)
    assert loss_after < loss_before * 0.9, (loss_before, loss_after)
    for parameter_name, parameter in model.named_parameters():
        changed = not torch.equal(parameter, before[parameter_name])
        assert changed == (parameter_name in trainable), f"{parameter_name}: changed={changed}"

    model.eval()
    tuned_packed, tuned_single = packed_logits(model, probe), plain_logits(model, single)
    if method.freezes_base:
        with base_model(model):
            assert torch.equal(packed_logits(model, probe), base_packed)
            assert torch.equal(plain_logits(model, single), base_single)
        assert torch.equal(packed_logits(model, probe), tuned_packed)  # the adapter is back on
    else:
        with pytest.raises(AfinaError) as error:
            with base_model(model):
                pass
        assert error.value.code == "base_model_unavailable"

    save_trained(model, method, tmp_path / "saved")
    saved_bytes = sum(f.stat().st_size for f in (tmp_path / "saved").iterdir())
    if method.freezes_base:  # only what was trained is written, never the base
        assert saved_bytes < 4 * sum(p.numel() for p in base.parameters())
    reloaded = load_trained(load_model(str(tiny_model_dir)), tmp_path / "saved").eval()
    torch.testing.assert_close(packed_logits(reloaded, probe), tuned_packed, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain_logits(reloaded, single), tuned_single, rtol=0, atol=1e-6)
    assert not trainable_parameters(reloaded)


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_prompt_learning_handles_packed_rows_and_generates_with_its_virtual_tokens(name, tiny_model_dir,
                                                                                   tiny_tokenizer, ticket_rows):
    """PEFT's own forward cannot take packed rows and its generation loses the virtual tokens on
    transformers 5; afina's body and generation fix must agree with PEFT's single-example forward."""
    data = examples(tiny_tokenizer, ticket_rows)
    model = build(tiny_model_dir, CASES[name][0])
    perturb(model)
    model.eval()
    rows = pack_examples(data[:6], 256)
    packed = packed_logits(model, collate_rows(rows, tiny_tokenizer.pad_token_id))
    for row_index, row in enumerate(rows):
        start = 0
        for example in row:
            alone = plain_logits(model, torch.tensor([example.input_ids]))[0, -len(example.input_ids):]
            torch.testing.assert_close(packed[row_index, start : start + len(example.input_ids)], alone,
                                       rtol=0, atol=1e-5)
            start += len(example.input_ids)

    tiny_tokenizer.padding_side = "left"
    prompts = ["<|im_start|>user\nthe printer is broken<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nmy password expired and my account is locked<|im_end|>\n<|im_start|>assistant\n"]
    batch = tiny_tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        generated = model.generate(**batch, **options)[:, batch["input_ids"].shape[1]:]
    for row, prompt in enumerate(prompts):
        ids = tiny_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        for _ in range(5):  # greedy decoding by full forward passes, no cache
            ids = torch.cat([ids, plain_logits(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert generated[row].tolist() == ids[0, -5:].tolist()
    base = load_model(str(tiny_model_dir)).eval()
    with torch.no_grad(), base_model(model):
        assert torch.equal(model.generate(**batch, **options), base.generate(**batch, **options))


def test_loreft_edits_only_the_first_and_last_prompt_tokens(tiny_model_dir, tiny_tokenizer, ticket_rows, tmp_path):
    # two packed examples: prompt of 5 then answer of 3, prompt of 4 then answer of 2
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5]])
    targets = torch.full((1, 14), -100)
    targets[0, 4:7] = 7  # the last prompt token predicts the first answer token
    targets[0, 11:13] = 7
    prompt = prompt_mask_from_targets(targets, position_ids)
    assert prompt[0].tolist() == [True] * 5 + [False] * 3 + [True] * 4 + [False] * 2
    edited = prompt_end_positions(prompt, segment_ids(position_ids, 1, 14, "cpu"), first=1, last=2)
    assert edited[0].nonzero().flatten().tolist() == [0, 3, 4, 8, 10, 11]

    method = LoreftMethod(r=4, positions="prompt_ends", first=3, last=3, dropout=0.0)
    data = examples(tiny_tokenizer, ticket_rows)
    model = build(tiny_model_dir, method)
    batch = collate_rows(pack_examples(data[:2], 256), tiny_tokenizer.pad_token_id)
    body, _ = body_and_head(model)
    with pytest.raises(AfinaError) as error:  # the loss must say which tokens are prompt
        body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    assert error.value.code == "loreft_prompt_mask_missing"

    # sft_loss_sum passes the prompt mask read off the targets, so prompt_ends trains
    pad = tiny_tokenizer.pad_token_id
    loss_before, _ = evaluate_loss(model, data, token_objective(256, method.shares_prefixes), 1, pad)
    config = TrainingConfig(max_steps=20, row_length=256, learning_rate=1e-1, warmup_ratio=0.0, schedule="constant",
                            eval_every=100, save_every=100, precision="fp32")
    train(model, data, [], config, tmp_path / "run", pad, QUIET)
    loss_after, _ = evaluate_loss(model, data, token_objective(256, method.shares_prefixes), 1, pad)
    assert loss_after < loss_before * 0.95, (loss_before, loss_after)  # only 6 positions per example are edited
    rotation = model.afina_loreft.layers["0"].rotate.weight
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(4), rtol=0, atol=1e-5)  # rows stay orthonormal

    # generation edits the prompt's ends and no generated token: the same as full forward passes
    # that mark only the prompt as prompt
    model.eval()
    prompt_ids = torch.tensor([data[0].input_ids[:20]])
    with torch.no_grad():
        generated = model.generate(input_ids=prompt_ids, max_new_tokens=4, do_sample=False, pad_token_id=pad)
        ids = prompt_ids
        for _ in range(4):
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[:, :20] = True
            hidden = body(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], prompt_mask=mask)
            ids = torch.cat([ids, model.lm_head(hidden.last_hidden_state[:, -1:]).argmax(-1)], dim=1)
    assert torch.equal(generated, ids)


def test_bottleneck_adapters_start_as_the_identity(tiny_model_dir, tiny_tokenizer, ticket_rows):
    data = examples(tiny_tokenizer, ticket_rows)
    batch = collate_rows(pack_examples(data[:4], 256), tiny_tokenizer.pad_token_id)
    base = load_model(str(tiny_model_dir)).eval()
    adapted = build(tiny_model_dir, AdapterMethod(bottleneck=8)).eval()
    assert torch.equal(packed_logits(adapted, batch), packed_logits(base, batch))


@pytest.mark.parametrize("method", [LoraMethod(r=4, dropout=0.0), PromptMethod(num_virtual_tokens=4),
                                    LoreftMethod(r=2, positions="all", dropout=0.0), AdapterMethod(bottleneck=8),
                                    FreezeMethod(train_last_layers=1)], ids=lambda m: m.name)
def test_gradient_checkpointing_gives_the_same_gradients(method, tiny_model_dir, tiny_tokenizer, ticket_rows):
    from afina.training.losses import sft_loss_sum

    data = examples(tiny_tokenizer, ticket_rows)
    batch = collate_rows(pack_examples(data[:4], 256), tiny_tokenizer.pad_token_id)
    gradients = []
    for checkpointing in (False, True):
        model = build(tiny_model_dir, method.model_copy(update={"gradient_checkpointing": checkpointing}))
        perturb(model, 0.05)  # nonzero adapters, so every trainable parameter gets a gradient
        model.train()
        sft_loss_sum(model, batch).backward()
        gradients.append({n: p.grad.clone() for n, p in trainable_parameters(model).items()})
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["lora", "dora", "rslora", "ia3"])
def test_mergeable_adapters_fold_into_the_base(name, tiny_model_dir, tiny_tokenizer, ticket_rows):
    data = examples(tiny_tokenizer, ticket_rows)
    batch = collate_rows(pack_examples(data[:4], 256), tiny_tokenizer.pad_token_id)
    method = CASES[name][0]
    model = build(tiny_model_dir, method)
    perturb(model, 0.1)
    model.eval()
    tuned = packed_logits(model, batch)
    merged = merge_trained(model, method)
    assert type(merged).__name__ == "LlamaForCausalLM" and not any("lora" in n or "ia3" in n
                                                                  for n, _ in merged.named_parameters())
    torch.testing.assert_close(packed_logits(merged, batch), tuned, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["prefix", "prompt", "loreft", "adapter"])
def test_activation_methods_are_not_mergeable(name, tiny_model_dir):
    method = CASES[name][0]
    with pytest.raises(AfinaError) as error:
        merge_trained(build(tiny_model_dir, method), method)
    assert error.value.code == "not_mergeable"


def has_cuda_and_bitsandbytes() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.skipif(has_cuda_and_bitsandbytes(), reason="this machine runs quantized bases: nothing to refuse")
@pytest.mark.parametrize("method", [QloraMethod(), LoraMethod(load_in_8bit=True), AdapterMethod(load_in_8bit=True)],
                         ids=["qlora", "lora-8bit", "adapter-8bit"])
def test_quantized_bases_are_refused_without_cuda(method, tiny_model_dir):
    for attempt in (lambda: check_method_supported(method), lambda: build(tiny_model_dir, method)):
        with pytest.raises(AfinaError) as error:
            attempt()
        assert error.value.code == "cuda_required" and error.value.location == "method"
        assert "lora" in error.value.hint


@pytest.mark.skipif(not has_cuda_and_bitsandbytes(), reason="qlora needs a CUDA GPU and bitsandbytes")
def test_qlora_trains_lora_on_a_4bit_base(tiny_model_dir, tiny_tokenizer, ticket_rows):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from afina.models.methods import quantization_config
    from afina.training.losses import sft_loss_sum

    method = QloraMethod(r=4, gradient_checkpointing=True)
    check_method_supported(method)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantization_config(method),
                                                device_map={"": 0})
    model = apply_method(base, method)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert all("lora_" in n for n in trainable_parameters(model))
    batch = collate_rows(pack_examples(examples(tiny_tokenizer, ticket_rows)[:4], 256),
                         tiny_tokenizer.pad_token_id).to(torch.device("cuda"))
    model.train()
    loss = sft_loss_sum(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in trainable_parameters(model).values())
    with pytest.raises(AfinaError) as error:
        merge_trained(model, method)
    assert error.value.code == "not_mergeable"


def test_method_config_errors_name_the_key_and_the_fix():
    with pytest.raises(AfinaError) as error:
        validate_config({"data": {"path": "d.jsonl"}, "method": {"name": "dora", "rnk": 8}})
    assert "method.rnk: unknown key, did you mean 'r'?" in error.value.message
    with pytest.raises(AfinaError) as error:
        validate_config({"data": {"path": "d.jsonl"}, "method": {"name": "qlora", "load_in_8bit": True}})
    assert "method.load_in_8bit: unknown key" in error.value.message
    with pytest.raises(AfinaError) as error:
        validate_config({"data": {"path": "d.jsonl"}, "method": "lorra"})
    assert "'lora'" in error.value.message and "'loreft'" in error.value.message
    with pytest.raises(AfinaError) as error:
        validate_config({"data": {"path": "d.jsonl"}, "method": {"name": "prefix", "gradient_checkpointing": True}})
    assert "gradient_checkpointing" in error.value.message


def qlora_run_config(model_dir, **training):
    return validate_config({"model": str(model_dir), "data": {"path": "d.jsonl"},
                            "method": {"name": "qlora", "r": 4}, "training": training})


def test_afina_train_loads_qlora_base_quantized(tiny_model_dir, monkeypatch):
    """The pipeline's loader hands bitsandbytes' 4-bit config (NF4, double quantization, the compute
    dtype) and this process's GPU to transformers; under FSDP the packed weights are stored in the
    compute dtype so that they shard. transformers' loading is recorded here: quantizing needs CUDA."""
    import afina.models.loading as loading
    from afina.pipeline import stages
    from afina.training.distributed import Ranks

    seen = []

    def from_pretrained(source, **kwargs):
        seen.append(kwargs)
        raise OSError("recorded")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(stages, "check_method_supported", lambda method: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for parallel, ranks in (("auto", Ranks()), ("fsdp", Ranks(0, 2, "fsdp"))):
        monkeypatch.setattr(stages, "current_ranks", lambda ranks=ranks: ranks)
        with pytest.raises(AfinaError):
            stages.load_base_for_training(qlora_run_config(tiny_model_dir, parallel=parallel))
    single, sharded = (kwargs["quantization_config"] for kwargs in seen)
    assert all(kwargs["device_map"] == {"": 0} for kwargs in seen)
    assert single.load_in_4bit and single.bnb_4bit_quant_type == "nf4" and single.bnb_4bit_use_double_quant
    assert single.bnb_4bit_quant_storage == torch.uint8
    assert sharded.bnb_4bit_quant_storage == sharded.bnb_4bit_compute_dtype == torch.bfloat16


def test_afina_train_refuses_qlora_without_cuda_before_reading_weights(tiny_model_dir, monkeypatch):
    if has_cuda_and_bitsandbytes():
        pytest.skip("this machine runs quantized bases: nothing to refuse")
    import afina.models.loading as loading
    from afina.pipeline import stages

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(AfinaError) as error:
        stages.load_base_for_training(qlora_run_config(tiny_model_dir))
    assert error.value.code == "cuda_required"


@pytest.mark.skipif(not has_cuda_and_bitsandbytes(), reason="qlora needs a CUDA GPU and bitsandbytes")
def test_afina_train_qlora_base_is_4bit_on_gpu(tiny_model_dir):
    import bitsandbytes as bnb

    from afina.pipeline.stages import load_training_model

    model = load_training_model(qlora_run_config(tiny_model_dir), Console(quiet=True))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert all("lora_" in n for n in trainable_parameters(model))


def test_freeze_refuses_a_module_that_matches_nothing(tiny_model_dir):
    with pytest.raises(AfinaError) as error:
        build(tiny_model_dir, FreezeMethod(train_last_layers=0, train_modules=["model.no_such.*"]))
    assert error.value.code == "invalid_method" and error.value.location == "method.train_modules"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("method-*.yaml")), ids=lambda p: p.name)
def test_each_method_config_selects_its_method(path):
    from afina.config import load_config

    assert load_config(path).method.name == path.stem.removeprefix("method-")
