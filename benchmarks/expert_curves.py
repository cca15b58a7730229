"""Expert budget curves: dev loss, own-axis dev metric and seconds per step against optimiser steps.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/expert_curves.py --dimension honest \
        --data-dir ../shared/data --steps 0,8,16,32 --lr 2e-3 --max-length 64 --out runs/curves/curves.jsonl
    python benchmarks/expert_curves.py plot runs/curves/curves.jsonl --out docs/figures/expert-curves-smollm2.png

One run trains one expert with the project's own loop (`trinityx.train.loop.fit` on the PEFT LoRA model that
`trinityx.train.experts.train_lora` builds: same LoraConfig, same encoding, same loss) for max(--steps) optimiser
steps, and measures the adapter at every step count in --steps *during* that one run: a checkpoint at step k
is the state after k steps of a run whose cosine schedule spans max(--steps). (A run of exactly k steps
decays its learning rate sooner; `--steps 0,k` measures that end point alone.)

Measured at each checkpoint, all on DEV data (never the test splits, which are for reporting):

- dev loss: the trainer's own token-weighted loss on --dev-examples dev examples of the dimension;
- honest: TruthfulQA MC1 / MC2 (%) on the dev-split questions, by log-likelihood with the evaluation's own
  scoring (`trinityx.eval.evaluate.mc_scores`: the QA primer, lm-evaluation-harness tokenisation);
- harmless: preference accuracy on PKU-SafeRLHF dev pairs (`safe_unsafe_pairs.json`, one pair per dev
  prompt): the share of pairs whose safe response has a higher mean per-token log-likelihood than the unsafe
  one, under the chat template the expert is trained in, plus the mean margin and the share of pairs whose
  margin grew over base (no judge needed);
- helpful: mean per-token log-likelihood of the AlpacaEval reference outputs (gpt4_1106_preview, the
  win-rate reference) on AlpacaEval `judge_train` prompts (never the `eval` prompts), cut at --ref-tokens.

Seconds per step: the trainer's own per-step wall times (train_log `seconds`) with this script's checkpoint
measurements subtracted, and the process's CPU seconds per step (`time.process_time` between step starts, the
checkpoint and dev-loss passes taken out): on one thread the CPU time is what the step costs on an idle core,
while the wall time also counts the other jobs sharing the machine. Each run appends one JSON line to --out and prints a table.
"""

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DIMENSIONS = ("helpful", "harmless", "honest")


# --------------------------------------------------------------------------------------------------
# Pure helpers (tested offline in tests/test_expert_curves.py)


def parse_steps(spec: str) -> list[int]:
    """'0,8,16' -> [0, 8, 16]: sorted, unique, non-negative, with at least one positive step."""
    try:
        steps = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise SystemExit(f"--steps {spec!r}: give comma-separated step counts, e.g. 0,8,16,32") from None
    if not steps or steps[0] < 0 or steps[-1] <= 0:
        raise SystemExit(f"--steps {spec!r}: step counts must be >= 0 and at least one > 0")
    return steps


def eval_every(steps: list[int]) -> int:
    """The largest dev-loss interval of the trainer that lands on every positive checkpoint."""
    return math.gcd(*[s for s in steps if s > 0])


def preference_stats(safe: list[float], unsafe: list[float], base_margins: list[float] | None = None) -> dict:
    """Preference accuracy of safe over unsafe from per-pair scores (higher = more likely)."""
    margins = [a - b for a, b in zip(safe, unsafe)]
    out = {"pref_acc": 100.0 * sum(m > 0 for m in margins) / len(margins),
           "margin": sum(margins) / len(margins), "pairs": len(margins)}
    if base_margins is not None:
        out["margin_up"] = 100.0 * sum(m > b for m, b in zip(margins, base_margins)) / len(margins)
    return out


def seconds_per_step(step_seconds: list[float], measured: dict[int, float]) -> dict:
    """Per-step times with the checkpoint measurements (keyed by 1-based step) taken out: median and mean."""
    clean = sorted(s - measured.get(i + 1, 0.0) for i, s in enumerate(step_seconds))
    if not clean:
        return {"median": None, "mean": None}
    mid = len(clean) // 2
    median = clean[mid] if len(clean) % 2 else (clean[mid - 1] + clean[mid]) / 2
    return {"median": median, "mean": sum(clean) / len(clean)}


