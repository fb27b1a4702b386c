"""The loss formulas afina minimizes, each a *sum* over its units, never a mean.

The loop divides a sum by the units of the whole optimizer step, so accumulated and packed batches
give the same update as one large batch:

| objective | call | divide the sum by |
| --- | --- | --- |
| SFT, CPT | `sft_loss_sum` | trained tokens in the step |
| DPO | `dpo_loss` | preference pairs in the step |
| ORPO | `orpo_loss` | preference pairs in the step (the `count` it returns) |
| KTO | `kto_loss` | completions (desirable + undesirable) in the step |
| reward model | `reward_loss` | preference pairs in the step |

Token losses are computed only where they count. The vocabulary projection (hidden -> 49k logits for
the default model) is a large share of the cost; prompt tokens carry no loss, so the projection and
cross-entropy run only on the positions that are trained, a chunk at a time, and the gradient of
each chunk is computed right after its loss (`LinearCrossEntropy`), so no logits outlive their chunk.

The preference formulas were checked against TRL's current sources (huggingface/trl 1.1:
`trl/trainer/dpo_trainer.py`, `trl/trainer/reward_trainer.py`, `trl/experimental/kto/kto_trainer.py`,
`trl/experimental/orpo/orpo_trainer.py`); where afina differs, the docstring says so and why.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from afina.data.packing import IGNORE, Batch
from afina.devices import compute_dtype
from afina.models.loreft import prompt_mask_from_targets
from afina.models.methods import body_and_head

CHUNK_TOKENS = 256  # trained positions projected at once: 256 x 49k fp32 logits is 50 MB


def sft_loss_sum(model, batch: Batch) -> torch.Tensor:
    """Sum of token cross-entropies over the trained positions of a packed batch.

    Summed, not averaged, so gradient accumulation can divide by the trained tokens of the whole
    optimizer step: packed, unpacked and accumulated batches then give the same loss.
    """
    body, head = body_and_head(model)
    hidden = body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                  prompt_mask=prompt_mask_from_targets(batch.targets, batch.position_ids),
                  examples=batch.examples).last_hidden_state
    mask = batch.targets != IGNORE
    return chunked_cross_entropy_sum(hidden[mask], batch.targets[mask], head)


def chunked_cross_entropy_sum(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                              chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """sum(cross_entropy(head(hidden), targets)), one chunk of positions at a time.

    A plain linear head (every model afina trains unless the head itself carries an adapter) runs
    `LinearCrossEntropy`; any other head keeps autograd's path, each chunk's logits recomputed in
    backward when there are several.
    """
    if not torch.is_grad_enabled():
        return sum((_chunk_loss(hidden[i : i + chunk], targets[i : i + chunk], head)
                    for i in range(0, hidden.shape[0], chunk)), torch.zeros((), device=hidden.device))
    if fuses_head(head):
        return LinearCrossEntropy.apply(hidden, head.weight, targets, chunk)
    if hidden.shape[0] <= chunk:
        return _chunk_loss(hidden, targets, head)
    total = torch.zeros((), device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(_chunk_loss, hidden[start : start + chunk], targets[start : start + chunk], head,
                                   use_reentrant=False)
    return total


def fuses_head(head: torch.nn.Module) -> bool:
    """Whether the loss runs `LinearCrossEntropy` on this output projection (a plain bias-free linear)."""
    return type(head) is torch.nn.Linear and head.bias is None


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


class LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden W^T, targets)) with its gradients computed in the forward pass.

    Each chunk's logits (fp32, as autocast's cross-entropy computes them) become its gradient in
    place, softmax minus the one-hot target, and are multiplied into the gradients of `hidden` and,
    when the head trains, of W; the backward pass only scales what was kept. Matmuls run in the
    autocast dtype when autocast is on, as `head(hidden)` would.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        dtype = compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device)
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                h, t = hidden[start : start + chunk].to(dtype), targets[start : start + chunk]
                logits = (h @ w.t()).float()
                lse = torch.logsumexp(logits, -1, keepdim=True)
                total += (lse.squeeze(1) - logits.gather(1, t[:, None]).squeeze(1)).sum()
                grad = logits.sub_(lse).exp_()  # softmax, then minus the one-hot target
                grad[torch.arange(t.shape[0], device=t.device), t] -= 1
                grad = grad.to(dtype)
                torch.mm(grad, w, out=grad_hidden[start : start + chunk])
                if grad_weight is not None:
                    grad_weight += grad.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = (grad_hidden * grad_total).to(hidden_dtype)
        grad_weight = None if grad_weight is None else (grad_weight * grad_total).to(weight_dtype)
        return grad_hidden, grad_weight, None, None


def plain_loss_sum(model, batch: Batch) -> torch.Tensor:
    """The same sum computed the way most trainers do: logits for every position, then
    cross-entropy with the untrained ones ignored. The reference every speed lever is checked
    against, and the baseline of `benchmarks/speed_levers.py`."""
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="sum")


# --- preference objectives ------------------------------------------------------------------------

def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO (Rafailov et al. 2023, Eq. 7), with conservative label smoothing (cDPO, Mitchell 2023).

        h_i    = (log pi(y_c|x) - log pi(y_r|x)) - (log ref(y_c|x) - log ref(y_r|x))
        loss_i = -(1 - eps) * log sigmoid(beta * h_i) - eps * log sigmoid(-beta * h_i)

    Log-probabilities are per sequence, summed over the answer's tokens (`sequence_logps`), as in
    TRL. eps is the probability that a pair's label is flipped (0 gives plain DPO); when policy
    and reference agree, h = 0 and every pair costs log 2 whatever eps is.

    Returns (sum of loss_i over pairs, chosen rewards, rejected rewards), the rewards being the
    implicit ones, beta * (log pi - log ref), detached, for logging (rewards/chosen, rewards/margins,
    rewards/accuracies in TRL's names).

    TRL: with eps = 0 this is TRL 1.1's `loss_type="sigmoid"` exactly. TRL 1.1's "sigmoid" ignores
    `label_smoothing` (only "robust", rDPO's unbiased variant divided by 1 - 2 eps, and "exo_pair" read
    it); the eps > 0 form here is cDPO as the DPO authors' reference code writes it, the form TRL 1.1
    still uses in its "aot" losses.
    """
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
              - label_smoothing * F.logsigmoid(-beta * logits))
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses.sum(), chosen_rewards, rejected_rewards


