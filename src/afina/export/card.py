"""The model card (README.md in an export): the lineage a reviewer asks for."""

from __future__ import annotations

from afina.export.source import ExportSource
from afina.store.records import Model


def render_card(source: ExportSource, export_format: str, quant: str | None, check: dict | None,
                version: str, files: dict[str, dict] | None = None) -> str:
    """Markdown: base model, method, data hashes, metrics base vs tuned, the gate's decision, the
    afina version, the round trip's result and the weight files' SHA-256. Without a registry record,
    what the run directory holds."""
    config, record = source.config, source.record
    base = f"`{config.model}`" + (" (SmolLM2-135M-Instruct, bundled with afina)" if config.model == "default" else "")
    lines = [f"# {record.ref if record else source.run_dir.name}", "",
             f"Fine-tuned from {base} with afina {version}.", "",
             "| | |", "| --- | --- |",
             f"| base model | {base}" + (f" (weights sha256 `{record.base_sha256[:16]}`)"
                                                   if record and record.base_sha256 else "") + " |",
             f"| method | {config.method.name} (merged into the weights) |",
             f"| objective | {config.objective.name} |",
             f"| run | `{source.run_dir.name}` |",
             f"| format | {export_format}{f' {quant}' if quant else ''} |"]
    if record is not None:
        lines += [f"| registered | {record.ref}, {record.created_at:%Y-%m-%d}"
                  + (f", aliases {', '.join(record.aliases)}" if record.aliases else "") + " |", ""]
        lines += data_section(record) + metrics_section(record) + gate_section(record)
    else:
        lines += ["", "This run is not in the registry: no data hashes, metrics or gate decision were recorded.", ""]
    unchecked = ("Not checked (exported with --no-verify): nobody has compared this export's answers with the "
                 "tuned model's.")
    lines += round_trip_section(check) if check is not None else ["## Round trip", "", unchecked, ""]
    lines += files_section(files or {})
    return "\n".join(lines) + "\n"


def round_trip_section(check: dict) -> list[str]:
    """What the export was proven to do: its answers, its stops and the task metric beside the tuned model's."""
    near = f" ({check['near_ties']} departing only at a near tie)" if check.get("near_ties") else ""
    how = (f"Loaded in {check['runtime']}, {check['answers']} test prompts answered greedily with the export's own "
           "chat template (checked to render every prompt as the tuned model's) and end-of-turn token.")
    identical = f"{check['identical']}/{check['answers']}{near} ({check['agreement']:.0%})"
    stops = f"{check['stops_matched']}/{check['stops_expected']}"
    lines = ["## Round trip", "", how, "", "| | tuned model in afina | this export |", "| --- | ---: | ---: |",
             f"| answers identical to the tuned model's | | {identical} |",
             f"| stops where the tuned model stops | {check['stops_expected']} answers | {stops} |"]
    if check.get("metric") and check.get("tuned_metric") is not None:
        lines.append(f"| {check['metric']} on these prompts | {check['tuned_metric']:.3f} | "
                     f"{check['export_metric']:.3f} |")
    if check.get("min_agreement") is not None:
        required = (f"Required: at least {check['min_agreement']:.0%} of the answers identical and of the stops "
                    "where the tuned model stops.")
        lines += ["", required]
    return lines + [""]


def files_section(files: dict[str, dict]) -> list[str]:
    if not files:
        return []
    lines = ["## Files", "", "| file | bytes | sha256 |", "| --- | ---: | --- |"]
    lines += [f"| {name} | {entry['bytes']:,} | `{entry['sha256']}` |" for name, entry in files.items()]
    return lines + [""]


def data_section(record: Model) -> list[str]:
    lines = ["## Data", "", "| role:file | sha256 |", "| --- | --- |"]
    lines += [f"| {name} | `{digest}` |" for name, digest in sorted(record.data_hashes.items())]
    return lines + [""]


def metrics_section(record: Model) -> list[str]:
    base, tuned = record.metrics.get("base", {}), record.metrics.get("tuned", {})
    lines = ["## Metrics on the held-out test split", "", "| metric | base | tuned |", "| --- | --- | --- |"]
    lines += [f"| {name} | {base[name]:.4g} | {tuned[name]:.4g} |" for name in sorted(set(base) & set(tuned))]
    return lines + [""]


def gate_section(record: Model) -> list[str]:
    gate = record.gate
    decision = "passed" if gate.get("passed") else "failed"
    lines = ["## Gate", "", f"Decision: **{decision}** on `{gate.get('metric')}`"
             + (f" ({gate.get('base_value'):.4g} -> {gate.get('tuned_value'):.4g})"
                if gate.get("base_value") is not None and gate.get("tuned_value") is not None else "")
             + (f", improvement interval {gate['interval'][0]:.3g} to {gate['interval'][1]:.3g}" if gate.get("interval") else "")
             + "."]
    lines += [f"- {reason}" for reason in gate.get("reasons", [])]
    return lines + [""]
