"""Training on several devices and machines, on PyTorch's own distributed engine.

    afina train config.yaml --devices 2                        # one machine: afina starts torchrun itself
    afina run config.yaml --devices 2                          # the workflow, its training stage on 2
    torchrun --nproc-per-node 8 --nnodes 2 --rdzv-endpoint head:29500 -m afina train config.yaml

Every process runs the one training loop (`afina.training.loop`) on the same examples. What changes:

    each optimizer step's items are dealt to the ranks (`rank_share`): together they are exactly the
        items one device would take, so the global batch and the epoch are the same, and every
        example is seen once per epoch
    the loss of each rank is its loss sum / the count of the WHOLE step (all-reduced), times the
        number of ranks, since DDP and FSDP average gradients: the sum over ranks is one device's loss
    every rank runs the same number of micro-batches (a rank short of items runs a zero-weighted
        copy of one): FSDP gathers weights at each forward, which every rank must join
    ddp: `DistributedDataParallel` on the model's loss; every rank holds the whole model
    fsdp: `fully_shard` on each decoder layer, then on the whole: weights (a LoRA's frozen base
        too), gradients and optimizer state are split across ranks; checkpoints are
        `torch.distributed.checkpoint` shards (`save_sharded_checkpoint`), readable on any number
        of processes, sealed at rest with a master key like single-device ones (`seal_shards`), and
        the weights are gathered into one model at the end (`gather_full_weights`)
    fsdp's options (`shard_model`): training.fsdp_activation_checkpointing recomputes each decoder
        layer in backward (the composable `checkpoint`), training.fsdp_cpu_offload keeps shards,
        gradients and optimizer state in CPU memory (`CPUOffloadPolicy`); either makes auto fsdp
    qlora under fsdp: the 4-bit base stored in the compute dtype (`load_qlora_base_for_sharding`),
        so that FSDP shards it like any weight; what cannot run is refused before any process
        starts (`check_parallel_supported`)
    out of memory on one rank: all ranks agree after each forward and backward
        (`afina.training.oom.agreed_out_of_memory`), forget the step (`discard_abandoned_step`) and
        redo it with smaller micro-batches, as one device does
    only rank 0 prints, writes metrics and checkpoints; a signal on any rank stops every rank after
        the same step (`agree`), with one checkpoint
    `afina run --devices N` (`train_on_devices`): torchrun runs `afina train --resume RUN_DIR` on the
        run directory the workflow created; rank 0 reports its result back, and the other stages
        stay in the one process that talks to the store

`training.parallel: auto` picks DDP when the estimate says the run fits one device, FSDP otherwise.
On CPU the backend is gloo (what the tests run), on CUDA NCCL with gloo beside it for CPU tensors.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from afina.errors import AfinaError
from afina.sealing import SealedFiles, sealed_files
from afina.training.checkpoints import CHECKPOINT, _fsync_dir, list_checkpoints, sha256

SHARDED_MARKER = ".metadata"  # the file `torch.distributed.checkpoint` writes beside its shards


@dataclass(frozen=True)
class Ranks:
    """Which process this is among how many, and how the model is split across them."""

    rank: int = 0
    world: int = 1
    parallel: str = "single"  # single, ddp or fsdp

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched_world() -> int:
    """The number of processes torchrun (or any launcher setting WORLD_SIZE) started."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start_process_group() -> None:
    """Join the processes torchrun started (gloo on CPU, NCCL on CUDA); nothing for one process."""
    if launched_world() <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # NCCL for tensors on the GPU; gloo for those on the CPU: the loop's agreements and sums, and
        # the shards and gradients that fsdp_cpu_offload keeps in CPU memory
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")


def current_ranks(parallel: str = "single") -> Ranks:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), parallel)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def parallel_of(training) -> str:
    """ddp or fsdp for a run's `TrainingConfig` under several processes, before any estimate: as set;
    auto is fsdp when an fsdp option is set (`afina.cli.train` asks the estimate otherwise), else ddp."""
    if training.parallel != "auto":
        return training.parallel
    return "fsdp" if training.fsdp_activation_checkpointing or training.fsdp_cpu_offload else "ddp"


