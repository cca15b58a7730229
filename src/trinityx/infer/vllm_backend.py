"""Generation through vLLM (optional: `pip install "trinityx[vllm]"` on a CUDA machine), same answers format.

`trinityx evaluate --backend vllm` sends the evaluation's prompts to one `vllm.LLM` engine on the backbone's
folder instead of Hugging Face `generate`; everything else (prompt formatting, stop strings, the generation
cache, judges, metrics, the results file) is unchanged. How each system reaches vLLM:

    base                        the backbone alone
    expert:DIM, datamix,        its PEFT LoRA folder, as a vLLM LoRA adapter (multi-LoRA serving)
    merge:METHOD
    trinityx (sequence router)  the router runs here on the prompts (one prompt pass of the backbone); the
    and its ablations           prompts are grouped by their gates rounded to `gate_decimals`, and each group
                                is served with one LoRA: the exact linear merge of the experts with those
                                gates (`taskvectors.merge(..., "linear")`, rank K*R), written to a temporary
                                folder. Uniform, top-1 and fixed gates give one or K groups, exactly.
    trinityx-token              not supported (its gates change per token inside the forward pass)

Prompts go in as token ids, tokenised exactly as the Hugging Face path does, so both backends see the same
tokens; greedy decoding is `temperature=0`. Answers are cut at the stop strings by the same `cut_at_stop`.
The generation cache key records the backend and the gate rounding, so vLLM answers never stand in for
Hugging Face ones. Log-likelihoods (TruthfulQA MC1/MC2) stay on the Hugging Face path, which matches
lm-evaluation-harness exactly.
"""

import tempfile
from pathlib import Path

import torch

from trinityx.errors import TrinityXError
from trinityx.lora.adapters import read_adapter_config

# vLLM's supported LoRA ranks (vllm.config.LoRAConfig): max_lora_rank must be one of these.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
_ENGINES: dict[tuple, object] = {}


def import_vllm():
    try:
        import vllm
        from vllm.lora.request import LoRARequest
    except ImportError as e:
        raise TrinityXError(
            f"--backend vllm needs vLLM, which is not installed ({e}); install it on a CUDA machine with "
            "`pip install \"trinityx[vllm]\"`, or use the default --backend hf") from None
    return vllm, LoRARequest


def lora_rank(folder: Path) -> int:
    return int(read_adapter_config(folder)["r"])


def engine(model_path: str, dtype: str, max_rank: int | None, max_loras: int):
    """One vLLM engine per (backbone, LoRA capacity), kept for the process: loading one takes minutes."""
    vllm, _ = import_vllm()
    supported = [r for r in VLLM_LORA_RANKS if max_rank is not None and r >= max_rank]
    if max_rank is not None and not supported:
        raise TrinityXError(f"a LoRA of rank {max_rank} is above vLLM's largest supported rank "
                            f"({VLLM_LORA_RANKS[-1]}); use --backend hf")
    key = (model_path, dtype, supported[0] if supported else None, max_loras)
    if key not in _ENGINES:
        kwargs = dict(model=model_path, dtype=dtype, seed=0)
        if supported:
            kwargs.update(enable_lora=True, max_lora_rank=supported[0], max_loras=max_loras)
        _ENGINES[key] = vllm.LLM(**kwargs)
    return _ENGINES[key]


def sampling_params(settings):
    vllm, _ = import_vllm()
    if settings.do_sample:
        return vllm.SamplingParams(max_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                   top_p=settings.top_p, seed=settings.seed, stop=list(settings.stop))
    return vllm.SamplingParams(max_tokens=settings.max_new_tokens, temperature=0.0, stop=list(settings.stop))


@torch.inference_mode()
def gate_groups(system, token_ids: list[list[int]], decimals: int,
                gates: torch.Tensor | None = None) -> dict[tuple[float, ...], list[int]]:
    """Prompts grouped by their gates rounded to `decimals` (sequence routers only): the caller's gates [N, K]
    when given, else the router's on the prompts."""
    mocae = system.mocae
    if mocae.config.router != "sequence":
        raise TrinityXError(f"system {system.name!r} routes per token inside the forward pass, which vLLM cannot "
                            "run; use --backend hf (or export a fixed mixture with `trinityx export --format merged`)")
    groups: dict[tuple[float, ...], list[int]] = {}
    if gates is not None:
        for i, g in enumerate(gates.tolist()):
            groups.setdefault(tuple(round(x, decimals) for x in g), []).append(i)
        return groups
    for start in range(0, len(token_ids), 16):
        batch = system.tokenizer.pad({"input_ids": token_ids[start:start + 16]}, padding_side="left",
                                     return_tensors="pt").to(mocae.backbone.device)  # [B, T], left-padded
        gates = system.route(batch.input_ids, batch.attention_mask)  # [B, K]
        for i, g in enumerate(gates.tolist()):
            groups.setdefault(tuple(round(x, decimals) for x in g), []).append(start + i)
    return groups


def generate(system, token_ids: list[list[int]], settings, gates: torch.Tensor | None = None) -> list[str]:
    """Raw answers (before `cut_at_stop`) of prompts given as token ids, through vLLM; `gates` [N, K] as in
    `gate_groups`."""
    from trinityx.lora.taskvectors import merge

    _, LoRARequest = import_vllm()
    model_path = str(system.backbone.model.config._name_or_path)
    dtype = str(system.backbone.model.dtype).removeprefix("torch.")
    prompts = [{"prompt_token_ids": ids} for ids in token_ids]
    with tempfile.TemporaryDirectory(prefix="trinityx-vllm-") as tmp:
        if system.mocae is not None:
            assignment, ranks = [None] * len(prompts), []
            for n, (mix, indices) in enumerate(gate_groups(system, token_ids, settings.gate_decimals, gates).items()):
                # The exact mixture of the experts at these gates, as one LoRA of rank K*R.
                folder = merge(system.mocae.adapter_dirs, list(mix), "linear", Path(tmp) / f"mix{n}")
                ranks.append(lora_rank(folder))
                for i in indices:
                    assignment[i] = LoRARequest(f"{system.name}-mix{n}", n + 1, str(folder))
            llm = engine(model_path, dtype, max(ranks), min(len(ranks), 8))
        elif system.folder is not None:
            llm = engine(model_path, dtype, lora_rank(system.folder), 1)
            assignment = [LoRARequest(system.name, 1, str(system.folder))] * len(prompts)
        else:
            llm, assignment = engine(model_path, dtype, None, 1), None
        outputs = llm.generate(prompts, sampling_params(settings), lora_request=assignment, use_tqdm=True)
    return [out.outputs[0].text for out in outputs]
