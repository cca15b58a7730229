"""`trinityx export`: a MoCaE folder as artifacts other servers load.

- `merged`: one fixed mixture folded into the backbone's weights, `W' = W + Σ_k g_k (alpha/r) B_k A_k` in every
  adapted layer (docs/design.md, "MoCaE"), saved as a standard Hugging Face model folder with its tokenizer. It
  loads with plain `AutoModelForCausalLM` (and so with vLLM, TGI, or llama.cpp's `convert_hf_to_gguf.py`) and
  computes exactly what the MoCaE model computes with those gates fixed. The mixture is `--weights`, or the
  router's gates for `--prompt`, or uniform (1/K, task arithmetic).
- `peft`: the experts as they are (PEFT LoRA folders, so vLLM's multi-LoRA serving takes them), the router
  (router.safetensors + mocae_config.json, so the folder is itself a MoCaE folder), and a README.md with the
  commands to serve them and to rebuild a mixture as one LoRA (the exact linear merge of `taskvectors.merge`).

Legend: K experts, R rank, D hidden (D_in, D_out).
"""

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from trinityx.backbones import load_backbone
from trinityx.errors import TrinityXError
from trinityx.io import atomic_dir, write_json
from trinityx.lora.adapters import read_adapter_config
from trinityx.mocae import MoCaEModel
from trinityx.mocae.model import read_config as read_mocae_config
from trinityx.paths import check_writable
from trinityx.sft import collate, encode


@dataclass
class ExportConfig:
    """Export a MoCaE folder: a merged Hugging Face model of one mixture, or the experts as PEFT adapters + router."""

    run: Path
    """A MoCaE folder (experts/, router.safetensors, mocae_config.json)."""
    format: Literal["merged", "peft"]
    """merged: one mixture folded into the weights; peft: the experts as PEFT adapters, the router, a README."""
    out: Path
    """Output folder (written atomically)."""
    weights: tuple[float, ...] | None = None
    """Mixture weights, one per expert in mocae_config.json order (negative values negate an expert)."""
    prompt: str | None = None
    """Use the router's gates for this prompt as the mixture (instead of --weights)."""
    backbone: str | None = None
    """Backbone (default: the one named in mocae_config.json)."""
    overwrite: bool = False
    """Replace an existing output folder."""


@torch.no_grad()
def prompt_gates(model: MoCaEModel, tokenizer, prompt_format: str, prompt: str) -> torch.Tensor:
    """The gates [K] the router gives `prompt` (under the folder's gate mode and temperature)."""
    batch = collate([encode(tokenizer, prompt_format, prompt, None, 4096)], tokenizer.pad_token_id, "left")
    return model.gates(model.route(batch["input_ids"], batch["attention_mask"], batch["prompt_mask"]))[0]


def read_config(run: Path) -> dict:
    """RUN/mocae_config.json, validated (expert names are plain names: each is copied from and to experts/<name>/)."""
    return asdict(read_mocae_config(run))


def check(cfg: ExportConfig, names: list[str]) -> None:
    if cfg.weights is not None and cfg.prompt is not None:
        raise TrinityXError("give --weights or --prompt, not both")
    if cfg.weights is not None and len(cfg.weights) != len(names):
        raise TrinityXError(f"--weights has {len(cfg.weights)} values for the {len(names)} experts {names}")
    if Path(cfg.out).exists() and not cfg.overwrite:
        raise TrinityXError(f"--out {cfg.out} already exists; pass --overwrite to replace it or choose another folder")
    if Path(cfg.out).resolve() == Path(cfg.run).resolve():
        raise TrinityXError("--out is the --run folder; export to another folder")
    check_writable(cfg.out, "--out")


def export(cfg: ExportConfig) -> Path:
    """`trinityx export`: write the merged model or the PEFT export; returns the output folder."""
    run = Path(cfg.run)
    config = read_config(run)
    names = config["expert_names"]
    check(cfg, names)
    if cfg.format == "peft" and cfg.prompt is None:
        weights = list(cfg.weights) if cfg.weights is not None else [1.0 / len(names)] * len(names)
        source = "weights" if cfg.weights is not None else "uniform"
        return write_peft(run, Path(cfg.out), config, weights, source, cfg)
    backbone = load_backbone(cfg.backbone or config["backbone"])
    model = MoCaEModel.from_pretrained(run, backbone.model)
    if cfg.weights is not None:
        gates, source = torch.tensor(cfg.weights, dtype=torch.float32), "weights"
    elif cfg.prompt is not None:
        gates, source = prompt_gates(model, backbone.tokenizer, backbone.prompt_format, cfg.prompt), "prompt"
    else:
        gates, source = torch.full((len(names),), 1.0 / len(names)), "uniform"
    weights = [round(g, 6) for g in gates.tolist()]
    if cfg.format == "peft":
        return write_peft(run, Path(cfg.out), config, weights, source, cfg)
    plain = model.merge_and_unload(gates)  # every adapted layer W + Σ_k g_k s B_k A_k; no hooks left
    record = export_record(run, config, weights, source, cfg)
    with atomic_dir(cfg.out) as tmp:
        plain.save_pretrained(tmp)
        backbone.tokenizer.save_pretrained(tmp)
        write_json(tmp / "trinityx_export.json", record)
        (tmp / "README.md").write_text(MERGED_README.format(
            backbone=config["backbone"], mixture=mixture_text(names, weights), source=source, out=cfg.out))
    print(f"exported the mixture {mixture_text(names, weights)} ({source}) folded into {config['backbone']} -> {cfg.out}")
    return Path(cfg.out)