def choose_parallel(setting: str, world: int, fits_one_device: bool) -> str:
    """single for one process; ddp or fsdp as set; auto: ddp when the run fits one device, else fsdp."""
    if world <= 1:
        return "single"
    if setting == "auto":
        return "ddp" if fits_one_device else "fsdp"
    return setting


def rank_share(items: list, rank: int, world: int) -> list:
    """This rank's items of one optimizer step: every `world`-th, starting at `rank`. The shares of all
    ranks are disjoint and together are the step."""
    return items[rank::world]


def micro_batches_per_rank(items: int, world: int, rows_per_micro_batch: int) -> int:
    """Micro-batches every rank runs for a step of `items`: those of the largest share (rank 0's)."""
    return max(1, math.ceil(math.ceil(items / world) / rows_per_micro_batch))


def check_parallel_supported(method, training, world: int) -> None:
    """Refuse, before any process starts, a method that `world` processes cannot run as configured:
    one error for the user instead of a traceback from each rank."""
    if world <= 1:
        return
    from afina.models.methods import check_method_supported

    check_method_supported(method)  # a 4- or 8-bit base needs CUDA and bitsandbytes, sharded or not
    if method.base_bits == 8 and training.parallel == "fsdp":
        raise AfinaError("unsupported_parallel", "an 8-bit base cannot be sharded: bitsandbytes' 8-bit weights do "
                         "not split across devices", location="training.parallel",
                         hint="set training.parallel: ddp, or use method: qlora, whose 4-bit base FSDP shards")
    if method.base_bits == 4 and training.fsdp_cpu_offload:
        raise AfinaError("unsupported_parallel", "a 4-bit base cannot be offloaded to CPU memory: bitsandbytes "
                         "computes with it on the GPU only", location="training.fsdp_cpu_offload",
                         hint="drop training.fsdp_cpu_offload; the 4-bit base is already sharded across devices")


def qlora_config_for_sharding(method):
    """qlora's `BitsAndBytesConfig` for a base that FSDP shards (the FSDP+QLoRA recipe): the packed
    4-bit weights stored in the compute dtype (`bnb_4bit_quant_storage`), so that FSDP splits and
    gathers them like the other weights of a unit; bitsandbytes keeps each layer's quantization
    state on its module, where the gathered weight finds it again."""
    from afina.models.methods import quantization_config

    config = quantization_config(method)
    config.bnb_4bit_quant_storage = config.bnb_4bit_compute_dtype
    return config


def load_qlora_base_for_sharding(name: str, method) -> nn.Module:
    """qlora's 4-bit base on this rank's GPU, stored for FSDP (`qlora_config_for_sharding`), ready
    for `apply_method` and `train`, where `shard_model` splits it."""
    from afina.models.loading import load_model

    config = qlora_config_for_sharding(method)
    return load_model(name, dtype=config.bnb_4bit_compute_dtype, quantization_config=config)


def check_shardable(model: nn.Module) -> None:
    """A 4-bit base loaded for one device stores its packed weights as uint8, which FSDP would shard
    apart from their quantization blocks: refuse it with what to do."""
    for name, param in model.named_parameters():
        if type(param).__name__ == "Params4bit" and param.dtype == torch.uint8:
            raise AfinaError("unsupported_parallel", f"the 4-bit weight {name} is stored as uint8, which FSDP cannot "
                             "shard", location="training.parallel",
                             hint="load the base with afina.training.distributed.load_qlora_base_for_sharding "
                                  "(bnb_4bit_quant_storage = the compute dtype), or set training.parallel: ddp")


class ObjectiveLoss(nn.Module):
    """The objective's loss as a module's forward, so DDP and FSDP see it: afina's loss runs the
    model's body and output projection itself (fused cross-entropy), never the model's forward."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch):
        return self.objective.loss_sum(self.model, batch)


class DistributedObjective:
    """The run's objective with its loss computed through the wrapped `ObjectiveLoss`; everything
    else (batching, counting) is the objective's own."""

    def __init__(self, objective, loss: nn.Module):
        self.objective = objective
        self.loss = loss

    def loss_sum(self, model, batch) -> torch.Tensor:
        return self.loss(batch)

    def __getattr__(self, name: str):
        return getattr(self.objective, name)


