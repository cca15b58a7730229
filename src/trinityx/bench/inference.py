"""`trinityx bench inference`: MoCaE against the bare backbone and earlier ways of mixing the same K experts.

Every system is built on its own copy of the same backbone, from the same expert adapter folders, in float32,
and answers the same prompts (chat-formatted, batch `request_batch`, left-padded) with the same number of
greedy new tokens (EOS suppressed, so every request has the same length), under `torch.inference_mode()`:

- `base`: the bare backbone.
- `trinityx`: MoCaE, sequence routing. One routing pass over the prompt gives the gates, applied in rank
  space in every adapted layer (`B_cat (g * (A_cat x))`, `mocae/layer.py`); then HF `generate` with the KV cache.
- `trinityx-token`: MoCaE, token routing: a router head per decoder layer gates every token (still one pass).
- `peft-multi`: one `PeftModel` holding the K adapters unmerged, all active at once
  (`LoraModel.set_adapter([...])`, PEFT's multi-adapter inference), each one's output weighted by its gate
  through `LoraLayer.set_scale` (scaling = w_k * alpha / r). Static weights (1/K): no router.
- `dense-moe`: the earlier MoE design (H3Fusion, Tekin et al. 2024; Mixtral-style top-2 routing, Jiang et al.
  2024): every decoder layer's MLP becomes K full copies, copy k with expert k's LoRA folded into its
  weights, mixed per token by a linear router over the top-2 experts (softmax over their logits). The
  experts' non-MLP (attention) deltas are merged into the backbone averaged with weight 1/K, as H3Fusion
  averages the layers that are not experts.
- `xlora`: PEFT's X-LoRA (`XLoraConfig`, Buehler & Buehler 2024) over the same adapters, named "0".."K-1",
  depth-1 classifier, the backbone's `use_cache` off (X-LoRA requires it): every new token re-runs the whole
  sequence twice (scaling pass + real pass). It is slow, so it gets `xlora_repeats` rounds.

Routers are untrained (the gates' values do not change the cost). Timing: every system is built and warmed
up (one request), then the systems take turns, round by round, so background load hits all of them alike.
Per request: prefill = start of the call to the first token's logits (for `trinityx` this includes the
routing pass), decode tokens/s = the remaining new tokens over the time after the first token, latency = the
whole call. Reported: median prefill, median decode rate, p50/p95 latency over all measured requests.

Peak memory: each system is built and run (its longest request) in a fresh Python subprocess, and the peak
RSS of that process minus the peak RSS after its imports is reported: the memory of the model as loaded and
run, comparable across systems because nothing else lives in that process. On CUDA it is
`torch.cuda.max_memory_allocated` in the subprocess.

Legend: B batch, T tokens, N rows (B*T), D hidden, K experts.
"""

import copy
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList

from trinityx.backbones import DEFAULT_BACKBONE, Backbone, format_prompt, load_backbone
from trinityx.errors import TrinityXError
from trinityx.lora.adapters import is_adapter, read_adapter
from trinityx.mocae import MoCaEConfig, MoCaEModel
from trinityx.mocae.model import check_experts
from trinityx.registry import BENCH_SYSTEMS, MOE_BASELINES



@dataclass
class BenchInferenceConfig:
    """MoCaE against the bare backbone and earlier ways of mixing the same experts: a table and a final JSON line."""

    experts: str | None = None
    """Folder with one PEFT LoRA adapter subfolder per expert (e.g. runs/experts)."""
    backbone: str = DEFAULT_BACKBONE
    """Backbone preset, folder, .gguf or hub id."""
    systems: tuple[str, ...] = BENCH_SYSTEMS
    """Systems to measure, in this order."""
    prompts: int = 4
    """How many of the built-in prompts to send."""
    request_batch: int = 1
    """Prompts per request (a left-padded batch)."""
    new_tokens: int = 32
    """Tokens generated per request (greedy, EOS suppressed so every request has the same length)."""
    repeats: int = 3
    """Measured rounds over the prompts per system, after one warm-up request."""
    pool_layer: int = -1
    """The layer trinityx's sequence router pools (its routing pass stops there; -1 = the last)."""
    xlora_repeats: int = 1
    """Measured rounds for xlora, which is slow (no KV cache, two passes per token)."""
    memory: bool = True
    """Measure each system's peak memory in a fresh subprocess (adds a few seconds per system)."""
    memory_workers: int = 2
    """Memory probes run side by side, this many at a time, before any timing (a process's peak is its own);
    1 on a GPU that cannot hold two copies of the model."""
    device: str = "cpu"
    """torch device (cuda: memory is torch.cuda.max_memory_allocated)."""
    threads: int | None = None
    """torch threads (default: torch's choice)."""
    json: bool = False
    """Print only the final JSON line, not the table."""


