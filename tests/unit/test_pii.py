"""Personal data: detectors with check digits, precision and recall on the labeled set, masking,
`afina data scan`, and `data.mask_pii` keeping the originals out of the run directory."""

import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from afina.cli.main import app
from afina.data.example.pii_samples import labeled_samples
from afina.data.formats import normalize_row
from afina.data.pii import (cpf_valid, dni_valid, find_pii, iban_valid, luhn_valid, mask_record, mask_value,
                            nif_pt_valid, ssn_valid)
from tests.conftest import chat_row, write_jsonl

CHECKSUMMED = ("IBAN", "CARD", "DNI", "NIF", "CPF", "SSN")


def test_check_digits_accept_known_values_and_refuse_one_digit_off():
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and iban_valid("ES9121000418450200051332")
    assert not iban_valid("ES9121000418450200051333")
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert dni_valid("12345678Z") and dni_valid("X1234567L") and not dni_valid("12345678A")
    assert nif_pt_valid("123456789") and not nif_pt_valid("123456788")
    assert cpf_valid("52998224725") and not cpf_valid("52998224726") and not cpf_valid("11111111111")
    assert ssn_valid("123-45-6789") and not ssn_valid("000-12-3456") and not ssn_valid("666-12-3456")


def test_precision_and_recall_per_type_on_the_labeled_set():
    found, truth = Counter(), Counter()
    right = Counter()
    for text, labels in labeled_samples(600, seed=1):
        spans = {(f.type, f.start, f.end) for f in find_pii(text)}
        for kind, *_ in labels:
            truth[kind] += 1
        for kind, *_ in spans:
            found[kind] += 1
        for kind, *_ in spans & set(labels):
            right[kind] += 1
    for kind in truth:
        precision, recall = right[kind] / max(1, found[kind]), right[kind] / truth[kind]
        floor = (0.98, 0.99) if kind in CHECKSUMMED else (0.95, 0.95)
        assert precision >= floor[0] and recall >= floor[1], (kind, precision, recall)


def test_a_sentence_in_each_language():
    text = "Hola, soy Ana: ana.garcia@empresa.es, +34 612 345 678, IBAN ES91 2100 0418 4502 0005 1332, DNI 12345678Z."
    assert [f.type for f in find_pii(text)] == ["EMAIL", "PHONE", "IBAN", "DNI"]
    text = "Olá, o meu NIF é 123456789 e o CPF 529.982.247-25; ligue para (11) 98765-4321."
    assert [f.type for f in find_pii(text)] == ["NIF", "CPF", "PHONE"]
    text = "Card 4111 1111 1111 1111, SSN 123-45-6789, from 192.168.1.20 on 2024-03-12, order #558812."
    assert [f.type for f in find_pii(text)] == ["CARD", "SSN", "IP"]


def test_masking_is_consistent_within_a_record():
    row = {"messages": [{"role": "user", "content": "Write to ana@example.com or bob@example.com"},
                        {"role": "assistant", "content": "I wrote to ana@example.com."}]}
    record, _ = normalize_row(row, 1)
    masked = mask_record(record)
    assert masked.messages[0].content == "Write to <EMAIL_1> or <EMAIL_2>"
    assert masked.messages[1].content == "I wrote to <EMAIL_1>."
    assert mask_value("ana@example.com") == "an***********om"


def test_data_scan_reports_counts_lines_and_masked_values(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat_row("my card is 4111 1111 1111 1111", "ok"),
                                              chat_row("nothing personal", "ok"),
                                              chat_row("mail ana@example.com", "sent to ana@example.com")])
    result = CliRunner().invoke(app, ["data", "scan", str(path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["counts"]["CARD"] == 1 and report["counts"]["EMAIL"] == 2
    assert report["rows_with_personal_data"] == 2
    assert {(f["type"], f["line"]) for f in report["findings"]} == {("CARD", 1), ("EMAIL", 3)}
    assert "4111 1111 1111 1111" not in result.output and "ana@example.com" not in result.output
    table = CliRunner().invoke(app, ["data", "scan", str(path)])
    assert table.exit_code == 0 and "named-entity" in table.output


@pytest.mark.parametrize("mask", [True, False])
def test_mask_pii_keeps_the_originals_out_of_the_run_directory(mask, tiny_model_dir, ticket_rows, tmp_path,
                                                               afina_home):
    planted = ["maria.souza@correio.pt", "ES91 2100 0418 4502 0005 1332", "529.982.247-25"]
    rows = [chat_row(f"{row['messages'][-2]['content']} (contact {planted[i % 3]})", row["messages"][-1]["content"])
            for i, row in enumerate(ticket_rows)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {{path: d.jsonl, mask_pii: {str(mask).lower()}}}\n"
                      "training: {max_steps: 1, row_length: 256}\n")
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output
    written = "".join(p.read_text(errors="replace") for p in (afina_home / "runs").rglob("*") if p.is_file()
                      and p.suffix in (".jsonl", ".json"))
    assert any(value in written for value in planted) != mask
    assert ("<EMAIL_1>" in written and "<IBAN_1>" in written and "<CPF_1>" in written) == mask
