"""`export_model`: one export from start to end, read top to bottom.

    check what was asked (format, quantization, architecture, runtime) -> answer the test prompts with
    the tuned model -> merge -> write into a staging folder -> load it back and compare (answers, stop
    token, chat template, the run's task metric) -> model card -> rename into place

A failed round trip leaves nothing at the destination: an export that answers wrongly is never
where a deployment would pick it up. With a master key every file of the export is encrypted
(`afina.security.encryption`) before the rename; afina loads it as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console

from afina.errors import AfinaError
from afina.export import gguf_file
from afina.export.card import render_card
from afina.export.hf_dir import end_of_turn_id, write_hf_directory
from afina.export.merged import check_mergeable, load_tuned, merge_tuned
from afina.export.ollama import render_modelfile
from afina.export.roundtrip import (
    RoundTrip,
    check_hf_directory,
    score_task,
    tuned_answers,
)
from afina.export.source import ExportSource, resolve_source
from afina.paths import afina_home
from afina.security.encryption import encrypt_tree, use_encryption

FORMATS = ("safetensors", "gguf")
EXACT = ("f32", "f16", "bf16")
MIN_AGREEMENT = {"f32": 1.0, "f16": 1.0, "bf16": 1.0, "q8_0": 0.8, "q6_k": 0.7, "q5_k_m": 0.6, "q5_k_s": 0.6}
"""Share of identical greedy answers (and of stops where the tuned model stops) an export must reach
by default: all for unquantized weights; for quantized ones a floor that falls with the bits, one
that catches a ruined quantization, not the usual rounding flips of a long answer."""
QUANTIZED_FLOOR = 0.5


@dataclass(frozen=True)
class ExportResult:
    """Where the export is and what its round trip measured."""

    path: Path  # the directory (safetensors) or the .gguf file
    directory: Path
    format: str
    quant: str | None
    size_bytes: int
    check: RoundTrip | None


def default_min_agreement(quant: str | None) -> float:
    return MIN_AGREEMENT.get(quant or "f32", QUANTIZED_FLOOR)


def export_model(target: str, export_format: str, quant: str | None = None, out: Path | None = None,
                 prompts: int = 8, min_agreement: float | None = None, verify: bool = True,
                 console: Console | None = None) -> ExportResult:
    """Export the run or registered model `target` as `export_format` and prove it answers as the
    tuned model does on `prompts` test prompts (unless `verify` is off)."""
    use_encryption()  # the run is read, and a GGUF converted for its check, through it (afina.sealing)
    console = console or Console(quiet=True)
    quant = check_request(export_format, quant, verify)
    source = resolve_source(target)
    check_mergeable(source.config.method)
    if export_format == "gguf":
        gguf_file.check_architecture(source.config.model)
    destination = (out or default_destination(source, export_format, quant)).expanduser()
    if destination.exists() and any(destination.iterdir()):
        raise AfinaError("export_exists", "the destination is not empty", location=str(destination),
                         hint="choose another --out, or remove it")
    floor = default_min_agreement(quant) if min_agreement is None else min_agreement
    rows = test_rows(source, prompts)
    conversations = [row.prompt_messages() for row in rows]
    max_new_tokens = source.config.eval.max_new_tokens

    from afina.models.loading import load_tokenizer
    from afina.pipeline.prepare import quiet_libraries

    quiet_libraries()
    tokenizer = load_tokenizer(source.config.model)
    eos = end_of_turn_id(tokenizer)
    with console.status("loading the tuned model"):
        tuned = load_tuned(source)
    with console.status(f"answering {len(conversations)} test prompts with the tuned model"):
        reference = tuned_answers(tuned, tokenizer, conversations, max_new_tokens) if verify else []
    dtype = next(tuned.parameters()).dtype
    merged = merge_tuned(tuned, source)

    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{destination.name}-", dir=destination.parent))
    try:
        with console.status(f"writing {export_format}{f' {quant}' if quant else ''}"):
            if export_format == "safetensors":
                write_hf_directory(merged, tokenizer, staging)
                artifact = staging
            else:
                artifact = staging / f"{destination.name}.gguf"
                gguf_file.write_gguf(merged, tokenizer, artifact, quant)
                (staging / "Modelfile").write_text(render_modelfile(artifact.name, tokenizer))
        del merged, tuned
        check = None
        if verify:
            with console.status(f"round trip: loading the export and answering {len(conversations)} prompts"):
                if export_format == "safetensors":
                    check = check_hf_directory(staging, reference, conversations, max_new_tokens, eos, dtype)
                else:
                    check = gguf_file.check_gguf_file(artifact, reference, conversations, max_new_tokens, eos,
                                                      tokenizer)
            score_task(check, [row.reference_answer() or "" for row in rows], task_metric(source))
            require_agreement(check, floor, artifact)
        write_record(staging, source, export_format, quant, check, floor)
        encrypt_tree(staging)  # with a master key, kept encrypted like the run it comes from
        if destination.exists():
            destination.rmdir()  # empty, checked above
        os.replace(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    path = destination if export_format == "safetensors" else destination / artifact.name
    size = sum(f.stat().st_size for f in destination.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".gguf"))
    return ExportResult(path, destination, export_format, quant, size, check)


def check_request(export_format: str, quant: str | None, verify: bool) -> str | None:
    """Refuse an unknown format or quantization, and a GGUF export whose tools are missing, before
    any model loads. Returns the quantization to write (f16 by default for GGUF, none for safetensors)."""
    if export_format not in FORMATS:
        raise AfinaError("bad_option", f"unknown format {export_format!r}", location="--format",
                         hint=f"one of {', '.join(FORMATS)}")
    if export_format == "safetensors":
        if quant not in (None, "f32", "bf16", "f16"):
            raise AfinaError("bad_option", "safetensors exports keep the tuned model's own precision",
                             location="--quant", hint="drop --quant, or export --format gguf --quant " + quant)
        return None
    quant = (quant or "f16").lower()
    gguf_file.check_quant(quant, verify)
    return quant


def default_destination(source: ExportSource, export_format: str, quant: str | None) -> Path:
    name = f"{source.record.name}-v{source.record.version}" if source.record else source.run_dir.name
    return afina_home() / "exports" / f"{name}-{export_format}{f'-{quant}' if quant else ''}"


def test_rows(source: ExportSource, count: int) -> list:
    """The first `count` chat rows of the run's test split with a prompt: the round trip answers each
    row's conversation before its answer, and scores the answers against that answer."""
    from afina.pipeline.run_dir import read_split

    rows = [r for r in read_split(source.run_dir, "test") if r.kind == "chat" and r.prompt_messages()][:count]
    if not rows:
        raise AfinaError("no_test_rows", "the run's test split has no chat prompts to check the export with",
                         location=str(source.run_dir / "test.jsonl"), hint="export with --no-verify")
    return rows