def wrap_for_parallel(model: nn.Module, objective, ranks: Ranks, device: torch.device,
                      checkpointing: bool = False, cpu_offload: bool = False):
    """`model` wrapped for `ranks.parallel`, and the objective computing its loss through the wrap.
    fsdp replaces the model's parameters by their shards: take trainable parameters afterwards.
    `checkpointing` and `cpu_offload` are fsdp's options (`training.fsdp_*`)."""
    if ranks.parallel == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        loss = nn.parallel.DistributedDataParallel(ObjectiveLoss(model.to(device), objective), device_ids=ids,
                                                   broadcast_buffers=False)
    else:
        loss = shard_model(ObjectiveLoss(model, objective), model, device, checkpointing, cpu_offload)
    return loss, DistributedObjective(objective, loss)


def shard_model(loss: ObjectiveLoss, model: nn.Module, device: torch.device, checkpointing: bool = False,
                cpu_offload: bool = False) -> nn.Module:
    """FSDP2: each decoder layer its own unit (its weights gathered only while it runs), the rest
    (embeddings, final norm, output projection) in the root unit.

    checkpointing: each decoder layer recomputes its activations in backward (the composable
    `checkpoint`, hooks on the layer: parameter names stay as they are, so checkpoints and saved
    adapters do not change). cpu_offload: `CPUOffloadPolicy`, shards, their gradients and the
    optimizer state in CPU memory (pinned on CUDA), AdamW stepping there."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    from afina.models.methods import decoder_layers

    check_shardable(model)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    for layer in decoder_layers(model):
        if checkpointing:  # fully_shard's hooks go first and last: the gather is outside the recomputed region
            checkpoint(layer)
        fully_shard(layer, mesh=mesh, offload_policy=offload)
    return fully_shard(loss, mesh=mesh, offload_policy=offload)


def gradient_sync(loss: nn.Module, ranks: Ranks, sync: bool):
    """A context in which backward averages gradients across ranks only when `sync` (the step's last
    micro-batch): the others accumulate locally."""
    if ranks.parallel == "ddp" and not sync:
        return loss.no_sync()
    if ranks.parallel == "fsdp":
        loss.set_requires_gradient_sync(sync)
    return nullcontext()


def discard_abandoned_step(loss: nn.Module | None, ranks: Ranks) -> None:
    """Forget a step given up on every rank (out of memory somewhere), before it is redone.

    DDP: the reducer of a rank whose synced forward went through still expects that backward, and
    would all-reduce in the next one, synced or not; reset as DDP's own `_update_process_group` does
    (there is no public call). FSDP: `reset_iter_state` (torch 2.13's recovery after a forward or
    backward cut short) on every rank, which also forgets the forward order its backward prefetch
    follows, then the gradients accumulated unsharded between synced backwards, which neither it
    nor the optimizer's zero_grad reaches in every version."""
    if loss is None or not ranks.distributed:
        return
    if ranks.parallel == "ddp":
        loss.reducer._reset_state()
        return
    loss.reset_iter_state()
    for module in loss.modules():
        if hasattr(module, "_get_fsdp_state"):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                for param in group.fsdp_params:
                    param.unsharded_accumulated_grad = None
                    if hasattr(param, "_unsharded_param"):
                        param._unsharded_param.grad = None


def all_reduce_sum(value: float, ranks: Ranks) -> float:
    if not ranks.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item())


