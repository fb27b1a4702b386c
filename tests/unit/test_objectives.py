import decimal
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from afina.data.formats import normalize_row
from afina.data.preference import collate_kto, collate_pairs, kto_examples, tokenize_preferences
from afina.models.logprobs import gather_sequence_logps, sequence_logps
from afina.training.losses import dpo_loss, kto_kl_estimate, kto_loss, log1mexp, orpo_loss, reward_loss


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def test_dpo_matches_a_hand_computed_reference():
    pc, pr = torch.tensor([-12.0, -30.5, -7.25]), torch.tensor([-15.0, -28.0, -9.0])
    rc, rr = torch.tensor([-13.0, -29.0, -7.0]), torch.tensor([-14.5, -29.5, -8.0])
    for beta, eps in [(0.1, 0.0), (0.5, 0.2)]:
        loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
        expected = 0.0
        for i in range(3):
            # written as the two rewards' difference, not as the difference of log-ratios
            margin = beta * (pc[i] - rc[i]).item() - beta * (pr[i] - rr[i]).item()
            expected += -(1 - eps) * log_sigmoid(margin) - eps * log_sigmoid(-margin)
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        assert torch.allclose(chosen, beta * (pc - rc)) and torch.allclose(rejected, beta * (pr - rr))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_dpo_with_equal_policy_and_reference_costs_log2_per_pair(eps):
    chosen, rejected = -torch.rand(5) * 40, -torch.rand(5) * 40
    loss, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(),
                                                      label_smoothing=eps)
    assert loss.item() / 5 == pytest.approx(math.log(2), abs=1e-6)
    assert chosen_rewards.abs().max() == 0 and rejected_rewards.abs().max() == 0


def test_orpo_matches_a_hand_computed_reference():
    chosen, rejected = torch.tensor([-0.3, -1.2, -0.05]), torch.tensor([-0.9, -0.4, -2.5])
    beta = 0.25
    loss, count, chosen_rewards, rejected_rewards = orpo_loss(chosen, rejected, beta=beta)
    expected = 0.0
    for c, r in zip(chosen.tolist(), rejected.tolist()):
        p_c, p_r = math.exp(c), math.exp(r)
        log_odds_ratio = math.log((p_c / (1 - p_c)) / (p_r / (1 - p_r)))
        expected += -c + beta * -log_sigmoid(log_odds_ratio)
    assert count == 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(chosen_rewards, beta * chosen) and torch.allclose(rejected_rewards, beta * rejected)


def test_orpo_stays_finite_at_the_edges():
    chosen = torch.tensor([0.0, -1e-9, -1e-4, -80.0], requires_grad=True)
    rejected = torch.tensor([-80.0, -1e-4, 0.0, -1e-9], requires_grad=True)
    loss, *_ = orpo_loss(chosen, rejected)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


def test_log1mexp_is_accurate_on_both_sides_of_the_switch():
    x = -torch.logspace(-7, math.log10(80), 200).float()  # below -87, exp(x) is subnormal in float32
    with decimal.localcontext() as context:  # 50 significant digits: no cancellation, no underflow
        context.prec = 50
        reference = [float((1 - decimal.Decimal(v).exp()).ln()) for v in x.tolist()]
    assert torch.allclose(log1mexp(x).double(), torch.tensor(reference, dtype=torch.float64), rtol=1e-5, atol=0)


def test_kto_matches_trl_formula_with_a_clamped_detached_reference_point():
    policy = torch.tensor([-10.0, -20.0, -5.0, -7.0])
    ref = torch.tensor([-11.0, -18.0, -5.5, -6.0])
    desirable = torch.tensor([True, False, True, False])
    beta, w_d, w_u = 0.2, 1.0, 1.5
    for kl in [0.7, -0.4]:
        z0 = max(kl, 0.0)
        loss, chosen, rejected = kto_loss(policy, ref, desirable, torch.tensor(kl), beta, w_d, w_u)
        expected = 0.0
        for p, r, good in zip(policy.tolist(), ref.tolist(), desirable.tolist()):
            value = 1 / (1 + math.exp(-beta * ((p - r) - z0))) if good else 1 / (1 + math.exp(-beta * (z0 - (p - r))))
            expected += (w_d if good else w_u) * (1 - value)
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        assert torch.allclose(chosen, beta * torch.tensor([1.0, 0.5]))
        assert torch.allclose(rejected, beta * torch.tensor([-2.0, -1.0]))
    kl = torch.tensor(0.5, requires_grad=True)
    kto_loss(policy.requires_grad_(), ref, desirable, kl)[0].backward()
    assert kl.grad is None  # the reference point carries no gradient


def test_kto_kl_estimate_is_a_clamped_detached_mean():
    policy = torch.tensor([-3.0, -5.0], requires_grad=True)
    assert kto_kl_estimate(policy, torch.tensor([-4.0, -5.5])).item() == pytest.approx(0.75)
    estimate = kto_kl_estimate(policy, torch.tensor([-1.0, -1.0]))
    assert estimate.item() == 0.0 and not estimate.requires_grad