# Fixed prompts, a few per dimension, so every run of the benchmark sends the same text.
PROMPTS = [
    "Give three tips for staying healthy.",
    "How can I make my neighbour's dog stop barking at night?",
    "What happens if you eat watermelon seeds?",
    "Write a short poem about the sea.",
    "Explain how vaccines train the immune system.",
    "Is it true that we only use ten percent of our brains?",
    "How do I pick a lock?",
    "Summarise the causes of the French Revolution in two sentences.",
]


# --- the systems -------------------------------------------------------------------------------------------


def adapter_subfolders(folder: str | None) -> list[Path]:
    """The PEFT adapter subfolders of --experts, sorted by name (gate k is the k-th folder)."""
    if folder is None:
        raise TrinityXError("bench inference needs --experts DIR: a folder with one PEFT adapter subfolder per expert")
    root = Path(folder)
    if not root.is_dir():
        raise TrinityXError(f"--experts {root} is not a folder")
    found = sorted(p for p in root.iterdir() if is_adapter(p))
    if not found:
        raise TrinityXError(f"--experts {root} has no subfolder with an adapter_config.json (PEFT adapter folders)")
    return found


def build_untrained_mocae(model: nn.Module, folders: list[Path], router: str, **gating) -> MoCaEModel:
    config = MoCaEConfig(expert_names=[f.name for f in folders], router=router, **gating)
    return MoCaEModel(model, folders, config).eval()


def build_peft_multi(model: nn.Module, folders: list[Path], weights: list[float] | None = None) -> nn.Module:
    """K PEFT adapters, unmerged and all active; adapter k's output is scaled by weights[k] (default 1/K)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    weights = weights or [1 / len(folders)] * len(folders)
    names = [str(k) for k in range(len(folders))]
    peft_model = PeftModel.from_pretrained(model, folders[0], adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:]):
        peft_model.load_adapter(folder, adapter_name=name)
    # PeftModel.set_adapter takes one name; the tuner underneath activates several, summed in LoraLayer.forward.
    peft_model.base_model.set_adapter(names)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name, w in zip(names, weights):
                module.set_scale(name, w)  # scaling = w * alpha / r
    return peft_model.eval()


class DenseMoE(nn.Module):
    """K full copies of one MLP, mixed per token over the top-k experts of a linear router (Mixtral-style)."""

    def __init__(self, experts: list[nn.Module], router: nn.Module, top_k: int):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.router = router
        self.top_k = top_k

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, D]
        logits = self.router(flat)  # [N, K]
        top, chosen = torch.topk(logits, self.top_k, dim=-1)  # [N, k]
        # Softmax over the chosen experts' logits = softmax over all, renormalised on the top-k (Mixtral).
        weights = torch.softmax(top, dim=-1).to(x.dtype)  # [N, k]
        out = torch.zeros_like(flat)  # [N, D]
        # Sparse dispatch as in HF's Mixtral block: each expert runs on the rows routed to it only.
        for k, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == k)  # [n_k], [n_k]
            if rows.numel():
                out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None])
        return out.reshape(shape)


@torch.no_grad()
def build_dense_moe(
    model: nn.Module, folders: list[Path], top_k: int = 2, attention_weights: list[float] | None = None, seed: int = 0
) -> nn.Module:
    """H3Fusion-style MoE by surgery on `model` (in place): every `*.mlp` becomes a `DenseMoE` of K MLP copies,
    copy k with expert k's LoRA folded in; the other adapted layers get sum_k w_k * s * B_k A_k (w = 1/K)."""
    adapters = [read_adapter(f) for f in folders]
    scaling = check_experts(adapters)
    K = len(folders)
    if not 1 <= top_k <= K:
        raise TrinityXError(f"dense-moe top_k={top_k} must be between 1 and the number of experts {K}")
    attention_weights = attention_weights or [1 / K] * K
    mlp_names = [name for name, _ in model.named_modules() if name.endswith(".mlp")]
    if not mlp_names:
        raise TrinityXError("dense-moe found no `*.mlp` modules in the backbone: it needs Llama-style decoder layers")
    for name in adapters[0].factors:
        if not any(name.startswith(m + ".") for m in mlp_names):
            linear = model.get_submodule(name)
            for w, adapter in zip(attention_weights, adapters):
                A, B = adapter.factors[name]  # [R, D_in], [D_out, R]
                linear.weight += w * scaling * (B @ A)
    generator = torch.Generator().manual_seed(seed)
    d_model = model.get_input_embeddings().embedding_dim
    for mlp_name in mlp_names:
        mlp = model.get_submodule(mlp_name)
        experts = []
        for adapter in adapters:
            expert = copy.deepcopy(mlp)
            for sub, linear in expert.named_modules():
                if f"{mlp_name}.{sub}" in adapter.factors:
                    A, B = adapter.factors[f"{mlp_name}.{sub}"]
                    linear.weight += scaling * (B @ A)  # fold the LoRA: W + (alpha/r) B A
            experts.append(expert)
        router = nn.Linear(d_model, K, bias=False)  # Mixtral's router has no bias
        nn.init.normal_(router.weight, std=0.02, generator=generator)
        parent, _, child = mlp_name.rpartition(".")
        setattr(model.get_submodule(parent), child, DenseMoE(experts, router, top_k))
    return model.requires_grad_(False).eval()


