"""`trinityx bench serve`: the OpenAI-compatible server under concurrent load, micro-batched vs one at a time.

Three phases, each against a real uvicorn server started in this process on a free loopback port and the
same loaded model, with the same prompts and greedy decoding:

1. `batched`: the server as configured (`--max-batch-size`), `--clients` concurrent clients sending
   `--requests` chat requests in total;
2. `one-at-a-time`: the same load with a batch-size-1 worker (what a server without batching does);
3. `overload`: past the queue limit (`--overload-queue` queued requests, `--overload-clients` clients), to
   show how it degrades: 503s with Retry-After instead of errors or a stall.

Each phase starts with one warm-up request (not counted) and is bounded by `--time-limit` seconds; a
request not sent by then is counted as skipped. Latency is measured by the client, from sending the
request to reading the whole answer. Clients and server share this process and its cores (the worker
thread runs torch, which releases the GIL), so the numbers are a lower bound for a separate client.
The batched answers are compared with the one-at-a-time answers: greedy batching must change nothing.
"""

import asyncio
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from trinityx.apps.serve import ServeConfig, Served, ServerThread, build_app, check_config, load_served
from trinityx.backbones import DEFAULT_BACKBONE, load_backbone
from trinityx.bench.inference import percentile
from trinityx.errors import TrinityXError
from trinityx.infer.engine import Engine
from trinityx.lora.adapters import lora_config, write_weights
from trinityx.mocae import MoCaEConfig, MoCaEModel

PROMPTS = [
    "Give three tips for staying healthy.",
    "What happens if you eat watermelon seeds?",
    "How do I pick a strong password?",
    "Explain what a prime number is.",
    "Write a haiku about the sea.",
    "Is it safe to mix bleach and ammonia?",
    "What is the capital of Australia?",
    "How can I politely decline an invitation?",
]


def write_random_experts(model: nn.Module, out: Path, names: list[str], targets: tuple[str, ...], r: int = 8,
                         alpha: int = 16, std: float = 1e-3, seed: int = 0, base: str = "") -> list[Path]:
    """Write one random PEFT LoRA adapter folder per name under `out` (a serving demo, not a trained expert).

    A ~ N(0, 1/D_in) and B ~ N(0, std^2): with a small `std` the answers stay close to the backbone's.
    """
    g = torch.Generator().manual_seed(seed)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in targets}
    if not modules:
        raise TrinityXError(f"the model has no linear layers named {targets}")
    folders = []
    for name in names:
        folder = out / name
        folder.mkdir(parents=True)
        lora_config(targets, r, alpha, inference_mode=True, base_model_name_or_path=base or None).save_pretrained(folder)
        factors = {}
        for module, linear in modules.items():
            A = torch.randn(r, linear.in_features, generator=g) / math.sqrt(linear.in_features)  # [R, D_in]
            factors[module] = (A, torch.randn(linear.out_features, r, generator=g) * std)  # B: [D_out, R]
        write_weights(folder, factors)
        folders.append(folder)
    return folders


def build_random_mocae(model: nn.Module, folder: Path, backbone: str, targets: tuple[str, ...],
                       names: tuple[str, ...] = ("helpful", "harmless", "honest"), r: int = 8, alpha: int = 16,
                       std: float = 1e-3, router_std: float = 0.05, seed: int = 0) -> MoCaEModel:
    """A MoCaE folder of random experts and a random router on `model` (modified in place); returns the model."""
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_random_experts(model, Path(tmp), list(names), targets, r, alpha, std, seed, backbone)
        mocae = MoCaEModel(model, folders, MoCaEConfig(expert_names=list(names), backbone=backbone))
        g = torch.Generator().manual_seed(seed + 1)
        for p in mocae.router.parameters():
            p.data = torch.randn(p.shape, generator=g) * router_std
        mocae.save_pretrained(folder)
    return mocae.eval()


