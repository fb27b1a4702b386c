import math
from collections import Counter

import pytest

from afina.data.mixture import mixture_order, mixture_proportions
from afina.errors import AfinaError

DRAWS = 20_000
CHI2_CRITICAL_DF2_P001 = 13.816  # chi-square, 2 degrees of freedom, p = 0.001


def chi_square(counts: Counter, proportions: dict[str, float], total: int) -> float:
    return sum((counts[name] - total * p) ** 2 / (total * p) for name, p in proportions.items())


def assert_drawn_in_proportion(order, proportions):
    counts = Counter(name for name, _ in order)
    assert chi_square(counts, proportions, len(order)) < CHI2_CRITICAL_DF2_P001
    for name, p in proportions.items():  # and each dataset within 4 binomial standard deviations
        assert abs(counts[name] - len(order) * p) < 4 * math.sqrt(len(order) * p * (1 - p))


def test_explicit_weights_are_drawn_in_their_proportions():
    sizes = {"tickets": 50, "chat": 2000, "code": 7}
    order = mixture_order(sizes, {"tickets": 3, "chat": 1, "code": 1}, None, DRAWS, seed=11)
    assert len(order) == DRAWS
    assert_drawn_in_proportion(order, {"tickets": 0.6, "chat": 0.2, "code": 0.2})


def test_temperature_sampling_follows_sizes_to_the_power_one_over_t():
    sizes = {"big": 10_000, "mid": 1_000, "small": 100}
    raw = {name: n ** 0.5 for name, n in sizes.items()}  # T = 2
    expected = {name: w / sum(raw.values()) for name, w in raw.items()}
    assert mixture_proportions(sizes, temperature=2.0) == pytest.approx(expected)
    assert_drawn_in_proportion(mixture_order(sizes, None, 2.0, DRAWS, seed=3), expected)


def test_no_weights_and_no_temperature_mean_proportional_to_size():
    sizes = {"a": 300, "b": 100}
    assert mixture_proportions(sizes) == pytest.approx({"a": 0.75, "b": 0.25})
    assert mixture_proportions(sizes, temperature=1.0) == pytest.approx({"a": 0.75, "b": 0.25})
    assert mixture_proportions(sizes, temperature=1e6) == pytest.approx({"a": 0.5, "b": 0.5}, abs=1e-5)


def test_the_order_is_fixed_by_the_seed_and_not_by_key_order():
    sizes, weights = {"a": 10, "b": 20, "c": 5}, {"a": 1, "b": 2, "c": 1}
    first = mixture_order(sizes, weights, None, 500, seed=7)
    assert first == mixture_order(dict(reversed(sizes.items())), dict(reversed(weights.items())), None, 500, seed=7)
    assert first != mixture_order(sizes, weights, None, 500, seed=8)


def test_a_dataset_is_cycled_in_a_fresh_permutation_per_pass():
    order = mixture_order({"small": 7, "large": 5000}, {"small": 1, "large": 1}, None, 2_000, seed=5)
    small = [index for name, index in order if name == "small"]
    passes = [small[i : i + 7] for i in range(0, len(small) - len(small) % 7, 7)]
    assert len(passes) > 100
    assert all(sorted(p) == list(range(7)) for p in passes)  # every example once per pass
    assert len({tuple(p) for p in passes}) > 50  # reshuffled, not the same order every pass
    large = [index for name, index in order if name == "large"]
    assert len(set(large)) == len(large)  # not exhausted yet: no repeats


def test_a_zero_weight_dataset_is_never_drawn():
    order = mixture_order({"a": 5, "b": 5}, {"a": 1, "b": 0}, None, 100, seed=0)
    assert {name for name, _ in order} == {"a"}
    assert mixture_order({"a": 5, "b": 0}, {"a": 1}, None, 10, seed=0)[0][0] == "a"


@pytest.mark.parametrize("sizes,weights,temperature", [
    ({"a": 5}, {"a": 1}, 2.0),  # both
    ({"a": 5}, {"b": 1}, None),  # unknown dataset
    ({"a": 5, "b": 5}, {"a": -1, "b": 2}, None),  # negative
    ({"a": 5, "b": 0}, {"a": 1, "b": 1}, None),  # weight on an empty dataset
    ({"a": 5}, None, 0.0),  # temperature must be positive
    ({}, None, None),
    ({"a": 0}, None, None),
])
def test_invalid_mixtures_are_refused(sizes, weights, temperature):
    with pytest.raises(AfinaError) as error:
        mixture_proportions(sizes, weights, temperature)
    assert error.value.code == "invalid_mixture"
