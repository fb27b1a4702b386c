import math

import numpy as np
import pytest
from pydantic import ValidationError

from afina.config.gate import GateConfig, GuardConfig, NotifyConfig, higher_is_better
from afina.errors import AfinaError
from afina.eval.gate import decide, general_loss_check, mcnemar_exact, paired_bootstrap_interval


def flags(ones: int, count: int) -> list[float]:
    return [1.0] * ones + [0.0] * (count - ones)


def test_a_clear_win_on_a_0_1_metric_passes_by_mcnemar():
    # 100 rows: base right on 25, tuned right on those and 31 more, wrong on none that base had
    base = {"exact_match": flags(25, 100)}
    tuned = {"exact_match": flags(56, 100)}
    decision = decide(GateConfig(), base, tuned)
    assert decision.passed
    assert decision.method == "mcnemar"
    assert (decision.base_value, decision.tuned_value) == (0.25, 0.56)
    assert decision.improvement == pytest.approx(0.31)
    assert 0 < decision.interval[0] < 0.31 < decision.interval[1]
    assert decision.p_value == pytest.approx(2 / 2**31)
    assert decision.reasons[0].startswith("exact_match rose 0.250 -> 0.560 (+0.310, 95% CI +0.")


def test_a_tie_fails_with_a_reason():
    scores = {"exact_match": flags(40, 100)}
    decision = decide(GateConfig(), scores, dict(scores))
    assert not decision.passed
    assert decision.improvement == 0 and decision.p_value == 1.0
    assert "tuned did not beat base on exact_match (improvement +0.000)" in decision.reasons


def test_a_small_gain_within_noise_fails_with_its_interval():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, 200)
    noise = rng.normal(0, 0.2, 200)
    tuned = base + noise - noise.mean() + 0.01  # a real but tiny gain, buried in per-row noise
    decision = decide(GateConfig(metric="rouge_l"), {"rouge_l": list(base)}, {"rouge_l": list(tuned)})
    assert decision.method == "paired_bootstrap" and decision.p_value is None
    low, high = decision.interval
    assert low < 0 < decision.improvement < high
    assert not decision.passed
    assert decision.reasons[-1] == (f"improvement {decision.improvement:+.3f} is within noise "
                                    f"(95% CI {low:+.3f}..{high:+.3f} includes 0)")
    assert decide(GateConfig(metric="rouge_l", require_significant=False),
                  {"rouge_l": list(base)}, {"rouge_l": list(tuned)}).passed


def test_a_few_discordant_rows_are_not_significant_by_mcnemar():
    # tuned fixes 4 rows and breaks 1: +3 points, but p = 0.375
    base = {"exact_match": [0.0] * 4 + [1.0] + [0.0] * 95}
    tuned = {"exact_match": [1.0] * 4 + [0.0] + [0.0] * 95}
    decision = decide(GateConfig(), base, tuned)
    assert not decision.passed
    assert decision.p_value == pytest.approx(0.375)
    assert "is within noise (McNemar p=0.375 is not below 0.05: 4 rows better, 1 worse)" in decision.reasons[-1]


def test_a_significant_gain_below_min_improvement_fails():
    base, tuned = {"exact_match": flags(25, 100)}, {"exact_match": flags(56, 100)}
    decision = decide(GateConfig(min_improvement=0.5), base, tuned)
    assert not decision.passed
    assert decision.reasons[-1] == "improvement +0.310 is below gate.min_improvement 0.500"
    assert decide(GateConfig(min_improvement=0.31), base, tuned).passed  # 0.56 - 0.25 in floats is 0.31000000000000005


def test_loss_is_better_lower():
    rng = np.random.default_rng(2)
    base = rng.uniform(1.0, 2.0, 100)
    tuned = base - rng.uniform(0.2, 0.4, 100)
    decision = decide(GateConfig(metric="loss"), {"loss": list(base)}, {"loss": list(tuned)})
    assert decision.passed
    assert decision.improvement == pytest.approx(float((base - tuned).mean()))
    assert 0.2 < decision.interval[0] < decision.improvement < decision.interval[1] < 0.4
    assert decision.reasons[0].startswith("loss fell ")
    assert f"95% CI {-decision.interval[1]:+.3f}..{-decision.interval[0]:+.3f}" in decision.reasons[0]
    worse = decide(GateConfig(metric="loss"), {"loss": list(tuned)}, {"loss": list(base)})
    assert not worse.passed and worse.improvement < 0
    assert [higher_is_better(m) for m in ("loss", "billing/loss", "perplexity", "exact_match", "field:team")] == [
        False, False, False, True, True]


def test_a_breached_guard_fails_a_winning_model():
    base = {"exact_match": flags(25, 100), "rouge_l": [0.6] * 100, "loss": [1.0] * 100}
    tuned = {"exact_match": flags(56, 100), "rouge_l": [0.5] * 100, "loss": [1.04] * 100}
    gate = GateConfig(guards=[GuardConfig(metric="rouge_l", max_decrease=0.05),
                              GuardConfig(metric="loss", max_decrease=0.05)])
    decision = decide(gate, base, tuned)
    assert not decision.passed
    rouge, loss = decision.guards
    assert not rouge.passed and rouge.change == pytest.approx(-0.1)
    assert loss.passed and loss.change == pytest.approx(-0.04)
    assert "guard rouge_l fell 0.600 -> 0.500 (-0.100): worse by more than the 0.050 allowed" in decision.reasons
    assert "guard loss held: rose 1.000 -> 1.040 (+0.040), within the 0.050 allowed" in decision.reasons
    relaxed = GateConfig(guards=[GuardConfig(metric="rouge_l", max_decrease=0.1)])
    assert decide(relaxed, base, tuned).passed


