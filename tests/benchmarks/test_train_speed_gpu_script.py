"""The GPU speed benchmark runs end to end on CPU with a tiny model (offline, a few seconds).

The numbers mean nothing on CPU; the test guards the code path that will run on a GPU machine: both
systems train on the same steps, report positive speed, compute the same loss, and afina's packed
examples attend only to themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.benchmark

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_speed_gpu.py"


def test_tiny_cpu_run_measures_both_systems_on_the_same_steps(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "tiny", "--device", "cpu", "--steps", "2",
                           "--warmup", "1", "--seq-len", "128", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((out / "results.json").read_text())["results"]["tiny"]
    assert set(results) == {"hf_peft", "afina"}
    hf, afina = results["hf_peft"], results["afina"]
    assert hf["tokens_per_second"] > 0 and afina["tokens_per_second"] > 0
    # Same examples, same steps: the same tokens, and (fp32, same initial weights) the same loss,
    # whether padded and masked (HF) or packed with restarting positions (afina).
    assert (hf["tokens"], hf["trained_tokens"]) == (afina["tokens"], afina["trained_tokens"])
    assert abs(hf["last_loss"] - afina["last_loss"]) < 1e-4 * abs(hf["last_loss"])
    assert afina["packing_check"]["isolated"]
    assert afina["forward_shape"][0] <= 2 and hf["forward_shape"] == [2, 128]
    report = (out / "results.md").read_text()
    assert "| hf_peft" in report and "| afina" in report


def test_without_cuda_it_stops_with_a_message(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "8b", "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--device cpu is only for the smoke run" in done.stderr


def test_flattened_rows_keep_each_examples_layout():
    """With flash-attention the GPU benchmark lays a step's rows end to end in one row: the examples
    table still places every example where its tokens are, as the restarting position ids do."""
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    from train_speed_gpu import afina_steps

    from afina.data.tokenize import Example
    from afina.models.attention import PackedLayout

    group = [Example(list(range(5, 5 + n)), [i > 2 for i in range(n)], line=1) for n in (7, 9, 5, 11)]
    (flat,), = afina_steps([group], 16, True, torch.device("cpu"))
    assert flat.input_ids.shape[0] == 1
    from_table = PackedLayout.from_table(flat.examples, flat.input_ids.numel())
    from_positions = PackedLayout.from_positions(flat.position_ids)
    assert torch.equal(from_table.gather, from_positions.gather) and torch.equal(from_table.valid, from_positions.valid)
