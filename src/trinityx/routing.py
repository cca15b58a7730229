"""Commands around the MoCaE router: `fit-router`, `calibrate`, `generate`.

The router is trained with the one training loop (`trinityx.train.fit`) on the mixed HHH data; its
loss is the LM loss plus the router terms of `mocae.objective` (GL, RL, entropy, step KL).
"""

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro
from safetensors.torch import save_file

from trinityx import data
from trinityx.backbones import DEFAULT_BACKBONE, Backbone, load_backbone
from trinityx.errors import TrinityXError
from trinityx.experts import encode_examples, partial_dir, subsample, to_jsonable
from trinityx.io import write_json
from trinityx.mocae import MoCaEConfig, MoCaEModel
from trinityx.mocae.calibration import calibration_report, reliability_diagram
from trinityx.mocae.layer import MixtureLinear
from trinityx.mocae.objective import mean_gate, router_objective
from trinityx.sft import collate, encode
from trinityx.train import TrainConfig, fit, lm_loss_sum


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
    head_hidden: int = 0
    """Router head MLP width (0 = a linear head)."""
    gamma: tuple[float, ...] | None = None
    """Prior over experts for RL; default uniform (the pipeline passes the reference task-vector gamma)."""
    train_experts: bool = False
    """Also train the experts' LoRA weights jointly with the router."""
    per_dimension: int | None = 200
    """Training examples per dimension (seeded subset); None uses all."""
    overwrite: bool = False
    """Replace an existing output folder."""
    loss: Annotated[RouterLoss, tyro.conf.OmitArgPrefixes] = field(default_factory=RouterLoss)
    train: Annotated[TrainConfig, tyro.conf.OmitArgPrefixes] = field(
        default_factory=lambda: TrainConfig(max_steps=40, lr=2e-3, warmup_steps=4, eval_every=20, dev_examples=48))


def expert_folders(experts: Path, dimensions) -> list[Path]:
    folders = [Path(experts) / d for d in dimensions]
    for f in folders:
        if not (f / "adapter_config.json").is_file():
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
                         pool_layer=cfg.pool_layer, head_hidden=cfg.head_hidden)
    return MoCaEModel(backbone.model, folders, config)


def save_trained_experts(model: MoCaEModel, folder: Path) -> None:
    """Write jointly trained expert weights back into folder/experts/<name>/ as PEFT adapters."""
    names = [n for n, m in model.backbone.named_modules() if isinstance(m, MixtureLinear)]
    for k, expert in enumerate(model.config.expert_names):
        tensors = {}
        for name in names:
            layer = model.backbone.get_submodule(name)
            tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A[k].detach().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B[k].detach().contiguous()
        save_file(tensors, folder / "experts" / expert / "adapter_model.safetensors")