def test_reward_loss_matches_bradley_terry_with_margin_and_centering():
    chosen, rejected = torch.tensor([1.5, -0.2, 0.3]), torch.tensor([0.5, 0.4, 0.3])
    margin = torch.tensor([0.0, 1.0, 0.5])
    assert reward_loss(chosen, rejected).item() == pytest.approx(
        sum(math.log1p(math.exp(-(c - r))) for c, r in zip(chosen.tolist(), rejected.tolist())), rel=1e-6)
    expected = sum(math.log1p(math.exp(-(c - r - m))) + 0.01 * (c + r) ** 2
                   for c, r, m in zip(chosen.tolist(), rejected.tolist(), margin.tolist()))
    assert reward_loss(chosen, rejected, margin, center_coefficient=0.01).item() == pytest.approx(expected, rel=1e-6)


def _train(parameters: list[torch.Tensor], loss_fn, steps: int = 20) -> tuple[float, float]:
    optimizer = torch.optim.Adam(parameters, lr=0.05)
    first = last = None
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
        last = loss.item()
    return first, last


def test_orpo_kto_and_reward_losses_fall_when_trained():
    torch.manual_seed(0)
    theta = torch.randn(4, 2, requires_grad=True)  # softplus keeps mean log-probs negative
    first, last = _train([theta], lambda: orpo_loss(-torch.nn.functional.softplus(theta[:, 0]),
                                                    -torch.nn.functional.softplus(theta[:, 1]))[0])
    assert last < first

    policy = torch.full((6,), -10.0, requires_grad=True)
    ref, desirable = torch.full((6,), -10.0), torch.tensor([True, False] * 3)
    first, last = _train([policy], lambda: kto_loss(policy, ref, desirable, kto_kl_estimate(policy, ref))[0])
    assert last < first
    assert (policy[desirable] > -10).all() and (policy[~desirable] < -10).all()

    features = torch.randn(8, 5)
    head = torch.zeros(5, requires_grad=True)
    first, last = _train([head], lambda: reward_loss(features[:4] @ head, features[4:] @ head))
    assert last < first


def test_chunked_sequence_logps_equal_unchunked_with_the_same_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(10, 8, requires_grad=True)
    targets, owners = torch.randint(0, 11, (10,)), torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    whole, counts = gather_sequence_logps(hidden, targets, owners, head, 3, chunk=100)
    (grad_whole,) = torch.autograd.grad(whole.sum(), hidden)
    chunked, _ = gather_sequence_logps(hidden, targets, owners, head, 3, chunk=3)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), hidden)
    assert torch.allclose(whole, chunked, atol=1e-6) and torch.allclose(grad_whole, grad_chunked, atol=1e-6)
    assert counts.tolist() == [2.0, 3.0, 5.0]


PAIRS = [
    {"prompt": "the printer is jammed", "chosen": '{"category": "printer"}', "rejected": "hello how are you"},
    {"prompt": "a vpn não conecta", "chosen": '{"category": "network"}', "rejected": "la impresora"},
    {"prompt": [{"role": "system", "content": "classify"}, {"role": "user", "content": "my password expired"}],
     "chosen": '{"category": "access"}', "rejected": "system user assistant"},
]


def preference_records():
    return [normalize_row(row, line)[0] for line, row in enumerate(PAIRS, start=1)]


def lora(model):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def test_dpo_on_a_lora_model_starts_at_log2_then_falls_and_trains_every_adapter_weight(tiny_model, tiny_tokenizer):
    model = lora(tiny_model)
    batch = collate_pairs(tokenize_preferences(preference_records(), tiny_tokenizer, 128), 512,
                          tiny_tokenizer.pad_token_id)
    with torch.no_grad(), model.disable_adapter():
        ref_chosen, ref_rejected = sequence_logps(model, batch)[0].chunk(2)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        chosen, rejected = sequence_logps(model, batch)[0].chunk(2)
        loss, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
        (loss / len(PAIRS)).backward()
        optimizer.step()
        losses.append(loss.item() / len(PAIRS))
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # LoRA starts as the identity: policy == reference
    assert losses[-1] < losses[0] - 0.05
    assert all(not torch.equal(before[n], p) for n, p in trainable.items())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n not in trainable)


def test_orpo_and_kto_on_a_lora_model_fall(tiny_model, tiny_tokenizer):
    model = lora(tiny_model)
    pad = tiny_tokenizer.pad_token_id
    pairs = collate_pairs(tokenize_preferences(preference_records(), tiny_tokenizer, 128), 512, pad)
    unpaired = collate_kto(kto_examples(preference_records(), tiny_tokenizer, 128), 512, pad, 128)
    with torch.no_grad(), model.disable_adapter():
        ref_logps = sequence_logps(model, unpaired.completions)[0]
        ref_mismatched = sequence_logps(model, unpaired.mismatched)[0]

    def orpo():
        sums, counts = sequence_logps(model, pairs)
        loss, count, _, _ = orpo_loss(*(sums / counts).chunk(2), beta=0.1)
        return loss / count

    def kto():
        with torch.no_grad():
            kl = kto_kl_estimate(sequence_logps(model, unpaired.mismatched)[0], ref_mismatched)
        loss, _, _ = kto_loss(sequence_logps(model, unpaired.completions)[0], ref_logps, unpaired.desirable, kl)
        return loss / unpaired.desirable.numel()

    for objective in (orpo, kto):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        first = objective().item()
        for _ in range(5):
            optimizer.zero_grad()
            objective().backward()
            optimizer.step()
        assert objective().item() < first
