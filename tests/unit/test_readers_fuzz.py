"""Every reader against hostile files: truncated, re-encoded, nested, full of control characters,
huge, or random. The only allowed outcomes are a report whose every problem has a code and a line,
or one AfinaError with a code and a location in the file. Never another exception."""

import csv
import io
import json
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from afina.cli.main import app
from afina.data import readers
from afina.data.validate import DataReport, check_file
from afina.errors import AfinaError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ROWS = [{"prompt": "¿Qué hora es?", "completion": "Son las 3, \"más o menos\"."},
        {"prompt": "日本語で", "completion": "はい"},
        {"prompt": "two\nlines", "completion": "ok, fine"}]
FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def encode(rows: list[dict], suffix: str) -> bytes:
    """A valid file of `rows`, written as a user's tools would write it."""
    if suffix == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    if suffix == ".json":
        return json.dumps(rows, ensure_ascii=False, indent=1).encode()
    if suffix == ".csv":
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().encode()
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def outcome(path) -> DataReport | AfinaError:
    """Read `path` and check that what came back is one of the allowed outcomes."""
    data = path.read_bytes()
    # CSV ends a line at \r too (Excel for Mac writes no \n); JSON and JSONL count \n only
    last_line = len(data.splitlines()) + 1 if path.suffix == ".csv" else data.count(b"\n") + 1
    try:
        report = check_file(path)
    except AfinaError as error:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", error.code), error.render()
        assert error.location and error.location.startswith(str(path)), error.render()
        line = re.fullmatch(re.escape(str(path)) + r"(?::(\d+))?", error.location)
        assert line, error.render()
        if line.group(1) and path.suffix != ".parquet":
            assert 1 <= int(line.group(1)) <= last_line, error.render()
        return error
    lines = last_line if path.suffix != ".parquet" else report.rows_read
    for problem in report.problems:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", problem.code) and problem.message, problem
        assert isinstance(problem.line, int) and 1 <= problem.line <= lines, problem
    for record in report.records:  # what was kept can be written out as training data
        json.dumps(record.to_json(), ensure_ascii=False).encode("utf-8")
        record.content_key()
    return report


def hostile_files(suffix: str) -> dict[str, bytes]:
    valid = encode(ROWS, suffix)
    text = valid.decode("utf-8", errors="replace") if suffix != ".parquet" else ""
    rng = random.Random(27)
    files = {
        "random": bytes(rng.randrange(256) for _ in range(3000)),
        "random_text": "".join(chr(rng.randrange(32, 0x3000)) for _ in range(2000)).encode(),
        "zeros": bytes(5000),
        "bom_only": b"\xef\xbb\xbf",
        "whitespace": b" \n\t\r\n  \n",
        "valid_twice": valid + valid,
        "many_rows": encode([{"prompt": f"q{i}", "completion": "a"} for i in range(3000)], suffix),
    }
    if suffix == ".parquet":
        files |= {"flipped": bytes(b ^ 0xFF if i % 97 == 50 else b for i, b in enumerate(valid)),
                  "text_named_parquet": encode(ROWS, ".jsonl")}
        return files
    for encoding in ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1", "cp1252"):
        files[f"encoded_{encoding}"] = text.encode(encoding, errors="replace")
    for code in [*range(32), 0x7F, 0x85, 0x2028, 0xFEFF]:
        files[f"control_{code:x}"] = text.replace("más", f"m{chr(code)}s").encode()
    files |= {
        "crlf": text.replace("\n", "\r\n").encode(),
        "cr_only": text.replace("\n", "\r").encode(),
        "nul_line": valid + b"\x00\n" + valid,
        "bom_in_middle": valid + b"\xef\xbb\xbf" + valid,
        "deep": _nested(suffix, 200_000),
        "deep_under_recursion_limit": _nested(suffix, 500),
        "surrogate": _with_value(suffix, "\\ud800"),
        "surrogate_low": _with_value(suffix, "x\\udfff"),
        "huge_line": _with_value(suffix, "y" * (5 * 1024 * 1024)),
        "long_line": _with_value(suffix, "z" * 300_000),
        "many_keys": json.dumps({f"k{i}": i for i in range(20_000)}).encode(),
        "quote_soup": b'"""\n"a",""b\n,,"\n' * 20,
    }
    return files


def _nested(suffix: str, depth: int) -> bytes:
    value = "[" * depth + "]" * depth
    if suffix == ".csv":
        return ("messages\n\"" + value + "\"\n").encode()
    if suffix == ".json":
        return ("[" + value + "]").encode()
    return (value + "\n").encode()


