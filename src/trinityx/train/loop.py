"""The one training loop, shared by expert and router training.

Forward, backward, accumulate, clip, step, schedule, evaluate, log, checkpoint: in that order, top to
bottom, on Hugging Face Accelerate (devices and processes), without a Trainer that hides the loop.
"""

import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from trinityx.errors import TrinityXError
from trinityx.io import atomic_dir, write_json
from trinityx.sft import IGNORE, Encoded, collate, global_batch_order

# loss_fn(model, batch) -> (summed token loss, number of target tokens, extra scalar metrics)
LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor, dict]]


@dataclass
class TrainConfig:
    """Optimisation settings shared by expert and router training."""

    max_steps: int = 100
    """Optimiser steps to run."""
    batch_size: int = 8
    """Examples per optimiser step (the global batch, over all processes and accumulation)."""
    micro_batch_size: int = 8
    """Examples per forward pass; batch_size / micro_batch_size is the gradient accumulation."""
    lr: float = 2e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warm-up steps before the cosine decay (to 10% of the peak)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 turns clipping off)."""
    max_length: int = 256
    """Longest tokenised example; longer ones are cut (prompt end and response start are kept)."""
    eval_every: int = 50
    """Evaluate the dev loss every N steps (and before and after training)."""
    dev_examples: int = 64
    """Dev examples used for the dev loss."""
    checkpoint_every: int = 25
    """Write a resumable checkpoint every N steps (0 = never)."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding, same results in expectation)."""
    seed: int = 0
    """Seed of the data order, the adapter initialisation and dropout."""

    def validate(self) -> None:
        for flag in ("max_steps", "batch_size", "micro_batch_size", "max_length", "eval_every", "dev_examples"):
            if getattr(self, flag) <= 0:
                raise TrinityXError(f"--{flag.replace('_', '-')} must be positive, got {getattr(self, flag)}")
        if self.batch_size % self.micro_batch_size:
            raise TrinityXError(
                f"--batch-size ({self.batch_size}) must be a multiple of --micro-batch-size ({self.micro_batch_size})"
            )
        if not self.lr > 0:  # also catches nan
            raise TrinityXError(f"--lr must be positive, got {self.lr}")


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over target tokens, and their count (IGNORE labels skipped)."""
    shift_logits = logits[:, :-1].float()  # [B, T-1, V]
    shift_labels = labels[:, 1:]  # [B, T-1]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, (shift_labels != IGNORE).sum()


def cosine_with_warmup(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to `floor` (as in nanoGPT)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate_loss(model, loss_fn: LossFn, batches: list[dict], accelerator: Accelerator) -> float:
    """Token-weighted mean loss over `batches` (this process' share), reduced over the processes.

    The forward passes run on the unwrapped model without gradients: a DDP-wrapped forward may broadcast
    buffers (a collective), which would hang when the processes hold different numbers of dev batches.
    """
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    bare = accelerator.unwrap_model(model)
    with torch.no_grad():
        for batch in batches:
            loss_sum, n, _ = loss_fn(bare, {k: v.to(accelerator.device) for k, v in batch.items()})
            total += loss_sum
            count += n
    model.train()
    total, count = accelerator.reduce(total), accelerator.reduce(count)
    return (total / count.clamp(min=1)).item()


def run_identity(cfg: TrainConfig, run: dict) -> dict:
    """What a checkpoint's weights depend on: the training settings (not how often checkpoints are written) and
    the caller's `run` (data, LoRA shape, backbone...). A checkpoint resumes only under the same identity."""
    return to_plain({"train": {k: v for k, v in asdict(cfg).items() if k != "checkpoint_every"}, **run})


def to_plain(obj):
    """A JSON round trip, so an identity compares equal to the one read back from state.json."""
    return json.loads(json.dumps(obj, default=str))


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out


def _save_checkpoint(folder: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer, history: dict,
                     identity: dict) -> None:
    # Everything a resumed run needs, in safetensors + JSON (no pickles): trainable weights, AdamW moments,
    # the RNG state (dropout), and the log so far. The data order is a function of (seed, step). The identity
    # says which configuration the weights belong to.
    state = optimizer.state_dict()
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    for idx, s in state["state"].items():
        for key, value in s.items():
            tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
    tensors["rng.torch"] = torch.get_rng_state()
    with atomic_dir(folder / "checkpoint") as tmp:
        save_file(tensors, tmp / "state.safetensors")
        write_json(tmp / "state.json", {"step": step, "param_groups": state["param_groups"], "history": history,
                                        "identity": identity})


def _load_checkpoint(folder: Path, params: dict[str, torch.nn.Parameter], optimizer, identity: dict) -> tuple[int, dict]:
    checkpoint = folder / "checkpoint"
    try:
        meta = json.loads((checkpoint / "state.json").read_text())
        tensors = load_file(checkpoint / "state.safetensors")
    except (OSError, ValueError, SafetensorError) as e:  # a truncated or garbled file
        raise TrinityXError(f"the training checkpoint in {checkpoint} cannot be read ({e}); delete {folder} to "
                            "start this training from scratch") from None
    if "identity" not in meta:
        # Written before checkpoints recorded their configuration: a run killed then resumes as it used to.
        print(f"note: the training checkpoint in {checkpoint} records no configuration; resuming it as this one")
    elif meta["identity"] != identity:
        changed = _differences(meta["identity"], identity)
        raise TrinityXError(f"the training checkpoint in {checkpoint} was written by a run with another configuration "
                            f"({'; '.join(changed[:6])}); rerun with the checkpoint's settings to resume it, or "
                            f"delete {folder} to start fresh with these")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    optim_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            optim_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": optim_state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return meta["step"], meta["history"]


def fit(model: torch.nn.Module, params: dict[str, torch.nn.Parameter], loss_fn: LossFn, train: list[Encoded],
        dev: list[Encoded], cfg: TrainConfig, work_dir: Path, pad_id: int, desc: str = "train",
        run: dict | None = None) -> dict:
    """Train `params` of `model` on `train` for cfg.max_steps optimiser steps; returns the training log.

    Resumes from `work_dir/checkpoint` when one exists and was written under the same `cfg` and `run` (the rest
    of the configuration the weights depend on; see `run_identity`); the resumed run ends with the same weights
    as an uninterrupted one. The loss of a step is the summed token loss over the whole global batch divided by
    its number of target tokens, so accumulation and process count do not change the gradient.
    """
    cfg.validate()
    if len(train) < cfg.batch_size:
        raise TrinityXError(f"the training set has {len(train)} examples, fewer than --batch-size {cfg.batch_size}")
    if not dev:
        raise TrinityXError("the dev set is empty; the dev loss cannot be measured")
    accelerator = Accelerator()
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.micro_batch_size * world > cfg.batch_size or cfg.batch_size % (cfg.micro_batch_size * world):
        raise TrinityXError(
            f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size x processes "
            f"({cfg.micro_batch_size} x {world})"
        )
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, cfg.warmup_steps, cfg.max_steps)
    )
    model, optimizer = accelerator.prepare(model, optimizer)

    work_dir = Path(work_dir)
    identity = run_identity(cfg, run or {})
    start_step, history = 0, {"steps": [], "dev": []}
    if (work_dir / "checkpoint").is_dir():
        start_step, history = _load_checkpoint(work_dir, params, optimizer, identity)
        accelerator.print(f"resuming {desc} from step {start_step}")
    with warnings.catch_warnings():  # fast-forwarding the schedule on resume is not a misordered step
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        for _ in range(start_step):
            scheduler.step()

    mine = dev[rank::world]  # every process evaluates its share of the dev examples (possibly none)
    dev_batches = [collate(mine[i:i + cfg.micro_batch_size], pad_id) for i in range(0, len(mine), cfg.micro_batch_size)]
    if start_step == 0:
        history["dev"].append({"step": 0, "loss": evaluate_loss(model, loss_fn, dev_batches, accelerator)})

    lengths = [len(e.input_ids) for e in train]
    targets = [sum(label != IGNORE for label in e.labels[1:]) for e in train]  # tokens lm_loss_sum counts
    steps_per_epoch = len(train) // cfg.batch_size
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc=desc, unit="step", disable=not accelerator.is_main_process)
    model.train()
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        epoch, index = divmod(step, steps_per_epoch)
        batch_ids = global_batch_order(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length)[index]
        mine = batch_ids[rank::world]  # this process's share of the global batch
        micro = [collate([train[i] for i in mine[s:s + cfg.micro_batch_size]], pad_id)
                 for s in range(0, len(mine), cfg.micro_batch_size)]
        # Normalise by the global batch's target tokens so the gradient does not depend on how it is split.
        n_target = sum(targets[i] for i in batch_ids)
        tokens = sum(len(train[i].input_ids) for i in batch_ids)
        step_loss, extras = 0.0, {}
        for j, batch in enumerate(micro):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            sync = j == len(micro) - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                loss_sum, _, metrics = loss_fn(model, batch)
                # DDP averages gradients over processes; multiply by `world` so the sum stays a global sum.
                accelerator.backward(loss_sum * world / max(1, n_target))
            step_loss += loss_sum.item() / max(1, n_target)
            for k, v in metrics.items():
                extras[k] = extras.get(k, 0.0) + float(v) / len(micro)
        grad_norm = accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        loss_total = accelerator.reduce(torch.tensor(step_loss, device=accelerator.device)).item()
        seconds = time.perf_counter() - t0
        record = {"step": step + 1, "loss": loss_total, "lr": scheduler.get_last_lr()[0],
                  "grad_norm": None if grad_norm is None else float(grad_norm), "tokens": tokens,
                  "seconds": seconds, "tokens_per_s": tokens / seconds, **extras}
        history["steps"].append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_total:.3f}", tok_s=f"{tokens / seconds:.0f}")
        last = step + 1 == cfg.max_steps
        if (step + 1) % cfg.eval_every == 0 or last:
            dev_loss = evaluate_loss(model, loss_fn, dev_batches, accelerator)
            history["dev"].append({"step": step + 1, "loss": dev_loss})
            bar.write(f"{desc} step {step + 1}: dev loss {dev_loss:.4f}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and not last:
            if accelerator.is_main_process:
                _save_checkpoint(work_dir, step + 1, params, optimizer, history, identity)
            accelerator.wait_for_everyone()
    bar.close()

    steps = history["steps"]
    seconds = sum(s["seconds"] for s in steps)
    return {
        "config": asdict(cfg),
        "processes": world,
        "dev_loss_before": history["dev"][0]["loss"],
        "dev_loss_after": history["dev"][-1]["loss"],
        "tokens_per_s": sum(s["tokens"] for s in steps) / seconds if seconds else None,
        "train_seconds": seconds,
        "resumed_from_step": start_step,
        **history,
    }


def remove_checkpoints(work_dir: Path) -> None:
    shutil.rmtree(Path(work_dir) / "checkpoint", ignore_errors=True)
