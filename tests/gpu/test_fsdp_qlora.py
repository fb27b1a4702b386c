"""QLoRA under FSDP on CUDA GPUs: the 4-bit base, stored in the compute dtype, is sharded like any other
weight and LoRA trains on it. Skipped without CUDA and bitsandbytes (CPU-only machines refuse qlora
before any process starts: tests/training/test_distributed_cli.py).

On one GPU the test shards over a process group of one (the gather and the quantization state's
round trip still run); on two or more it uses two processes."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
                                reason="QLoRA under FSDP needs CUDA GPUs and bitsandbytes")


def rank_main(rank: int, world: int, port: int, model_dir: Path, rows: list, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist

    from afina.config.methods import QloraMethod
    from afina.data.packing import collate_rows, pack_examples
    from afina.models.methods import apply_method, trainable_parameters
    from afina.training.distributed import Ranks, load_qlora_base_for_sharding, wrap_for_parallel
    from afina.training.objectives import token_objective
    from tests.training.test_distributed import tiny_data

    torch.cuda.set_device(rank)
    dist.init_process_group("cpu:gloo,cuda:nccl")
    try:
        torch.manual_seed(0)
        method = QloraMethod(r=4, dropout=0.0)
        model = apply_method(load_qlora_base_for_sharding(str(model_dir), method), method)
        stored = sorted({str(p.dtype) for p in model.parameters() if type(p).__name__ == "Params4bit"})
        device = torch.device("cuda", rank)
        loss, objective = wrap_for_parallel(model, token_objective(256), Ranks(rank, world, "fsdp"), device)
        frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
        sharded = all(hasattr(p, "full_tensor") for p in frozen)
        trainable = trainable_parameters(model)
        optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
        data = tiny_data(model_dir, rows)
        batch = collate_rows(pack_examples(data[rank * 4:(rank + 1) * 4], 256), 0).to(device)
        losses = []
        for _ in range(4):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                value = objective.loss_sum(model, batch) / batch.trained_tokens
            value.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(value.detach()))
        if rank == 0:
            (out / "result.json").write_text(json.dumps({"stored": stored, "sharded": sharded, "losses": losses,
                                                         "frozen": len(frozen)}))
    finally:
        dist.destroy_process_group()


def test_qlora_base_shards_under_fsdp_and_lora_trains_on_it(tiny_model_dir, ticket_rows, tmp_path):
    from tests.training.test_distributed import free_port

    world = min(2, torch.cuda.device_count())
    mp.start_processes(rank_main, args=(world, free_port(), tiny_model_dir, ticket_rows, tmp_path), nprocs=world,
                       start_method="spawn")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["stored"] == ["torch.bfloat16"]  # bnb_4bit_quant_storage: the compute dtype, as FSDP needs
    assert result["frozen"] > 0 and result["sharded"]  # the 4-bit base split into DTensor shards
    losses = result["losses"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
