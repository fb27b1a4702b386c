"""`afina export`: a run or registered model as a deployable artifact, checked by a round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from afina.cli.console import console


def export_command(
        target: Annotated[str, typer.Argument(help="Run directory, or a registered model as NAME, NAME:VERSION or "
                                                   "NAME:ALIAS")],
        export_format: Annotated[str, typer.Option("--format", help="safetensors (a Hugging Face directory) or gguf "
                                                                    "(llama.cpp, Ollama, LM Studio)")] = "safetensors",
        quant: Annotated[str | None, typer.Option("--quant", help="GGUF weights: f16 (default), bf16, f32, q8_0, or "
                                                                  "a llama.cpp k-quant such as q4_k_m")] = None,
        out: Annotated[Path | None, typer.Option("--out", help="Folder to write (default: "
                                                               "$AFINA_HOME/exports/NAME-FORMAT)")] = None,
        prompts: Annotated[int, typer.Option("--prompts", min=1, help="Test prompts the round trip answers")] = 8,
        min_agreement: Annotated[float | None, typer.Option(
            "--min-agreement", min=0.0, max=1.0, help="Share of answers that must equal the tuned model's, and of "
                                                      "stops where it stops (default: 1 unquantized, 0.8 q8_0, 0.7 "
                                                      "q6_k, 0.6 q5_k, 0.5 below)")] = None,
        verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Load the export in its runtime and compare "
                                                                          "its answers with the tuned model's")] = True,
) -> None:
    """Merge the adapter, write safetensors or GGUF (with an Ollama Modelfile and a model card), then
    load the export back and check it answers the run's test prompts as the tuned model does."""
    from afina.export.export import export_model

    result = export_model(target, export_format, quant, out, prompts, min_agreement, verify, console)
    check = result.check
    what = f"{result.format}{f' {result.quant}' if result.quant else ''}"
    console.print(f"exported {what}: {result.path} ({result.size_bytes / 2**20:,.1f} MiB)")
    if check is None:
        console.print("[yellow]not verified[/] (--no-verify): the model card says so")
        return
    console.print(f"round trip in {check.runtime}: {check.identical}/{check.answers} answers identical to the tuned "
                  f"model's ({check.agreement:.0%}{f', {check.near_ties} at a near tie' if check.near_ties else ''}), "
                  f"stops where it stops {check.stops_matched}/{check.stops_expected}; "
                  f"load {check.load_seconds:.1f}s, {check.tokens_per_second:,.0f} tokens/s")
    if check.tuned_metric is not None:
        console.print(f"{check.metric} on these prompts: tuned {check.tuned_metric:.3f}, export {check.export_metric:.3f}")
    if check.first_difference:
        console.print(f"first difference: {check.first_difference}", markup=False)
    if result.format == "gguf":
        console.print(f"Ollama: cd {result.directory} && ollama create NAME -f Modelfile")