def task_metric(source: ExportSource) -> str:
    """The metric the run's gate judged it on, without its task prefix (`billing/field:team` -> `field:team`)."""
    from afina.config.gate import metric_base_name

    return metric_base_name(source.config.gate.metric)


def require_agreement(check: RoundTrip, floor: float, artifact: Path) -> None:
    """Answers and stops each reach the floor, or the export fails (and is not put in place)."""
    if check.stop_agreement < floor:
        raise AfinaError("export_mismatch", f"the export stops where the tuned model stops in {check.stops_matched} "
                         f"of {check.stops_expected} answers ({check.stop_agreement:.0%}, at least {floor:.0%} "
                         f"required): {check.first_stop_difference}", location=str(artifact),
                         hint="the end-of-turn token lost its weight: export a less quantized format (q8_0, f16)")
    if check.agreement < floor:
        raise AfinaError("export_mismatch", f"{check.identical} of {check.answers} answers identical to the tuned "
                         f"model's ({check.agreement:.0%}, at least {floor:.0%} required); first difference: "
                         f"{check.first_difference}", location=str(artifact),
                         hint="export a less quantized format (q8_0, f16), or lower --min-agreement if the "
                              "differences are acceptable")


def write_record(directory: Path, source: ExportSource, export_format: str, quant: str | None,
                 check: RoundTrip | None, floor: float) -> None:
    """README.md (the model card) and export.json (the same facts for scripts), with the weight files'
    SHA-256, so that a deployment can check it runs the file that passed the round trip."""
    from afina.pipeline.workflow import afina_version

    summary = None
    if check is not None:
        summary = {k: v for k, v in asdict(check).items() if k != "details"} | {
            "agreement": check.agreement, "stop_agreement": check.stop_agreement, "min_agreement": floor}
    files = weight_files(directory)
    (directory / "README.md").write_text(render_card(source, export_format, quant, summary, afina_version(), files))
    manifest = {"run": str(source.run_dir), "model": source.record.ref if source.record else None,
                "base_model": source.config.model, "method": source.config.method.name, "format": export_format,
                "quant": quant, "files": files, "round_trip": summary | {"details": check.details} if check else None}
    (directory / "export.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))


def weight_files(directory: Path) -> dict[str, dict]:
    """Each weight file of the export (safetensors shards, the GGUF): its size and SHA-256."""
    files = {}
    for path in sorted(directory.iterdir()):
        if path.suffix in (".safetensors", ".gguf"):
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
            files[path.name] = {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    return files