@dataclass
class StepLossHook:
    """Wraps the trainer's loss function; before the first micro-batch of step k+1 (k in `at`) it calls
    `measure(model, k)`: then the weights are exactly those after k optimiser steps. Dev-loss passes run
    without gradients and are not counted."""

    loss_fn: object
    micro_per_step: int
    at: set
    measure: object
    calls: int = 0
    excluded_cpu: float = 0.0
    """CPU seconds of this process spent measuring (checkpoints, dev-loss passes), not training."""
    stamps: list = None
    """(process CPU time, excluded_cpu) at the start of each optimiser step, then once at the end."""

    def __post_init__(self):
        self.stamps = []

    def stamp(self) -> None:
        self.stamps.append((time.process_time(), self.excluded_cpu))

    def cpu_per_step(self) -> list[float]:
        """CPU seconds of each optimiser step, the measurements between steps taken out."""
        return [(c1 - c0) - (e1 - e0) for (c0, e0), (c1, e1) in zip(self.stamps, self.stamps[1:])]

    def __call__(self, model, batch):
        import torch

        if not torch.is_grad_enabled():  # a dev-loss pass of the trainer
            t0 = time.process_time()
            out = self.loss_fn(model, batch)
            self.excluded_cpu += time.process_time() - t0
            return out
        if self.calls % self.micro_per_step == 0:
            step = self.calls // self.micro_per_step
            if step in self.at:
                t0 = time.process_time()
                self.measure(model, step)
                self.excluded_cpu += time.process_time() - t0
            self.stamp()
        self.calls += 1
        return self.loss_fn(model, batch)


def response_logliks(model, tokenizer, prompt_format: str, pairs: list[tuple[str, str]], max_length: int,
                     batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed log-likelihood, tokens) of each response after its prompt, encoded exactly as for training
    (`trinityx.sft.encode`: the prompt format, the response and EOS, cut at max_length)."""
    import torch

    from trinityx.sft import IGNORE, collate, encode

    encoded = [encode(tokenizer, prompt_format, p, r, max_length) for p, r in pairs]
    out = []
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            batch = collate(encoded[i:i + batch_size], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logp = torch.log_softmax(logits[:, :-1].float(), -1)
            labels = batch["labels"][:, 1:]
            keep = labels != IGNORE
            picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
            out += [(float(s), int(n)) for s, n in zip(picked.sum(1), keep.sum(1))]
    return out


# --------------------------------------------------------------------------------------------------
# Own-axis metrics on dev data


def judged_safety(data_dir: Path, args):
    """The evaluation's safety score on PKU-SafeRLHF dev prompts: greedy answers of --answer-tokens tokens, each
    flagged unsafe when the harm judge's p_unsafe reaches its threshold (`evaluate.aggregate_harmless`).
    Returns (description, measure(system) -> dict); each point keeps its per-prompt flags for paired tests."""
    from trinityx import data
    from trinityx.eval.judges import load_judge
    from trinityx.infer.generation import GenerationSettings

    judge = load_judge(Path(args.harm_judge).expanduser())
    prompts = list(dict.fromkeys(r.prompt for r in data.load_sft("harmless", data_dir, "dev")))[: args.judge_items]
    settings = GenerationSettings(max_new_tokens=args.answer_tokens, batch_size=16)

    def measure(system):
        answers = system.generate(prompts, settings)
        scores = judge.score(prompts, answers)
        unsafe = [float(p >= judge.threshold) for p in scores]
        return {"safety": 100.0 - 100.0 * sum(unsafe) / len(unsafe), "judged": len(unsafe), "unsafe_flags": unsafe,
                "answer_chars": sum(len(a) for a in answers) / len(answers),
                "cut": 100.0 * sum(answers.cut) / len(answers)}
    accuracy = (judge.validity or {}).get("accuracy")
    return (f"safety score on {len(prompts)} dev prompts ({judge.name}, threshold {judge.threshold:.3f}, "
            f"held-out accuracy {accuracy}, {args.answer_tokens} greedy tokens)"), measure


def dev_probe(dimension: str, data_dir: Path, args):
    """Load the dev items of the dimension's probe; returns (name, measure(system) -> dict)."""
    from trinityx import data

    if dimension == "honest":
        from trinityx.eval.evaluate import mc_scores

        questions = data.load_truthfulqa_mc(data_dir, "dev")[: args.probe_items]

        def measure(system, state):
            mc1, mc2 = mc_scores(system, questions, 32)
            return {"mc1": 100.0 * sum(mc1) / len(mc1), "mc2": 100.0 * sum(mc2) / len(mc2), "items": len(mc1)}
        return f"TruthfulQA MC1/MC2, {len(questions)} dev questions", measure

    if dimension == "harmless":
        import json as _json

        rows = _json.loads((data_dir / data.PKU_PAIRS_FILE).read_text())
        seen, pairs = set(), []
        for row in rows:  # one pair per dev prompt, file order
            if data.split_of(row["prompt"], data.PKU_FRACTIONS) == "dev" and row["prompt"] not in seen:
                seen.add(row["prompt"])
                pairs.append((row["prompt"], row["response"][0], row["response"][1]))
        pairs = pairs[: args.probe_items]
        judge_name, judge = judged_safety(data_dir, args) if args.harm_judge else ("", None)

        def measure(system, state):
            b = system.backbone
            flat = [(p, r) for p, s, u in pairs for r in (s, u)]
            ll = response_logliks(system.model, b.tokenizer, b.prompt_format, flat, args.probe_length, 8)
            safe = [s / max(1, n) for s, n in ll[0::2]]
            unsafe = [s / max(1, n) for s, n in ll[1::2]]
            margins = [a - c for a, c in zip(safe, unsafe)]
            stats = preference_stats(safe, unsafe, state.get("base_margins"))
            state.setdefault("base_margins", margins)
            stats["safe_nll"] = -sum(safe) / len(safe)
            if judge is not None:
                stats.update(judge(system))
            return stats
        name = f"PKU-SafeRLHF safe-vs-unsafe preference, {len(pairs)} dev pairs (mean per-token log-lik)"
        return name + (f"; {judge_name}" if judge else ""), measure

    items = data.load_alpaca_eval(data_dir, "judge_train", reference="gpt4_1106_preview")
    items = [it for it in items if not it.instruction.strip() == ""][: args.probe_items]
    pairs = [(it.instruction, it.reference) for it in items]

    def measure(system, state):
        b = system.backbone
        ll = response_logliks(system.model, b.tokenizer, b.prompt_format, pairs, args.probe_length, 8)
        return {"ref_nll": -sum(s for s, _ in ll) / sum(n for _, n in ll), "items": len(ll)}
    return (f"AlpacaEval gpt4_1106_preview reference NLL/token, {len(pairs)} judge_train prompts, "
            f"first {args.probe_length} tokens"), measure


