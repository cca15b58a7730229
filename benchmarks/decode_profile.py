"""Where a decode step's time goes: the torch profiler on `base` and `trinityx` generating the same tokens.

Issue 16 asks for this profile before any speed-up. Both systems run in one process, one after the other,
on the same prompt (batch 1 or a batch of copies), greedy, after a warm-up request; experts are random PEFT
LoRA adapters of the given rank (the shapes, not the values, set the cost). Prints the top operators by
self CPU time for each system, the operators whose call count or time differs, and a JSON line.

    OMP_NUM_THREADS=1 python benchmarks/decode_profile.py --rank 16 --new-tokens 32 --batch 1

Also prints the bytes a decode step reads for the experts next to the backbone's weights: at batch 1 a
CPU decode step is bound by reading the weights, so that ratio is the floor of the LoRA path's slowdown.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from trinityx.backbones import format_prompt, load_backbone
from trinityx.bench.inference import build_system
from trinityx.bench.serve import write_random_experts

PROMPT = "Write a short poem about the sea."


def measure(name: str, backbone_spec: str, folders: list[Path], args) -> dict:
    backbone = load_backbone(backbone_spec)
    tokenizer = backbone.tokenizer
    tokenizer.padding_side = "left"
    module, generate = build_system(name, backbone, folders, args.pool_layer)
    batch = tokenizer([format_prompt(tokenizer, backbone.prompt_format, PROMPT)] * args.batch, return_tensors="pt",
                      add_special_tokens=False)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        generate(batch.input_ids, batch.attention_mask, **kwargs)  # warm-up
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            generate(batch.input_ids, batch.attention_mask, **kwargs)
            seconds.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(batch.input_ids, batch.attention_mask, **kwargs)
    ops = {e.key: {"calls": e.count, "self_ms": e.self_cpu_time_total / 1e3} for e in prof.key_averages()}
    return {"request_s": sorted(seconds)[len(seconds) // 2], "ops": ops, "table": prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=args.top), "model": module}


def expert_bytes(model, rank: int, n_experts: int, targets: tuple[str, ...]) -> tuple[int, int]:
    """(bytes of the backbone's weights, bytes of the stacked experts a decode step reads: A_cat and B_cat)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets:
            lora += n_experts * rank * (module.in_features + module.out_features) * module.weight.element_size()
    return weights, lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pool-layer", type=int, default=15)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        first = load_backbone(args.backbone)
        names = ["helpful", "harmless", "honest"]
        folders = write_random_experts(first.model, Path(tmp), names, first.lora_targets, r=args.rank, alpha=2 * args.rank)
        weights, lora = expert_bytes(first.model, args.rank, len(names), first.lora_targets)
        del first
        rows = {name: measure(name, args.backbone, folders, args) for name in ("base", "trinityx")}
    for name, row in rows.items():
        print(f"== {name}: {row['request_s']:.3f} s per request (median of {args.repeats})\n{row['table']}")
    base, ours = rows["base"]["ops"], rows["trinityx"]["ops"]
    print(f"{'operator':<28} {'base calls':>10} {'trinityx calls':>14} {'base ms':>9} {'trinityx ms':>11}")
    diffs = []
    for op in sorted(set(base) | set(ours), key=lambda o: -(ours.get(o, {}).get("self_ms", 0) - base.get(o, {}).get("self_ms", 0))):
        b, o = base.get(op, {"calls": 0, "self_ms": 0.0}), ours.get(op, {"calls": 0, "self_ms": 0.0})
        if b["calls"] != o["calls"] or abs(o["self_ms"] - b["self_ms"]) > 5:
            diffs.append({"op": op, "base": b, "trinityx": o})
    for d in diffs[:15]:
        print(f"{d['op']:<28} {d['base']['calls']:>10} {d['trinityx']['calls']:>14} {d['base']['self_ms']:>9.1f} "
              f"{d['trinityx']['self_ms']:>11.1f}")
    print(f"weights read per decode step: backbone {weights / 2**20:.0f} MiB, stacked experts {lora / 2**20:.1f} MiB "
          f"({100 * lora / weights:.1f} %): a bandwidth-bound step is at best {weights / (weights + lora):.3f}x base")
    print(json.dumps({"bench": "decode_profile", "config": vars(args),
                      "request_s": {n: r["request_s"] for n, r in rows.items()},
                      "speed_vs_base": rows["base"]["request_s"] / rows["trinityx"]["request_s"],
                      "expert_bytes_fraction": lora / weights, "bandwidth_floor": weights / (weights + lora),
                      "differing_ops": diffs[:15]}))


if __name__ == "__main__":
    main()
