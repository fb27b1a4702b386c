"""`afina run`: the whole path in one command, each stage recorded in the store.

    validate -> split -> train -> evaluate -> gate -> register (or discard) -> notify

    afina run configs/tickets-lora.yaml training.epochs=3
    afina run --resume ~/.afina/runs/tickets-20261202-101500      # after a crash or kill -9

A stage's start and end are one transaction each in the store (`afina.store`), so a resumed run
redoes no stage that finished: training continues from its last good checkpoint, evaluation and
the gate are read back, and registering looks for the run's model before adding one. A tuned model
that does not beat its base (`gate:`) is discarded: its trained weights and checkpoints are deleted,
its record stays with the reason and the figures. A notification that cannot be delivered is a
warning event; it never fails the run.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from rich.console import Console

from afina.config.schema import RunConfig
from afina.errors import AfinaError
from afina.eval.gate import GateDecision, decide
from afina.models.loading import resolve_model_dir
from afina.pipeline.notify import Notification, notify
from afina.pipeline.prepare import PreparedData, resolve_data_path
from afina.pipeline.run_dir import create_run_dir, delete_trained, load_run_config
from afina.pipeline.stages import evaluate_run, load_training_model, prepare_run, train_run
from afina.security.encryption import read_bytes, use_encryption
from afina.store import Store
from afina.training.checkpoints import sha256
from afina.training.distributed import train_on_devices
from afina.training.objectives import objective_for


@dataclass
class WorkflowResult:
    run_id: str
    run_dir: Path
    status: str  # succeeded (registered), discarded, interrupted, failed
    decision: GateDecision | None = None
    model: str | None = None  # name:version of the registered model


def afina_version() -> str:
    try:
        return version("afina")
    except PackageNotFoundError:
        return "unknown"


def weights_sha256(model: str) -> str:
    """One hash over the base model's weight files (safetensors, in name order)."""
    directory = Path(resolve_model_dir(model))
    if not directory.is_dir():  # a hub id: what the hub serves may change, so record the id only
        return ""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(sha256(path).encode())
    return digest.hexdigest()


class Workflow:
    """One attempt: its config, run directory and store records, run stage by stage."""

    def __init__(self, config: RunConfig, store: Store, console: Console, run_dir: Path | None = None,
                 devices: int = 1):
        use_encryption()  # the lower layers the stages drive seal and read files through it (afina.sealing)
        self.config, self.store, self.console = config, store, console
        self.run_dir = run_dir
        self.devices = devices  # processes of the training stage (`afina run --devices N`)
        self.data: PreparedData | None = None
        self.model = None  # loaded before a new run's directory appears; a resumed run loads its own

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    def stage(self, name: str, work, done: set[str]) -> dict | None:
        """Run one stage unless it already finished; record its start, end, outcome and figures."""
        if name in done:
            self.console.print(f"[dim]- {name}: done before, not repeated[/]")
            return None
        started = time.perf_counter()
        self.store.start_stage(self.run_id, name)
        try:
            figures, message = work()
        except BaseException as error:
            reason = error.render() if isinstance(error, AfinaError) else f"{type(error).__name__}: {error}"
            status = "failed" if not isinstance(error, KeyboardInterrupt) else "interrupted"
            self.store.finish_stage(self.run_id, name, "failed", message=reason[:2000])
            self.store.set_run_status(self.run_id, status, error_code=getattr(error, "code", type(error).__name__),
                                      error_message=reason[:2000])
            raise
        self.store.finish_stage(self.run_id, name, "succeeded", figures=figures, message=message)
        self.console.print(f"[green]✓[/] {name} ({time.perf_counter() - started:.1f}s): {message}")
        return figures


def start_workflow(config: RunConfig, store: Store, console: Console, devices: int = 1) -> WorkflowResult:
    """A new attempt: everything that can be checked is checked before the run directory exists."""
    flow = Workflow(config, store, console, devices=devices)
    objective_for(config).check_gate(config)  # a gate on a metric the objective cannot score: before any work
    data = prepare_run(config, console)  # validate and split: bad input stops here, nothing written
    flow.data, flow.model = data, load_training_model(config, console)  # a model that cannot load: nothing written
    flow.run_dir = create_run_dir(config, data)  # atomically: staged, then renamed into place
    files = record_data_files(store, config, data)
    store.create_run(flow.run_id, name=config.name, config=config.model_dump(mode="json"), run_dir=str(flow.run_dir),
                     base_model=config.model, data=files, status="running")
    for name, (figures, message) in (("validate", validate_figures(data)), ("split", split_figures(data))):
        flow.stage(name, lambda figures=figures, message=message: (figures, message), set())
    return continue_workflow(flow)


