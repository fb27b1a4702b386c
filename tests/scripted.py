"""A test objective: afina's own objective with a script run before each training loss it computes.

Tests make a step spike to nan, run out of memory or be interrupted through the objective the loop
is given, never by reaching into the loop's internals.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class ScriptedObjective:
    """Wraps an objective. `script(call, batch)` runs before each training loss (`call` counts the
    micro-batches trained so far, from 1; validation losses do not count) and may raise (an
    out-of-memory error), send a signal, or return a factor the loss is multiplied by (nan: a spike)."""

    def __init__(self, objective, script: Callable[[int, object], float | None]):
        self.objective = objective
        self.script = script
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(self.objective, name)

    def loss_sum(self, model, batch) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.objective.loss_sum(model, batch)
        self.calls += 1
        factor = self.script(self.calls, batch)
        loss = self.objective.loss_sum(model, batch)
        return loss if factor is None else loss * factor
