"""Experts: one LoRA adapter per dimension, trained by supervised fine-tuning with the prompt masked out."""

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro
from accelerate import PartialState
from peft import get_peft_model

from trinityx import data
from trinityx.backbones import DEFAULT_BACKBONE, Backbone, load_backbone
from trinityx.errors import TrinityXError
from trinityx.io import atomic_dir, to_jsonable, write_json
from trinityx.lora.adapters import lora_config
from trinityx.paths import check_writable
from trinityx.sft import Encoded, encode
from trinityx.train.loop import TrainConfig, fit, lm_loss_sum


@dataclass
class LoraSettings:
    """The LoRA shape every expert shares, so experts stack (Hu et al. 2021)."""

    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / r."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input during training."""

    def validate(self) -> None:
        if self.lora_rank < 1:
            raise TrinityXError(f"--lora-rank must be at least 1, got {self.lora_rank}")
        if not self.lora_alpha > 0:  # also catches nan
            raise TrinityXError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise TrinityXError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class ExpertConfig:
    """Train one expert: a LoRA adapter on one dimension's training split."""

    out: Path
    """Output folder: a PEFT adapter folder plus trinityx_config.json and train_log.json."""
    dimension: Literal["helpful", "harmless", "honest"] = "helpful"
    """Which dimension's data to train on."""
    backbone: str = DEFAULT_BACKBONE
    """A preset (smollm2-135m, gemma3-270m, llama2-7b, mistral-7b, gemma-7b, deepseek-7b), a model folder, a .gguf file or a hub id."""
    data_dir: str | None = None
    """Folder laid out like ../shared/data (default: $TRINITYX_DATA_DIR)."""
    source: Literal["local", "hub"] = "local"
    """Read the data from --data-dir (local) or from the Hugging Face Hub (hub)."""
    max_train_examples: int | None = None
    """Use at most this many training examples (a seeded subset); None uses all."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype (float32 on CPU: bf16 matmuls are very slow there)."""
    overwrite: bool = False
    """Replace an existing output folder."""
    lora: Annotated[LoraSettings, tyro.conf.OmitArgPrefixes] = field(default_factory=LoraSettings)
    train: Annotated[TrainConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=TrainConfig)


def encode_examples(backbone: Backbone, examples: list[data.SFTExample], max_length: int) -> list[Encoded]:
    dims = {d: i for i, d in enumerate(data.DIMENSIONS)}
    return [encode(backbone.tokenizer, backbone.prompt_format, e.prompt, e.response, max_length, dims[e.dimension])
            for e in examples]


