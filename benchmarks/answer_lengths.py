"""How long must a system's answers be allowed to get before most of them end on their own?

    OMP_NUM_THREADS=1 python benchmarks/answer_lengths.py --run runs/paper --system base --prompts 16

Generates greedy answers once at the largest budget (`--max-new-tokens`, cached under `--cache-dir`) to
AlpacaEval eval prompts and BeaverTails-Evaluation prompts taken after the first `--skip` of each (so not the
items a `--eval-limit` evaluation already answered), and prints, for each smaller budget, the % of answers
that would still be cut there: an answer that ended on its own after n tokens is finished under any budget of
at least n; one that ran out of the largest budget is cut under every budget. A table, then one JSON line.
"""

import argparse
import json
import time

import torch

from trinityx import data
from trinityx.backbones import load_backbone
from trinityx.infer.generation import GenerationSettings, generate
from trinityx.infer.systems import load_system


def cut_share(lengths: list[int], cut: list[bool], budget: int) -> float:
    """% of answers cut under `budget`: those that ran out of the largest budget or needed more than `budget`."""
    return 100.0 * sum(c or n > budget for n, c in zip(lengths, cut)) / len(lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run folder holding the system's adapters")
    parser.add_argument("--system", default="base")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--prompts", type=int, default=16, help="prompts of each set")
    parser.add_argument("--skip", type=int, default=100, help="leave out the first N prompts of each set")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--budgets", default="64,128,256,384,512")
    parser.add_argument("--cache-dir", default="runs/answer_lengths")
    args = parser.parse_args()
    torch.set_num_threads(1)
    system = load_system(args.system, args.run, load_backbone(args.backbone))
    sets = {"alpaca_eval": [it.instruction for it in data.load_alpaca_eval(args.data_dir, "eval")],
            "beavertails": [p.prompt for p in data.load_safety_prompts(args.data_dir)]}
    budgets = [int(b) for b in args.budgets.split(",") if int(b) <= args.max_new_tokens]
    result = {"system": args.system, "max_new_tokens": args.max_new_tokens, "sets": {}}
    print(f"| set | n | " + " | ".join(f"cut at {b}" for b in budgets) + " |")
    for name, prompts in sets.items():
        chosen = prompts[args.skip:args.skip + args.prompts]
        start = time.perf_counter()
        answers = generate(system, chosen, GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=16),
                           args.cache_dir)
        lengths = [len(system.tokenizer(a, add_special_tokens=False).input_ids) for a in answers]
        shares = {b: cut_share(lengths, answers.cut, b) for b in budgets}
        result["sets"][name] = {"n": len(chosen), "cut_percent": shares, "seconds": time.perf_counter() - start}
        print(f"| {name} | {len(chosen)} | " + " | ".join(f"{shares[b]:.0f} %" for b in budgets) + " |", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