def resume_workflow(run_dir: Path, store: Store, console: Console, devices: int = 1) -> WorkflowResult:
    """Continue an attempt from the stage it stopped in; finished stages are not redone."""
    config = load_run_config(run_dir)
    flow = Workflow(config, store, console, run_dir, devices)
    run = store.get_run(flow.run_id)
    if run.status in ("succeeded", "discarded"):
        console.print(f"run {flow.run_id} already ended: {run.status}")
        return WorkflowResult(flow.run_id, run_dir, run.status)
    store.set_run_status(flow.run_id, "running")
    return continue_workflow(flow)


def continue_workflow(flow: Workflow) -> WorkflowResult:
    store, config, console = flow.store, flow.config, flow.console
    done = set(store.finished_stages(flow.run_id))
    for name in ("validate", "split"):  # done when the run directory was written
        if name in done and flow.data is None:
            console.print(f"[dim]- {name}: done before, not repeated[/]")
    try:
        flow.stage("train", lambda: train_stage(flow), done)
    except KeyboardInterrupt:  # a signal: the checkpoint is written, the run resumes from it
        return WorkflowResult(flow.run_id, flow.run_dir, "interrupted")
    flow.stage("evaluate", lambda: evaluate_stage(flow), done)
    report = json.loads(read_bytes(flow.run_dir / "eval.json"))
    general = report.get("general")
    decision = decide(config.gate, gate_scores(report, "base"), gate_scores(report, "tuned"),
                      (general["base_loss"], general["tuned_loss"]) if general else None)
    flow.stage("gate", lambda: (asdict(decision), decision.reasons[0]), done)
    model = None
    if decision.passed:
        figures = flow.stage("register", lambda: register_stage(flow, report, decision), done)
        model = figures["model"] if figures else registered_model(store, flow.run_id)
        status = "succeeded"
    else:
        flow.stage("register", lambda: discard_stage(flow), done)
        status = "discarded"
    store.set_run_status(flow.run_id, status, decision="registered" if decision.passed else "discarded",
                         metric_name=decision.metric, metric_value=decision.tuned_value)
    flow.stage("notify", lambda: notify_stage(flow, decision, model, report), done)
    verdict = (f"[green]registered[/] as {model}" if decision.passed
               else "[red]discarded[/]: its trained weights and checkpoints were deleted, its record kept")
    console.print(f"decision: {verdict}")
    for reason in decision.reasons:
        console.print(f"  {reason}")
    return WorkflowResult(flow.run_id, flow.run_dir, status, decision, model)


# --- the stages -----------------------------------------------------------------------------------

def validate_figures(data: PreparedData) -> tuple[dict, str]:
    reports = data.reports or {"": data.report}
    figures = {task or "data": {"path": r.path, "rows_read": r.rows_read, "rows_skipped": r.rows_skipped,
                                "formats": dict(r.formats), "duplicates": r.duplicates} for task, r in reports.items()}
    read = sum(r.rows_read for r in reports.values())
    skipped = sum(r.rows_skipped for r in reports.values())
    return figures, f"{read} rows read, {skipped} skipped"


def split_figures(data: PreparedData) -> tuple[dict, str]:
    sizes = {name: len(rows) for name, rows in data.splits.items()}
    return sizes, ", ".join(f"{name} {size}" for name, size in sizes.items())


def record_data_files(store: Store, config: RunConfig, data: PreparedData) -> dict[str, list]:
    """The run's data files in the store, by content hash (one record per distinct file)."""
    sources = [config.data.path] if config.datasets is None else [t.path for t in config.datasets.tasks.values()]
    reports = list((data.reports or {"": data.report}).values())
    files = []
    for source, report in zip(sources, reports):
        path = resolve_data_path(source)
        files.append(store.record_data_file(sha256(path), str(path), ",".join(sorted(report.formats)),
                                            report.rows_read, {"rows_skipped": report.rows_skipped,
                                                               "duplicates": report.duplicates}))
    return {"train": files}