def subsample(examples: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(examples):
        return examples
    generator = torch.Generator().manual_seed(seed)
    return [examples[i] for i in torch.randperm(len(examples), generator=generator)[:n].tolist()]


def lm_loss_fn(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss_sum, n = lm_loss_sum(logits, batch["labels"])
    return loss_sum, n, {}


def partial_dir(out: Path) -> Path:
    """Where an unfinished run keeps its checkpoint, beside the output folder, so `out` only ever appears whole."""
    return out.with_name(f".{out.name}.partial")


RUN_INDEPENDENT = ("started", "overwrite", "backbone_loaded_from")
"""Fields of a recorded config that do not change the trained weights (a resume ignores them)."""


def examples_digest(examples: list[Encoded]) -> str:
    """sha256 of the tokenised examples: the data a run trains on, whatever folder or subset it came from."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.input_ids, e.labels]).encode())
    return digest.hexdigest()


def lora_model(backbone: Backbone, lora: LoraSettings, seed: int):
    """(PEFT model, its trainable parameters by name): a fresh, seeded LoRA on the backbone's targets."""
    torch.manual_seed(seed)
    peft_config = lora_config(backbone.lora_targets, lora.lora_rank, lora.lora_alpha, lora.lora_dropout)
    model = get_peft_model(backbone.model, peft_config)
    return model, {n: p for n, p in model.named_parameters() if p.requires_grad}


def train_lora(backbone: Backbone, train: list[data.SFTExample], dev: list[data.SFTExample], lora: LoraSettings,
               cfg: TrainConfig, out: Path, extra_config: dict, desc: str) -> dict:
    """Fit one LoRA adapter on SFT examples and write it to `out` atomically; returns the training log."""
    model, params = lora_model(backbone, lora, cfg.seed)
    train_enc = encode_examples(backbone, train, cfg.max_length)
    dev_enc = encode_examples(backbone, dev[: cfg.dev_examples], cfg.max_length)
    work = partial_dir(out)
    # What else the weights depend on, so a checkpoint of another configuration is never resumed (`fit` adds `cfg`).
    config = {k: v for k, v in extra_config.items() if k not in (*RUN_INDEPENDENT, "train")}
    run = {"config": config, "lora": asdict(lora), "examples": examples_digest(train_enc + dev_enc)}
    log = fit(model, params, lm_loss_fn, train_enc, dev_enc, cfg, work, backbone.tokenizer.pad_token_id, desc=desc,
              run=run)
    log["train_examples"] = len(train_enc)
    log["dev_examples"] = len(dev_enc)
    state = PartialState()
    if state.is_main_process:  # under `accelerate launch`, only the main process writes
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            write_json(tmp / "trinityx_config.json", extra_config)
            write_json(tmp / "train_log.json", log)
        shutil.rmtree(work, ignore_errors=True)
    state.wait_for_everyone()
    # Leave the backbone as it was found: other experts are trained on the same loaded model.
    backbone.model = model.unload()
    return log


def train_expert(cfg: ExpertConfig, backbone: Backbone | None = None) -> dict:
    """`trinityx train-expert`: train the expert of one dimension and write its adapter folder."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise TrinityXError(f"--out {out} already exists; pass --overwrite to replace it or choose another folder")
    check_writable(out, "--out")
    cfg.lora.validate()
    cfg.train.validate()
    data_dir = data.resolve_data_dir(cfg.data_dir) if cfg.source == "local" else None
    train = data.load_sft(cfg.dimension, data_dir, "train", source=cfg.source)
    dev = data.load_sft(cfg.dimension, data_dir, "dev", source=cfg.source)
    train = subsample(train, cfg.max_train_examples, cfg.train.seed)
    dev = subsample(dev, cfg.train.dev_examples, cfg.train.seed)
    if backbone is None:
        backbone = load_backbone(cfg.backbone, cfg.dtype)
    resolved = {"command": "train-expert", **to_jsonable(asdict(cfg)), "data_dir": str(data_dir),
                "backbone_loaded_from": backbone.loaded_from, "prompt_format": backbone.prompt_format,
                "lora_targets": list(backbone.lora_targets), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    log = train_lora(backbone, train, dev, cfg.lora, cfg.train, out, resolved, desc=f"expert:{cfg.dimension}")
    PartialState().print(f"expert:{cfg.dimension}: dev loss {log['dev_loss_before']:.4f} -> {log['dev_loss_after']:.4f} "
          f"({log['tokens_per_s']:.0f} tokens/s) -> {out}")
    return log


@dataclass
class ExpertsConfig:
    """Train the expert of every dimension on one loaded backbone (the README's main job until the pipeline)."""

    out: Path
    """Output folder; each expert goes to OUT/<dimension>/ and a summary to OUT/experts_summary.json."""
    dimensions: tuple[Literal["helpful", "harmless", "honest"], ...] = data.DIMENSIONS
    """Dimensions to train, in order."""
    backbone: str = DEFAULT_BACKBONE
    """A preset, a model folder, a .gguf file or a hub id."""
    data_dir: str | None = None
    """Folder laid out like ../shared/data (default: $TRINITYX_DATA_DIR)."""
    source: Literal["local", "hub"] = "local"
    """Read the data from --data-dir (local) or from the Hugging Face Hub (hub)."""
    max_train_examples: int | None = None
    """Use at most this many training examples per dimension; None uses all."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype."""
    lora: Annotated[LoraSettings, tyro.conf.OmitArgPrefixes] = field(default_factory=LoraSettings)
    train: Annotated[TrainConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=TrainConfig)


def train_experts(cfg: ExpertsConfig) -> dict:
    """`trinityx train-experts`: one expert per dimension; finished experts are kept, not retrained."""
    out = Path(cfg.out)
    check_writable(out, "--out")
    cfg.lora.validate()
    cfg.train.validate()
    backbone = load_backbone(cfg.backbone, cfg.dtype)
    print(f"backbone {cfg.backbone}: loaded from {backbone.loaded_from} in {backbone.load_seconds:.1f} s")
    summary = {"backbone": cfg.backbone, "backbone_load_seconds": backbone.load_seconds,
               "backbone_loaded_from": backbone.loaded_from, "experts": {}}
    for dimension in cfg.dimensions:
        folder = out / dimension
        if (folder / "train_log.json").is_file():
            print(f"expert:{dimension}: already trained in {folder}, kept")
            log = json.loads((folder / "train_log.json").read_text())
        else:
            expert = ExpertConfig(out=folder, dimension=dimension, backbone=cfg.backbone, data_dir=cfg.data_dir,
                                  source=cfg.source, max_train_examples=cfg.max_train_examples, dtype=cfg.dtype,
                                  lora=cfg.lora, train=cfg.train)
            log = train_expert(expert, backbone)
        summary["experts"][dimension] = {
            "dev_loss_base": log["dev_loss_before"], "dev_loss_expert": log["dev_loss_after"],
            "tokens_per_s": log["tokens_per_s"], "steps": len(log["steps"]), "train_examples": log["train_examples"],
        }
    write_json(out / "experts_summary.json", summary)
    print(f"{'expert':<10} {'dev loss base':>14} {'dev loss expert':>16} {'tokens/s':>9}")
    for dimension, row in summary["experts"].items():
        print(f"{dimension:<10} {row['dev_loss_base']:>14.4f} {row['dev_loss_expert']:>16.4f} {row['tokens_per_s']:>9.0f}")
    return summary
