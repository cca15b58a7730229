"""`accelerate launch` with 2 CPU processes (gloo) trains the same adapter, and evaluates the same items with the
same results, as one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_evaluate import without_timing

# One dev example: the second process has no dev batch at all (this hung before dev passes left DDP out).
ARGS = ["train-expert", "--dimension", "helpful", "--max-steps", "3", "--batch-size", "4", "--micro-batch-size", "2",
        "--eval-every", "3", "--lr", "0.01", "--lora-dropout", "0", "--dev-examples", "1"]
TIMEOUT = 600  # a collective mismatch hangs forever; fail instead


needs_launcher = pytest.mark.skipif(
    shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
    reason="accelerate's launcher is not installed")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
LAUNCH = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trinityx"]


def close(a, b) -> bool:
    """Equal JSON values, floats within 1e-5 (relative) of each other."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-5, abs=1e-9)
    return a == b


@needs_launcher
def test_two_processes_equal_one(tiny_backbone, data_dir, tmp_path):
    env = ENV
    common = [*ARGS, "--backbone", str(tiny_backbone), "--data-dir", str(data_dir)]
    # One process: the global batch of 4 as 2 micro-batches of 2 (gradient accumulation).
    subprocess.run([sys.executable, "-m", "trinityx", *common, "--out", str(tmp_path / "one")], env=env, check=True,
                   capture_output=True, timeout=TIMEOUT)
    # Two processes: the same global batch, one micro-batch of 2 on each, gradients all-reduced over gloo.
    subprocess.run([*LAUNCH, *common, "--out", str(tmp_path / "two")], env=env, check=True, capture_output=True,
                   timeout=TIMEOUT)
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    log_one, log_two = (json.loads((tmp_path / d / "train_log.json").read_text()) for d in ("one", "two"))
    assert log_two["processes"] == 2
    assert abs(log_one["dev_loss_after"] - log_two["dev_loss_after"]) < 1e-5  # the dev loss is reduced, not local
    assert max(one[k].abs().max().item() for k in one) > 1e-3  # the adapters did move
    for key in one:
        assert (one[key] - two[key]).abs().max().item() < 1e-5, key


@needs_launcher
def test_sharded_evaluation_over_two_processes_equals_one(tiny_backbone, data_dir, tiny_judges, tmp_path):
    judges, _ = tiny_judges
    common = ["evaluate", "--system", "base", "--backbone", str(tiny_backbone), "--data-dir", str(data_dir),
              "--judges", str(judges), "--limit", "5", "--max-new-tokens", "5", "--answer-tokens", "5",
              "--bootstrap", "20", "--batch-size", "2"]
    one, two = tmp_path / "one" / "eval.json", tmp_path / "two" / "eval.json"
    subprocess.run([sys.executable, "-m", "trinityx", *common, "--out", str(one), "--cache-dir",
                    str(tmp_path / "cache1")], env=ENV, check=True, capture_output=True, timeout=TIMEOUT)
    # Each process scores items rank, rank + 2, ... into its shard file; the main process merges.
    done = subprocess.run([*LAUNCH, *common, "--out", str(two), "--cache-dir", str(tmp_path / "cache2")], env=ENV,
                          check=True, capture_output=True, text=True, timeout=TIMEOUT)
    assert sorted(p.name for p in two.parent.glob("eval.shard-*")) == ["eval.shard-0-of-2.json",
                                                                       "eval.shard-1-of-2.json"]
    merged = json.loads(two.read_text())
    assert merged["shards"] == 2 and "truthful_rate" in done.stdout
    # cache dir and output path are the only settings that differ
    assert without_timing(merged, "cache_dir", "out") == without_timing(json.loads(one.read_text()), "cache_dir", "out")
    for name in ("eval.helpful.json", "eval.harmless.json", "eval.honest.json", "eval.model_outputs.json"):
        # Judge scores of a shard's smaller batches differ from one process's in the last float bits (padding).
        assert close(json.loads((one.parent / name).read_text()), json.loads((two.parent / name).read_text())), name
