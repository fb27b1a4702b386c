"""Every speed lever computes the same loss and gradients as the plain path (fp32), and the speed
benchmarks run end to end on a tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from afina.config.methods import LoraMethod
from afina.data.packing import collate_rows, pack_examples
from afina.models.methods import apply_method, trainable_parameters
from afina.models.loading import load_model
from afina.training import losses as loss_module
from afina.training.allocator import allocator_environment
from afina.training.losses import plain_loss_sum, sft_loss_sum
from tests.training.test_training import examples

ROOT = Path(__file__).resolve().parents[2]


def loss_and_grads(model, batches, loss_fn):
    """The accumulated step: summed loss over all micro-batches / the step's trained tokens."""
    model.zero_grad(set_to_none=True)
    step_tokens = sum(b.trained_tokens for b in batches)
    total = 0.0
    for batch in batches:
        loss = loss_fn(model, batch) / step_tokens
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in trainable_parameters(model).items()}


def assert_same(reference, candidate, tolerance=1e-4):
    ref_loss, ref_grads = reference
    loss, grads = candidate
    assert abs(loss - ref_loss) <= tolerance * abs(ref_loss)
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().item() or 1.0
        assert (grad - ref_grads[name]).abs().max().item() <= tolerance * scale, name


@pytest.fixture
def lora_tiny(tiny_model_dir):
    torch.manual_seed(0)
    return apply_method(load_model(str(tiny_model_dir)), LoraMethod(r=4, alpha=8, dropout=0.0))


def test_each_lever_keeps_loss_and_gradients_of_the_plain_path(lora_tiny, tiny_tokenizer, ticket_rows, monkeypatch):
    data = examples(tiny_tokenizer, ticket_rows[:8])
    pad = tiny_tokenizer.pad_token_id
    plain = loss_and_grads(lora_tiny, [collate_rows([[e] for e in data], pad)], plain_loss_sum)
    packed_rows = [collate_rows(pack_examples(data, 4096), pad)]
    assert packed_rows[0].input_ids.shape[0] == 1
    # packing: one row, positions restart per example, same loss
    assert_same(plain, loss_and_grads(lora_tiny, packed_rows, plain_loss_sum))
    # projection and cross-entropy only at trained positions
    assert_same(plain, loss_and_grads(lora_tiny, packed_rows, sft_loss_sum))
    # fused linear cross-entropy, gradients computed chunk by chunk (tiny chunks force several)
    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", 7)
    chunked = loss_and_grads(lora_tiny, packed_rows,
                             lambda m, b: loss_module.chunked_cross_entropy_sum(*hidden_targets(m, b), chunk=7))
    assert_same(plain, chunked)
    # short rows accumulated instead of one long row
    short = [collate_rows([row], pad) for row in pack_examples(data, 64)]
    assert len(short) > 2
    assert_same(plain, loss_and_grads(lora_tiny, short, sft_loss_sum))
    # shared prefixes: the examples after a row's first read their common system prompt from it
    shared = [collate_rows(pack_examples(data, 4096, share_prefixes=True), pad, share_prefixes=True)]
    assert shared[0].shares_prefixes and shared[0].tokens == packed_rows[0].tokens
    assert shared[0].input_ids.numel() < packed_rows[0].input_ids.numel()
    assert_same(plain, loss_and_grads(lora_tiny, shared, sft_loss_sum))


@pytest.mark.parametrize("head_kind", ["linear", "wrapped"])
def test_linear_cross_entropy_matches_autograd(head_kind):
    """The fused head (gradients of hidden and of a training head weight computed in forward) and the
    checkpointed chunks other heads take both equal plain cross-entropy, in float64."""
    torch.manual_seed(0)
    hidden = torch.randn(23, 6, dtype=torch.float64, requires_grad=True)
    linear = torch.nn.Linear(6, 11, bias=False).double()
    head = linear if head_kind == "linear" else torch.nn.Sequential(linear)
    targets = torch.randint(0, 11, (23,))
    plain = torch.nn.functional.cross_entropy(linear(hidden), targets, reduction="sum")
    chunked = loss_module.chunked_cross_entropy_sum(hidden, targets, head, chunk=5)
    torch.testing.assert_close(chunked, plain.float())
    for got, want in zip(torch.autograd.grad(0.3 * chunked, (hidden, linear.weight)),
                         torch.autograd.grad(0.3 * plain, (hidden, linear.weight))):
        torch.testing.assert_close(got, want)


