"""`trinityx bench inference` on the tiny backbone: every system runs, and each baseline is what it claims to be."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from trinityx.bench.inference import (
    BenchInferenceConfig, DenseMoE, bench_inference, build_dense_moe, build_peft_multi, build_untrained_mocae,
    build_xlora, check_targets, measure_memory, percentile, probe_memory,
)
from trinityx.errors import TrinityXError
from trinityx.registry import BENCH_SYSTEMS

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATOL = 1e-5
PROMPT = "Give three tips for staying healthy."


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def experts(tiny_backbone, tmp_path_factory):
    """Three PEFT adapters with seeded random non-zero B, in one folder, as `--experts` expects."""
    root = tmp_path_factory.mktemp("bench-experts")
    for k, name in enumerate(["harmless", "helpful", "honest"]):
        model = get_peft_model(load(tiny_backbone), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
        g = torch.Generator().manual_seed(k + 1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data = torch.randn(p.shape, generator=g) * 0.3
        model.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def folders(experts):
    return sorted(p for p in experts.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def inputs(tiny_backbone):
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    enc = tok([PROMPT], return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def test_peft_multi_equals_mocae_with_fixed_gates(tiny_backbone, folders, inputs):
    ids, mask = inputs
    w = [0.5, 0.3, 0.2]
    peft_multi = build_peft_multi(load(tiny_backbone), folders, weights=w)
    assert peft_multi.base_model.active_adapters == ["0", "1", "2"]  # three adapters, separate and unmerged
    mocae = build_untrained_mocae(load(tiny_backbone), folders, "sequence", gate_mode="fixed", fixed_weights=w)
    want = mocae(ids, mask).logits
    assert (want - load(tiny_backbone)(ids, attention_mask=mask).logits).abs().max() > 1e-2
    torch.testing.assert_close(peft_multi(input_ids=ids, attention_mask=mask).logits, want, atol=ATOL, rtol=0)


class ConstantRouter(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)  # [N, K]


@torch.no_grad()
def test_dense_moe_top1_one_hot_equals_that_expert_merged(tiny_backbone, folders, inputs):
    ids, mask = inputs
    for k in range(3):
        one_hot = [float(j == k) for j in range(3)]
        moe = build_dense_moe(load(tiny_backbone), folders, top_k=1, attention_weights=one_hot)
        blocks = [m for m in moe.modules() if isinstance(m, DenseMoE)]
        assert len(blocks) == 2 and all(len(b.experts) == 3 for b in blocks)  # a full MLP copy per expert, per layer
        for block in blocks:
            block.router = ConstantRouter(torch.tensor(one_hot) * 10)
        merged = PeftModel.from_pretrained(load(tiny_backbone), folders[k]).merge_and_unload()
        torch.testing.assert_close(moe(input_ids=ids, attention_mask=mask).logits,
                                   merged(input_ids=ids, attention_mask=mask).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_dense_moe_top2_mixes_two_mlp_copies():
    g = torch.Generator().manual_seed(0)
    experts = [nn.Linear(4, 4) for _ in range(3)]
    block = DenseMoE(experts, ConstantRouter(torch.tensor([0.0, 2.0, 1.0])), top_k=2)
    x = torch.randn(2, 5, 4, generator=g)
    w = torch.softmax(torch.tensor([2.0, 1.0]), -1)  # experts 1 and 2 chosen, softmax over their logits
    torch.testing.assert_close(block(x), w[0] * experts[1](x) + w[1] * experts[2](x), atol=ATOL, rtol=0)


@torch.no_grad()
def test_xlora_with_a_zero_classifier_equals_uniform_mocae(tiny_backbone, folders, inputs):
    ids, mask = inputs
    xlora = build_xlora(load(tiny_backbone), folders)
    classifier = xlora.base_model.internal_xlora_classifier
    nn.init.zeros_(classifier.layers[-1].weight)
    nn.init.zeros_(classifier.layers[-1].bias)  # every token's scalings = softmax(0) = 1/K
    mocae = build_untrained_mocae(load(tiny_backbone), folders, "sequence", gate_mode="uniform")
    torch.testing.assert_close(xlora(input_ids=ids, attention_mask=mask).logits, mocae(ids, mask).logits, atol=ATOL, rtol=0)


def test_bench_inference_runs_every_system(tiny_backbone, experts, capsys):
    cfg = BenchInferenceConfig(backbone=str(tiny_backbone), experts=str(experts), prompts=2, new_tokens=3,
                               repeats=2, memory=False, threads=1)
    result = bench_inference(cfg)
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(result))  # the last line is the JSON
    assert list(result["systems"]) == list(BENCH_SYSTEMS)
    for name, row in result["systems"].items():
        assert row["requests"] == (2 if name == "xlora" else 4)  # xlora: 1 round of 2 prompts
        assert row["prefill_ms"] > 0 and row["decode_tokens_per_s"] > 0 and row["p95_ms"] >= row["p50_ms"] > 0
        assert name in out
    params = {name: row["params"] for name, row in result["systems"].items()}
    assert params["dense-moe"] > params["trinityx"] > params["base"]
    with pytest.raises(TrinityXError, match="--experts"):
        bench_inference(BenchInferenceConfig(backbone=str(tiny_backbone)))


def test_memory_probe(tiny_backbone, experts):
    # In this process for speed; `measure_memory` runs the same function in a fresh interpreter.
    cfg = BenchInferenceConfig(backbone=str(tiny_backbone), experts=str(experts), prompts=1, new_tokens=2)
    memory = probe_memory(cfg, "trinityx")
    assert memory["peak_memory_mb"] >= 0 and memory["process_peak_rss_mb"] > memory["peak_memory_mb"]


def test_percentile_golden():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)  # 4 + 0.8 * (5 - 4)
    assert percentile([7.0], 95) == 7.0


def row(tps, mem, p50):
    return {"decode_tokens_per_s": tps, "peak_memory_mb": mem, "p50_ms": p50}


def test_targets_golden():
    rows = {"base": row(100.0, 500.0, 10.0), "trinityx": row(96.0, 530.0, 12.0), "dense-moe": row(50.0, 1000.0, 30.0)}
    targets = check_targets(rows)
    assert targets["trinityx_decode_tokens_per_s_within_5pct_of_base"] == {"ratio": 0.96, "met": True}
    assert targets["trinityx_peak_memory_mb_within_5pct_of_base"]["met"] is False  # 530 / 500 = 1.06
    assert targets["trinityx_p50_ms_40pct_below_dense-moe"] == {"ratio": 0.4, "met": True}
    assert targets["trinityx_peak_memory_mb_40pct_below_dense-moe"]["met"] is True  # 530 / 1000 = 0.53
    assert targets["trinityx_p50_ms_40pct_below_xlora"] == {"ratio": None, "met": None}  # xlora not run


def test_memory_of_a_child_is_not_hidden_by_a_large_parent(tiny_backbone, experts):
    # The benchmark runs inside the pipeline, a process of several GB. A child's ru_maxrss starts at its
    # parent's RSS (fork), so peak minus baseline read 0 for every system; VmHWM is reset by exec.
    ballast = bytearray(600 * 2**20)  # 600 MiB, touched below so it is resident
    ballast[::4096] = b"x" * len(ballast[::4096])
    cfg = BenchInferenceConfig(backbone=str(tiny_backbone), experts=str(experts), prompts=1, new_tokens=2)
    memory = measure_memory(cfg, "base")
    del ballast
    assert 0 < memory["peak_memory_mb"] < 600  # the tiny model, not the parent's ballast
