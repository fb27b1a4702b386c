import pytest

from afina.data import readers
from afina.data.validate import check_file, load_records
from afina.errors import AfinaError
from tests.conftest import chat_row, write_jsonl

GOOD = chat_row("hola", "adiós")


def codes(report):
    return [(p.code, p.line, p.field) for p in report.problems]


@pytest.mark.parametrize("row, code, field", [
    ("{not json", "invalid_json", None),
    ("[1, 2]", "not_an_object", None),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown_role",
     "messages[0].role"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "missing_assistant_message", "messages"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "empty_content",
     "messages[1].content"),
    ({"prompt": "q", "completion": 3}, "invalid_field_type", "completion"),
    ({"question": "q", "answer": "a"}, "unknown_format", None),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 5}]},
     "invalid_weight", "messages[1].weight"),
    ({"conversations": [{"from": "alien", "value": "q"}]}, "unknown_role", "conversations[0].from"),
])
def test_each_row_problem_has_code_line_and_field(tmp_path, row, code, field):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD | {"x": 1}, row])
    report = check_file(path)
    assert (code, 3, field) in codes(report)
    with pytest.raises(AfinaError) as error:
        load_records(path)
    assert error.value.code == code and error.value.location.startswith(f"{path}:3")


def test_invalid_utf8_is_reported_on_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert ("invalid_utf8", 2, None) in codes(check_file(path))


def test_mixed_formats_are_rejected_at_the_first_odd_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"text": "raw"}, GOOD])
    assert ("mixed_formats", 2, None) in codes(check_file(path))


def test_chat_formats_may_mix(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "q", "completion": "a"}])
    assert check_file(path).errors == []


def test_oversized_line_is_reported_without_reading_it_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 1000)
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, '{"text": "' + "x" * 5000 + '"}', GOOD])
    report = check_file(path)
    assert ("line_too_long", 2, None) in codes(report)
    assert [r.line for r in report.records] == [1, 3]


def test_duplicates_are_counted_as_warnings(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD])
    report = load_records(path)
    assert report.duplicates == 1 and ("duplicate", 2, None) in codes(report) and len(report.records) == 2


def test_skip_invalid_counts_what_it_skips(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "{bad", {"messages": []}, chat_row("a", "b")])
    report = load_records(path, skip_invalid=True)
    assert report.rows_skipped == 2 and [r.line for r in report.records] == [1, 4]


@pytest.mark.parametrize("content, name, code", [
    (None, "missing.jsonl", "file_not_found"),
    (b"", "empty.jsonl", "empty_file"),
    (b"\n\n", "blank.jsonl", "empty_file"),
    (b"\x00\x01\x02binary", "model.jsonl", "binary_file"),
    (b"a,b\n", "data.txt", "unsupported_file_type"),
    (b"{\"data\": 3}", "bad.json", "not_an_array"),
    (b"[{\"text\": 1},", "cut.json", "invalid_json"),
])
def test_file_level_problems(tmp_path, content, name, code):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AfinaError) as error:
        check_file(path)
    assert error.value.code == code and str(path) in error.value.location