def test_fused_lora_layers_match_peft_layers(lora_tiny, tiny_tokenizer, ticket_rows):
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    from afina.models.fused_lora import FusedLoraLinear

    data = examples(tiny_tokenizer, ticket_rows[:8])
    batches = [collate_rows(pack_examples(data, 4096), tiny_tokenizer.pad_token_id)]
    fused = [m for m in lora_tiny.modules() if isinstance(m, FusedLoraLinear)]
    assert len(fused) == 14  # 7 linear layers x 2 decoder layers
    fast = loss_and_grads(lora_tiny, batches, plain_loss_sum)
    for module in fused:
        module.__class__ = PeftLoraLinear
    assert_same(loss_and_grads(lora_tiny, batches, plain_loss_sum), fast)


def test_fused_lora_dropout_and_bias_match_autograd():
    from afina.models.fused_lora import LoraLinearFunction

    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(7, 6, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(2, 5, 6) > 0.3
    fused = LoraLinearFunction.apply(x, weight, bias, a, b, 0.5, keep, 0.3, torch.float64)
    plain = x @ weight.t() + bias + 0.5 * ((x * keep / 0.7) @ a.t()) @ b.t()
    torch.testing.assert_close(fused, plain)
    grad = torch.randn_like(plain)
    fused_grads = torch.autograd.grad(fused, (x, a, b), grad)
    for got, want in zip(fused_grads, torch.autograd.grad(plain, (x, a, b), grad)):
        torch.testing.assert_close(got, want)


def test_gated_lora_function_matches_autograd():
    """A SwiGLU down projection's node: SiLU(gate) * up formed inside, with dropout and bias, in float64."""
    from afina.models.fused_lora import LoraLinearFunction

    torch.manual_seed(0)
    gate = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(7, 6, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(2, 5, 6) > 0.3
    fused = LoraLinearFunction.apply(up, weight, bias, a, b, 0.5, keep, 0.3, torch.float64, gate)
    x = torch.nn.functional.silu(gate) * up
    plain = x @ weight.t() + bias + 0.5 * ((x * keep / 0.7) @ a.t()) @ b.t()
    torch.testing.assert_close(fused, plain)
    grad = torch.randn_like(plain)
    for got, want in zip(torch.autograd.grad(fused, (gate, up, a, b), grad),
                         torch.autograd.grad(plain, (gate, up, a, b), grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fused_norms_and_mlp_match_transformers_modules(tiny_model_dir, tiny_tokenizer, ticket_rows, method):
    """RMSNorm and the SwiGLU block as one node each give transformers' loss and gradients (full
    fine-tuning checks the norm weights' gradients too)."""
    from afina.config.methods import FullMethod

    torch.manual_seed(0)
    model = apply_method(load_model(str(tiny_model_dir)), LoraMethod(r=4, alpha=8, dropout=0.0)
                         if method == "lora" else FullMethod())
    fused = [m for m in model.modules() if type(m).__name__.startswith("Fused") and "Lora" not in type(m).__name__]
    assert len(fused) == 2 * 2 + 1 + 2  # two norms per decoder layer, the final norm, one MLP per layer
    batches = [collate_rows(pack_examples(examples(tiny_tokenizer, ticket_rows[:8]), 4096),
                            tiny_tokenizer.pad_token_id)]
    fast = loss_and_grads(model, batches, sft_loss_sum)
    for module in fused:
        module.__class__ = type(module).__mro__[1]  # transformers' own class
    assert_same(loss_and_grads(model, batches, sft_loss_sum), fast)


def test_dropout_keep_mask_has_the_rate_it_reports_and_follows_the_seed():
    from afina.models.fused_lora import keep_mask

    torch.manual_seed(0)
    keep, rate = keep_mask(torch.Size((400, 1001)), 0.05, torch.device("cpu"))
    assert keep.shape == (400, 1001) and keep.dtype == torch.bool
    assert abs(rate - 0.05) < 1 / 65536
    lanes = keep.flatten()[: 400 * 1000].view(-1, 4).float().mean(0)  # each 16 bits of a 64-bit draw
    assert torch.all((lanes - (1 - rate)).abs() < 0.003), lanes
    torch.manual_seed(0)
    assert torch.equal(keep_mask(torch.Size((400, 1001)), 0.05, torch.device("cpu"))[0], keep)
    assert not torch.equal(keep_mask(torch.Size((400, 1001)), 0.05, torch.device("cpu"))[0], keep)


def test_fused_lora_with_dropout_trains_and_is_deterministic_in_eval(tiny_model_dir, tiny_tokenizer, ticket_rows):
    torch.manual_seed(0)
    model = apply_method(load_model(str(tiny_model_dir)), LoraMethod(r=4, alpha=8, dropout=0.3))
    batch = collate_rows(pack_examples(examples(tiny_tokenizer, ticket_rows[:4]), 4096), tiny_tokenizer.pad_token_id)
    model.train()
    loss, grads = loss_and_grads(model, [batch], sft_loss_sum)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # A gets none while B is 0
    model.eval()
    with torch.no_grad():
        assert sft_loss_sum(model, batch).item() == sft_loss_sum(model, batch).item()


@pytest.mark.parametrize("shared", [False, True], ids=["", "shared prefixes"])
@pytest.mark.parametrize("kernel", ["matmul", "matmul recomputing probabilities", "sdpa"])
def test_packed_attention_matches_the_masked_path(lora_tiny, tiny_tokenizer, ticket_rows, monkeypatch, kernel,
                                                  shared):
    """Rows of several examples plus a padded row: each example attends only to itself (and, sharing
    prefixes, to the prefix it reads from its row's first example), as under transformers'
    block-diagonal mask over the examples laid out in full (the plain path), in each of its kernels."""
    from afina.models import attention

    if kernel == "sdpa":
        monkeypatch.setattr(attention, "MATMUL_SCORES_BYTES", 0)
    if kernel == "matmul recomputing probabilities":
        monkeypatch.setattr(attention, "KEPT_PROBABILITIES_BYTES", 0)
    data = examples(tiny_tokenizer, ticket_rows[:9])
    rows = pack_examples(data, 160, share_prefixes=shared)
    batches = [collate_rows(rows[i : i + 2], tiny_tokenizer.pad_token_id, share_prefixes=shared)
               for i in range(0, len(rows), 2)]
    assert any(len(row) > 1 for row in rows)
    assert any(b.input_ids.numel() > b.tokens - int(b.examples[:, 3].sum()) for b in batches)  # a padded row
    assert all(b.shares_prefixes == shared for b in batches if b.examples.shape[0] > 2)
    plain = loss_and_grads(lora_tiny, [collate_rows([[e] for e in data], tiny_tokenizer.pad_token_id)],
                           plain_loss_sum)

    def masked_path(*args, **kwargs):
        raise AssertionError("packed rows went through the masked SDPA path")

    monkeypatch.setattr(attention, "sdpa_attention_forward", masked_path)
    assert_same(plain, loss_and_grads(lora_tiny, batches, sft_loss_sum))


def test_shared_prefixes_through_sdpa_with_a_mask_match_the_blocks(lora_tiny, tiny_tokenizer, ticket_rows):
    """Where the blocks cannot run (attention dropout, a short sliding window), SDPA gets a mask that
    sees shared prefixes: the same attention as the blocks compute."""
    from afina.models.attention import LAYOUT_KEYWORD, PackedLayout, packed_attention, sdpa_attention_forward

    data = examples(tiny_tokenizer, ticket_rows[:6])
    batch = collate_rows(pack_examples(data, 120, share_prefixes=True), tiny_tokenizer.pad_token_id,
                         share_prefixes=True)
    assert batch.shares_prefixes and batch.input_ids.shape[0] > 1
    layout = PackedLayout.from_table(batch.examples, batch.input_ids.numel())
    module = lora_tiny.base_model.model.model.layers[0].self_attn
    rows, length = batch.input_ids.shape
    config = lora_tiny.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // heads
    torch.manual_seed(0)
    q = torch.randn(rows, heads, length, dim)
    k, v = torch.randn(rows, kv_heads, length, dim), torch.randn(rows, kv_heads, length, dim)
    blocks, _ = packed_attention(module, q, k, v, None, **{LAYOUT_KEYWORD: layout})
    masked, _ = sdpa_attention_forward(module, q, k, v, layout.mask(rows, None))
    real = batch.input_ids != tiny_tokenizer.pad_token_id
    assert torch.allclose(blocks[real], masked[real], atol=1e-5)


def test_shared_prefixes_stop_before_trained_positions_and_pack_more_examples():
    from afina.data.packing import IGNORE, shared_prefix
    from afina.data.tokenize import Example

    def example(ids, prompt):
        return Example(ids, [i >= prompt for i in range(len(ids))], line=1)

    first = example([1, 2, 3, 4, 5, 6], prompt=4)  # tokens 4 and 5 trained: position 3 predicts the first
    same_prompt = example([1, 2, 3, 4, 7, 8], prompt=4)
    assert shared_prefix(first, same_prompt) == 3  # position 3's target is trained: it stays each example's own
    assert shared_prefix(first, example([1, 2, 9, 4, 5, 6], prompt=4)) == 2
    assert shared_prefix(first, example([1, 2, 3, 4, 5, 6, 7, 8], prompt=1)) == 0  # trained from its first target
    rows = pack_examples([first, same_prompt, same_prompt], 12, share_prefixes=True)
    assert [len(r) for r in rows] == [3]  # 6 + 3 + 3 tokens held
    assert len(pack_examples([first, same_prompt, same_prompt], 12)) == 2
    batch = collate_rows(rows, pad_id=0, share_prefixes=True)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 4, 7, 8, 4, 7, 8]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5]]
    assert batch.targets.tolist() == [[IGNORE, IGNORE, IGNORE, 5, 6, IGNORE, 7, 8, IGNORE, 7, 8, IGNORE]]
    assert batch.examples.tolist() == [[0, 6, 0, 0], [6, 3, 0, 3], [9, 3, 0, 3]]
    assert batch.tokens == 18 and batch.trained_tokens == 6  # tokens: the examples', as laid out in full


def test_methods_acting_at_example_positions_never_share_prefixes(tiny_model_dir, tiny_tokenizer, ticket_rows):
    from afina.config.methods import LoreftMethod, PrefixMethod
    from afina.errors import AfinaError
    from afina.models.methods import model_shares_prefixes

    assert LoraMethod().shares_prefixes and not LoreftMethod().shares_prefixes and not PrefixMethod().shares_prefixes
    torch.manual_seed(0)
    loreft = apply_method(load_model(str(tiny_model_dir)), LoreftMethod())
    assert not model_shares_prefixes(loreft)
    data = examples(tiny_tokenizer, ticket_rows[:4])
    batch = collate_rows(pack_examples(data, 4096, share_prefixes=True), tiny_tokenizer.pad_token_id,
                         share_prefixes=True)
    with pytest.raises(AfinaError) as error:
        sft_loss_sum(loreft, batch)
    assert error.value.code == "shared_prefixes_unsupported"


def hidden_targets(model, batch):
    from afina.data.packing import IGNORE
    from afina.models.methods import body_and_head

    body, head = body_and_head(model)
    hidden = body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).last_hidden_state
    mask = batch.targets != IGNORE
    return hidden[mask], batch.targets[mask], head


