"""Save what a run trained, rebuild the tuned model from it, and fold adapters into the base.

    save_trained(model, method, run_dir / "adapter")
    tuned = load_trained(load_model(config.model), run_dir / "adapter")
    merged = merge_trained(tuned, method)      # lora, dora, rslora, ia3 (and full/freeze as they are)

Only what was trained is written, in safetensors, with `afina_method.json` naming the method:

| method | files |
| --- | --- |
| PEFT (lora, dora, rslora, qlora, ia3, prefix, prompt) | PEFT's adapter_config.json and adapter_model.safetensors |
| full, freeze | trained.safetensors: the trained parameters under their names in the model |
| loreft, adapter | trained.safetensors: the module's state (its config is in afina_method.json) |

The base itself is never copied: `load_trained` takes it freshly loaded and rebuilds the tuned model
so that its logits are exactly those of the trained model (same base dtype and device).

With a master key the directory is encrypted once the run has written it; `check_trained` and
`load_trained` read it either way through the sealed files the process was handed (`afina.sealing`),
decrypting into a private temporary copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from pydantic import TypeAdapter, ValidationError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from afina.config.methods import AnyMethod, FreezeMethod, Method
from afina.errors import AfinaError
from afina.models.loading import refuse_pickled_weights
from afina.models.methods import (
    attach_modules,
    attached_module,
    freeze_targets,
    is_quantized,
    repair_prompt_learning_generation,
    unwrap,
)
from afina.sealing import is_sealed, sealed_files

METHOD_FILE = "afina_method.json"
WEIGHTS_FILE = "trained.safetensors"


def save_trained(model: nn.Module, method: AnyMethod, directory: str | Path) -> Path:
    """Write what `method` trained in `model` to `directory` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if method.kind == "peft":
        model.save_pretrained(directory)  # PEFT writes the adapter only, in safetensors
    elif method.kind == "weights":
        save_file(cpu_tensors(trained_base_parameters(unwrap(model), method)), directory / WEIGHTS_FILE)
    else:
        save_file(cpu_tensors(attached_module(model).state_dict()), directory / WEIGHTS_FILE)
    record = {"method": method.model_dump(mode="json"), "base_model": unwrap(model).name_or_path}
    (directory / METHOD_FILE).write_text(json.dumps(record, indent=2))
    return directory


def trained_base_parameters(model: PreTrainedModel, method: AnyMethod) -> dict[str, torch.Tensor]:
    """full: every parameter; freeze: those it unfroze. Named as in the model (tied weights once)."""
    if not isinstance(method, FreezeMethod):  # full
        return dict(model.named_parameters())
    chosen = {id(p) for p in freeze_targets(model, method)}
    return {name: p for name, p in model.named_parameters() if id(p) in chosen}


def cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().contiguous().cpu() for name, t in tensors.items()}


def read_method(directory: Path) -> AnyMethod | None:
    """The method recorded by `save_trained`; None for a bare PEFT adapter directory (older runs)."""
    path = directory / METHOD_FILE
    if not path.is_file():
        if (directory / "adapter_config.json").is_file():
            return None
        raise AfinaError("artifact_not_found", "no trained weights here (afina_method.json is missing)",
                         location=str(directory))
    try:
        return TypeAdapter(Method).validate_python(json.loads(sealed_files().read_bytes(path))["method"])
    except (ValueError, KeyError, ValidationError) as exc:
        raise AfinaError("artifact_invalid", f"cannot read the recorded method: {exc}", location=str(path)) from None


