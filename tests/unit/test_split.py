from afina.data.formats import normalize_row
from afina.data.split import split_records
from tests.conftest import chat_row


def records(count, start=0):
    return [normalize_row(chat_row(f"question {i}", f"answer {i}"), i + 1)[0] for i in range(start, start + count)]


def test_split_is_deterministic_and_follows_ratios():
    rows = records(2000)
    first = split_records(rows, 0.1, 0.2, seed=3)
    assert first == split_records(rows, 0.1, 0.2, seed=3)
    assert abs(len(first["test"]) / 2000 - 0.2) < 0.03 and abs(len(first["validation"]) / 2000 - 0.1) < 0.03
    assert first != split_records(rows, 0.1, 0.2, seed=4)


def test_appending_rows_does_not_move_existing_rows():
    old = split_records(records(300), 0.1, 0.1, seed=0)
    new = split_records(records(300) + records(200, start=300), 0.1, 0.1, seed=0)
    for name in old:
        before = {r.content_key() for r in old[name]}
        after = {r.content_key() for r in new[name]}
        assert before <= after