def _with_value(suffix: str, escaped: str) -> bytes:
    """A valid file whose second row's completion is `escaped` (JSON escapes left as written)."""
    if suffix == ".csv":
        cell = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "@"}])
        return ("messages\nx\n\"" + cell.replace('"', '""').replace("@", escaped) + "\"\n").encode()
    row = json.dumps({"prompt": "q", "completion": "@"}).replace("@", escaped)
    rows = [json.dumps(ROWS[0]), row]
    return ("\n".join(rows) + "\n" if suffix == ".jsonl" else "[" + ",\n".join(rows) + "]").encode()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_hostile_corpus(tmp_path, suffix):
    for name, content in hostile_files(suffix).items():
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(content)
        outcome(path)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_truncated_at_every_byte(tmp_path, suffix):
    valid = encode(ROWS, suffix)
    path = tmp_path / f"cut{suffix}"
    for end in range(len(valid) + 1):
        path.write_bytes(valid[:end])
        result = outcome(path)
        if end == len(valid):
            assert isinstance(result, DataReport) and result.errors == [] and len(result.records) == 3


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_utf8_bom_changes_nothing(tmp_path, suffix):
    plain, marked = tmp_path / f"plain{suffix}", tmp_path / f"marked{suffix}"
    plain.write_bytes(encode(ROWS, suffix))
    marked.write_bytes(b"\xef\xbb\xbf" + encode(ROWS, suffix))
    assert check_file(plain).records == check_file(marked).records


@pytest.mark.parametrize("suffix", SUFFIXES)
@FUZZ
@given(data=st.data())
def test_mutated_files(tmp_path, suffix, data):
    valid = encode(ROWS, suffix)
    position = data.draw(st.integers(0, len(valid)))
    cut = data.draw(st.integers(0, 8))
    inserted = data.draw(st.binary(max_size=12) | st.sampled_from([b"\x00", b'"', b"\\ud800", b"[" * 2000, b"\n",
                                                                     b"\xef\xbb\xbf", b"\xff\xfe", b",", b"{"]))
    path = tmp_path / f"mutated{suffix}"
    path.write_bytes(valid[:position] + inserted + valid[position + cut:])
    outcome(path)


TEXT = st.text(min_size=1, max_size=40).filter(str.strip)


@pytest.mark.parametrize("suffix", SUFFIXES)
@FUZZ
@given(pairs=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=5, unique=True))
def test_any_text_written_by_a_standard_writer_reads_back(tmp_path, suffix, pairs):
    rows = [{"prompt": p, "completion": c} for p, c in pairs]
    path = tmp_path / f"written{suffix}"
    path.write_bytes(encode(rows, suffix))
    result = outcome(path)
    if suffix == ".csv" and any("\x00" in p + c for p, c in pairs):  # CSV has no way to escape a NUL
        if isinstance(result, AfinaError):  # a few cells of nothing but control characters read as binary
            assert result.code == "binary_file"
        else:
            assert {p.code for p in result.errors} == {"invalid_text"}
        return
    assert isinstance(result, DataReport) and result.errors == [], result
    assert [(r.messages[0].content, r.messages[1].content) for r in result.records] == pairs


@pytest.mark.parametrize("name, content, code, where", [
    ("deep.json", b"[" * 200_000, "too_deep", ":1"),
    ("cut.csv", b'prompt,completion\nq,"a\nb,c\n', "unterminated_quote", ":2"),
    ("utf16.jsonl", '{"prompt": "q", "completion": "a"}\n'.encode("utf-16"), "invalid_utf8", ":1"),
    ("blob.csv", bytes(range(256)) * 20, "binary_file", ""),
    ("nul.jsonl", b'{"prompt": "q", "completion": "a"}\n{"prompt": "q\x00"}\n', "invalid_text", ":2"),
    ("lone.jsonl", b'{"prompt": "q", "completion": "\\ud800"}\n', "invalid_text", ":1 field completion"),
    ("chat.csv", b'messages\n"[{""role"": ""user""}, {"\n', "invalid_json", ":2 field messages"),
])
def test_inspect_ends_with_one_located_error_line(tmp_path, tiny_model_dir, name, content, code, where):
    path = tmp_path / name
    path.write_bytes(content)
    result = CliRunner().invoke(app, ["data", "inspect", str(path), "--model", str(tiny_model_dir)])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "error[" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error[{code}] at {path}{where}: "), result.output


def test_huge_cell_through_inspect(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 4096)
    path = tmp_path / "huge.csv"
    path.write_text('prompt,completion\nq,"' + "x" * 10_000 + '"\n')
    result = CliRunner().invoke(app, ["data", "inspect", str(path), "--model", str(tiny_model_dir)])
    assert result.exit_code == 2 and f"error[cell_too_large] at {path}:2" in result.output, result.output
