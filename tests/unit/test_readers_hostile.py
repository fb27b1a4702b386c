"""Files that used to crash the readers or be read wrongly: each now gives a valid report or one
located error with its code."""

import csv
import json

import pytest

from afina.data import readers
from afina.data.validate import check_file
from afina.errors import AfinaError

ROW = {"prompt": "q", "completion": "a"}


def codes(report):
    return [(p.code, p.line, p.field) for p in report.problems]


def file_error(path) -> AfinaError:
    with pytest.raises(AfinaError) as error:
        check_file(path)
    return error.value


def test_a_csv_cell_over_the_default_csv_limit_is_ordinary_data(tmp_path):
    path = tmp_path / "long.csv"
    document = "Long contract text, clause after clause. " * 5000  # about 200 KB, over csv's default 128 KB
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["prompt", "completion"], ["Summarize", document]])
    report = check_file(path)
    assert report.errors == [] and report.records[0].messages[1].content == document


def test_a_csv_cell_over_the_cap_is_a_located_error(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "huge.csv"
    path.write_text(f'prompt,completion\nq,a\nq,"{"x" * 5000}"\nq,b\n')
    error = file_error(path)
    assert error.code == "cell_too_large" and error.location == f"{path}:3"
    assert csv.field_size_limit() == 128 * 1024  # the reader leaves csv's process-wide limit as it was


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_lone_surrogate_is_reported_on_its_row(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    rows = [json.dumps(ROW), '{"prompt": "q", "completion": "caf\\ud800"}', json.dumps(ROW | {"prompt": "r"})]
    path.write_text("\n".join(rows) if suffix == ".jsonl" else "[\n" + ",\n".join(rows) + "\n]")
    report = check_file(path)
    line = 2 if suffix == ".jsonl" else 3
    assert codes(report) == [("invalid_text", line, "completion")]
    assert len(report.records) == 2


def test_a_lone_surrogate_in_a_csv_messages_cell(tmp_path):
    path = tmp_path / "chat.csv"
    cell = '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udc00"}]'.replace('"', '""')
    path.write_text(f'messages\n"{cell}"\n')
    assert codes(check_file(path)) == [("invalid_text", 2, "messages[1].content")]


def test_paired_surrogates_are_one_character(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "smile", "completion": "\\ud83d\\ude00"}\n')
    assert check_file(path).records[0].messages[1].content == "\U0001F600"


@pytest.mark.parametrize("depth", [150, 200_000])
def test_deep_nesting_in_a_jsonl_row(tmp_path, depth):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + "[" * depth + "]" * depth + "\n")
    report = check_file(path)
    assert codes(report) == [("too_deep", 2, None)] and len(report.records) == 1


def test_deep_nesting_in_a_json_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[\n" + json.dumps(ROW) + ",\n" + "[" * 200_000 + "]" * 200_000 + "\n]")
    error = file_error(path)
    assert error.code == "too_deep" and error.location == f"{path}:3"


def test_nesting_just_under_the_limit_is_read(tmp_path):
    path = tmp_path / "d.jsonl"
    nested = "[" * (readers.MAX_DEPTH - 1) + "]" * (readers.MAX_DEPTH - 1)
    path.write_text(f'{{"prompt": "q", "completion": "a", "extra": {nested}}}\n')
    assert check_file(path).errors == []


def test_a_stray_quote_that_breaks_the_quoting_is_located(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"What is 2+2?,4\nCapital of France?,Paris\n"Largest ocean?",Pacific\n'
                    "Tallest mountain?,Everest\n")
    error = file_error(path)
    assert error.code == "stray_quote" and error.location == f"{path}:4" and "line 2" in error.message


def test_a_stray_quote_that_merges_rows_is_flagged_with_the_span(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\nq1,"a1\nq2,a2\nq3,a3"\nq4,a4\n')
    report = check_file(path)
    assert codes(report) == [("merged_rows", 2, "completion")] and "lines 2-4" in report.problems[0].message
    assert [r.line for r in report.records] == [2, 5]


def test_a_multiline_cell_of_prose_is_not_flagged(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\nq,"First paragraph, with a comma.\n\nSecond paragraph."\n')
    assert check_file(path).problems == []


def test_an_unterminated_quote_is_reported_as_such(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\nq1,a1\nq2,"a2\nq3,a3\n')
    error = file_error(path)
    assert error.code == "unterminated_quote" and error.location == f"{path}:3" and "line 4" in error.message


def test_a_row_with_missing_cells_says_so(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion,notes\nq,a,n\nq,a\n")
    report = check_file(path)
    assert codes(report) == [("invalid_csv", 3, None)] and "2 cells" in report.problems[0].message


def test_a_repeated_header_column_is_refused(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion,prompt\nq,a,b\n")
    error = file_error(path)
    assert error.code == "invalid_csv" and error.location == f"{path}:1"


def test_invalid_json_in_a_messages_cell_says_invalid_json(tmp_path):
    path = tmp_path / "chat.csv"
    cell = '[{"role": "user", "content": "hi"}, {"role": "assistant"'.replace('"', '""')
    path.write_text(f'messages\n"{cell}"\n')
    report = check_file(path)
    assert codes(report) == [("invalid_json", 2, "messages")]


def test_csv_cells_that_look_like_json_stay_text(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([["prompt", "completion"], ["Classify: printer jammed", '{"team": "it"}'],
                                      ["[citation needed] means?", "[1, 2]"]])
    report = check_file(path)
    assert report.errors == []
    assert [r.messages[1].content for r in report.records] == ['{"team": "it"}', "[1, 2]"]


def test_a_csv_label_column_reads_true_and_false(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion,label\nq,good,true\nq,bad,FALSE\n")
    assert [r.label for r in check_file(path).records] == [True, False]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_utf8_byte_order_mark_is_accepted_everywhere(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    text = {".jsonl": json.dumps(ROW) + "\n", ".json": json.dumps([ROW]), ".csv": "prompt,completion\nq,a\n"}[suffix]
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    report = check_file(path)
    assert report.errors == [] and report.formats == {"prompt_completion": 1}


@pytest.mark.parametrize("suffix, row, field", [
    (".jsonl", b'{"prompt": "q\x00", "completion": "a"}', None),
    (".csv", b"q\x00,a", "prompt"),
])
def test_a_nul_byte_on_one_line_is_that_rows_error(tmp_path, suffix, row, field):
    path = tmp_path / f"d{suffix}"
    good = [b'{"prompt": "q", "completion": "%d"}' % i if suffix == ".jsonl" else b"q,%d" % i for i in (1, 2)]
    header = b"prompt,completion\n" if suffix == ".csv" else b""
    path.write_bytes(header + good[0] + b"\n" + row + b"\n" + good[1] + b"\n")
    report = check_file(path)
    line = 3 if suffix == ".csv" else 2
    assert codes(report) == [("invalid_text", line, field)] and len(report.records) == 2


def test_a_nul_byte_in_a_json_file_is_located(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n{"prompt": "q", "completion": "a"},\n{"prompt": "q\x00", "completion": "a"}\n]')
    error = file_error(path)
    assert error.code == "invalid_text" and error.location == f"{path}:3"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_files_are_named_as_such(tmp_path, encoding):
    path = tmp_path / "d.jsonl"
    path.write_bytes((json.dumps(ROW) + "\n").encode(encoding))
    error = file_error(path)
    assert error.code == "invalid_utf8" and error.location == f"{path}:1" and "UTF-" in error.message


def test_rows_of_a_data_object_keep_their_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"meta": {"source": "crm"},\n "data": [\n' + json.dumps(ROW) + ",\n\n"
                    + json.dumps(ROW | {"completion": 3}) + "\n]}")
    report = check_file(path)
    assert codes(report) == [("invalid_field_type", 5, "completion")] and report.records[0].line == 3


def test_an_unreadable_path_is_a_located_error(tmp_path):
    path = tmp_path / ("x" * 300 + ".jsonl")  # a name longer than the file system allows
    error = file_error(path)
    assert error.code == "unreadable_file" and error.location == str(path)


@pytest.mark.parametrize("text, line", [
    ("[" + json.dumps(ROW) + "]\n[" + json.dumps(ROW) + "]", 2),
    ('{"data": [' + json.dumps(ROW) + ']}\n{"data": []}', 2),
    ('{"data": [' + json.dumps(ROW) + '],\n "source": "crm",\n}', 3),
])
def test_text_after_the_examples_is_not_ignored(tmp_path, text, line):
    path = tmp_path / "d.json"
    path.write_text(text)
    error = file_error(path)
    assert error.code == "invalid_json" and error.location == f"{path}:{line}"