def orpo_loss(chosen_logps_mean: torch.Tensor, rejected_logps_mean: torch.Tensor,
              beta: float = 0.1) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024, Eqs. 4-7): supervised NLL on the chosen answer plus an odds-ratio penalty.

        p_c, p_r  = exp(mean token log-prob of the chosen / rejected answer)
        log odds  = log(p_c / (1 - p_c)) - log(p_r / (1 - p_r))
                  = (lc - lr) - (log(1 - exp(lc)) - log(1 - exp(lr)))       lc, lr the mean log-probs
        loss_i    = -lc_i + beta * -log sigmoid(log odds_i)

    The NLL part is per token: -lc_i is the mean token NLL of pair i's chosen answer (the answer
    and its end-of-turn token, not the prompt), the L_SFT of the paper (Eq. 2) and of its reference
    code (`disable_prompt_loss`). Each pair therefore counts once in both terms, so the sum divides
    by one count, the pairs of the step; a separate NLL sum would need a second, token count.
    TRL's experimental ORPOTrainer instead takes one cross-entropy mean over every token of the chosen
    sequences, prompt included, so long answers weigh more there; the odds-ratio term is the same.

    log(1 - exp(x)) is computed without cancellation (`log1mexp`), and mean log-probs are kept
    just below 0 so a perfectly predicted answer gives a large finite log odds, not inf/nan.

    Returns (sum of loss_i over pairs, number of pairs, chosen rewards, rejected rewards); rewards
    are beta * mean log-prob, detached, as TRL logs them.
    """
    chosen = chosen_logps_mean.float().clamp(max=-1e-7)
    rejected = rejected_logps_mean.float().clamp(max=-1e-7)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    losses = -chosen - beta * F.logsigmoid(log_odds)
    return losses.sum(), int(chosen.numel()), beta * chosen.detach(), beta * rejected.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides (Maechler 2012, "Accurately computing log(1 - exp(-|a|))").

    Near 0, 1 - exp(x) cancels, so use log(-expm1(x)); far below, exp(x) is tiny, so use log1p(-exp(x)).
    Each branch only sees inputs in its own range, so the unused branch cannot put inf/nan into gradients.
    """
    near_zero = x > -math.log(2)
    near = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -1.0))))
    far = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -1.0), x)))
    return torch.where(near_zero, near, far)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl_estimate: torch.Tensor | float, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, Eq. 7) as TRL's `KTOTrainer` computes it (`loss_type="kto"`).

        r_i    = log pi(y_i|x_i) - log ref(y_i|x_i)            summed over the answer's tokens
        z0     = max(0, KL estimate), detached                  (`kto_kl_estimate`)
        loss_i = desirable_weight   * (1 - sigmoid(beta * (r_i - z0)))    if y_i is desirable
                 undesirable_weight * (1 - sigmoid(beta * (z0 - r_i)))    otherwise

    z0 is the reference point of the prospect-theory value function: it is estimated from
    *mismatched* completions (prompt x_i with another example's answer, see
    `afina.data.preference.mismatched_completions`) and carries no gradient, as in TRL.
    TRL averages the losses over the examples of a batch (the weights scale terms, they are not
    renormalized), so the sum returned here divides by the number of examples of the step.

    Returns (sum of loss_i, rewards of the desirable examples, rewards of the undesirable ones),
    rewards being beta * r_i, detached.
    """
    desirable = desirable.to(torch.bool)
    z0 = torch.as_tensor(kl_estimate, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    logratios = policy_logps - ref_logps
    losses = torch.where(desirable,
                         desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios))))
    rewards = beta * logratios.detach()
    return losses.sum(), rewards[desirable], rewards[~desirable]


def kto_kl_estimate(policy_mismatched_logps: torch.Tensor, ref_mismatched_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: mean of log pi - log ref over mismatched completions, clamped at 0, detached.

    TRL computes it once per micro-batch (mean over the batch, then over processes) from the same
    batch's answers paired with other prompts; under data parallelism average it across ranks
    before `kto_loss`. It needs at least two examples: with one, the "mismatched" pair is the real one.
    """
    return (policy_mismatched_logps - ref_mismatched_logps).float().mean().detach().clamp(min=0)


def reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None,
                center_coefficient: float | None = None) -> torch.Tensor:
    """Pairwise Bradley-Terry loss of a reward model (Ouyang et al. 2022; margin as in Llama 2, Touvron et al. 2023).

        loss_i = -log sigmoid(r_c,i - r_r,i - m_i)   [+ center_coefficient * (r_c,i + r_r,i)^2]

    The margin m_i (default 0) asks the chosen answer to win by at least that much. The optional
    centering term (Eisenstein et al. 2023, TRL's `center_rewards_coefficient`) pins the reward's
    free offset near 0. Both match TRL 1.1's `RewardTrainer.compute_loss`, summed instead of averaged.
    """
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    losses = -F.logsigmoid(difference)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return losses.sum()