@dataclass
class BenchServeConfig:
    """Benchmark `trinityx serve` under concurrent clients: batched vs one-at-a-time, and past the queue limit."""

    run: Path | None = None
    """MoCaE folder to serve (default: random experts and router on --backbone, in a temporary folder)."""
    backbone: str = DEFAULT_BACKBONE
    """Backbone of the random MoCaE folder when --run is not given."""
    clients: int = 4
    """Concurrent clients of the batched and one-at-a-time phases."""
    requests: int = 16
    """Requests per phase."""
    max_tokens: int = 16
    """max_tokens of each request (greedy)."""
    max_batch_size: int = 8
    """Micro-batch size of the batched phase."""
    join_ratio: float = 0.0
    """The batched phases' `trinityx serve --join-ratio` (queued rows join once they are this many times the
    running rows, or fill the batch)."""
    join_wait_steps: int = 0
    """The batched phases' `trinityx serve --join-wait-steps` (or once they have waited this many decode steps)."""
    max_queue: int = 64
    """Queue limit of the batched and one-at-a-time phases (keep it above --clients: no request is refused)."""
    overload_clients: int = 16
    """Concurrent clients of the overload phase (0 skips it)."""
    overload_queue: int = 2
    """Queue limit of the overload phase: clients beyond batch + queue get 503s."""
    time_limit: float = 120.0
    """Seconds per phase; requests not sent by then are counted as skipped."""
    threads: int | None = None
    """torch threads (default: torch's choice)."""
    json: bool = False
    """Print only the final JSON line, not the table."""


async def run_load(url: str, model: str, clients: int, requests: int, max_tokens: int, time_limit: float,
                   after_warmup=None) -> dict:
    """`clients` concurrent clients send `requests` chat requests in total; returns counts, latencies, answers."""
    import httpx2

    deadline = time.monotonic() + time_limit
    next_index = 0
    samples, statuses, answers, skipped = [], {}, {}, 0

    async def client(http):
        nonlocal next_index, skipped
        while next_index < requests:
            i, next_index = next_index, next_index + 1
            if time.monotonic() > deadline:
                skipped += 1
                continue
            body = {"model": model, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
            start = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/chat/completions", json=body,
                                           timeout=max(1.0, deadline - time.monotonic() + 30))
                status = response.status_code
            except httpx2.HTTPError as e:
                status = type(e).__name__
            latency = time.perf_counter() - start
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                answer = response.json()
                samples.append({"latency_s": latency, "tokens": answer["usage"]["completion_tokens"]})
                answers[i] = answer["choices"][0]["message"]["content"]

    limits = httpx2.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx2.AsyncClient(limits=limits) as http:
        warm = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": PROMPTS[0]}]}
        (await http.post(f"{url}/v1/chat/completions", json=warm, timeout=time_limit)).raise_for_status()
        if after_warmup is not None:
            after_warmup()
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    latencies = [s["latency_s"] for s in samples]
    ok = statuses.get(200, 0)
    return {
        "requests": requests, "ok": ok, "status_429": statuses.get(429, 0), "status_503": statuses.get(503, 0),
        "errors": sum(n for s, n in statuses.items() if s not in (200, 429, 503)), "skipped": skipped,
        "wall_s": wall, "requests_per_s": ok / wall, "tokens_per_s": sum(s["tokens"] for s in samples) / wall,
        "p50_s": percentile(latencies, 50) if latencies else float("nan"),
        "p95_s": percentile(latencies, 95) if latencies else float("nan"),
        "p99_s": percentile(latencies, 99) if latencies else float("nan"),
        "answers": answers,
    }


def run_phase(served: Served, batch: int, queue: int, clients: int, cfg: BenchServeConfig) -> dict:
    old = served.engine
    served.engine = Engine(old.model, old.tokenizer, old.prompt_format, max_batch_size=batch, max_queue=queue,
                           join_ratio=served.cfg.join_ratio, join_wait_steps=served.cfg.join_wait_steps)
    warm = {}
    with ServerThread(build_app(served)) as url:
        result = asyncio.run(run_load(url, served.name, clients, cfg.requests, cfg.max_tokens, cfg.time_limit,
                                      after_warmup=lambda: warm.update(served.engine.stats())))
        stats = {k: v - warm[k] for k, v in served.engine.stats().items()}  # the measured requests, not the warm-up
        # Rows per decode step: with continuous batching a run of joined requests is one `batch`, so requests
        # per batch says nothing about how many rows a step decodes together.
        result["rows_per_step"] = stats["decoded_rows"] / max(1, stats["decode_steps"])
        # Where the time went: a prefill (routing included) holds every running row back; the model's forward
        # passes (prefills and decode steps) against the wall time, the rest being sampling, HTTP and idling.
        result["prefilled_rows"] = stats["prefilled_rows"]
        result["rows_per_prefill"] = stats["prefilled_rows"] / max(1, stats["prefills"])
        forward = stats["prefill_seconds"] + stats["decode_seconds"]
        result["prefill_share"] = stats["prefill_seconds"] / forward if forward else 0.0
        result["forward_share"] = forward / result["wall_s"] if result["wall_s"] else 0.0
    return {"max_batch_size": batch, "max_queue": queue, "clients": clients, **result}


