import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from afina.data.formats import detect_format, normalize_row
from afina.data.validate import check_file
from tests.conftest import write_jsonl

ROWS = {
    "messages": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    "prompt_completion": {"prompt": "2+2?", "completion": "4"},
    "alpaca": {"instruction": "Translate", "input": "hola", "output": "hello"},
    "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    "text": {"text": "El contrato se rescinde por incumplimiento."},
    "preference": {"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away."},
}


@pytest.mark.parametrize("fmt", list(ROWS))
def test_each_format_is_detected(fmt):
    assert detect_format(ROWS[fmt]) == fmt
    record, problems = normalize_row(ROWS[fmt], 1)
    assert problems == [] and record.source_format == fmt


def test_chat_formats_normalize_to_the_same_messages():
    expected = [("user", "hi"), ("assistant", "hello")]
    for fmt in ("messages", "sharegpt"):
        record, _ = normalize_row(ROWS[fmt], 1)
        assert [(m.role, m.content) for m in record.messages] == expected
    alpaca, _ = normalize_row(ROWS["alpaca"], 1)
    assert [(m.role, m.content) for m in alpaca.messages] == [("user", "Translate\n\nhola"), ("assistant", "hello")]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_type_reads_with_line_numbers(tmp_path, suffix):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, rows)
        expected_lines = [1, 2, 3]
    elif suffix == ".json":
        path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]")
        expected_lines = [2, 3, 4]
    elif suffix == ".csv":
        path.write_text("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in rows))
        expected_lines = [2, 3, 4]
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
        expected_lines = [1, 2, 3]
    report = check_file(path)
    assert [r.line for r in report.records] == expected_lines
    assert report.formats == {"prompt_completion": 3}


def test_csv_messages_column_holds_json(tmp_path):
    path = tmp_path / "chat.csv"
    cell = json.dumps(ROWS["messages"]["messages"]).replace('"', '""')
    path.write_text(f'messages\n"{cell}"\n')
    report = check_file(path)
    assert report.formats == {"messages": 1}
