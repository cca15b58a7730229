"""Commands around the MoCaE router: `fit-router`, `calibrate`, `generate`.

Two ways to train a sequence router (`--phase`):

- `states` (default): the head reads the frozen backbone's pooled prompt states, which do not depend on the
  router, so they are computed once and the head trains on them for as many steps as it needs, in seconds,
  with the router terms of `mocae.objective` (GL, RL, entropy, step KL; no LM term). The prompts are the
  routing data (`data.load_routing_prompts`): labelled by dimension, no responses, from sources that hold no
  evaluation item.
- `lm`: the one training loop (`trinityx.train.loop.fit`) through the whole mixture on the mixed HHH training
  data, the loss being the LM loss plus the router terms (the paper's objective). Token routers always
  train this way (their gates read every layer's input, which depends on the gates below).
"""

import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro
from tqdm.auto import tqdm

from trinityx import data
from trinityx.backbones import DEFAULT_BACKBONE, Backbone, context_error, format_prompt, load_backbone
from trinityx.errors import TrinityXError
from trinityx.io import to_jsonable, write_json
from trinityx.lora.adapters import is_adapter, write_weights
from trinityx.mocae import MoCaEConfig, MoCaEModel
from trinityx.mocae.calibration import calibration_report, reliability_diagram, routing_summary
from trinityx.mocae.model import read_config
from trinityx.mocae.objective import mean_gate, router_objective
from trinityx.paths import check_name, check_writable
from trinityx.sft import collate, encode
from trinityx.train.experts import encode_examples, examples_digest, partial_dir, subsample
from trinityx.train.loop import TrainConfig, cosine_with_warmup, fit, lm_loss_sum


@dataclass
class RouterLoss:
    """Weights of the router objective's terms; 0 switches a term off."""

    lm_weight: float = 1.0
    """Language-model loss on the mixed HHH data (prompt tokens masked)."""
    gl_weight: float = 1.0
    """GL: cross-entropy between the gate and the example's dimension label."""
    rl_weight: float = 0.1
    """RL: KL between the batch-mean gate and the prior gamma."""
    entropy_weight: float = 0.0
    """Entropy of the gates (positive weight: sharper gates)."""
    step_kl_weight: float = 0.0
    """KL between this step's and the previous step's batch-mean gate."""

    def as_dict(self) -> dict[str, float]:
        return {"lm": self.lm_weight, "gl": self.gl_weight, "rl": self.rl_weight, "entropy": self.entropy_weight,
                "step_kl": self.step_kl_weight}


