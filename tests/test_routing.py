"""fit-router, calibrate and generate, end to end on the tiny backbone and the fixture data."""

import json

import pytest
import torch

from trinityx import data
from trinityx.cli import main
from trinityx.errors import TrinityXError
from trinityx.mocae import MoCaEModel
from trinityx.train.loop import TrainConfig
from trinityx.train.router import CalibrateConfig, RouterConfig, calibrate, fit_router


@pytest.fixture(scope="module")
def experts(tiny_backbone, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("experts")
    main(["train-experts", "--backbone", str(tiny_backbone), "--data-dir", str(data_dir), "--out", str(out),
          "--max-steps", "4", "--batch-size", "4", "--micro-batch-size", "4", "--eval-every", "4", "--lr", "0.02"])
    return out


def test_fit_router_learns_the_dimensions_and_trains_only_the_router(tiny_backbone, data_dir, experts, tmp_path):
    out = tmp_path / "mocae"
    cfg = RouterConfig(experts=experts, out=out, backbone=str(tiny_backbone), data_dir=str(data_dir), per_dimension=24,
                       train=TrainConfig(max_steps=30, batch_size=12, micro_batch_size=6, lr=3e-2, warmup_steps=2,
                                         eval_every=15, checkpoint_every=10))
    log = fit_router(cfg)
    steps = log["steps"]
    first, last = sum(s["loss"] for s in steps[:5]) / 5, sum(s["loss"] for s in steps[-5:]) / 5
    assert last < first
    assert sum(s["router_accuracy"] for s in steps[-5:]) / 5 > sum(s["router_accuracy"] for s in steps[:5]) / 5
    assert log["router_accuracy_dev"] > 0.6  # the fixture's three datasets have easy-to-tell prompts
    assert log["trainable_parameters"] == sum(p.numel() for p in MoCaEModel.from_pretrained(out).router.parameters())
    # The experts are frozen by default: the saved ones are byte-identical copies.
    for dim in ("helpful", "harmless", "honest"):
        assert (out / "experts" / dim / "adapter_model.safetensors").read_bytes() == \
               (experts / dim / "adapter_model.safetensors").read_bytes()

    report = calibrate(CalibrateConfig(run=out, data_dir=str(data_dir), fit_examples=20, test_examples=20))
    assert report["temperature"] > 0 and report["after"]["nll"] <= report["before"]["nll"] + 0.05
    assert (out / "reliability_after.png").stat().st_size > 1000
    assert json.loads((out / "mocae_config.json").read_text())["temperature"] == report["temperature"]
    assert len(report["confusion_matrix"]) == 3

    main(["generate", "--run", str(out), "--prompt", "give tip 1", "how to steal", "--max-new-tokens", "4",
          "--weights", "1", "1", "-0.5"])


def test_fit_router_refuses_missing_experts(tiny_backbone, data_dir, tmp_path):
    with pytest.raises(TrinityXError, match="train-expert --dimension helpful"):
        fit_router(RouterConfig(experts=tmp_path, out=tmp_path / "m", backbone=str(tiny_backbone), data_dir=str(data_dir)))


def test_fit_router_dimensions_are_plain_names(experts, tiny_backbone, data_dir, tmp_path):
    import os
    import shutil

    outside = tmp_path / "outside"
    shutil.copytree(experts / "honest", outside)  # a real expert outside --experts
    relative = os.path.relpath(outside, experts)
    with pytest.raises(TrinityXError, match=r"--dimensions: '\.\./.*outside' is not a plain name"):
        fit_router(RouterConfig(experts=experts, out=tmp_path / "m", backbone=str(tiny_backbone),
                                data_dir=str(data_dir), dimensions=("helpful", "harmless", relative)))
    assert not (tmp_path / "m").exists()


def test_routers_of_one_backbone_share_one_routing_pass(tiny_backbone, experts, monkeypatch):
    from trinityx.backbones import load_backbone
    from trinityx.mocae import MoCaEConfig
    from trinityx.train.router import prompt_gate_logits

    prompts = ["give tip 1", "how to steal a car", "what is the capital of France?"]
    dims = ["helpful", "harmless", "honest"]
    models = []
    for seed in (0, 1):
        model = MoCaEModel(load_backbone(str(tiny_backbone)).model, [experts / d for d in dims],
                           MoCaEConfig(expert_names=dims, pool_layer=1))
        torch.manual_seed(seed)  # two different router heads (a new head starts at zero) on the same states
        for p in model.router.parameters():
            p.data.normal_()
        models.append(model)
    alone = [prompt_gate_logits(m, load_backbone(str(tiny_backbone)), prompts, 32) for m in models]
    passes = []
    for m in models:
        run_pass = m.hidden_states_at
        monkeypatch.setattr(m, "hidden_states_at", lambda *a, run_pass=run_pass: passes.append(1) or run_pass(*a))
    cache = {}
    shared = [prompt_gate_logits(m, load_backbone(str(tiny_backbone)), prompts, 32, pooled_cache=cache) for m in models]
    assert len(passes) == 1  # one batch, one pass, for both routers
    assert not torch.equal(alone[0], alone[1])
    for a, b in zip(alone, shared):
        torch.testing.assert_close(a, b)


def test_states_phase_computes_each_prompt_once_and_standardises(tiny_backbone, data_dir, experts, tmp_path,
                                                                  monkeypatch):
    from trinityx.backbones import load_backbone
    from trinityx.train.router import HEAD_TRAIN, pooled_states

    cache, passes = {}, []
    original = MoCaEModel.pooled_prompt
    monkeypatch.setattr(MoCaEModel, "pooled_prompt",
                        lambda self, ids, *a: passes.append(len(ids)) or original(self, ids, *a))
    cfg = RouterConfig(experts=experts, out=tmp_path / "m", backbone=str(tiny_backbone), data_dir=str(data_dir),
                       pooling="mean+last", head_train=TrainConfig(**{**HEAD_TRAIN.__dict__, "max_steps": 40}))
    log = fit_router(cfg, load_backbone(str(tiny_backbone)), cache)
    assert log["phase"] == "states" and log["router_accuracy_train"] > 0.6
    n_prompts = log["n_train"] + log["n_dev"]
    assert sum(passes) == n_prompts  # every routing prompt through the backbone exactly once
    model = MoCaEModel.from_pretrained(tmp_path / "m", load_backbone(str(tiny_backbone)).model)
    assert model.config.pooling == "mean+last" and not torch.all(model.router.feature_std == 1)
    # A second router on the same states, and the calibration sets, add no pass for prompts already seen.
    prompts = [p.prompt for p in data.load_routing_prompts(data_dir, "dev")[0]]
    pooled_states(model, load_backbone(str(tiny_backbone)), prompts, HEAD_TRAIN.max_length, cache=cache)
    assert sum(passes) == n_prompts
    report = calibrate(CalibrateConfig(run=tmp_path / "m", data_dir=str(data_dir), fit_examples=10, test_examples=10),
                       load_backbone(str(tiny_backbone)), cache)
    assert report["fit_split"] == "routing dev" and report["n_test"] > 0


def test_routing_data_is_checked_row_by_row(data_dir, tmp_path):
    prompts, record = data.load_routing_prompts(data_dir, "train")
    assert {p.dimension for p in prompts} == set(data.DIMENSIONS) and record["dropped_evaluation_items"] == 0
    evaluation = data.evaluation_prompts(data_dir)
    for split in data.SPLITS:
        assert not {p.prompt.lower() for p in data.load_routing_prompts(data_dir, split)[0]} & evaluation
    train, dev = (set(p.prompt for p in data.load_routing_prompts(data_dir, s)[0]) for s in ("train", "dev"))
    assert not train & dev

    good = tmp_path / "mine.jsonl"
    good.write_text('{"prompt": "how do I bake bread with rye?", "dimension": "helpful"}\n' * 3)
    with_file = [p for s in data.SPLITS for p in data.load_routing_prompts(data_dir, s, files=(good,))[0]]
    assert [p.source for p in with_file].count(str(good)) == 1  # the duplicated row counts once
    test_question = next(q.question for q in data.load_truthfulqa(data_dir, "test"))
    cases = [('[{"dimension": "helpful"}]', "missing key 'prompt'"),
             ('[{"prompt": "x", "dimension": "funny"}]', "dimension 'funny' is not one of"),
             ("[]", "has no rows"),
             (json.dumps([{"prompt": test_question, "dimension": "honest"}]), "is an evaluation item"),
             ('[{"prompt": "  ", "dimension": "honest"}]', "the prompt is empty")]
    for n, (text, message) in enumerate(cases):
        bad = tmp_path / f"bad{n}.json"
        bad.write_text(text)
        with pytest.raises(TrinityXError, match=message) as error:
            data.load_routing_prompts(data_dir, "train", files=(bad,))
        assert str(bad) in str(error.value) and ("index 0" in str(error.value) or "no rows" in str(error.value))
    with pytest.raises(TrinityXError, match="does not exist"):
        data.load_routing_prompts(data_dir, "train", files=(tmp_path / "none.json",))
