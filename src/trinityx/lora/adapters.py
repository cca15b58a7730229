"""The PEFT LoRA adapter folder: the one place that knows its files, keys, config and scaling.

    folder/
      adapter_config.json          LoraConfig as PEFT saves it (r, lora_alpha, use_rslora, target_modules, ...)
      adapter_model.safetensors    base_model.model.<module>.lora_A.weight [R, D_in], ...lora_B.weight [D_out, R]

Experts, merges, the data-mix baseline and the bench's random experts are all such folders, so PEFT loads every
one of them. Legend: `R` rank, `D_in`/`D_out` the adapted linear layer's input/output size.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from peft import LoraConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from trinityx.errors import TrinityXError
from trinityx.io import write_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)

# PEFT saves a LoRA factor of module `m` under `base_model.model.{m}.lora_A.weight` (the adapter name is dropped).
KEY_PREFIX = "base_model.model."
FACTOR_SUFFIXES = {"A": ".lora_A.weight", "B": ".lora_B.weight"}


def lora_config(targets, r: int, alpha: float, dropout: float = 0.0, **extra) -> LoraConfig:
    """The LoraConfig of a causal-LM LoRA on the linear layers named `targets`."""
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                      task_type="CAUSAL_LM", **extra)


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """s in ΔW = s · B A: alpha / r (Hu et al. 2021, §4.1), or alpha / sqrt(r) for rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def read_adapter_config(folder: Path) -> dict:
    """folder/adapter_config.json; a missing, malformed or non-object file is an error naming it."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise TrinityXError(f"adapter folder {folder} has no {CONFIG_FILE}; is it a PEFT adapter folder?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8
        raise TrinityXError(f"{path} is not valid JSON ({e}); retrain or recopy the adapter in {folder}") from None
    if not isinstance(config, dict):
        raise TrinityXError(f"{path} holds no adapter config (a JSON object); retrain or recopy the adapter in "
                            f"{folder}")
    return config


@dataclass
class Adapter:
    """A plain LoRA adapter folder as read: its config and factors."""

    folder: Path
    config: dict  # adapter_config.json as saved by PEFT
    factors: dict[str, tuple[Tensor, Tensor]]  # module -> (A [R, D_in], B [D_out, R]), as stored, sorted by module

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.factors.values())

    def scaling(self, module: str) -> float:
        """s of one module; R is read from its factor's shape, which also covers PEFT's per-module rank_pattern."""
        r = self.factors[module][0].shape[0]
        return lora_scaling(self.config["lora_alpha"], r, bool(self.config.get("use_rslora")))

    def delta(self, module: str) -> Tensor:
        """The dense update ΔW = s · B A of one module [D_out, D_in]."""
        a, b = self.factors[module]
        return self.scaling(module) * (b @ a)  # [D_out, D_in]


def read_adapter(folder: str | Path) -> Adapter:
    """Read a PEFT LoRA folder of plain LoRA factors on linear layers; anything else is an error naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrinityXError(f"adapter folder {folder} does not exist (expected a PEFT LoRA adapter folder)")
    config = read_adapter_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise TrinityXError(
            f"adapter folder {folder} has no {WEIGHTS_FILE} (pickled adapter_model.bin is not read); "
            "save the adapter with PEFT's save_pretrained(..., safe_serialization=True)"
        )
    where = folder / CONFIG_FILE
    if config.get("peft_type") != "LORA":
        raise TrinityXError(f"{where}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise TrinityXError(f"{where}: {key}=true is not supported; train the adapter as plain LoRA")
    if config.get("alpha_pattern"):
        raise TrinityXError(f"{where}: per-module lora_alpha (alpha_pattern) is not supported")
    try:
        tensors = load_file(weights)
    except SafetensorError as e:  # truncated or garbled
        raise TrinityXError(f"{weights} cannot be read ({e}); retrain or recopy the adapter in {folder}") from None

    found = {"A": {}, "B": {}}
    for key, tensor in tensors.items():
        factor = next((f for f, suffix in FACTOR_SUFFIXES.items() if key.endswith(suffix)), None)
        if not key.startswith(KEY_PREFIX) or factor is None:
            raise TrinityXError(
                f"{weights}: unexpected tensor {key!r}; only plain LoRA factors (lora_A/lora_B weights of "
                "linear layers) are supported, not DoRA, LoRA biases, embeddings or modules_to_save"
            )
        found[factor][key[len(KEY_PREFIX) : -len(FACTOR_SUFFIXES[factor])]] = tensor
    A, B = found["A"], found["B"]
    if not A:
        raise TrinityXError(f"{weights} holds no LoRA factors")
    if A.keys() != B.keys():
        unpaired = ", ".join(sorted(A.keys() ^ B.keys())[:5])
        raise TrinityXError(f"{weights}: modules with only one LoRA factor: [{unpaired}]")
    return Adapter(folder=folder, config=config, factors={m: (A[m], B[m]) for m in sorted(A)})


def write_weights(folder: Path, factors: dict[str, tuple[Tensor, Tensor]]) -> None:
    """folder/adapter_model.safetensors from {module: (A [R, D_in], B [D_out, R])}, keyed as PEFT keys them."""
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{KEY_PREFIX}{module}{FACTOR_SUFFIXES['A']}"] = a.detach().contiguous()
        tensors[f"{KEY_PREFIX}{module}{FACTOR_SUFFIXES['B']}"] = b.detach().contiguous()
    save_file(tensors, Path(folder) / WEIGHTS_FILE, metadata={"format": "pt"})


def write_adapter(folder: Path, config: dict, factors: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Write a PEFT LoRA folder: `config` as adapter_config.json and the factors."""
    write_json(Path(folder) / CONFIG_FILE, config)
    write_weights(folder, factors)
