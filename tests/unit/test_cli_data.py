from hypothesis import given, settings
from hypothesis import strategies as st

from afina.cli.data import length_summary


def test_p95_of_a_few_lengths_stays_within_them():
    assert length_summary([10, 20, 1000]) == (10, 20, 902, 1000)  # the old method said 1784
    assert length_summary([7]) == (7, 7, 7, 7)


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.integers(0, 100_000), min_size=1, max_size=50))
def test_the_summary_is_ordered(lengths):
    low, median, p95, high = length_summary(lengths)
    assert (low, high) == (min(lengths), max(lengths))
    assert low <= median <= p95 <= high