def print_table(cfg: BenchServeConfig, source: str, phases: dict) -> None:
    print(f"\nbench serve: {source}; {cfg.requests} chat requests per phase, max_tokens {cfg.max_tokens} (greedy), "
          f"float32 CPU, {torch.get_num_threads()} threads; clients and server in one process over loopback HTTP; "
          f"join ratio {cfg.join_ratio:g}, join wait {cfg.join_wait_steps} steps")
    print(f"{'phase':<14} {'batch':>5} {'queue':>5} {'clients':>7} {'ok':>4} {'429':>4} {'503':>4} {'err':>4} "
          f"{'skip':>4} {'req/s':>6} {'tok/s':>7} {'p50 s':>6} {'p95 s':>6} {'p99 s':>6} {'rows/step':>9} "
          f"{'rows/prefill':>12} {'prefill %':>9} {'forward %':>9}")
    for name, p in phases.items():
        print(f"{name:<14} {p['max_batch_size']:>5} {p['max_queue']:>5} {p['clients']:>7} {p['ok']:>4} "
              f"{p['status_429']:>4} {p['status_503']:>4} {p['errors']:>4} {p['skipped']:>4} "
              f"{p['requests_per_s']:>6.2f} {p['tokens_per_s']:>7.1f} {p['p50_s']:>6.2f} {p['p95_s']:>6.2f} "
              f"{p['p99_s']:>6.2f} {p['rows_per_step']:>9.2f} {p['rows_per_prefill']:>12.2f} "
              f"{100 * p['prefill_share']:>9.0f} {100 * p['forward_share']:>9.0f}")


def bench_serve(cfg: BenchServeConfig) -> dict:
    if cfg.clients < 1 or cfg.requests < 1 or cfg.max_tokens < 1:
        raise TrinityXError("--clients, --requests and --max-tokens must be >= 1")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory() as tmp:
        serve_cfg = ServeConfig(run=cfg.run or Path(tmp) / "mocae", max_tokens=max(cfg.max_tokens, 512),
                                join_ratio=cfg.join_ratio, join_wait_steps=cfg.join_wait_steps)
        check_config(serve_cfg)  # the server's own checks, before a model loads
        if cfg.run is None:
            backbone = load_backbone(cfg.backbone)
            model = build_random_mocae(backbone.model, serve_cfg.run, cfg.backbone, backbone.lora_targets)
            source = f"random experts (r=8) and router on {cfg.backbone}"
            served = load_served(serve_cfg, model=model, backbone=backbone)
        else:
            source = str(cfg.run)
            served = load_served(serve_cfg)
        phases = {"batched": run_phase(served, cfg.max_batch_size, cfg.max_queue, cfg.clients, cfg),
                  "one-at-a-time": run_phase(served, 1, cfg.max_queue, cfg.clients, cfg)}
        if cfg.overload_clients:
            phases["overload"] = run_phase(served, cfg.max_batch_size, cfg.overload_queue, cfg.overload_clients, cfg)
    batched, single = phases["batched"]["answers"], phases["one-at-a-time"]["answers"]
    mismatches = sum(batched[i] != single[i] for i in batched.keys() & single.keys())
    for p in phases.values():
        del p["answers"]
    result = {"bench": "serve", "source": source, "config": {k: str(v) if isinstance(v, Path) else v
                                                              for k, v in asdict(cfg).items()},
              "threads": torch.get_num_threads(), "phases": phases, "batched_vs_single_mismatches": mismatches,
              "speedup_requests_per_s": phases["batched"]["requests_per_s"] / phases["one-at-a-time"]["requests_per_s"]}
    if not cfg.json:
        print_table(cfg, source, phases)
        print(f"batched vs one-at-a-time: {result['speedup_requests_per_s']:.2f}x requests/s; "
              f"{mismatches} answers differ (greedy batching must change none)")
    print(json.dumps(result))
    return result