@dataclass
class RouterConfig:
    """Fit the MoCaE router over trained experts on the mixed HHH training data."""

    experts: Path
    """Folder with one PEFT expert per dimension: EXPERTS/<dimension>/ (as `trinityx train-experts` writes)."""
    out: Path
    """Output MoCaE folder: experts/, router.safetensors, mocae_config.json, train_log.json."""
    backbone: str = DEFAULT_BACKBONE
    """The backbone the experts were trained on."""
    data_dir: str | None = None
    """Folder laid out like ../shared/data (default: $TRINITYX_DATA_DIR)."""
    dimensions: tuple[str, ...] = data.DIMENSIONS
    """Expert order (gate k is dimension k); each must have EXPERTS/<dimension>/."""
    router: Literal["sequence", "token"] = "sequence"
    """Routing granularity."""
    pool_layer: int = -1
    """Hidden state the sequence router pools (0 embeddings, l after layer l, -1 the last). The routing pass stops
    at this layer: a middle layer routes at about half the cost of a prefill."""
    pool_layers: tuple[int, ...] = ()
    """More hidden states the sequence router reads (pooled like pool_layer's, concatenated); the routing pass
    stops at the highest layer of pool_layer and these."""
    pooling: Literal["mean", "last", "mean+last"] = "mean"
    """Pooling over the prompt tokens: their mean, the last prompt token's state, or both."""
    head_hidden: int = 0
    """Router head MLP width (0 = a linear head)."""
    gamma: tuple[float, ...] | None = None
    """Prior over experts for RL; default uniform (the pipeline passes the reference task-vector gamma)."""
    phase: Literal["states", "lm"] = "states"
    """How a sequence router trains: `states` on the frozen backbone's pooled prompt states of the routing data
    (computed once; seconds), `lm` through the mixture with the LM loss on the HHH training data (the paper's
    objective; a token router always trains this way)."""
    routing_sources: tuple[str, ...] = tuple(data.ROUTING_SOURCES)
    """Built-in routing data (states phase): alpaca, alpaca_eval_judge_train, pku_saferlhf, truthfulqa."""
    routing_files: tuple[str, ...] = ()
    """More routing data (states phase): JSON or JSON-lines files of {"prompt", "dimension"} rows."""
    train_experts: bool = False
    """Also train the experts' LoRA weights jointly with the router (lm phase)."""
    per_dimension: int | None = 200
    """Training examples (lm phase) or routing prompts (states phase) per dimension (seeded subset); None: all."""
    dev_per_dimension: int | None = 100
    """Routing dev prompts per dimension the states phase reports accuracy on (None: all)."""
    overwrite: bool = False
    """Replace an existing output folder."""
    loss: Annotated[RouterLoss, tyro.conf.OmitArgPrefixes] = field(default_factory=RouterLoss)
    train: Annotated[TrainConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=lambda: replace(LM_TRAIN))
    head_train: TrainConfig = field(default_factory=lambda: HEAD_TRAIN)
    """The head's optimisation in the states phase (max_steps, batch_size, lr, weight_decay, warmup_steps,
    max_length of a prompt, seed; eval_every and checkpoints do not apply: a run takes seconds)."""

    def validate(self) -> None:
        for dimension in self.dimensions:
            check_name(dimension, "--dimensions")  # each names the folder EXPERTS/<dimension>/
        if self.gamma is not None and len(self.gamma) != len(self.dimensions):
            raise TrinityXError(f"--gamma has {len(self.gamma)} values for {len(self.dimensions)} experts")
        if self.per_dimension is not None and self.per_dimension < 1:
            raise TrinityXError(f"--per-dimension must be positive (or omitted for all), got {self.per_dimension}")
        if self.phase == "states" and self.train_experts:
            raise TrinityXError("--train-experts needs --phase lm (the states phase trains the router head only)")
        if self.phase == "states" and self.router == "sequence" and self.loss.lm_weight not in (0.0, 1.0):
            raise TrinityXError("--lm-weight applies to --phase lm only; the states phase has no LM term")
        (self.train if self.phase == "lm" or self.router == "token" else self.head_train).validate()


LM_TRAIN = TrainConfig(max_steps=40, lr=2e-3, warmup_steps=4, eval_every=20, dev_examples=48)
"""Defaults of the lm phase (and of token routers): 40 steps through the mixture with the LM loss."""
HEAD_TRAIN = TrainConfig(max_steps=300, batch_size=96, micro_batch_size=96, lr=3e-3, weight_decay=0.01,
                         warmup_steps=10, max_length=256, eval_every=300, dev_examples=1, checkpoint_every=0)
"""Defaults of the states phase: 300 full steps of AdamW on the cached states (a few seconds on a CPU)."""


def expert_folders(experts: Path, dimensions) -> list[Path]:
    folders = [Path(experts) / d for d in dimensions]
    for f in folders:
        if not is_adapter(f):
            raise TrinityXError(f"--experts {experts}: no PEFT expert in {f}; train it with `trinityx train-expert "
                                f"--dimension {f.name} --out {f}`")
    return folders


def router_loss_fn(gamma: torch.Tensor, weights: dict[str, float]):
    """loss_fn for `fit`: summed LM loss of the mixture plus the router terms scaled to the batch's tokens."""
    state = {"prev_mean": None}

    def loss_fn(model: MoCaEModel, batch):
        out = model(batch["input_ids"], batch["attention_mask"], prompt_mask=batch["prompt_mask"])
        lm_sum, n = lm_loss_sum(out.logits, batch["labels"])
        total, parts = router_objective(lm_sum / n.clamp(min=1), out.gate_logits, batch["dimension"], gamma, weights,
                                        state["prev_mean"] if model.training else None)
        if model.training:
            state["prev_mean"] = mean_gate(out.gate_logits).detach()
        accuracy = (out.gate_logits.argmax(-1) == batch["dimension"]).float().mean().item()
        # `fit` divides by the global batch's target tokens: scaling by n keeps total a per-token mean.
        return total * n, n, {**{f"loss_{k}": v for k, v in parts.items()}, "router_accuracy": accuracy}

    return loss_fn