def check_trained(directory: str | Path) -> None:
    """Refuse what `load_trained` could not read, before any model loads: no trained weights, an
    unreadable method record, a missing or truncated safetensors file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AfinaError("artifact_not_found", "the run has no trained weights (did training finish?)",
                         location=str(directory), hint="finish the run with afina train --resume RUN")
    refuse_pickled_weights(directory, str(directory))
    method = read_method(directory)
    check_safetensors(directory / ("adapter_model.safetensors" if method is None or method.kind == "peft"
                                   else WEIGHTS_FILE))


def check_safetensors(path: Path) -> None:
    """A safetensors file whose header parses and whose tensors end exactly at the end of the file
    (a truncated or padded file fails); reads the header only."""
    if not path.is_file():
        raise AfinaError("artifact_not_found", "the trained weights file is missing", location=str(path))
    size, head = safetensors_head(path)
    try:
        length = int.from_bytes(head[:8], "little")
        if size < 8 or length > size - 8:
            raise ValueError(f"the header claims {length} bytes of a {size}-byte file")
        header = json.loads(head[8:8 + length])
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as exc:
        raise AfinaError("artifact_invalid", f"not a readable safetensors file: {exc}", location=str(path),
                         hint="the file is damaged; train the run again") from None
    if 8 + length + end != size:
        raise AfinaError("artifact_invalid", f"the file holds {size} bytes, its header describes {8 + length + end} "
                         "(truncated?)", location=str(path), hint="the file is damaged; train the run again")


def safetensors_head(path: Path) -> tuple[int, bytes]:
    """The plain size of a safetensors file and its first bytes, through its header. An encrypted
    file is decrypted as a stream (every chunk authenticated), never whole in memory."""
    if not is_sealed(path):
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            handle.seek(0)
            return path.stat().st_size, handle.read(8 + min(length, path.stat().st_size))
    size, head = 0, b""
    for chunk in sealed_files().plain_chunks(path):
        size += len(chunk)
        if len(head) < 8 or len(head) < 8 + int.from_bytes(head[:8], "little"):
            head += chunk
    return size, head


def load_trained(base_model: PreTrainedModel, directory: str | Path) -> nn.Module:
    """Rebuild the tuned model from a freshly loaded base and what `save_trained` wrote.

    The result is frozen and ready for evaluation or generation; `base_model(model)` works on it as
    on the trained model (except for full / freeze, whose base weights are now the tuned ones).
    """
    directory = Path(directory)
    refuse_pickled_weights(directory, str(directory))  # never unpickle: it can run code
    method = read_method(directory)
    with sealed_files().plain_copy(directory) as plain:  # PEFT opens the files; the copy is gone once read
        if method is None or method.kind == "peft":
            model = PeftModel.from_pretrained(base_model, plain)
            repair_prompt_learning_generation(model)
        elif method.kind == "weights":
            copy_into_parameters(base_model, read_weights(base_model, plain), directory)
            model = base_model
        else:
            model = attach_modules(base_model, method)
            attached_module(model).load_state_dict(read_weights(base_model, plain))
    model.requires_grad_(False)  # PEFT leaves loaded prompt encoders trainable
    return model


def read_weights(model: nn.Module, directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / WEIGHTS_FILE, device=str(next(model.parameters()).device))


def copy_into_parameters(model: PreTrainedModel, weights: dict[str, torch.Tensor], directory: Path) -> None:
    parameters = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(parameters))
    if unknown:
        raise AfinaError("artifact_mismatch", f"the saved weights do not fit this base model (e.g. {unknown[0]})",
                         location=str(directory), hint="load the base model the run was trained from")
    with torch.no_grad():
        for name, tensor in weights.items():
            parameters[name].copy_(tensor)


def merge_trained(model: nn.Module, method: AnyMethod) -> PreTrainedModel:
    """A plain transformers model with the trained update folded into its weights.

    lora / dora / rslora / qlora / ia3 are merged by PEFT (on an unquantized base only); full and
    freeze already are plain models. prefix, prompt, loreft and adapter act on activations, not
    weights, and raise AfinaError `not_mergeable`.
    """
    if not method.merges:
        raise AfinaError("not_mergeable", f"{method.name} changes activations, not weights, so it cannot be folded "
                         "into the base model", location="method",
                         hint="serve the base model with the trained weights loaded (load_trained)")
    if method.kind == "weights":
        return unwrap(model)
    if is_quantized(model):
        raise AfinaError("not_mergeable", "merging into a quantized base would round the merged weights",
                         location="method", hint="load the base unquantized, load_trained onto it, then merge")
    return model.merge_and_unload()