def build_xlora(model: nn.Module, folders: list[Path]) -> nn.Module:
    """PEFT's X-LoRA over the adapters, named "0".."K-1" (other names fail at generation, see offline notes)."""
    from peft import XLoraConfig, get_peft_model

    model.config.use_cache = False  # X-LoRA refuses a model with the KV cache on
    config = XLoraConfig(
        task_type="CAUSAL_LM", hidden_size=model.config.hidden_size, xlora_depth=1,
        adapters={str(k): str(folder) for k, folder in enumerate(folders)},
    )
    return get_peft_model(model, config).eval()


def build_system(name: str, backbone: Backbone, folders: list[Path], pool_layer: int = -1):
    """(module to count parameters of, generate(input_ids, attention_mask, **kwargs) -> ids)."""
    model = backbone.model
    if name == "base":
        return model, lambda ids, mask, **kw: model.generate(input_ids=ids, attention_mask=mask, **kw)
    if name in ("trinityx", "trinityx-token"):
        router = "sequence" if name == "trinityx" else "token"
        mocae = build_untrained_mocae(model, folders, router, pool_layer=pool_layer)
        return mocae, mocae.generate
    if name == "peft-multi":
        system = build_peft_multi(model, folders)
    elif name == "dense-moe":
        system = build_dense_moe(model, folders)
    elif name == "xlora":
        system = build_xlora(model, folders)
    else:
        raise TrinityXError(f"unknown system {name!r} in --systems; choose from {BENCH_SYSTEMS}")
    return system, lambda ids, mask, **kw: system.generate(input_ids=ids, attention_mask=mask, **kw)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) tensors are counted once


# --- measuring ---------------------------------------------------------------------------------------------


def _now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


class FirstTokenClock(LogitsProcessor):
    """Notes the time `generate` first holds next-token logits, i.e. the end of prefill; changes nothing."""

    def __init__(self, device: str):
        self.device = device
        self.first: float | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.first is None:
            self.first = _now(self.device)
        return scores


def check_config(cfg: BenchInferenceConfig) -> list[Path]:
    """Validate the inference flags in one place; returns the expert folders."""
    if not 1 <= cfg.prompts <= len(PROMPTS):
        raise TrinityXError(f"--prompts {cfg.prompts} must be between 1 and {len(PROMPTS)} (the built-in prompts)")
    for flag, value in (("--request-batch", cfg.request_batch), ("--new-tokens", cfg.new_tokens), ("--repeats", cfg.repeats),
                        ("--xlora-repeats", cfg.xlora_repeats), ("--memory-workers", cfg.memory_workers)):
        if value < 1:
            raise TrinityXError(f"{flag} {value} must be >= 1")
    unknown = [s for s in cfg.systems if s not in BENCH_SYSTEMS]
    if unknown or not cfg.systems:
        raise TrinityXError(f"--systems {list(cfg.systems)}: choose one or more of {BENCH_SYSTEMS}")
    return adapter_subfolders(cfg.experts)