def mixture_text(names: list[str], weights: list[float]) -> str:
    return ", ".join(f"{n}={w:g}" for n, w in zip(names, weights))


def export_record(run: Path, config: dict, weights: list[float], source: str, cfg: ExportConfig) -> dict:
    return {"command": "export", "format": cfg.format, "run": str(run.resolve()), "backbone": config["backbone"],
            "experts": config["expert_names"], "weights": weights, "weights_from": source, "prompt": cfg.prompt,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_peft(run: Path, out: Path, config: dict, weights: list[float], source: str, cfg: ExportConfig) -> Path:
    names = config["expert_names"]
    ranks = [read_adapter_config(run / "experts" / n)["r"] for n in names]
    with atomic_dir(out) as tmp:
        for name in names:
            shutil.copytree(run / "experts" / name, tmp / "experts" / name)
        for file in ("router.safetensors", "mocae_config.json"):
            shutil.copy2(run / file, tmp / file)
        write_json(tmp / "trinityx_export.json", export_record(run, config, weights, source, cfg))
        (tmp / "README.md").write_text(PEFT_README.format(
            backbone=config["backbone"], names=", ".join(names), k=len(names),
            lora_modules=" ".join(f"{n}={out}/experts/{n}" for n in names), max_rank=max(ranks),
            merged_rank=sum(ranks), paths=", ".join(f'"{out}/experts/{n}"' for n in names),
            weights=", ".join(f"{w:g}" for w in weights), mixture=mixture_text(names, weights), source=source,
            weights_cli=" ".join(f"{w:g}" for w in weights), zeros=" ".join("0" * len(names)), out=out,
            first=names[0]))
    print(f"exported {len(names)} PEFT experts ({', '.join(names)}) and the router -> {out}")
    return out


MERGED_README = """# TrinityX merged model

The backbone `{backbone}` with one fixed mixture of the TrinityX experts folded into its weights:
{mixture} (weights from: {source}). In every adapted linear layer `W' = W + sum_k g_k (alpha/r) B_k A_k`,
so this model computes what the MoCaE model computes with these gates fixed; it has no router.

It is a standard Hugging Face model folder (config, safetensors weights, tokenizer):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{out}")
tokenizer = AutoTokenizer.from_pretrained("{out}")
```

```bash
vllm serve {out}
python llama.cpp/convert_hf_to_gguf.py {out}   # a GGUF file for llama.cpp / Ollama
```
"""

PEFT_README = """# TrinityX experts as PEFT adapters

Backbone: `{backbone}`. Experts ({k}): {names}, each a PEFT LoRA adapter folder in `experts/<name>/`. The
router is `router.safetensors` with `mocae_config.json`: this folder is a MoCaE folder, so
`trinityx serve --run {out}` serves the routed mixture (per-prompt gates, OpenAI-compatible API).

`BASE` below is the backbone as a Hugging Face model (hub id or folder). If `{backbone}` is a TrinityX preset or a
GGUF file, write it as a folder first: `trinityx export --run {out} --format merged --weights {zeros} --out base`
(all-zero weights = the bare backbone).

## Each expert on its own: vLLM multi-LoRA

```bash
vllm serve BASE --enable-lora --max-lora-rank {max_rank} --lora-modules {lora_modules}
```

A request picks one expert by its name as the model: `{{"model": "{first}", "messages": [...]}}`. vLLM applies one
adapter per request; it does not mix them per prompt as the router does.

## A mixture as one adapter

The mixture of this export is {mixture} (weights from: {source}). Task arithmetic is exact as a LoRA of
rank {merged_rank} (the experts' factors concatenated):

```python
from trinityx.lora.taskvectors import merge
merge([{paths}], weights=[{weights}], method="linear", out="{out}/mixture")
```

```bash
vllm serve BASE --enable-lora --max-lora-rank {merged_rank} --lora-modules mixture={out}/mixture
```

(vLLM accepts only some rank limits, e.g. 8, 16, 32, 64: pass the smallest one >= {merged_rank}.) With PEFT:
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "{out}/mixture")`. For one merged model
folder without LoRA at all, use `trinityx export --run {out} --format merged --weights {weights_cli} --out merged`.
"""
