"""`afina export`: a run or registered model as a deployable artifact, checked by a round trip."""

from __future__ import annotations

from pathlib import Path

import typer

from afina.cli.console import console


def export_command(
        target: str = typer.Argument(..., help="Run directory, or a registered model as NAME, NAME:VERSION or "
                                               "NAME:ALIAS"),
        export_format: str = typer.Option("safetensors", "--format", help="safetensors (a Hugging Face directory) "
                                                                         "or gguf (llama.cpp, Ollama, LM Studio)"),
        quant: str = typer.Option(None, "--quant", help="GGUF weights: f16 (default), bf16, f32, q8_0, or a llama.cpp "
                                                        "k-quant such as q4_k_m (needs llama-cpp-python)"),
        out: Path = typer.Option(None, "--out", help="Folder to write (default: $AFINA_HOME/exports/NAME-FORMAT)"),
        prompts: int = typer.Option(8, "--prompts", min=1, help="Test prompts the round trip answers"),
        min_agreement: float = typer.Option(None, "--min-agreement", min=0.0, max=1.0,
                                            help="Share of answers that must equal the tuned model's (default: 1 "
                                                 "unquantized, 0.8 q8_0, 0.5 below)"),
        verify: bool = typer.Option(True, "--verify/--no-verify", help="Load the export in its runtime and compare "
                                                                      "its answers with the tuned model's")) -> None:
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
                  f"{check.stopped} stopped at the end-of-turn token; "
                  f"load {check.load_seconds:.1f}s, {check.tokens_per_second:,.0f} tokens/s")
    if check.first_difference:
        console.print(f"first difference: {check.first_difference}", markup=False)
    if result.format == "gguf":
        console.print(f"Ollama: cd {result.directory} && ollama create NAME -f Modelfile")