def train_stage(flow: Workflow) -> tuple[dict, str]:
    if flow.devices > 1:  # torchrun's processes train the run directory; this one waits for them
        flow.model = None
        result = train_on_devices(flow.run_dir, flow.devices)
    else:
        data = flow.data or prepare_run(flow.config, flow.console)
        result = train_run(flow.config, data, flow.run_dir, flow.console, flow.model)
    if result.status == "interrupted":
        raise KeyboardInterrupt
    if result.status == "diverged":
        raise AfinaError("diverged", f"training stopped after repeated non-finite losses at step {result.steps}",
                         location="training.learning_rate", hint="lower training.learning_rate, then afina run again")
    figures = {"status": result.status, "steps": result.steps, "train_loss": result.train_loss,
               "validation_loss": result.validation_loss, "tokens": result.trained_tokens,
               "tokens_per_second": result.tokens_per_second, "seconds": result.seconds, "cost": result.cost}
    return figures, f"{result.steps} steps, {result.status}, train loss {result.train_loss:.3f}"


def evaluate_stage(flow: Workflow) -> tuple[dict, str]:
    report = evaluate_run(flow.run_dir, flow.console)
    metric = flow.config.gate.metric
    figures = {"base": headline(report["base"]), "tuned": headline(report["tuned"])}
    base, tuned = figures["base"].get(metric), figures["tuned"].get(metric)
    shown = f"{metric} base {base:.3f}, tuned {tuned:.3f}" if base is not None and tuned is not None else "done"
    return figures, shown


def headline(result: dict) -> dict:
    """The numbers of one side of the evaluation (no predictions, no per-example lists)."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def gate_scores(report: dict, side: str) -> dict[str, list[float]]:
    """Per-example scores of one side of eval.json, as the gate reads them (`<task>/<metric>` in a mixture)."""
    if "tasks" not in report:
        return report[side].get("per_example", {})
    return {f"{task}/{metric}": values for task, sides in report["tasks"].items()
            for metric, values in sides[side].get("per_example", {}).items()}


def register_stage(flow: Workflow, report: dict, decision: GateDecision) -> tuple[dict, str]:
    existing = registered_model(flow.store, flow.run_id)
    if existing:  # registered before a crash, stage not yet marked: never twice
        return {"model": existing}, f"already registered as {existing}"
    config = flow.config
    files = flow.store.run_data(flow.run_id)
    model = flow.store.register_model(
        config.name, run_id=flow.run_id, base_model=config.model, base_sha256=weights_sha256(config.model),
        data_hashes={f"{f.role}:{Path(f.data_file.path).name}": f.data_file.sha256 for f in files},
        config=config.model_dump(mode="json"),
        metrics={"base": headline(report["base"]), "tuned": headline(report["tuned"])},
        gate=asdict(decision), artifacts={"run_dir": str(flow.run_dir), "adapter": str(flow.run_dir / "adapter")},
        afina_version=afina_version())
    name = f"{model.name}:{model.version}"
    return {"model": name}, f"model {name}"


def registered_model(store: Store, run_id: str) -> str | None:
    found = [m for m in store.list_models(include_deleted=True) if m.run_id == run_id]
    return f"{found[0].name}:{found[0].version}" if found else None


def discard_stage(flow: Workflow) -> tuple[dict, str]:
    return {"deleted": delete_trained(flow.run_dir)}, "discarded: trained weights and checkpoints deleted"


def notify_stage(flow: Workflow, decision: GateDecision, model: str | None, report: dict) -> tuple[dict, str]:
    metric = decision.metric
    message = Notification(
        run_id=flow.run_id, decision="registered" if decision.passed else "discarded",
        figures={metric: (decision.base_value, decision.tuned_value)}, reasons=list(decision.reasons),
        model=model)
    results = notify(flow.config.notify, message)
    for result in results:
        if not result.ok:
            flow.store.add_event("notification_failed", f"{result.channel} not delivered: {result.error}",
                                 run_id=flow.run_id, level="warning",
                                 details={"channel": result.channel, "attempts": result.attempts})
            flow.console.print(f"[yellow]warning[/]: {result.channel} notification not delivered: {result.error}")
    delivered = [r.channel for r in results if r.ok]
    figures = {"delivered": delivered, "failed": [r.channel for r in results if not r.ok]}
    return figures, ("sent by " + ", ".join(delivered)) if delivered else (
        "nobody to notify" if not results else "not delivered (warning recorded)")
