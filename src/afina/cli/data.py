"""`afina data inspect`, `afina data preview` and `afina data scan`."""

from __future__ import annotations

import statistics
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from afina.data.formats import Problem
from afina.data.tokenize import tokenize_record
from afina.data.validate import check_file

app = typer.Typer(help="Check and preview data files.", no_args_is_help=True)
console = Console()


def _errors(command):
    from afina.cli.console import user_errors

    return user_errors(command)


@app.command("inspect")
def inspect_command(
    path: Path = typer.Argument(..., help="Data file: .jsonl, .json, .csv or .parquet"),
    model: str = typer.Option("default", help="Model whose tokenizer measures lengths"),
    max_length: int = typer.Option(1024, help="Length limit in tokens"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Exit 0 even if rows are invalid"),
) -> None:
    """Report formats, token lengths, rows over the limit, duplicates and every problem with its line."""
    _errors(_inspect)(path, model, max_length, skip_invalid)


def _inspect(path: Path, model: str, max_length: int, skip_invalid: bool) -> None:
    from afina.models.loading import load_tokenizer
    from afina.pipeline.prepare import quiet_libraries

    report = check_file(path)
    quiet_libraries()
    tokenizer = load_tokenizer(model)
    lengths, over = [], 0
    for record in report.records:
        if record.kind in ("preference", "unpaired"):
            continue
        example = tokenize_record(record, tokenizer, max_length=10**9)
        lengths.append(len(example.input_ids))
        if len(example.input_ids) > max_length:
            over += 1
            report.problems.append(Problem("too_long", record.line, None,
                                           f"{len(example.input_ids)} tokens, over max_length={max_length}",
                                           severity="warning"))
    summary = Table(title=f"{path}", show_header=False)
    summary.add_row("rows read", str(report.rows_read))
    summary.add_row("valid rows", str(len(report.records)))
    summary.add_row("invalid rows", str(len({p.line for p in report.errors})))
    summary.add_row("formats", ", ".join(f"{k} {v}" for k, v in report.formats.items()) or "-")
    summary.add_row("exact duplicates", str(report.duplicates))
    summary.add_row(f"over {max_length} tokens", str(over))
    if lengths:
        summary.add_row("tokens min / median / p95 / max", " / ".join(map(str, length_summary(lengths))))
        summary.add_row("tokens total", f"{sum(lengths):,}")
    console.print(summary)
    if report.problems:
        problems = Table(title="problems")
        for column in ("code", "line", "field", "message"):
            problems.add_column(column)
        for p in report.problems[:50]:
            style = "red" if p.severity == "error" else "yellow"
            problems.add_row(f"[{style}]{p.code}[/]", str(p.line or ""), p.field or "", p.message)
        console.print(problems)
        if len(report.problems) > 50:
            console.print(f"... and {len(report.problems) - 50} more")
    if report.errors and not skip_invalid:
        raise report.first_error(hint="every problem is listed above; --skip-invalid exits 0")


def length_summary(lengths: list[int]) -> tuple[int, int, int, int]:
    """Min, median, 95th percentile and max. The percentile interpolates between the values
    themselves (the default method extrapolates past the largest when there are few)."""
    p95 = statistics.quantiles(lengths, n=20, method="inclusive")[18] if len(lengths) > 1 else lengths[0]
    return min(lengths), int(statistics.median(lengths)), int(p95), max(lengths)


@app.command("preview")
def preview_command(
    path: Path = typer.Argument(..., help="Data file"),
    index: int = typer.Option(0, help="Which valid row to show (0-based)"),
    model: str = typer.Option("default", help="Model whose chat template and tokenizer are used"),
    train_on_prompt: bool = typer.Option(False, help="Preview with every token trained"),
) -> None:
    """Show one example as the model sees it; trained tokens are highlighted."""
    _errors(_preview)(path, index, model, train_on_prompt)


def _preview(path: Path, index: int, model: str, train_on_prompt: bool) -> None:
    from afina.errors import AfinaError
    from afina.models.loading import load_tokenizer
    from afina.pipeline.prepare import quiet_libraries

    report = check_file(path)
    if not 0 <= index < len(report.records):
        raise AfinaError("index_out_of_range", f"the file has {len(report.records)} valid rows", location="--index")
    quiet_libraries()
    tokenizer = load_tokenizer(model)
    record = report.records[index]
    example = tokenize_record(record, tokenizer, max_length=10**9, train_on_prompt=train_on_prompt)
    text = Text()
    for token_id, trained in zip(example.input_ids, example.trained):
        text.append(tokenizer.decode([token_id]), style="bold black on green" if trained else "dim")
    console.print(f"{path}:{record.line} ({record.source_format}) · {len(example.input_ids)} tokens, "
                  f"{example.trained_count} trained (highlighted)")
    console.print(text)


@app.command("scan")
def scan_command(
    path: Path = typer.Argument(..., help="Data file: .jsonl, .json, .csv or .parquet"),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON"),
) -> None:
    """Find personal data (e-mails, phones, IBANs, cards, DNI/NIE, NIF, CPF, SSN, IPs): counts per type,
    and each finding's line and field, with the value masked."""
    _errors(_scan)(path, json_output)


def _scan(path: Path, json_output: bool) -> None:
    import json

    from afina.data.pii import NER_TYPES, TYPES, find_pii, mask_value, record_texts

    report = check_file(path)
    if report.errors and not report.records:
        raise report.first_error()
    findings = [{"type": finding.type, "line": record.line, "field": field, "value": mask_value(finding.value)}
                for record in report.records for field, text in record_texts(record) for finding in find_pii(text)]
    counts = {kind: sum(1 for f in findings if f["type"] == kind) for kind in TYPES}
    rows = len({f["line"] for f in findings})
    not_scanned = (f"{' and '.join(t.lower() for t in NER_TYPES)}s are not scanned: they need a named-entity "
                   "model (Presidio or spaCy), which afina does not ship")
    if json_output:
        typer.echo(json.dumps({"path": str(path), "rows": len(report.records), "rows_with_personal_data": rows,
                               "counts": counts, "findings": findings, "not_scanned": list(NER_TYPES)}, indent=2))
        return
    table = Table(title=f"{path}: personal data in {rows} of {len(report.records)} rows")
    for column in ("type", "found", "first lines"):
        table.add_column(column)
    for kind, count in counts.items():
        lines = sorted({f["line"] for f in findings if f["type"] == kind})
        table.add_row(kind, str(count), ", ".join(map(str, lines[:8])) + (" ..." if len(lines) > 8 else ""))
    console.print(table)
    for finding in findings[:20]:
        console.print(f"{path}:{finding['line']} {finding['field']}: {finding['type']} {finding['value']}",
                      markup=False, highlight=False)
    if len(findings) > 20:
        console.print(f"... and {len(findings) - 20} more (--json lists all)")
    console.print(f"note: {not_scanned}; data.mask_pii: true replaces the types above with placeholders "
                  "before training")