# --------------------------------------------------------------------------------------------------
# One run


def run(args) -> dict:
    import torch

    from trinityx import data
    from trinityx.backbones import load_backbone
    from trinityx.infer.systems import System
    from trinityx.train.experts import LoraSettings, encode_examples, lm_loss_fn, lora_model, subsample
    from trinityx.train.loop import TrainConfig, fit

    torch.set_num_threads(args.threads)
    data_dir = data.resolve_data_dir(args.data_dir)
    steps = parse_steps(args.steps)
    probe_name, probe = dev_probe(args.dimension, data_dir, args)
    backbone = load_backbone(args.backbone)
    lora = LoraSettings(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha or 2.0 * args.lora_rank,
                        lora_dropout=args.lora_dropout)
    cfg = TrainConfig(max_steps=steps[-1], batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                      lr=args.lr, warmup_steps=args.warmup_steps, max_length=args.max_length,
                      eval_every=eval_every(steps), dev_examples=args.dev_examples, checkpoint_every=0,
                      seed=args.seed)
    train = subsample(data.load_sft(args.dimension, data_dir, "train"), args.train_examples, cfg.seed)
    dev = subsample(data.load_sft(args.dimension, data_dir, "dev"), cfg.dev_examples, cfg.seed)

    # As trinityx.train.experts.train_lora does, minus writing the adapter.
    model, params = lora_model(backbone, lora, cfg.seed)
    train_enc = encode_examples(backbone, train, cfg.max_length)
    dev_enc = encode_examples(backbone, dev, cfg.max_length)

    points, probe_seconds, state = {}, {}, {}
    # Step 0 is the base model (LoRA's B starts at zero) whatever the lr, rank or length: measured once per
    # probe setting and backbone, then reused by later runs.
    base_key = f"{args.backbone}|{args.dimension}|{probe_name}|{args.probe_length}"
    base_file = Path(args.work_dir) / "base_probe.json"
    base_cache = json.loads(base_file.read_text()) if base_file.is_file() else {}

    def measure(m, k):
        t0 = time.perf_counter()
        rng = torch.get_rng_state()
        was_training = m.training
        m.eval()
        if k == 0 and base_key in base_cache and not args.no_base_cache:
            state.update(base_cache[base_key]["state"])
            points[k] = dict(base_cache[base_key]["point"], cached=True)
        else:
            points[k] = probe(System(f"{args.dimension}@{k}", backbone, m), state)
            if k == 0:
                base_cache[base_key] = {"point": points[k], "state": dict(state)}
                base_file.parent.mkdir(parents=True, exist_ok=True)
                base_file.write_text(json.dumps(base_cache))
        m.train(was_training)
        torch.set_rng_state(rng)
        probe_seconds[k + 1] = time.perf_counter() - t0  # charged to the step it ran in
        points[k]["probe_seconds"] = probe_seconds[k + 1]
        print(f"step {k}: {points[k]}", flush=True)

    hook = StepLossHook(lm_loss_fn, cfg.batch_size // cfg.micro_batch_size, set(steps), measure)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.perf_counter()
    work = Path(args.work_dir) / f"{args.dimension}-{os.getpid()}"
    log = fit(model, params, hook, train_enc, dev_enc, cfg, work, backbone.tokenizer.pad_token_id,
              desc=f"curve:{args.dimension}")
    hook.stamp()  # the end of the last step (its dev-loss pass is in excluded_cpu)
    model.eval()
    measure(model, steps[-1])
    wall = time.perf_counter() - t0
    cpu = hook.cpu_per_step()

    dev_loss = {d["step"]: d["loss"] for d in log["dev"]}
    step_s = [s["seconds"] for s in log["steps"]]
    per_step = seconds_per_step(step_s, probe_seconds)
    tokens = [s["tokens"] for s in log["steps"]]
    rows = [{"step": k, "dev_loss": dev_loss.get(k), **points[k]} for k in steps]
    result = {
        "dimension": args.dimension, "backbone": args.backbone, "started": started,
        "lr": args.lr, "lora_rank": lora.lora_rank, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
        "batch_size": cfg.batch_size, "micro_batch_size": cfg.micro_batch_size, "max_length": cfg.max_length,
        "warmup_steps": cfg.warmup_steps, "max_steps": cfg.max_steps, "schedule": "cosine over max_steps, floor 0.1",
        "train_examples": len(train_enc), "dev_examples": len(dev_enc), "seed": cfg.seed, "probe": probe_name,
        "threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0],
        "seconds_per_step": per_step["median"], "seconds_per_step_mean": per_step["mean"],
        "cpu_seconds_per_step": sorted(cpu)[len(cpu) // 2], "cpu_seconds_per_step_mean": sum(cpu) / len(cpu),
        "tokens_per_step": sum(tokens) / len(tokens), "wall_seconds": wall,
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "python": platform.python_version(),
        "torch": torch.__version__, "points": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print_table(result)
    print(json.dumps(result))
    return result


# --------------------------------------------------------------------------------------------------
# Tables and plot

METRICS = {"honest": ("mc1", "mc2"), "harmless": ("pref_acc", "margin_up", "margin", "safety", "answer_chars"),
           "helpful": ("ref_nll",)}


def label(r: dict) -> str:
    return (f"lr {r['lr']:g}, r {r['lora_rank']}, len {r['max_length']}, n {r['train_examples']}, "
            f"{r['max_steps']}-step run")


def print_table(r: dict, file=None) -> None:
    cols = METRICS[r["dimension"]]
    print(f"{r['dimension']} ({label(r)}, batch {r['batch_size']}; {r['cpu_seconds_per_step']:.2f} CPU s/step "
          f"({r['seconds_per_step']:.2f} s wall, load {r['load_avg_1m']:.1f}) at {r['threads']} thread, "
          f"{r['tokens_per_step']:.0f} tokens/step)", file=file)
    paired = safety_against_base(r["points"])
    extra = " | safety - base [paired 95% CI] |" if paired else " |"
    print("| step | dev loss | " + " | ".join(cols) + extra, file=file)
    print("|---:|---:|" + "---:|" * len(cols) + ("---:|" if paired else ""), file=file)
    for p in r["points"]:
        cells = " | ".join(f"{p.get(c, float('nan')):.2f}" for c in cols)
        loss = f"{p['dev_loss']:.3f}" if p.get("dev_loss") is not None else "-"
        print(f"| {p['step']} | {loss} | {cells}" + (f" | {paired[p['step']]}" if paired else "") + " |", file=file)


def safety_against_base(points: list[dict]) -> dict[int, str] | None:
    """Each checkpoint's judged safety minus step 0's on the same prompts, with the evaluation's paired
    bootstrap interval (`metrics.paired_difference`); None when the run has no judged safety."""
    base = next((p for p in points if p["step"] == 0 and p.get("unsafe_flags")), None)
    if base is None:
        return None
    from trinityx.eval.metrics import paired_difference, paired_verdict

    out = {}
    for p in points:
        d = paired_difference([100.0 * (1 - f) for f in p["unsafe_flags"]],
                              [100.0 * (1 - f) for f in base["unsafe_flags"]])
        out[p["step"]] = f"{d['difference']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}] {paired_verdict(d)}"
    return out


def plot(path: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    panels = [("honest", "dev_loss", "honest: dev loss"), ("honest", "mc1", "honest: MC1 % (dev)"),
              ("honest", "mc2", "honest: MC2 % (dev)"),
              ("harmless", "dev_loss", "harmless: dev loss"),
              ("harmless", "pref_acc", "harmless: safe>unsafe pref. acc % (dev)"),
              ("harmless", "margin_up", "harmless: pairs with margin up vs base %"),
              ("harmless", "safety", "harmless: judged safety score % (dev)"),
              ("helpful", "dev_loss", "helpful: dev loss"),
              ("helpful", "ref_nll", "helpful: AlpacaEval ref. NLL/token")]
    panels = [(d, k, t) for d, k, t in panels  # only what the file holds, and a last panel for the note
              if any(r["dimension"] == d and any(p.get(k) is not None for p in r["points"]) for r in runs)]
    rows = math.ceil((len(panels) + 1) / 3)
    fig, axes = plt.subplots(rows, 3, figsize=(14, 3.7 * rows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(panels):-1]:
        ax.axis("off")
    for ax, (dim, key, title) in zip(axes, panels):
        for r in (r for r in runs if r["dimension"] == dim):
            xs = [p["step"] for p in r["points"] if p.get(key) is not None]
            ys = [p[key] for p in r["points"] if p.get(key) is not None]
            ax.plot(xs, ys, marker="o", label=label(r))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimiser steps (batch 8)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[-1].axis("off")
    axes[-1].text(0, 0.5, "Step 0 = base. Dev data only (never the test splits).\n"
                  "Points of a run lie inside its cosine schedule;\nan 'N-step run' decays over N steps.\n"
                  "The harmless safety score is the harm judge's\n(docs/judges.md); the other probes need no judge.",
                  fontsize=9, va="center")
    fig.suptitle("TrinityX expert curves, SmolLM2-135M-Instruct (dev data; checkpoints inside one cosine run)")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("plot", "table"):
        parser = argparse.ArgumentParser(description="plot or tabulate curves.jsonl")
        parser.add_argument("what", choices=("plot", "table"))
        parser.add_argument("jsonl")
        parser.add_argument("--out", default="docs/figures/expert-curves-smollm2.png")
        a = parser.parse_args()
        if a.what == "plot":
            plot(a.jsonl, a.out)
        else:
            for line in Path(a.jsonl).read_text().splitlines():
                if line.strip():
                    print_table(json.loads(line))
                    print()
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dimension", choices=DIMENSIONS, required=True)
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--steps", default="0,8,16,32,64", help="checkpoints; the run trains max(steps) steps")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=None, help="default 2 x rank (the project's ratio)")
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--train-examples", type=int, default=160, help="configs/quick.yaml expert_examples")
    parser.add_argument("--dev-examples", type=int, default=32)
    parser.add_argument("--probe-items", type=int, default=64, help="dev items of the own-axis probe")
    parser.add_argument("--probe-length", type=int, default=160, help="max tokens of a probe prompt+response")
    parser.add_argument("--harm-judge", default=None,
                        help="harmless: also the judged safety score, with this judge folder (e.g. "
                             "~/.cache/trinityx/judges/harm)")
    parser.add_argument("--judge-items", type=int, default=96, help="harmless: dev prompts judged per checkpoint")
    parser.add_argument("--answer-tokens", type=int, default=32, help="harmless: greedy tokens per judged answer "
                        "(the quick profile's max_new_tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", default="runs/expert_curves/work")
    parser.add_argument("--no-base-cache", action="store_true", help="measure step 0 even if cached")
    parser.add_argument("--out", default="runs/expert_curves/curves.jsonl")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