def build_mocae(backbone: Backbone, folders: list[Path], cfg: RouterConfig) -> MoCaEModel:
    config = MoCaEConfig(expert_names=list(cfg.dimensions), backbone=cfg.backbone, router=cfg.router,
                         pool_layer=cfg.pool_layer, pool_layers=list(cfg.pool_layers), pooling=cfg.pooling,
                         head_hidden=cfg.head_hidden)
    return MoCaEModel(backbone.model, folders, config)


def save_trained_experts(model: MoCaEModel, folder: Path) -> None:
    """Write jointly trained expert weights back into folder/experts/<name>/ as PEFT adapters."""
    for k, expert in enumerate(model.config.expert_names):
        factors = {name: (layer.lora_A[k], layer.lora_B[k]) for name, layer in zip(model.mixture_names, model.mixtures)}
        write_weights(folder / "experts" / expert, factors)


def fit_router(cfg: RouterConfig, backbone: Backbone | None = None, pooled_cache: dict | None = None) -> dict:
    """`trinityx fit-router`: train the router (and optionally the experts) and save a MoCaE folder.

    `pooled_cache`: shared by calls that train several sequence routers of one backbone on the same routing
    data in the states phase (see `pooled_states`)."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise TrinityXError(f"--out {out} already exists; pass --overwrite to replace it or choose another folder")
    cfg.validate()
    check_writable(out, "--out")
    folders = expert_folders(cfg.experts, cfg.dimensions)
    data_dir = data.resolve_data_dir(cfg.data_dir)
    backbone = backbone or load_backbone(cfg.backbone)
    if cfg.phase == "states" and cfg.router == "sequence":
        return fit_router_on_states(cfg, backbone, folders, data_dir, pooled_cache)
    train = data.load_mixture(data_dir, "train", per_dimension=cfg.per_dimension, seed=cfg.train.seed)
    dev = subsample(data.load_mixture(data_dir, "dev"), cfg.train.dev_examples, cfg.train.seed)
    # Gate k serves dimension k: relabel the data's dimension index to the expert order given.
    order = {d: k for k, d in enumerate(cfg.dimensions)}
    train = [e for e in train if e.dimension in order]
    dev = [e for e in dev if e.dimension in order]
    train_enc = [encode(backbone.tokenizer, backbone.prompt_format, e.prompt, e.response, cfg.train.max_length,
                        order[e.dimension]) for e in train]
    dev_enc = [encode(backbone.tokenizer, backbone.prompt_format, e.prompt, e.response, cfg.train.max_length,
                      order[e.dimension]) for e in dev]

    torch.manual_seed(cfg.train.seed)
    model = build_mocae(backbone, folders, cfg)
    for p in model.router.parameters():
        p.requires_grad_(True)
    if cfg.train_experts:
        for m in model.mixtures:
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    K = len(cfg.dimensions)
    gamma = torch.tensor(cfg.gamma, dtype=torch.float32) if cfg.gamma else torch.full((K,), 1.0 / K)
    run = {"config": {k: v for k, v in to_jsonable(asdict(cfg)).items() if k not in ("overwrite", "train")},
           "examples": examples_digest(train_enc + dev_enc)}  # a checkpoint of another configuration is refused
    log = fit(model, params, router_loss_fn(gamma / gamma.sum(), cfg.loss.as_dict()), train_enc, dev_enc, cfg.train,
              partial_dir(out), backbone.tokenizer.pad_token_id, desc=f"router:{cfg.router}", run=run)
    model.eval()
    log["router_accuracy_dev"] = router_accuracy(model, backbone, dev, order, cfg.train.max_length)
    log["trainable_parameters"] = sum(p.numel() for p in params.values())
    model.save_pretrained(out)
    if cfg.train_experts:
        save_trained_experts(model, out)
    write_json(out / "trinityx_config.json", {"command": "fit-router", **to_jsonable(asdict(cfg)),
                                               "data_dir": str(data_dir), "gamma": gamma.tolist(),
                                               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    write_json(out / "train_log.json", log)
    shutil.rmtree(partial_dir(out), ignore_errors=True)
    print(f"router:{cfg.router}: dev loss {log['dev_loss_before']:.4f} -> {log['dev_loss_after']:.4f}, "
          f"router accuracy on dev prompts {log['router_accuracy_dev']:.3f} -> {out}")
    return log


def routing_set(data_dir: Path, split: str, sources, files, order: dict[str, int], per_dimension: int | None,
                seed: int) -> tuple[list[str], torch.Tensor, dict]:
    """(prompts, labels [N], record) of a routing split, at most `per_dimension` per dimension (seeded).

    The router's dev set and calibration's fit set are both drawn here with the run's seed, so the same
    prompts come out and their states are computed once."""
    prompts, record = data.load_routing_prompts(data_dir, split, sources, files, tuple(order))
    rng = torch.Generator().manual_seed(seed)
    chosen = []
    for dimension in order:
        rows = [p for p in prompts if p.dimension == dimension]
        if not rows:
            raise TrinityXError(f"routing split {split!r} has no {dimension!r} prompt (sources {list(sources)}, "
                                f"files {list(files)}); add a source or a file that covers it")
        if per_dimension is not None and len(rows) > per_dimension:
            rows = [rows[i] for i in sorted(torch.randperm(len(rows), generator=rng)[:per_dimension].tolist())]
        chosen += rows
    record["per_dimension"] = {d: sum(p.dimension == d for p in chosen) for d in order}
    return [p.prompt for p in chosen], torch.tensor([order[p.dimension] for p in chosen]), record


def balanced_batches(labels: torch.Tensor, batch_size: int, steps: int, generator: torch.Generator):
    """`steps` batches of indices, each dimension drawn equally often (smaller ones are repeated): the head sees
    a balanced mixture, as the evaluation sets each ask for one dimension, whatever the sources' sizes."""
    groups = [(labels == k).nonzero().flatten() for k in range(int(labels.max()) + 1)]
    groups = [g for g in groups if len(g)]
    for _ in range(steps):
        picks = [g[torch.randint(len(g), (batch_size // len(groups) + 1,), generator=generator)] for g in groups]
        yield torch.cat(picks)[torch.randperm(len(groups) * (batch_size // len(groups) + 1), generator=generator)][:batch_size]


def fit_head(model: MoCaEModel, states: torch.Tensor, labels: torch.Tensor, gamma: torch.Tensor,
             weights: dict[str, float], cfg: TrainConfig) -> list[dict]:
    """Train the sequence router head on cached pooled states [N, F] with the router terms (no LM term).

    Step, schedule, log, in that order: balanced batches, AdamW with warm-up and cosine decay, clipping."""
    head = model.router
    head.train()
    params = list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, cfg.warmup_steps, cfg.max_steps))
    generator = torch.Generator().manual_seed(cfg.seed)
    log, prev_mean = [], None
    for step, ids in enumerate(balanced_batches(labels, cfg.batch_size, cfg.max_steps, generator)):
        logits = head(states[ids])  # [B, K]
        total, parts = router_objective(None, logits, labels[ids], gamma, {**weights, "lm": 0.0}, prev_mean)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        prev_mean = mean_gate(logits).detach()
        if step % 25 == 0 or step == cfg.max_steps - 1:
            accuracy = (logits.argmax(-1) == labels[ids]).float().mean().item()
            log.append({"step": step + 1, "loss": parts["total"], "router_accuracy": accuracy,
                        "lr": scheduler.get_last_lr()[0], **{f"loss_{k}": v for k, v in parts.items()}})
    head.eval()
    for p in params:
        p.requires_grad_(False)
    return log


def fit_router_on_states(cfg: RouterConfig, backbone: Backbone, folders: list[Path], data_dir: Path,
                         pooled_cache: dict | None) -> dict:
    """The states phase of `fit-router`: routing data -> pooled states (once) -> head -> MoCaE folder."""
    out = Path(cfg.out)
    start = time.perf_counter()
    order = {d: k for k, d in enumerate(cfg.dimensions)}
    sources, files, seed = cfg.routing_sources, cfg.routing_files, cfg.head_train.seed
    train_prompts, train_labels, train_record = routing_set(data_dir, "train", sources, files, order,
                                                            cfg.per_dimension, seed)
    dev_prompts, dev_labels, dev_record = routing_set(data_dir, "dev", sources, files, order, cfg.dev_per_dimension,
                                                      seed)
    torch.manual_seed(cfg.head_train.seed)
    model = build_mocae(backbone, folders, cfg)
    cache = {} if pooled_cache is None else pooled_cache
    states = pooled_states(model, backbone, train_prompts, cfg.head_train.max_length, cache=cache,
                           desc="routing states (train)")
    dev_states = pooled_states(model, backbone, dev_prompts, cfg.head_train.max_length, cache=cache,
                               desc="routing states (dev)")
    states_seconds = time.perf_counter() - start
    K = len(cfg.dimensions)
    gamma = torch.tensor(cfg.gamma, dtype=torch.float32) if cfg.gamma else torch.full((K,), 1.0 / K)
    model.router.standardise(states)
    steps = fit_head(model, states, train_labels, gamma / gamma.sum(), cfg.loss.as_dict(), cfg.head_train)
    with torch.no_grad():
        dev_accuracy = (model.router(dev_states).argmax(-1) == dev_labels).float().mean().item()
        train_accuracy = (model.router(states).argmax(-1) == train_labels).float().mean().item()
    log = {"phase": "states", "steps": steps, "router_accuracy_dev": dev_accuracy,
           "router_accuracy_train": train_accuracy, "n_train": len(train_prompts), "n_dev": len(dev_prompts),
           "routing_data": {"train": train_record, "dev": dev_record},
           "trainable_parameters": sum(p.numel() for p in model.router.parameters()),
           "states_seconds": states_seconds, "seconds": time.perf_counter() - start}
    model.save_pretrained(out)
    write_json(out / "trinityx_config.json", {"command": "fit-router", **to_jsonable(asdict(cfg)),
                                               "data_dir": str(data_dir), "gamma": gamma.tolist(),
                                               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    write_json(out / "train_log.json", log)
    print(f"router:{cfg.router} (states phase, {len(train_prompts)} routing prompts, {cfg.head_train.max_steps} "
          f"steps): accuracy train {train_accuracy:.3f}, dev {dev_accuracy:.3f}, {log['seconds']:.0f} s -> {out}")
    return log


def prompt_batches(backbone: Backbone, prompts: list[str], max_length: int, batch_size: int):
    """(input_ids, attention_mask, prompt_mask) of left-padded batches of prompts in the backbone's format."""
    for s in range(0, len(prompts), batch_size):
        enc = [encode(backbone.tokenizer, backbone.prompt_format, p, None, max_length) for p in prompts[s:s + batch_size]]
        batch = collate(enc, backbone.tokenizer.pad_token_id, padding_side="left")
        yield batch["input_ids"], batch["attention_mask"], batch["prompt_mask"]


@torch.no_grad()
def pooled_states(model: MoCaEModel, backbone: Backbone, prompts: list[str], max_length: int, batch_size: int = 16,
                  cache: dict | None = None, desc: str | None = None) -> torch.Tensor:
    """What the sequence router head reads of each prompt [N, F], each prompt computed once in `cache`.

    The states depend on the backbone, the pooling config and the tokens only, never on the head: routers that
    share those share one pass, and so do the training, dev and calibration sets that share prompts. `cache`
    maps a pooling config to {prompt: state}. Prompts are batched by length (little padding)."""
    c = model.config
    key = (c.pool_layer, tuple(c.pool_layers), c.pooling, c.normalize_hidden, max_length)
    known = {} if cache is None else cache.setdefault(key, {})
    todo = sorted({p for p in prompts if p not in known}, key=len)
    with tqdm(total=len(todo), desc=desc or "routing states", unit="prompt", disable=len(todo) < 64) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            batch = next(prompt_batches(backbone, chunk, max_length, batch_size))
            known.update(zip(chunk, model.pooled_prompt(*batch)))  # [b, F]
            bar.update(len(chunk))
    return torch.stack([known[p] for p in prompts])  # [N, F]


@torch.no_grad()
def prompt_gate_logits(model: MoCaEModel, backbone: Backbone, prompts: list[str], max_length: int,
                       batch_size: int = 16, pooled_cache: dict | None = None) -> torch.Tensor:
    """Router logits [N, K] of prompts alone (what the router sees at inference).

    `pooled_cache`: a dict shared by calls that score several sequence routers of one backbone on the same
    prompts; each distinct (pooling, prompts) routing pass then runs once."""
    if model.config.router != "sequence":
        return torch.cat([model.route(*batch) for batch in prompt_batches(backbone, prompts, max_length, batch_size)])
    return model.router(pooled_states(model, backbone, prompts, max_length, batch_size, pooled_cache))  # [N, K]


def labelled_prompts(examples: list[data.SFTExample], order: dict[str, int]) -> tuple[list[str], torch.Tensor]:
    """Distinct prompts with their dimension label (TruthfulQA has several answers per question)."""
    seen = {}
    for e in examples:
        if e.dimension in order:
            seen.setdefault(e.prompt, order[e.dimension])
    return list(seen), torch.tensor(list(seen.values()))


def router_accuracy(model, backbone, examples, order, max_length) -> float:
    prompts, labels = labelled_prompts(examples, order)
    return (prompt_gate_logits(model, backbone, prompts, max_length).argmax(-1) == labels).float().mean().item()


@dataclass
class CalibrateConfig:
    """Fit the router's temperature on held-out labelled prompts and measure calibration (Guo et al. 2017)."""

    run: Path
    """A MoCaE folder (as `trinityx fit-router` writes)."""
    data_dir: str | None = None
    """Folder laid out like ../shared/data (default: $TRINITYX_DATA_DIR)."""
    backbone: str | None = None
    """Backbone (default: the one in the folder's mocae_config.json)."""
    fit_examples: int = 150
    """Routing dev-split prompts per dimension used to fit T (fewer when a dimension has fewer)."""
    test_examples: int = 150
    """Routing test-split prompts per dimension used to measure calibration before and after."""
    routing_sources: tuple[str, ...] = tuple(data.ROUTING_SOURCES)
    """Built-in routing data whose dev and test splits are used (as in `fit-router`)."""
    routing_files: tuple[str, ...] = ()
    """More routing data: JSON or JSON-lines files of {"prompt", "dimension"} rows (as in `fit-router`)."""
    no_calibration: bool = False
    """Ablation: keep T = 1 (no fit); the metrics are still measured."""
    evaluation_sets: bool = True
    """Also route every item of the three evaluation sets by its request (sequence routers) and record, per set,
    the accuracy against the set's own dimension, the argmax counts and the mean gates at the fitted T."""
    max_length: int = 256
    """Longest prompt in tokens."""
    seed: int = 0
    """Seed of the prompt subsets."""


def calibrate(cfg: CalibrateConfig, backbone: Backbone | None = None, pooled_cache: dict | None = None) -> dict:
    """`trinityx calibrate`: write calibration.json and reliability diagrams; store T in mocae_config.json.

    `pooled_cache`: shared by calls that calibrate several sequence routers of one backbone (see
    `prompt_gate_logits`)."""
    run = Path(cfg.run)
    if not (run / "mocae_config.json").is_file():
        raise TrinityXError(f"--run {run} is not a MoCaE folder (no mocae_config.json); create it with `trinityx fit-router`")
    config = read_config(run)
    check_writable(run, "--run")  # calibration.json, the diagrams and the temperature are written into it
    backbone = backbone or load_backbone(cfg.backbone or config.backbone)
    model = MoCaEModel.from_pretrained(run, backbone.model)
    model.set_gating(temperature=1.0, gate_mode="learned")
    data_dir = data.resolve_data_dir(cfg.data_dir)
    order = {d: k for k, d in enumerate(model.config.expert_dims)}
    sets = {}
    for split, n in (("dev", cfg.fit_examples), ("test", cfg.test_examples)):
        # At most n prompts per dimension, drawn as fit-router draws its dev set (the same seed gives the same ones).
        prompts, labels, _ = routing_set(data_dir, split, cfg.routing_sources, cfg.routing_files, order, n, cfg.seed)
        sets[split] = (prompt_gate_logits(model, backbone, prompts, cfg.max_length, pooled_cache=pooled_cache), labels)
    report = calibration_report(*sets["dev"], *sets["test"])
    if cfg.no_calibration:
        report["temperature"] = 1.0
        report["after"] = report["before"]
    report.update({"no_calibration": cfg.no_calibration, "fit_split": "routing dev", "measure_split": "routing test",
                   "routing_sources": list(cfg.routing_sources), "routing_files": list(cfg.routing_files),
                   "dimensions": model.config.expert_dims, "seed": cfg.seed, "data_dir": str(data_dir)})
    T = report["temperature"]
    if cfg.evaluation_sets:
        report["evaluation_sets"] = route_evaluation_sets(model, backbone, data_dir, T, cfg.max_length, pooled_cache)
    logits_test, labels_test = sets["test"]
    reliability_diagram(torch.softmax(logits_test, -1), labels_test, run / "reliability_before.png",
                        title="router, T = 1 (test prompts)")
    reliability_diagram(torch.softmax(logits_test / T, -1), labels_test, run / "reliability_after.png",
                        title=f"router, T = {T:.2f} fitted on dev (test prompts)")
    write_json(run / "calibration.json", report)
    write_json(run / "mocae_config.json", asdict(replace(config, temperature=T)))
    for name, r in report.get("evaluation_sets", {}).items():
        print(f"routing of all {r['n']} {name} items: accuracy {r['accuracy']:.3f}, routed to {r['argmax_counts']}")
    print(f"router calibration on {len(labels_test)} test prompts: T = {T:.3f}; accuracy {report['accuracy']:.3f}; "
          f"ECE {report['before']['ece']:.4f} -> {report['after']['ece']:.4f}, Brier {report['before']['brier']:.4f} -> "
          f"{report['after']['brier']:.4f}, NLL {report['before']['nll']:.4f} -> {report['after']['nll']:.4f}")
    return report


def route_evaluation_sets(model: MoCaEModel, backbone: Backbone, data_dir: Path, temperature: float,
                          max_length: int, pooled_cache: dict | None = None) -> dict:
    """{set: routing summary} of a sequence router over every item of each evaluation set (gates at T). The
    router never saw these prompts (they are excluded from the routing data); this is how it routes them."""
    if model.config.router != "sequence":
        return {}
    out = {}
    for name, requests in data.evaluation_requests(data_dir).items():
        gates = torch.softmax(prompt_gate_logits(model, backbone, requests, max_length, pooled_cache=pooled_cache)
                              / temperature, -1)  # [N, K]
        out[name] = routing_summary([{"gates": g} for g in gates.tolist()], data.EVALUATION_SETS[name],
                                    list(model.config.expert_dims))
    return out


@dataclass
class GenerateConfig:
    """Answer a prompt with a MoCaE model and print the gates it used."""

    run: Path
    """A MoCaE folder."""
    prompt: tuple[str, ...]
    """One or more prompts (a batch)."""
    max_new_tokens: int = 128
    """Longest answer in tokens."""
    weights: tuple[float, ...] | None = None
    """Fixed expert weights instead of the router (negative values negate an expert)."""
    gate_mode: Literal["learned", "uniform", "top1"] | None = None
    """Override the routing: uniform gates (task arithmetic) or hard top-1."""
    backbone: str | None = None
    """Backbone (default: the one in mocae_config.json)."""


@torch.inference_mode()
def generate(cfg: GenerateConfig) -> list[dict]:
    run = Path(cfg.run)
    if cfg.max_new_tokens < 1:
        raise TrinityXError(f"--max-new-tokens must be at least 1, got {cfg.max_new_tokens}")
    config = read_config(run)
    if cfg.weights is not None and len(cfg.weights) != config.n_experts:
        raise TrinityXError(f"--weights has {len(cfg.weights)} values for the {config.n_experts} experts "
                            f"{config.expert_names}: give one per expert, in that order")
    backbone = load_backbone(cfg.backbone or config.backbone)
    model = MoCaEModel.from_pretrained(run, backbone.model)
    if cfg.weights is not None:
        model.set_gating(gate_mode="fixed", fixed_weights=list(cfg.weights))
    elif cfg.gate_mode:
        model.set_gating(gate_mode=cfg.gate_mode)
    tok = backbone.tokenizer
    enc = []
    for i, prompt in enumerate(cfg.prompt):
        ids = tok(format_prompt(tok, backbone.prompt_format, prompt), add_special_tokens=False).input_ids
        too_long = context_error(len(ids), cfg.max_new_tokens, backbone.model)
        if too_long:  # the rule `serve` applies: never cut a prompt silently
            raise TrinityXError(f"--prompt {i + 1}: {too_long}; shorten it or lower --max-new-tokens")
        enc.append(encode(tok, backbone.prompt_format, prompt, None, len(ids)))
    batch = collate(enc, tok.pad_token_id, padding_side="left")
    gates = model.gates(model.route(batch["input_ids"], batch["attention_mask"], batch["prompt_mask"]))
    out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=cfg.max_new_tokens,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    results = []
    for i, prompt in enumerate(cfg.prompt):
        answer = tok.decode(out[i, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        g = gates[i]  # [K]
        shown = ", ".join(f"{n}={v:.3f}" for n, v in zip(model.config.expert_names, g.tolist()))
        print(f"prompt: {prompt}\ngates: {shown}\nanswer: {answer}\n")
        results.append({"prompt": prompt, "answer": answer, "gates": dict(zip(model.config.expert_names, g.tolist()))})
    return results
