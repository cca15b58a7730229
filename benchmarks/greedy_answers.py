"""Greedy answers of a MoCaE folder, to check that a change of the decode path changes no answer.

Issue 16 asks every speed change to keep exact greedy answers against the current path. Run this script at
both commits (the older one from a worktree, `PYTHONPATH=<worktree>/src`), then compare the two files:

    PYTHONPATH=/path/to/old/src python benchmarks/greedy_answers.py runs/paper/mocae --out old.json
    python benchmarks/greedy_answers.py runs/paper/mocae --out new.json --compare old.json

Answers the inference benchmark's built-in prompts with `MoCaEModel.generate` (its router, greedy), each
prompt alone and all of them as one left-padded batch, and writes {"alone<i>"/"batch<i>": token ids}.
`--compare` prints how many answers are identical and exits 1 if any differs.
"""

import argparse
import json
import sys

import torch

from trinityx.backbones import format_prompt, load_backbone
from trinityx.bench.inference import PROMPTS
from trinityx.mocae import MoCaEModel
from trinityx.mocae.model import read_config


def answers(folder: str, new_tokens: int) -> dict[str, list[int]]:
    backbone = load_backbone(read_config(folder).backbone)
    tok = backbone.tokenizer
    tok.padding_side = "left"
    model = MoCaEModel.from_pretrained(folder, backbone.model)
    texts = [format_prompt(tok, backbone.prompt_format, p) for p in PROMPTS]
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    out = {}
    with torch.inference_mode():
        for i, text in enumerate(texts):
            enc = tok([text], return_tensors="pt", add_special_tokens=False)
            ids = model.generate(enc.input_ids, enc.attention_mask, **kwargs)
            out[f"alone{i}"] = ids[0, enc.input_ids.shape[1]:].tolist()
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(enc.input_ids, enc.attention_mask, **kwargs)
        for i in range(len(texts)):
            out[f"batch{i}"] = ids[i, enc.input_ids.shape[1]:].tolist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="a MoCaE folder (mocae_config.json, router.safetensors, experts/)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare", help="answers written by this script at another commit")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mine = answers(args.folder, args.new_tokens)
    with open(args.out, "w") as f:
        json.dump(mine, f)
    if args.compare:
        with open(args.compare) as f:
            other = json.load(f)
        differ = sorted(k for k in mine if mine[k] != other.get(k))
        print(json.dumps({"bench": "greedy_answers", "answers": len(mine), "identical": len(mine) - len(differ),
                          "differ": differ}))
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
