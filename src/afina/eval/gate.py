"""The gate: keep the tuned model only if it beats its base by more than noise.

The base and the tuned model are scored on the same test rows, so the comparison is paired: the
gate looks at each row's difference tuned - base (base - tuned for a loss, so that a positive
improvement is always better). Its interval is a seeded paired bootstrap of the mean difference;
for 0/1 metrics (exact match, valid JSON, a field's accuracy) McNemar's exact test on the rows
where the two disagree decides significance, as the bootstrap is coarse on few discordant rows.
Pure functions: scores in, a decision with its reasons out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from afina.config.gate import GateConfig, higher_is_better
from afina.errors import AfinaError

BOOTSTRAP_VALUES_AT_ONCE = 4_000_000  # resampled values held in memory at a time (32 MB of float64, as many of indices)
TOLERANCE = 1e-12  # float sums: a gain of 0.1 computed as 0.09999999999999998 still clears 0.1


@dataclass(frozen=True)
class GuardResult:
    """A guarded metric: `change` is in its better direction (negative: it got worse)."""

    metric: str
    base_value: float
    tuned_value: float
    change: float
    max_decrease: float
    passed: bool


@dataclass(frozen=True)
class LossCheck:
    """The forgetting check: the loss on general-purpose data before and after tuning."""

    passed: bool
    base_loss: float
    tuned_loss: float
    increase: float
    max_increase: float
    reason: str


@dataclass(frozen=True)
class GateDecision:
    """Whether the tuned model is kept, with the figures and the reasons.

    `improvement` and `interval` are in the metric's better direction: positive is better, for a
    loss a drop. `p_value` is McNemar's exact test for 0/1 metrics (method 'mcnemar'), None for
    others (method 'paired_bootstrap', decided by the interval).
    """

    passed: bool
    metric: str
    base_value: float
    tuned_value: float
    improvement: float
    interval: tuple[float, float]
    confidence: float
    p_value: float | None
    method: str
    examples: int
    guards: list[GuardResult]
    general: LossCheck | None
    reasons: list[str]


def decide(gate: GateConfig, base: dict[str, list[float]], tuned: dict[str, list[float]],
           general_loss: tuple[float, float] | None = None) -> GateDecision:
    """Judge the tuned model against its base.

    `base` and `tuned` map each metric to its per-row scores, row i of both from the same test row.
    `general_loss` is (base, tuned) loss on gate.general_data, required when the gate sets it.
    Passing needs an improvement of at least gate.min_improvement (and above zero), significance
    when gate.require_significant, every guard held and the general loss within its limit.
    """
    base_scores, tuned_scores = paired_scores(base, tuned, gate.metric, "gate.metric")
    better = higher_is_better(gate.metric)
    gains = tuned_scores - base_scores if better else base_scores - tuned_scores
    base_value, tuned_value = float(base_scores.mean()), float(tuned_scores.mean())
    improvement = float(gains.mean())
    percent = f"{gate.confidence * 100:g}%"
    both = torch.cat([base_scores, tuned_scores])
    binary = bool(((both == 0) | (both == 1)).all())
    method = "mcnemar" if binary else "paired_bootstrap"
    gained, lost = int((gains > 0).sum()), int((gains < 0).sum())
    p_value = mcnemar_exact(lost, gained) if binary else None
    finite = bool(gains.isfinite().all())  # a diverged model scores NaN or infinite losses
    beat = finite and improvement > 0 and improvement >= gate.min_improvement - TOLERANCE
    if not finite:
        interval, significant = (math.nan, math.nan), False
        reasons = [f"{gate.metric} has non-finite scores (NaN or infinity): the tuned model cannot be judged"]
    else:
        interval = paired_bootstrap_interval(gains, gate.confidence, gate.bootstrap_samples, gate.seed)
        significant = improvement > 0 and (p_value < 1 - gate.confidence if binary else interval[0] > 0)
        low, high = interval if better else (-interval[1], -interval[0])  # shown as tuned - base
        test = f"; McNemar p={p_value:.3g}" if binary else ""
        reasons = [f"{gate.metric} {movement(base_value, tuned_value)} ({tuned_value - base_value:+.3f}, {percent} CI "
                   f"{low:+.3f}..{high:+.3f}{test}; {gains.numel()} test rows)"]
        if improvement <= 0:
            reasons.append(f"tuned did not beat base on {gate.metric} (improvement {improvement:+.3f})")
        elif not beat:
            reasons.append(f"improvement {improvement:+.3f} is below gate.min_improvement {gate.min_improvement:.3f}")
        elif gate.require_significant and not significant and binary:
            reasons.append(f"improvement {improvement:+.3f} is within noise (McNemar p={p_value:.3g} is not below "
                           f"{1 - gate.confidence:.3g}: {gained} rows better, {lost} worse)")
        elif gate.require_significant and not significant:
            reasons.append(f"improvement {improvement:+.3f} is within noise ({percent} CI "
                           f"{interval[0]:+.3f}..{interval[1]:+.3f} includes 0)")
    guards = [check_guard(guard.metric, guard.max_decrease, base, tuned, f"gate.guards.{index}.metric")
              for index, guard in enumerate(gate.guards)]
    reasons += [describe_guard(guard) for guard in guards]
    general = None
    if gate.max_general_loss_increase is not None:
        if general_loss is None:
            raise ValueError("the gate checks the loss on gate.general_data: pass general_loss=(base, tuned)")
        general = general_loss_check(*general_loss, gate.max_general_loss_increase)
        reasons.append(general.reason)
    passed = (beat and (significant or not gate.require_significant) and all(g.passed for g in guards)
              and (general is None or general.passed))
    return GateDecision(passed, gate.metric, base_value, tuned_value, improvement, interval, gate.confidence,
                        p_value, method, int(gains.numel()), guards, general, reasons)


def paired_scores(base: dict[str, list[float]], tuned: dict[str, list[float]], metric: str,
                  location: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row scores of `metric` for base and tuned; AfinaError when the evaluation has none."""
    measured = sorted(name for name in tuned if len(tuned[name]) and len(base.get(name, ())))
    if metric not in measured:
        raise AfinaError("unknown_gate_metric", f"the evaluation reports no {metric!r} for base and tuned; "
                                                f"it reports: {', '.join(measured) or 'nothing'}",
                         location=location, hint="name one of the reported metrics")
    base_scores = torch.tensor(base[metric], dtype=torch.float64)
    tuned_scores = torch.tensor(tuned[metric], dtype=torch.float64)
    if base_scores.shape != tuned_scores.shape:
        raise ValueError(f"{metric}: {base_scores.numel()} base scores but {tuned_scores.numel()} tuned ones; "
                         "both must come from the same test rows")
    return base_scores, tuned_scores