def test_bf16_lever_stays_close_to_fp32(lora_tiny, tiny_tokenizer, ticket_rows):
    """bf16 autocast cannot match fp32 to 1e-4; it must stay within bf16's own precision."""
    data = examples(tiny_tokenizer, ticket_rows[:8])
    batch = collate_rows(pack_examples(data, 4096), tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        fp32 = sft_loss_sum(lora_tiny, batch).item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = sft_loss_sum(lora_tiny, batch).item()
    assert abs(bf16 - fp32) <= 2e-2 * fp32


def run_script(*args, timeout=300, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)


def command_allocator() -> str:
    """The allocator a process the afina command starts runs under, from this one: a user's LD_PRELOAD
    wins, else the installed allocator, else glibc's malloc."""
    return {**os.environ, **allocator_environment()}.get("LD_PRELOAD") or "glibc"


# one packed row's fp32 loss and LoRA gradient norms, in a process of its own (its allocator is fixed at start)
LOSS_IN_A_PROCESS = """
import json, os, sys
sys.path.insert(0, "benchmarks")
from train_speed import afina_in_training, afina_row_length
from afina.data.packing import collate_rows, pack_examples
from afina.training.losses import sft_loss_sum
examples, tokenizer, model, _ = afina_in_training(sys.argv[1])
model = model.float()
loss = sft_loss_sum(model, collate_rows([pack_examples(examples, afina_row_length(examples))[0]], tokenizer.pad_token_id))
loss.backward()
print(json.dumps({"loss": loss.item(), "allocator": os.environ.get("LD_PRELOAD"),
                  "grads": [p.grad.norm().item() for p in model.parameters() if p.grad is not None]}))
"""


@pytest.mark.skipif(not allocator_environment(), reason="neither tcmalloc nor jemalloc is installed here (or "
                    "LD_PRELOAD is set)")
def test_the_allocator_lever_keeps_the_loss_and_gradients(tiny_model_dir):
    runs = {}
    for name, env in (("glibc", {"LD_PRELOAD": ""}), ("allocator", allocator_environment())):
        done = run_script("-c", LOSS_IN_A_PROCESS, tiny_model_dir, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[name] = json.loads(done.stdout.splitlines()[-1])
    assert runs["allocator"]["allocator"] == allocator_environment()["LD_PRELOAD"]
    assert runs["allocator"]["loss"] == pytest.approx(runs["glibc"]["loss"], rel=1e-4)
    assert runs["glibc"]["grads"] and runs["allocator"]["grads"] == pytest.approx(runs["glibc"]["grads"], rel=1e-4)
