"""The tuned model as one plain transformers model: the adapter folded into the base weights."""

from __future__ import annotations

from typing import get_args

from transformers import PreTrainedModel

from afina.config.methods import AnyMethod
from afina.errors import AfinaError
from afina.export.source import ExportSource
from afina.models.artifacts import merge_trained
from afina.pipeline.stages import load_tuned_model


def merging_methods() -> list[str]:
    """The methods whose trained update folds into the base weights, in the config's order."""
    return [cls.model_fields["name"].default for cls in get_args(AnyMethod) if cls.merges]


def check_mergeable(method: AnyMethod) -> None:
    """Refuse, before any model loads, a method that changes activations rather than weights: its
    tuned model cannot be written as a plain model that llama.cpp or transformers would run."""
    if not method.merges:
        raise AfinaError("not_mergeable", f"{method.name} changes activations, not weights, so it cannot be folded "
                         "into a plain model for export", location="method",
                         hint=f"train with one of {', '.join(merging_methods())} to export; or serve the run with "
                              "afina, which loads the trained module beside the base")


def load_tuned(source: ExportSource):
    """The tuned model as afina evaluates it (adapter beside the base), refused first if it cannot merge."""
    check_mergeable(source.config.method)
    return load_tuned_model(source.config, source.run_dir)


def merge_tuned(tuned, source: ExportSource) -> PreTrainedModel:
    """Fold the adapter into the base, in place: one copy of the model in memory."""
    merged = merge_trained(tuned, source.config.method)
    merged.requires_grad_(False)
    return merged