def paired_bootstrap_interval(differences, confidence: float, samples: int, seed: int) -> tuple[float, float]:
    """Percentile interval of the mean of `differences`, resampling rows with replacement."""
    differences = torch.as_tensor(differences, dtype=torch.float64).flatten().cpu()
    count = differences.numel()
    generator = torch.Generator().manual_seed(seed)
    at_once = max(1, min(samples, BOOTSTRAP_VALUES_AT_ONCE // count))
    means = torch.cat([differences[torch.randint(count, (min(at_once, samples - start), count), generator=generator)]
                       .mean(1) for start in range(0, samples, at_once)])
    low, high = torch.quantile(means, torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64))
    return float(low), float(high)


def mcnemar_exact(worse: int, better: int) -> float:
    """Two-sided exact McNemar p-value: the binomial(worse + better, 1/2) probability of a split at
    least as uneven as the one seen. 1.0 when the models never disagree."""
    total = worse + better
    if total == 0:
        return 1.0
    term = tail = 1  # C(total, 0); each next binomial coefficient from the last, in exact integers
    for k in range(min(worse, better)):
        term = term * (total - k) // (k + 1)
        tail += term
    return min(1.0, 2 * tail / 2**total)  # int / int divides correctly rounded, however large both are


def check_guard(metric: str, max_decrease: float, base: dict[str, list[float]], tuned: dict[str, list[float]],
                location: str) -> GuardResult:
    """Whether `metric` got worse by more than `max_decrease` (mean over the test rows)."""
    base_scores, tuned_scores = paired_scores(base, tuned, metric, location)
    base_value, tuned_value = float(base_scores.mean()), float(tuned_scores.mean())
    change = tuned_value - base_value if higher_is_better(metric) else base_value - tuned_value
    passed = math.isfinite(change) and -change <= max_decrease + TOLERANCE
    return GuardResult(metric, base_value, tuned_value, change, max_decrease, passed)


def describe_guard(guard: GuardResult) -> str:
    moved = f"{movement(guard.base_value, guard.tuned_value)} ({guard.tuned_value - guard.base_value:+.3f})"
    if guard.passed:
        return f"guard {guard.metric} held: {moved}, within the {guard.max_decrease:.3f} allowed"
    return f"guard {guard.metric} {moved}: worse by more than the {guard.max_decrease:.3f} allowed"


def movement(before: float, after: float) -> str:
    """'rose 0.250 -> 0.560', 'fell 1.200 -> 0.950' or 'stayed at 0.250'."""
    if before == after:
        return f"stayed at {before:.3f}"
    return f"{'rose' if after > before else 'fell'} {before:.3f} -> {after:.3f}"


def general_loss_check(base_loss: float, tuned_loss: float, max_increase: float) -> LossCheck:
    """The loss on general-purpose data may rise by at most `max_increase` (it may always fall)."""
    increase = tuned_loss - base_loss
    passed = math.isfinite(increase) and increase <= max_increase + TOLERANCE
    verdict = "within" if passed else "more than"
    reason = (f"loss on the general data went {base_loss:.3f} -> {tuned_loss:.3f} ({increase:+.3f}), "
              f"{verdict} the {max_increase:.3f} rise allowed")
    return LossCheck(passed, base_loss, tuned_loss, increase, max_increase, reason)
