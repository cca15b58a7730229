"""`trinityx bench train`: expert-training throughput against the plain Hugging Face Trainer + PEFT.

(`trinityx bench inference` is `bench/inference.py`, `trinityx bench serve` is `bench/serve.py`, each with its own
config.)

Both run in this one process on the same backbone, data, LoRA shape, batch and sequence length. Throughput
counts real (non-pad) tokens per second of optimiser steps, the first step of each system is a warm-up and
is not counted. The table is for people, the last line (JSON) for programs.
"""

import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from trinityx import data
from trinityx.backbones import DEFAULT_BACKBONE, load_backbone
from trinityx.sft import collate
from trinityx.train.experts import LoraSettings, encode_examples, lm_loss_fn, lora_model
from trinityx.train.loop import TrainConfig, fit


@dataclass
class BenchTrainConfig:
    """Expert-training throughput: trinityx's loop against the HF Trainer + PEFT, a table and a final JSON line."""

    backbone: str = DEFAULT_BACKBONE
    """Backbone preset, folder, .gguf or hub id."""
    data_dir: str | None = None
    """Folder laid out like ../shared/data (default: $TRINITYX_DATA_DIR)."""
    dimension: Literal["helpful", "harmless", "honest"] = "helpful"
    """Whose training data to use."""
    steps: int = 6
    """Measured optimiser steps per system (plus one warm-up step)."""
    batch_size: int = 8
    """Examples per step."""
    max_length: int = 256
    """Longest example in tokens."""
    threads: int | None = None
    """torch threads (default: torch's choice)."""


def _bench_trinityx(backbone, train, dev, lora, cfg: TrainConfig) -> dict:
    model, params = lora_model(backbone, lora, cfg.seed)
    with tempfile.TemporaryDirectory() as work:
        log = fit(model, params, lm_loss_fn, train, dev, cfg, Path(work), backbone.tokenizer.pad_token_id, desc="trinityx")
    backbone.model = model.unload()
    steps = log["steps"][1:]
    return {"tokens": sum(s["tokens"] for s in steps), "seconds": sum(s["seconds"] for s in steps),
            "final_loss": log["steps"][-1]["loss"]}


def _bench_hf_trainer(backbone, train, lora, cfg: TrainConfig) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, _ = lora_model(backbone, lora, cfg.seed)
    pad = backbone.tokenizer.pad_token_id
    batch_tokens: list[int] = []
    step_seconds: list[float] = []

    def collator(rows):
        batch = collate([train[r["i"]] for r in rows], pad)
        batch_tokens.append(int(batch["attention_mask"].sum()))
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_seconds.append(time.perf_counter() - self.t0)

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf-trainer-"), per_device_train_batch_size=cfg.batch_size,
        max_steps=cfg.max_steps, learning_rate=cfg.lr, warmup_steps=cfg.warmup_steps, lr_scheduler_type="cosine",
        max_grad_norm=cfg.max_grad_norm, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        remove_unused_columns=False, dataloader_num_workers=0, seed=cfg.seed, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=[{"i": i} for i in range(len(train))],
                      data_collator=collator, callbacks=[Clock()])
    trainer.train()
    backbone.model = model.unload()
    # The collator may run ahead of the steps (prefetch); step i consumed batch i.
    n = len(step_seconds)
    return {"tokens": sum(batch_tokens[1:n]), "seconds": sum(step_seconds[1:n]),
            "final_loss": trainer.state.log_history[-2].get("loss") if len(trainer.state.log_history) > 1 else None}


def bench_train(cfg: BenchTrainConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data_dir = data.resolve_data_dir(cfg.data_dir)
    backbone = load_backbone(cfg.backbone)
    examples = data.load_sft(cfg.dimension, data_dir, "train")
    dev = encode_examples(backbone, data.load_sft(cfg.dimension, data_dir, "dev")[:8], cfg.max_length)
    train = encode_examples(backbone, examples, cfg.max_length)
    lora = LoraSettings()
    base = TrainConfig(max_steps=cfg.steps + 1, batch_size=cfg.batch_size, micro_batch_size=cfg.batch_size,
                       max_length=cfg.max_length, eval_every=10_000, checkpoint_every=0, warmup_steps=1)
    rows = {
        "hf-trainer+peft": _bench_hf_trainer(backbone, train, lora, base),
        "trinityx": _bench_trinityx(backbone, train, dev, lora, replace(base, group_by_length=False)),
        "trinityx+length-grouping": _bench_trinityx(backbone, train, dev, lora, base),
    }
    for row in rows.values():
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        row["s_per_step"] = row["seconds"] / cfg.steps
    ref = rows["hf-trainer+peft"]["tokens_per_s"]
    print(f"\nbench train: {cfg.backbone}, {cfg.dimension} data, batch {cfg.batch_size} x <= {cfg.max_length} tokens, "
          f"{cfg.steps} measured steps after 1 warm-up, {torch.get_num_threads()} threads")
    print(f"{'system':<26} {'tokens/s':>9} {'s/step':>7} {'vs trainer':>10}")
    for name, row in rows.items():
        print(f"{name:<26} {row['tokens_per_s']:>9.0f} {row['s_per_step']:>7.2f} {row['tokens_per_s'] / ref:>9.2f}x")
    result = {"bench": "train", "backbone": cfg.backbone, "batch_size": cfg.batch_size, "max_length": cfg.max_length,
              "steps": cfg.steps, "systems": rows}
    print(json.dumps(result))
    return result