def agree(flag: bool, ranks: Ranks) -> bool:
    """True on every rank when `flag` is True on any (a signal on one node stops them all at the same step)."""
    if not ranks.distributed:
        return flag
    tensor = torch.tensor([int(flag)])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def agreed_status(status: str, ranks: Ranks) -> str:
    """One status for every rank after a step: interrupted when a signal reached any rank, else rank
    0's (time and cost budgets read its clock)."""
    if not ranks.distributed:
        return status
    return "interrupted" if agree(status == "interrupted", ranks) else from_main(status, ranks)


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def from_main(value, ranks: Ranks | None = None):
    """Rank 0's `value` on every rank (a run directory created by rank 0 only)."""
    ranks = ranks or current_ranks()
    if not ranks.distributed:
        return value
    box = [value if ranks.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class NoMetrics:
    """What ranks other than 0 write metrics to: nothing."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"

    def write(self, split: str, step: int, **values: float) -> None:
        pass

    def event(self, kind: str, step: int, message: str, **details) -> None:
        pass

    def close(self) -> None:
        pass


def full_norm(norm: torch.Tensor) -> float:
    """A gradient norm as a number: FSDP's, over sharded gradients, is a DTensor to gather first."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# --- sharded checkpoints --------------------------------------------------------------------------

def is_sharded(path: Path) -> bool:
    return (path / SHARDED_MARKER).is_file()


def save_sharded_checkpoint(directory: Path, step: int, model: nn.Module, optimizer, scheduler, state: dict,
                            keep: int, ranks: Ranks, keep_also: Path | None = None,
                            files: SealedFiles | None = None) -> Path:
    """Every rank writes its shards of the trained weights and optimizer state into a staging
    directory (`torch.distributed.checkpoint`); rank 0 then adds the schedule, RNG and loop state,
    seals every file with a master key (`files`: the process's `afina.sealing.sealed_files()` unless
    given), writes the manifest of every file's hash as it is on disk, and renames the directory into
    place: as atomic and as encrypted as `afina.training.checkpoints.save_checkpoint`, and read back
    by `latest_checkpoint` alike."""
    import torch.distributed.checkpoint as dcp

    final, staging = directory / f"step-{step:07d}", directory / f".staging-step-{step:07d}"
    if ranks.main:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    barrier(ranks)
    dcp.save(sharded_state(model, optimizer), checkpoint_id=staging)
    barrier(ranks)
    if ranks.main:
        torch.save({"scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}, staging / "schedule.pt")
        (staging / "state.json").write_text(json.dumps({**state, "step": step}))
        seal_shards(staging, files or sealed_files())
        written = sorted(p for p in staging.iterdir())
        for path in written:
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        (staging / "manifest.json").write_text(json.dumps({"step": step,
                                                           "files": {p.name: sha256(p) for p in written}}))
        _fsync_dir(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(directory)
        for old in list_checkpoints(directory)[:-keep]:
            if old != keep_also and CHECKPOINT.match(old.name):
                shutil.rmtree(old)
    barrier(ranks)
    return final


def sharded_state(model: nn.Module, optimizer) -> dict:
    """The trained weights and the optimizer state, keyed by parameter name (shards under FSDP,
    whole tensors otherwise): what DCP saves and loads, on any number of processes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, moments = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": weights, "optimizer": moments}


def seal_shards(staging: Path, files: SealedFiles) -> int:
    """Seal every file of a sharded checkpoint's staging directory (DCP's shards and metadata, the
    schedule, the state) when a master key is set, as single-device checkpoints are: `files` is the
    process's way to seal (`afina.sealing`), which refuses to leave them plain if it cannot seal."""
    return files.seal_tree(staging)


def restore_sharded_checkpoint(path: Path, model: nn.Module, optimizer, scheduler,
                               files: SealedFiles | None = None) -> None:
    """Load a sharded checkpoint into `model` and `optimizer` as they are split now (FSDP on any
    number of ranks, or one whole model), then the schedule and RNG. Sealed shards are read from a
    private decrypted copy (`files.plain_copy`, removed afterwards): DCP opens its files itself."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    files = files or sealed_files()
    state = sharded_state(model, optimizer)
    with files.plain_copy(path) as plain:
        dcp.load(state, checkpoint_id=plain)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    saved = torch.load(io.BytesIO(files.read_bytes(path / "schedule.pt")), weights_only=True)
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])


def restore_whole_into_shards(path: Path, model: nn.Module, optimizer, scheduler, trainable: dict) -> None:
    """A single-device or DDP checkpoint (whole tensors) resumed under FSDP: rank 0's copy split
    into this run's shards, the optimizer state keyed by name as `set_optimizer_state_dict` wants."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from afina.security.encryption import load_tensors, read_bytes

    weights = load_tensors(path / "trainable.safetensors")  # decrypted in memory when sealed
    saved = torch.load(io.BytesIO(read_bytes(path / "optimizer.pt")), weights_only=True)
    names = list(trainable)
    moments = {"state": {names[i]: value for i, value in saved["optimizer"]["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                for group in saved["optimizer"]["param_groups"]]}
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=moments,
                   options=StateDictOptions(full_state_dict=True, strict=False))
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])


def gather_full_weights(model: nn.Module, ranks: Ranks) -> None:
    """After FSDP training: every sharded parameter gathered, one at a time, into a whole tensor on
    rank 0's CPU (other ranks keep an empty meta tensor), so rank 0 saves one ordinary safetensors
    adapter or model. The model is then for saving only: its FSDP hooks would gather again."""
    whole: dict[int, nn.Parameter] = {}
    for owner_name, owner in list(model.named_modules()):
        for name, param in list(owner.named_parameters(recurse=False)):
            if not hasattr(param, "full_tensor"):
                continue
            if id(param) not in whole:
                tensor = param.detach().full_tensor()
                tensor = tensor.cpu() if ranks.main else torch.empty_like(tensor, device="meta")
                whole[id(param)] = nn.Parameter(tensor, requires_grad=param.requires_grad)
            setattr(owner, name, whole[id(param)])


# --- launching ------------------------------------------------------------------------------------

RESULT_VARIABLE = "AFINA_TRAIN_RESULT"  # where `afina train`'s rank 0 writes its TrainResult for a launcher
SHUTDOWN_SECONDS = 110  # what torchrun waits for its processes after a signal before killing them

def launch_devices(devices: int, argv: list[str]) -> int:
    """`afina train ... --devices N`: torchrun (`torch.distributed.run`) starts N processes of the
    same command on this machine; returns their exit code (130 when this process was told to stop).

    A SIGTERM here reaches the processes through torchrun, which gives them SHUTDOWN_SECONDS to
    finish their step and checkpoint (a spot instance's two-minute notice) before it kills them."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if devices < 1:
        raise AfinaError("bad_devices", f"--devices must be 1 or more, not {devices}", location="--devices")
    command = ["--standalone", f"--nproc-per-node={devices}", f"--shutdown-timeout={SHUTDOWN_SECONDS}",
               "--no-python", sys.executable, "-c", "from afina.cli import main; main()", *argv]
    try:
        torchrun(command)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except ChildFailedError as error:  # a rank failed and torchrun stopped the others
        print(f"afina: a training process failed: {error}", file=sys.stderr)
        return 1
    except SignalException:  # SIGTERM or SIGINT: torchrun has passed it on and waited for the processes
        return 130
    return 0


def train_on_devices(run_dir: Path, devices: int):
    """The training stage of `afina run --devices N`: `afina train --resume RUN_DIR` on N processes
    of this machine, which train the run directory's splits (from its last checkpoint, if any) and
    save what they trained there; returns rank 0's `TrainResult`. Everything else in the workflow
    stays in the calling process."""
    import tempfile

    from afina.training.loop import TrainResult

    with tempfile.TemporaryDirectory(prefix="afina-train-") as scratch:
        result_file = Path(scratch) / "result.json"
        os.environ[RESULT_VARIABLE] = str(result_file)  # the processes torchrun starts inherit it
        try:
            code = launch_devices(devices, ["train", "--resume", str(run_dir)])
        finally:
            os.environ.pop(RESULT_VARIABLE, None)
        if not result_file.is_file() and code == 130:  # stopped before rank 0 could report
            raise KeyboardInterrupt
        if not result_file.is_file():  # an interrupted run still reports: its checkpoint was written
            raise AfinaError("training_failed", f"training on {devices} processes failed (exit code {code})",
                             location=str(run_dir), hint="their error is printed above; once fixed, continue "
                                                         f"with afina run --resume {run_dir}")
        return TrainResult(**json.loads(result_file.read_text()))


def report_to_launcher(result) -> None:
    """Rank 0's `TrainResult` where the launcher asked for it (`train_on_devices`); nothing otherwise."""
    from dataclasses import asdict

    path = os.environ.get(RESULT_VARIABLE)
    if path and is_main_process():
        Path(path).write_text(json.dumps(asdict(result)))
