"""benchmarks/expert_curves.py: its pure helpers and one tiny end-to-end run (offline, tiny model)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("expert_curves", ROOT / "benchmarks" / "expert_curves.py")
curves = importlib.util.module_from_spec(spec)
spec.loader.exec_module(curves)


def test_parse_steps_and_eval_interval():
    assert curves.parse_steps("16, 0,8,8") == [0, 8, 16]
    assert curves.eval_every([0, 8, 16, 32]) == 8
    assert curves.eval_every([0, 6, 16]) == 2
    for bad in ("", "0", "a,b", "-1,4"):
        with pytest.raises(SystemExit):
            curves.parse_steps(bad)


def test_preference_stats():
    stats = curves.preference_stats([-1.0, -2.0, -3.0, -1.0], [-2.0, -1.0, -4.0, -1.0], [0.5, 0.5, 0.5, 0.5])
    assert stats["pref_acc"] == 50.0  # margins 1, -1, 1, 0: ties are not wins
    assert stats["margin"] == pytest.approx(0.25)
    assert stats["margin_up"] == 50.0
    assert "margin_up" not in curves.preference_stats([0.0], [1.0])


def test_seconds_per_step_takes_out_measurements():
    out = curves.seconds_per_step([1.0, 5.0, 1.2, 1.1], {2: 4.0})
    assert out["median"] == pytest.approx(1.05) and out["mean"] == pytest.approx(1.075)


def test_hook_measures_after_exactly_k_steps():
    seen = []
    hook = curves.StepLossHook(lambda m, b: b, micro_per_step=2, at={0, 2}, measure=lambda m, k: seen.append(k))
    for _ in range(6):  # three optimiser steps of two micro-batches
        hook(None, 0)
    with torch.no_grad():
        hook(None, 0)  # a dev-loss pass does not count
    hook.stamp()
    assert seen == [0, 2] and hook.calls == 6 and len(hook.cpu_per_step()) == 3


def test_response_logliks_match_the_training_loss(tiny_backbone):
    from trinityx.backbones import load_backbone
    from trinityx.sft import collate, encode
    from trinityx.train.experts import lm_loss_fn

    b = load_backbone(str(tiny_backbone))
    pairs = [("give tip", "eat well"), ("name a fox fact", "the quick brown fox jumps over the lazy dog")]
    ll = curves.response_logliks(b.model, b.tokenizer, b.prompt_format, pairs, 64, batch_size=1)
    batch = collate([encode(b.tokenizer, b.prompt_format, p, r, 64) for p, r in pairs], b.tokenizer.pad_token_id)
    with torch.no_grad():
        loss_sum, n, _ = lm_loss_fn(b.model, batch)
    assert sum(s for s, _ in ll) == pytest.approx(-float(loss_sum), rel=1e-4)
    assert sum(k for _, k in ll) == int(n)


@pytest.mark.parametrize("dimension", ["honest", "harmless", "helpful"])
def test_one_tiny_run_writes_a_json_line(tiny_backbone, data_dir, tiny_judges, tmp_path, monkeypatch, dimension):
    out = tmp_path / "curves.jsonl"
    argv = ["expert_curves.py", "--dimension", dimension, "--backbone", str(tiny_backbone), "--data-dir",
            str(data_dir), "--steps", "0,1,2", "--batch-size", "2", "--micro-batch-size", "1", "--max-length", "48",
            "--train-examples", "4", "--dev-examples", "2", "--probe-items", "2", "--probe-length", "48",
            "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    if dimension == "harmless":  # the judged safety score beside the preference probe
        argv += ["--harm-judge", str(tiny_judges[0] / "harm"), "--judge-items", "3", "--answer-tokens", "4"]
    monkeypatch.setattr(sys, "argv", argv)
    curves.main()
    curves.main()  # the second run reuses the cached base measurement
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and [p["step"] for p in rows[0]["points"]] == [0, 1, 2]
    first, second = rows
    assert second["points"][0].get("cached") and not first["points"][0].get("cached")
    for key in curves.METRICS[dimension]:
        if key != "margin_up":
            assert first["points"][0][key] == second["points"][0][key]
    assert first["points"][-1] == {**second["points"][-1], "probe_seconds": first["points"][-1]["probe_seconds"]}
    assert first["cpu_seconds_per_step"] > 0 and first["max_steps"] == 2
    if dimension == "harmless":
        point = first["points"][-1]
        assert point["judged"] == 3 and len(point["unsafe_flags"]) == 3
        assert point["safety"] == pytest.approx(100.0 - 100.0 * sum(point["unsafe_flags"]) / 3)
        paired = curves.safety_against_base(first["points"])
        assert paired[0].startswith("+0.0 [+0.0, +0.0] tie") and set(paired) == {0, 1, 2}
    monkeypatch.setattr(sys, "argv", ["expert_curves.py", "plot", str(out), "--out", str(tmp_path / "c.png")])
    curves.main()
    assert (tmp_path / "c.png").stat().st_size > 0