def test_general_loss_rise_beyond_its_limit_fails():
    base, tuned = {"exact_match": flags(25, 100)}, {"exact_match": flags(56, 100)}
    gate = GateConfig(general_data="general.jsonl", max_general_loss_increase=0.1)
    kept = decide(gate, base, tuned, general_loss=(2.0, 2.05))
    assert kept.passed and kept.general.increase == pytest.approx(0.05)
    forgot = decide(gate, base, tuned, general_loss=(2.0, 2.3))
    assert not forgot.passed
    assert forgot.reasons[-1] == ("loss on the general data went 2.000 -> 2.300 (+0.300), "
                                  "more than the 0.100 rise allowed")
    assert general_loss_check(2.0, 1.5, 0.0).passed  # a fall is always fine
    assert not general_loss_check(2.0, math.nan, 0.1).passed
    with pytest.raises(ValueError, match="general_loss"):
        decide(gate, base, tuned)


def test_mcnemar_matches_the_binomial_by_hand():
    assert mcnemar_exact(0, 5) == 2 / 32  # 2 * C(5,0) / 2^5
    assert mcnemar_exact(1, 9) == 2 * (1 + 10) / 1024
    assert mcnemar_exact(8, 2) == 2 * (1 + 10 + 45) / 1024
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    # many rows, summed in exact integers: close to the normal approximation, 2 * (1 - Phi(199 / sqrt(2000)))
    assert mcnemar_exact(900, 1100) == pytest.approx(math.erfc(199 / math.sqrt(2000) / math.sqrt(2)), rel=0.05)


def test_bootstrap_is_deterministic_with_its_seed():
    differences = np.random.default_rng(3).normal(0.1, 1.0, 500)
    first = paired_bootstrap_interval(differences, 0.95, 2000, seed=7)
    assert paired_bootstrap_interval(differences, 0.95, 2000, seed=7) == first
    assert paired_bootstrap_interval(differences, 0.95, 2000, seed=8) != first
    # the interval of a mean: about 1.96 standard errors either side
    half_width = 1.96 * differences.std() / math.sqrt(differences.size)
    assert (first[1] - first[0]) / 2 == pytest.approx(half_width, rel=0.1)
    large = np.random.default_rng(4).normal(0, 1, 20_000)  # resampled in chunks: the same with the seed
    assert paired_bootstrap_interval(large, 0.9, 300, 0) == paired_bootstrap_interval(large, 0.9, 300, 0)


def test_non_finite_scores_fail():
    decision = decide(GateConfig(metric="loss"), {"loss": [1.0, 1.0]}, {"loss": [0.5, math.nan]})
    assert not decision.passed
    assert "non-finite" in decision.reasons[0]
    diverged_base = decide(GateConfig(metric="loss", require_significant=False), {"loss": [math.inf, 1.0]},
                           {"loss": [0.5, 0.5]})
    assert not diverged_base.passed


def test_a_metric_the_evaluation_did_not_report_is_an_error_naming_the_reported_ones():
    base = {"exact_match": flags(1, 4), "rouge_l": [0.5] * 4, "json_valid": []}
    with pytest.raises(AfinaError) as error:
        decide(GateConfig(metric="json_valid"), base, dict(base))
    assert error.value.code == "unknown_gate_metric"
    assert error.value.location == "gate.metric"
    assert "exact_match, rouge_l" in error.value.message
    with pytest.raises(AfinaError) as error:
        decide(GateConfig(guards=[GuardConfig(metric="field:team")]), base, dict(base))
    assert error.value.location == "gate.guards.0.metric"


def test_an_unknown_metric_name_is_a_config_error_naming_the_valid_ones():
    with pytest.raises(ValidationError, match="unknown metric 'acuracy'; valid: exact_match, .*loss"):
        GateConfig(metric="acuracy")
    with pytest.raises(ValidationError, match="unknown metric"):
        GateConfig(guards=[{"metric": "a/b/loss"}])
    for name in ("field:priority", "billing/exact_match", "billing-2/field:team", "perplexity"):
        assert GateConfig(metric=name).metric == name
    with pytest.raises(ValidationError, match="together"):
        GateConfig(general_data="general.jsonl")


def test_notify_config_keeps_secrets_out():
    config = NotifyConfig.model_validate({
        "webhook": {"url": "https://hooks.example.com/x", "secret_env": "HOOK_SECRET"},
        "email": {"host": "smtp.example.com", "from": "afina@example.com", "to": ["team@example.com"],
                  "username_env": "SMTP_USER", "password_env": "SMTP_PASSWORD"}})
    assert config.email.from_ == "afina@example.com" and config.email.port == 587 and config.email.starttls
    with pytest.raises(ValidationError):  # a secret value where a variable name belongs
        NotifyConfig.model_validate({"webhook": {"url": "https://x", "secret_env": "s3cr3t value!"}})
    with pytest.raises(ValidationError):
        NotifyConfig.model_validate({"email": {"host": "h", "from": "a@b", "to": ["c@d"], "password": "pw"}})
