"""What `afina serve MODEL ...` names, resolved and loaded: bases once, LoRA adapters shared on them.

    sources = [resolve_source(name) for name in ("default", "demo:production", "runs/tickets-...")]
    served = load_served_models(sources)
    served.get("demo:production")       # the LoadedModel (base + adapters) that serves the name
    served.adapter_of("demo:production")  # its adapter's name on that model ("" for the base itself)

A MODEL is `default`, a registry reference (`name`, `name:3`, `name:production`), a run directory
(its adapter on its base), a merged Hugging Face model directory or a GGUF file (served by its file
name without `.gguf`; converted once for transformers, as `model:` converts one, or run as it is by
the llama.cpp engine). Adapters of one base that PEFT
can mix in one batch (LoRA without DoRA) are loaded onto one copy of the base, each under its own
adapter name; any other trained method gets a model of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from afina.errors import AfinaError
from afina.security.encryption import decrypted_copy, read_bytes, use_encryption


@dataclass(frozen=True)
class ModelSource:
    """A served name and where its weights come from."""

    name: str  # what clients pass as `model`
    base: str  # what afina.models.loading.load_model reads: default, a directory or a hub id
    run_dir: Path | None = None  # a run whose adapter goes on the base
    adapter_dir: Path | None = None


@dataclass
class LoadedModel:
    """One model in memory and how to generate with it."""

    model: torch.nn.Module
    tokenizer: object
    end_ids: tuple[int, ...]  # end-of-turn and end-of-text tokens: generation stops at any
    pad_id: int
    context_length: int
    device: torch.device
    adapters: dict[str, str] = field(default_factory=dict)  # served name -> PEFT adapter name


@dataclass
class ServedModels:
    """Served names -> the loaded model that answers them, and the adapter it uses."""

    loaded: list[LoadedModel]
    routes: dict[str, tuple[int, str]]  # name -> (index in loaded, adapter name; "" for none)

    def names(self) -> list[str]:
        return list(self.routes)

    def get(self, name: str) -> LoadedModel:
        if name not in self.routes:
            raise AfinaError("model_not_found", f"the model {name!r} is not served here",
                             hint=f"served models: {', '.join(self.routes)}")
        return self.loaded[self.routes[name][0]]

    def adapter_of(self, name: str) -> str:
        return self.routes[name][1]

    def by_id(self, key: int) -> LoadedModel:
        return next(m for m in self.loaded if id(m) == key)

    def first_name_per_model(self) -> list[str]:
        seen, names = set(), []
        for name, (index, _) in self.routes.items():
            if index not in seen:
                seen.add(index)
                names.append(name)
        return names


def resolve_source(name: str) -> ModelSource:
    """Where a served name's weights are: a directory (run or merged model), `default`, a hub id, or a
    registry reference. AfinaError `model_not_found` when it is none of these."""
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "adapter").is_dir() and (path / "config.json").is_file():
            return run_source(path, path.name)
        if (path / "config.json").is_file():
            return ModelSource(name=path.name, base=str(path))
        raise AfinaError("model_not_found", "neither a run directory nor a model directory (no config.json)",
                         location=str(path))
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name=path.stem, base=str(path))
    if name == "default":
        return ModelSource(name=name, base=name)
    from afina.store import open_store

    with open_store() as store:
        try:
            model = store.get_model(name)
        except AfinaError:
            from afina.models.loading import HUB_ID

            if HUB_ID.match(name):
                return ModelSource(name=name, base=name)
            raise
    run_dir = model.artifacts.get("run_dir")
    if run_dir:
        return run_source(Path(run_dir), name)
    merged = model.artifacts.get("merged")
    if merged:
        return ModelSource(name=name, base=str(merged))
    raise AfinaError("artifact_not_found", f"the registered model {model.ref} has no run directory or merged model",
                     location=name)


def run_source(run_dir: Path, name: str) -> ModelSource:
    from afina.pipeline.run_dir import load_run_config

    config = load_run_config(run_dir)
    return ModelSource(name=name, base=config.model, run_dir=run_dir, adapter_dir=run_dir / "adapter")


def shares_base(source: ModelSource) -> bool:
    """A LoRA adapter (PEFT can mix it with others of its base in one batch)."""
    if source.adapter_dir is None:
        return False
    config_path = source.adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        return False
    config = json.loads(read_bytes(config_path))
    return config.get("peft_type") == "LORA" and not config.get("use_dora")


def load_served_models(sources: list[ModelSource], device: torch.device | None = None) -> ServedModels:
    """Load every source: one base per distinct base with its shareable adapters on it."""
    from peft import PeftModel

    from afina.models.artifacts import check_trained
    from afina.models.loading import load_model, load_tokenizer

    use_encryption()  # encrypted runs and exports are read through it (afina.sealing)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = [s.name for s in sources]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise AfinaError("duplicate_model", f"{duplicated[0]!r} is named twice", location="MODEL")
    for source in sources:
        if source.adapter_dir is not None:
            check_trained(source.adapter_dir)
    loaded: list[LoadedModel] = []
    routes: dict[str, tuple[int, str]] = {}
    shared: dict[str, int] = {}  # base -> index of the loaded model that holds its adapters
    for source in sources:
        if source.adapter_dir is not None and not shares_base(source):  # loreft, prefix, full, ...
            from afina.pipeline.run_dir import load_run_config
            from afina.pipeline.stages import load_tuned_model

            model = load_tuned_model(load_run_config(source.run_dir), source.run_dir)
            loaded.append(prepare(model, load_tokenizer(source.base), device))
            routes[source.name] = (len(loaded) - 1, "")
            continue
        if source.base not in shared:
            loaded.append(prepare(load_model(source.base), load_tokenizer(source.base), device))
            shared[source.base] = len(loaded) - 1
        entry = loaded[shared[source.base]]
        if source.adapter_dir is None:
            routes[source.name] = (shared[source.base], "")
            continue
        adapter = f"adapter{len(entry.adapters)}"
        with decrypted_copy(source.adapter_dir) as adapter_dir:  # a private copy when the run is encrypted
            if isinstance(entry.model, PeftModel):
                entry.model.load_adapter(str(adapter_dir), adapter_name=adapter)
            else:
                entry.model = PeftModel.from_pretrained(entry.model, str(adapter_dir), adapter_name=adapter)
        entry.model.eval()
        entry.adapters[source.name] = adapter
        routes[source.name] = (shared[source.base], adapter)
    return ServedModels(loaded, routes)


def prepare(model: torch.nn.Module, tokenizer, device: torch.device) -> LoadedModel:
    model = model.to(device).eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, end_ids=end_token_ids(tokenizer, model),
                       pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                       context_length=context_length(model), device=device)


def end_token_ids(tokenizer, model) -> tuple[int, ...]:
    """The chat template's end-of-turn token first, then every other end token the model declares."""
    ids: list[int] = []
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token in tokenizer.get_vocab():
            ids.append(token_id)
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token_id in [tokenizer.eos_token_id, *(declared if isinstance(declared, list) else [declared])]:
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return tuple(ids)


def context_length(model: torch.nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(config, "max_position_embeddings", None) or 2048)