def fit_router(cfg: RouterConfig, backbone: Backbone | None = None) -> dict:
    """`trinityx fit-router`: train the router (and optionally the experts) and save a MoCaE folder."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise TrinityXError(f"--out {out} already exists; pass --overwrite to replace it or choose another folder")
    if cfg.gamma is not None and len(cfg.gamma) != len(cfg.dimensions):
        raise TrinityXError(f"--gamma has {len(cfg.gamma)} values for {len(cfg.dimensions)} experts")
    folders = expert_folders(cfg.experts, cfg.dimensions)
    data_dir = data.resolve_data_dir(cfg.data_dir)
    backbone = backbone or load_backbone(cfg.backbone)
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
    log = fit(model, params, router_loss_fn(gamma / gamma.sum(), cfg.loss.as_dict()), train_enc, dev_enc, cfg.train,
              partial_dir(out), backbone.tokenizer.pad_token_id, desc=f"router:{cfg.router}")
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


@torch.no_grad()
def prompt_gate_logits(model: MoCaEModel, backbone: Backbone, prompts: list[str], max_length: int,
                       batch_size: int = 16, pooled_cache: dict | None = None) -> torch.Tensor:
    """Router logits [N, K] of prompts alone (what the router sees at inference).

    `pooled_cache`: a dict shared by calls that score several sequence routers of one backbone on the same
    prompts; each distinct (pool layer, normalisation, prompts) routing pass then runs once."""
    def batches():
        for s in range(0, len(prompts), batch_size):
            enc = [encode(backbone.tokenizer, backbone.prompt_format, p, None, max_length)
                   for p in prompts[s:s + batch_size]]
            batch = collate(enc, backbone.tokenizer.pad_token_id, padding_side="left")
            yield batch["input_ids"], batch["attention_mask"], batch["prompt_mask"]

    if model.config.router != "sequence" or pooled_cache is None:
        return torch.cat([model.route(*batch) for batch in batches()])  # [N, K]
    key = (model.config.pool_layer, model.config.normalize_hidden, max_length, batch_size, tuple(prompts))
    if key not in pooled_cache:
        pooled_cache[key] = torch.cat([model.pooled_prompt(*batch) for batch in batches()])  # [N, D]
    return model.router(pooled_cache[key])  # [N, K]


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
    """Dev-split prompts per dimension used to fit T."""
    test_examples: int = 150
    """Test-split prompts per dimension used to measure calibration before and after."""
    no_calibration: bool = False
    """Ablation: keep T = 1 (no fit); the metrics are still measured."""
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
    config = json.loads((run / "mocae_config.json").read_text())
    backbone = backbone or load_backbone(cfg.backbone or config["backbone"])
    model = MoCaEModel.from_pretrained(run, backbone.model)
    model.set_gating(temperature=1.0, gate_mode="learned")
    data_dir = data.resolve_data_dir(cfg.data_dir)
    order = {d: k for k, d in enumerate(model.config.expert_dims)}
    sets = {}
    for split, n in (("dev", cfg.fit_examples), ("test", cfg.test_examples)):
        prompts, labels = labelled_prompts(data.load_mixture(data_dir, split, per_dimension=None), order)
        chosen = []
        for k in range(len(order)):  # a balanced subset: n prompts per dimension
            idx = (labels == k).nonzero().flatten()
            chosen += idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(cfg.seed))[:n]].tolist()
        logits = prompt_gate_logits(model, backbone, [prompts[i] for i in chosen], cfg.max_length,
                                    pooled_cache=pooled_cache)
        sets[split] = (logits, labels[chosen])
    report = calibration_report(*sets["dev"], *sets["test"])
    if cfg.no_calibration:
        report["temperature"] = 1.0
        report["after"] = report["before"]
    report.update({"no_calibration": cfg.no_calibration, "fit_split": "dev", "measure_split": "test",
                   "dimensions": model.config.expert_dims, "seed": cfg.seed, "data_dir": str(data_dir)})
    T = report["temperature"]
    logits_test, labels_test = sets["test"]
    reliability_diagram(torch.softmax(logits_test, -1), labels_test, run / "reliability_before.png",
                        title="router, T = 1 (test prompts)")
    reliability_diagram(torch.softmax(logits_test / T, -1), labels_test, run / "reliability_after.png",
                        title=f"router, T = {T:.2f} fitted on dev (test prompts)")
    write_json(run / "calibration.json", report)
    config["temperature"] = T
    write_json(run / "mocae_config.json", config)
    print(f"router calibration on {len(labels_test)} test prompts: T = {T:.3f}; accuracy {report['accuracy']:.3f}; "
          f"ECE {report['before']['ece']:.4f} -> {report['after']['ece']:.4f}, Brier {report['before']['brier']:.4f} -> "
          f"{report['after']['brier']:.4f}, NLL {report['before']['nll']:.4f} -> {report['after']['nll']:.4f}")
    return report


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
    if not (run / "mocae_config.json").is_file():
        raise TrinityXError(f"--run {run} is not a MoCaE folder (no mocae_config.json)")
    config = json.loads((run / "mocae_config.json").read_text())
    backbone = load_backbone(cfg.backbone or config["backbone"])
    model = MoCaEModel.from_pretrained(run, backbone.model)
    if cfg.weights is not None:
        model.set_gating(gate_mode="fixed", fixed_weights=list(cfg.weights))
    elif cfg.gate_mode:
        model.set_gating(gate_mode=cfg.gate_mode)
    tok = backbone.tokenizer
    enc = [encode(tok, backbone.prompt_format, p, None, 1024) for p in cfg.prompt]
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