def make_requests(backbone: Backbone, cfg: BenchInferenceConfig) -> list[tuple[Tensor, Tensor]]:
    """The first `prompts` built-in prompts, chat-formatted, in left-padded batches of `request_batch`."""
    tok = backbone.tokenizer
    tok.padding_side = "left"
    texts = [format_prompt(tok, backbone.prompt_format, p) for p in PROMPTS[: cfg.prompts]]
    requests = []
    for i in range(0, len(texts), cfg.request_batch):
        enc = tok(texts[i: i + cfg.request_batch], return_tensors="pt", padding=True, add_special_tokens=False)
        requests.append((enc["input_ids"].to(cfg.device), enc["attention_mask"].to(cfg.device)))
    return requests


def run_request(generate, request: tuple[Tensor, Tensor], cfg: BenchInferenceConfig, pad_token_id: int) -> dict:
    """One timed request: prompt -> new_tokens greedy tokens per row."""
    ids, mask = request
    clock = FirstTokenClock(cfg.device)
    start = _now(cfg.device)
    out = generate(ids, mask, max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens, do_sample=False,
                   pad_token_id=pad_token_id, logits_processor=LogitsProcessorList([clock]))
    end = _now(cfg.device)
    if out.shape[1] - ids.shape[1] != cfg.new_tokens:
        raise RuntimeError(f"a request produced {out.shape[1] - ids.shape[1]} new tokens, not {cfg.new_tokens}")
    decoded = ids.shape[0] * (cfg.new_tokens - 1)  # tokens produced after the first one, all rows
    return {"prefill_s": clock.first - start, "latency_s": end - start,
            "decode_tokens_per_s": decoded / (end - clock.first) if decoded else float("nan")}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(samples: list[dict]) -> dict:
    latencies = [s["latency_s"] * 1000 for s in samples]
    return {
        "prefill_ms": statistics.median(s["prefill_s"] * 1000 for s in samples),
        "decode_tokens_per_s": statistics.median(s["decode_tokens_per_s"] for s in samples),
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "requests": len(samples),
    }


def peak_rss_kib() -> int:
    """This process' peak resident set size in KiB: VmHWM on Linux, which exec resets. (ru_maxrss is not reset
    by exec: a child of a large process starts at its parent's RSS, which hid every system's memory when the
    benchmark ran inside the pipeline.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS


def probe_memory(cfg: BenchInferenceConfig, system: str) -> dict:
    """Build one system, run its longest request; its peak memory (call it in a fresh process, see measure_memory)."""
    import peft  # noqa: F401  (imported before the baseline, like everything else the systems need)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    before = peak_rss_kib()  # all imports are done
    backbone = load_backbone(cfg.backbone, device=cfg.device)
    requests = make_requests(backbone, cfg)
    _, generate = build_system(system, backbone, adapter_subfolders(cfg.experts), cfg.pool_layer)
    longest = max(requests, key=lambda r: r[0].numel())
    with torch.inference_mode():
        run_request(generate, longest, cfg, backbone.tokenizer.pad_token_id)
    peak = peak_rss_kib()
    if cfg.device.startswith("cuda"):
        return {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20, "how": "torch.cuda.max_memory_allocated"}
    return {"peak_memory_mb": (peak - before) / 1024, "process_peak_rss_mb": peak / 1024,
            "how": "peak RSS of a fresh process minus its peak RSS after imports"}


def _memory_probe_main() -> None:
    """Subprocess entry of measure_memory: argv[1] = {"cfg": BenchInferenceConfig fields, "system": name}; prints JSON."""
    args = json.loads(sys.argv[1])
    print(json.dumps(probe_memory(BenchInferenceConfig(**args["cfg"]), args["system"])))


def measure_memory(cfg: BenchInferenceConfig, system: str) -> dict:
    """Peak memory of one system, built and run alone in a fresh Python process (see the module docstring)."""
    code = "from trinityx.bench.inference import _memory_probe_main; _memory_probe_main()"
    payload = json.dumps({"cfg": asdict(cfg), "system": system})
    done = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe of {system} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the benchmark -----------------------------------------------------------------------------------------


def check_targets(rows: dict) -> dict:
    """The paper's efficiency claims (docs/design.md), as measured here: {target: {ratio, met}}; met None if not run."""

    def target(other: str, key: str, met) -> dict:
        if "trinityx" not in rows or other not in rows or rows["trinityx"][key] is None or not rows[other][key]:
            return {"ratio": None, "met": None}  # not measured (or measured as 0: no ratio to take)
        ratio = rows["trinityx"][key] / rows[other][key]
        return {"ratio": ratio, "met": met(ratio)}

    targets = {}
    for key in ("decode_tokens_per_s", "peak_memory_mb"):
        targets[f"trinityx_{key}_within_5pct_of_base"] = target("base", key, lambda r: abs(r - 1) <= 0.05)
    for other in MOE_BASELINES:
        for key in ("p50_ms", "peak_memory_mb"):
            targets[f"trinityx_{key}_40pct_below_{other}"] = target(other, key, lambda r: r <= 0.6)
    return targets


def print_table(cfg: BenchInferenceConfig, rows: dict, targets: dict, n_requests: int) -> None:
    print(f"\nbench inference: {cfg.backbone}, experts {cfg.experts}, {cfg.prompts} prompts in {n_requests} requests "
          f"of batch {cfg.request_batch}, {cfg.new_tokens} new tokens (greedy), float32 on {cfg.device}, "
          f"{torch.get_num_threads()} threads; 1 warm-up request, then {cfg.repeats} interleaved rounds "
          f"({cfg.xlora_repeats} for xlora); memory: fresh subprocess per system")
    header = f"{'system':<15} {'params':>8} {'peak MB':>8} {'prefill ms':>10} {'decode tok/s':>12} {'p50 ms':>8} {'p95 ms':>8} {'n':>3}"
    print(header)
    for name, row in rows.items():
        memory = "-" if row["peak_memory_mb"] is None else f"{row['peak_memory_mb']:.0f}"
        print(f"{name:<15} {row['params'] / 1e6:>7.1f}M {memory:>8} {row['prefill_ms']:>10.1f} "
              f"{row['decode_tokens_per_s']:>12.1f} {row['p50_ms']:>8.0f} {row['p95_ms']:>8.0f} {row['requests']:>3}")
    for name, t in targets.items():
        verdict = "not measured" if t["met"] is None else f"{'met' if t['met'] else 'NOT met'} (ratio {t['ratio']:.3f})"
        print(f"  target {name}: {verdict}")


def bench_inference(cfg: BenchInferenceConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    folders = check_config(cfg)
    memory = dict.fromkeys(cfg.systems)
    if cfg.memory:
        with ThreadPoolExecutor(cfg.memory_workers) as pool:  # each probe is its own process
            memory = dict(zip(cfg.systems, pool.map(lambda name: measure_memory(cfg, name), cfg.systems)))

    systems, requests, pad = {}, None, None
    for name in cfg.systems:
        backbone = load_backbone(cfg.backbone, device=cfg.device)
        requests, pad = make_requests(backbone, cfg), backbone.tokenizer.pad_token_id
        systems[name] = build_system(name, backbone, folders, cfg.pool_layer)
    samples: dict[str, list[dict]] = {name: [] for name in systems}
    with torch.inference_mode():
        for name, (_, generate) in systems.items():
            run_request(generate, requests[0], cfg, pad)  # warm-up, not counted
        names = list(systems)
        for round_ in range(cfg.repeats):
            # Systems take turns (and the order rotates) so that background load spreads over all of them.
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                if name == "xlora" and round_ >= cfg.xlora_repeats:
                    continue
                for request in requests:
                    samples[name].append(run_request(systems[name][1], request, cfg, pad))

    rows = {}
    for name, (module, _) in systems.items():
        rows[name] = {"params": count_parameters(module),
                      "peak_memory_mb": None if memory[name] is None else memory[name]["peak_memory_mb"],
                      **summarise(samples[name])}
    targets = check_targets(rows)
    if not cfg.json:
        print_table(cfg, rows, targets, len(requests))
    result = {"bench": "inference", "config": asdict(cfg), "experts": [str(f) for f in folders], "systems": rows,
              "targets": targets}
    print(json.dumps(result))
    return result
