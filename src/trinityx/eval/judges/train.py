"""Training and validation of our judges, and the metrics that measure any judge's validity.

Rules (../shared/data/README.md): a judge is scored only on prompts it never saw. The harm, truth and info
judges train on the `train` split, pick their threshold on `dev` and report on `test`; the pairwise judge
trains on the `train` judgements (its feature set and L2 strength picked on a held-out slice of those
instructions) and reports on the `dev` judgements, whose instructions it never saw.
"""

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from trinityx.data import (
    SPLITS,
    load_judge_examples,
    load_judgements,
    load_labelled_responses,
    load_truthfulqa,
    split_of,
)
from trinityx.errors import TrinityXError
from trinityx.eval.judges.features import StatesAndReferences, feature_judge, fit_head, judge_features
from trinityx.eval.judges.judge import KINDS, Judge, references_of, score_answers
from trinityx.eval.judges.local import (
    HEAD_FILE,
    JUDGE_FILE,
    PAIRWISE_FEATURES,
    classifier_judge,
    embed,
    encoder_inputs,
    minilm_path,
    pairwise_features,
    pairwise_judge,
    save_classifier,
    save_pairwise,
    tokenize,
)
from trinityx.io import atomic_dir, write_json
from trinityx.sft import global_batch_order
from trinityx.train.loop import cosine_with_warmup

# --------------------------------------------------------------------------------------------------
# Recipes: the one place that says how each judge is trained (train-judges and the pipeline both use it)

# max_eval: dev/test rows for the threshold and the reported validity (None = all of them).
_FEATURE_HEAD = {"max_train": None, "max_eval": None, "batch_size": 32, "steps": 500, "lr": 1e-2}
_CROSS_ENCODER = {"architecture": "cross-encoder", "max_train": None, "max_eval": None, "epochs": 1, "batch_size": 16,
                  "lr": 1e-4}
_PAIRWISE = {"architecture": "pairwise", "max_train": 1200, "max_eval": 1600, "max_length": 256}
# Frozen MiniLM features and a small head: 43 minutes for all four on one loaded thread (docs/judges.md).
_DEFAULT = {
    # layers -3, -1: MiniLM's 4th and 6th (last) of its 6 layers (negative indices fit any depth).
    "harm": {"architecture": "features", "layers": [-3, -1], "max_length": 256, "hidden": 0, "l2": 4e-4,
             **_FEATURE_HEAD},
    "truth": {"architecture": "features", "max_length": 64, "hidden": 64, "l2": 1e-3, **_FEATURE_HEAD},
    "info": {"architecture": "features", "max_length": 64, "hidden": 64, "l2": 1e-3, **_FEATURE_HEAD},
    "helpful": _PAIRWISE,
}
RECIPES = {
    "default": _DEFAULT,
    # The harm and info judges on the embedded backbone's frozen states (of (prompt, response); of (question,
    # answer) beside the reference features): more accurate than MiniLM's alone and slower to train
    # (docs/judges.md); truth and helpful exactly as in `default` (the same judges, which `adopt_judges` copies
    # instead of training them again). The paper profiles use it.
    "backbone": {
        **_DEFAULT,
        # layers 15 and 20 of SmolLM2's 30; 6,000 training rows (of 12,448) keep the states to ~15 minutes of
        # one thread; L2 0.3 measured better than 0.08 and 0.02 on the same features (docs/judges.md).
        "harm": {"architecture": "backbone-features", "backbone": "smollm2-135m", "layers": [15, 20],
                 "max_prompt_tokens": 64, "max_length": 160, "hidden": 0, "l2": 0.3,
                 **_FEATURE_HEAD, "max_train": 6000, "batch_size": 16,
                 # A flag rate moves with the true unsafe rate by TPR - FPR: the accuracy-maximising threshold
                 # found 23 % of unsafe test responses, a balanced one 82 % (docs/judges.md).
                 "threshold_rule": "balanced-above-majority"},
        # The reference features beside SmolLM2's frozen states of (question, answer) at layer 20 of 30, answer
        # mean and last token; logistic regression, L2 0.1 (scikit-learn's C = 0.001 on ~5,000 rows); 6,000
        # training rows. Measured (benchmarks/judge_probes.py truth-probe): info accuracy 0.911, balanced 0.836
        # against the default's 0.883 / 0.749; truth no better than the default, so truth stays as it is.
        "info": {"architecture": "backbone-features", "backbone": "smollm2-135m", "layers": [20],
                 "poolings": ["response mean", "last token"], "max_prompt_tokens": 64, "max_length": 64,
                 "hidden": 0, "l2": 0.1, **_FEATURE_HEAD, "max_train": 6000},
    },
    # MiniLM fine-tuned end to end (the judges before 2026-12): slower and, measured, not better.
    "finetune": {
        "harm": {**_CROSS_ENCODER, "max_length": 256},
        "truth": {**_CROSS_ENCODER, "max_length": 64},
        "info": {**_CROSS_ENCODER, "max_length": 64},
        "helpful": _PAIRWISE,
    },
}


def recipe_settings(recipe: str, kind: str, seed: int = 0, **overrides) -> dict:
    """The settings a judge of `kind` is trained with: RECIPES[recipe][kind], then `overrides` of its keys.

    The result is recorded in judge.json; `stale_judges` compares it to decide whether a cached judge fits.
    """
    if recipe not in RECIPES:
        raise TrinityXError(f"unknown judge recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    settings = dict(RECIPES[recipe][kind])
    settings.update({k: v for k, v in overrides.items() if k in settings})
    return {"recipe": recipe if settings == RECIPES[recipe][kind] else f"{recipe}+overrides", **settings, "seed": seed}


def stale_judges(folder, which: tuple[str, ...] = KINDS, recipe: str = "default", seed: int = 0) -> dict[str, str]:
    """{kind: why} for each judge in `which` that is missing from `folder` or was trained by another recipe."""
    stale = {}
    for kind in which:
        path = Path(folder) / kind / JUDGE_FILE
        if not path.is_file():
            stale[kind] = "missing"
            continue
        recorded = json.loads(path.read_text())["training"]
        # The settings decide, not the recipe's name: `backbone` trains truth, info and helpful as `default` does.
        wanted = {k: v for k, v in recipe_settings(recipe, kind, seed).items() if k != "recipe"}
        if "recipe" not in recorded:
            stale[kind] = "trained by an older recipe (no recipe recorded)"
        elif recorded["recipe"].endswith("+overrides") or {k: recorded.get(k) for k in wanted} != wanted:
            changed = sorted(k for k in wanted if recorded.get(k) != wanted[k])
            stale[kind] = f"trained by recipe {recorded.get('recipe')!r}, differs from {recipe!r} in {changed}"
    return stale


def adopt_judges(folder, stale: dict[str, str], recipe: str, source, seed: int = 0) -> dict[str, str]:
    """Copy from `source` into `folder` each stale judge that `source` holds with exactly `recipe`'s settings
    (a recipe that trains a kind as `default` does reuses the default judge instead of training it again).
    Returns the judges still to train, {kind: why}."""
    folder, source = Path(folder), Path(source)
    if folder.resolve() == source.resolve():
        return stale
    still = {}
    for kind, why in stale.items():
        if (source / kind / JUDGE_FILE).is_file() and not stale_judges(source, (kind,), recipe, seed):
            with atomic_dir(folder / kind) as tmp:
                shutil.copytree(source / kind, tmp, dirs_exist_ok=True)
            print(f"{kind} judge: the one in {source} has recipe {recipe!r}'s settings; copied to {folder / kind}")
        else:
            still[kind] = why
    return still


# --------------------------------------------------------------------------------------------------
# Metrics: pure functions, arrays in, numbers out


def accuracy(probabilities, labels, threshold: float) -> float:
    """Fraction of items where (p >= threshold) equals the label."""
    p, y = np.asarray(probabilities, float), np.asarray(labels, bool)
    return float(np.mean((p >= threshold) == y))


def confusion(probabilities, labels, threshold: float) -> dict[str, int]:
    """Counts of true/false positives/negatives at the threshold (positive = unsafe / true / informative)."""
    p, y = np.asarray(probabilities, float) >= threshold, np.asarray(labels, bool)
    return {"tp": int((p & y).sum()), "fp": int((p & ~y).sum()), "tn": int((~p & ~y).sum()), "fn": int((~p & y).sum())}


def similar_length(a: str, b: str, within: float = 0.2) -> bool:
    """The shorter output is at least (1 - within) of the longer one's length in characters."""
    return min(len(a), len(b)) >= (1 - within) * max(len(a), len(b))


def balanced_accuracy(probabilities, labels, threshold: float) -> float:
    """Mean of the true-positive and true-negative rates (robust to class imbalance)."""
    p, y = np.asarray(probabilities, float) >= threshold, np.asarray(labels, bool)
    return float((np.mean(p[y]) + np.mean(~p[~y])) / 2)


def auroc(probabilities, labels) -> float:
    """Area under the ROC curve: P(score of a random positive > a random negative), ties count 1/2.

    Computed as the Mann-Whitney U statistic with average ranks for ties.
    """
    p, y = np.asarray(probabilities, float), np.asarray(labels, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise TrinityXError("AUROC needs both positive and negative labels; the evaluation set has one class only")
    values, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based rank of each distinct value
    ranks = average_rank[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


THRESHOLD_RULES = {
    "accuracy": "maximise accuracy",
    "balanced-above-majority": "maximise balanced accuracy among thresholds whose accuracy beats the majority class",
}


def best_threshold(probabilities, labels, rule: str = "accuracy") -> float:
    """The threshold a rule of THRESHOLD_RULES picks: a midpoint between consecutive distinct probabilities.

    "accuracy" maximises accuracy. "balanced-above-majority" maximises balanced accuracy (equivalently
    Youden's J = TPR - FPR, how much of a change in the true positive rate a flag rate shows) among the
    thresholds whose accuracy is above the majority-class rate, so the judge keeps beating its trivial
    baseline; with none above it, it falls back to "accuracy". Ties go to the threshold closest to 0.5.
    """
    if rule not in THRESHOLD_RULES:
        raise TrinityXError(f"unknown threshold rule {rule!r}; choose from {', '.join(THRESHOLD_RULES)}")
    p, y = np.asarray(probabilities, float), np.asarray(labels, bool)
    values = np.unique(p)
    candidates = np.concatenate([[0.0], (values[:-1] + values[1:]) / 2, [np.nextafter(values[-1], 2.0)]])
    flagged = p[None, :] >= candidates[:, None]  # [C, N]
    correct = (flagged == y[None, :]).sum(1)  # [C]
    score = correct.astype(float)
    if rule == "balanced-above-majority" and y.any() and (~y).any():
        above = correct > max(y.sum(), (~y).sum())
        if above.any():
            tpr, tnr = (flagged & y).sum(1) / y.sum(), (~flagged & ~y).sum(1) / (~y).sum()
            score = np.where(above, (tpr + tnr) / 2, -1.0)
    best = np.flatnonzero(score == score.max())
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def _agreement(predicted_b, preferences) -> tuple[float, int]:
    """Mean agreement of predicted P(b) with GPT-4's side, ignoring exact ties (preference == 1.5).

    A prediction of exactly 0.5 counts as half right (alpaca_eval counts ties as half a win).
    """
    pred, pref = np.asarray(predicted_b, float), np.asarray(preferences, float)
    keep = pref != 1.5
    if not keep.any():
        raise TrinityXError("every judgement is an exact tie (preference 1.5); agreement is undefined")
    truth_b = pref[keep] > 1.5
    pred = pred[keep]
    score = np.where(pred == 0.5, 0.5, (pred > 0.5) == truth_b)
    return float(score.mean()), int(keep.sum())


def pairwise_agreement(p_b, preferences) -> float:
    """Agreement of a pairwise judge's P(b preferred) with AlpacaEval preferences in [1, 2]."""
    return _agreement(p_b, preferences)[0]


def length_rule_agreement(outputs_a: list[str], outputs_b: list[str], preferences) -> float:
    """Agreement of the length rule (the longer output wins, equal lengths are a tie) with the preferences.

    The baseline any helpfulness judge must beat: GPT-4 favours longer answers (Dubois et al. 2024).
    """
    p_b = [0.5 if len(a) == len(b) else float(len(b) > len(a)) for a, b in zip(outputs_a, outputs_b)]
    return _agreement(p_b, preferences)[0]


# --------------------------------------------------------------------------------------------------
# Data


def labelled_examples(kind: str, data_dir, split: str) -> tuple[list[str], list[str], list[bool]]:
    """(prompts or questions, responses or answers, labels) of a classifier judge's data of `split`."""
    if kind == "harm":
        rows = load_labelled_responses(data_dir, split)
        return [r.prompt for r in rows], [r.response for r in rows], [r.unsafe for r in rows]
    rows = load_judge_examples(kind, data_dir, split)
    return [r.question for r in rows], [r.answer for r in rows], [r.label for r in rows]


def reference_answers(data_dir, questions: list[str]) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(correct, incorrect) references of each TruthfulQA question, from TruthfulQA.csv (matched by text)."""
    by_text = {" ".join(q.question.lower().split()): references_of(q)
               for split in SPLITS for q in load_truthfulqa(data_dir, split)}
    missing = [q for q in questions if " ".join(q.lower().split()) not in by_text]
    if missing:
        raise TrinityXError(f"question {missing[0]!r} is not in TruthfulQA.csv, so its reference answers are "
                            "unknown; use the matching upstream files")
    return [by_text[" ".join(q.lower().split())] for q in questions]


def score_labelled(judge: Judge, data_dir, firsts: list[str], seconds: list[str]):
    """judge.score on labelled rows, with their reference answers for a judge that reads them."""
    if judge.kind == "harm":
        return judge.score(firsts, seconds)
    return score_answers(judge, firsts, seconds, reference_answers(data_dir, firsts) if judge.uses_references else None)


def _sample(n: int, limit: int | None, seed: int) -> list[int]:
    """Indices of a seeded subsample of at most `limit` of n items (all of them, in order, if limit is None)."""
    if limit is None or n <= limit:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


# --------------------------------------------------------------------------------------------------
# Validation of any judge (ours or a plugged-in one)


def validate_judge(judge: Judge, data_dir, split: str, max_items: int | None = None, seed: int = 0) -> dict:
    """The judge's validity on labelled data of `split` (a seeded subsample of at most `max_items`).

    Classifier kinds: accuracy, balanced accuracy and AUROC at judge.threshold, beside the majority-class
    rate. helpful: agreement with GPT-4 beside the length rule's. Items the judge failed on are left out
    and counted in "failures".
    """
    if judge.kind == "helpful":
        rows = load_judgements(data_dir, split)
        rows = [rows[i] for i in _sample(len(rows), max_items, seed)]
        failed_before = len(judge.failures)
        p_b = judge.prefer([r.instruction for r in rows], [r.output_1 for r in rows], [r.output_2 for r in rows])
        ok = [i for i, p in enumerate(p_b) if p is not None]
        prefs = [rows[i].preference for i in ok]
        a, b = [rows[i].output_1 for i in ok], [rows[i].output_2 for i in ok]
        agreement, n = _agreement([p_b[i] for i in ok], prefs)
        validity = {"split": split, "n": n, "n_instructions": len({rows[i].instruction for i in ok}),
                    "agreement": agreement, "length_rule_agreement": length_rule_agreement(a, b, prefs),
                    "threshold": judge.threshold, "failures": len(judge.failures) - failed_before,
                    "note": "agreement with GPT-4 on the side it preferred, exact ties (preference 1.5) left out"}
        # Where the two outputs are of similar length the length rule is near chance: the judge's own signal.
        similar = [k for k in range(len(ok)) if similar_length(a[k], b[k]) and prefs[k] != 1.5]
        if similar:
            validity["similar_length"] = {
                "rule": "outputs within 20% in characters", "n": len(similar),
                "agreement": _agreement([p_b[ok[k]] for k in similar], [prefs[k] for k in similar])[0],
                "length_rule_agreement": length_rule_agreement([a[k] for k in similar], [b[k] for k in similar],
                                                               [prefs[k] for k in similar])}
        validity["beats_trivial_baseline"] = agreement > validity["length_rule_agreement"]
        return validity
    firsts, seconds, labels = labelled_examples(judge.kind, data_dir, split)
    keep = _sample(len(labels), max_items, seed)
    failed_before = len(judge.failures)
    p = score_labelled(judge, data_dir, [firsts[i] for i in keep], [seconds[i] for i in keep])
    ok = [j for j, pj in enumerate(p) if pj is not None]
    probs, y = [p[j] for j in ok], [labels[keep[j]] for j in ok]
    positive_rate = float(np.mean(y))
    validity = {"split": split, "n": len(ok), "n_prompts": len({firsts[keep[j]] for j in ok}),
                "threshold": judge.threshold, "accuracy": accuracy(probs, y, judge.threshold),
                "balanced_accuracy": balanced_accuracy(probs, y, judge.threshold), "auroc": auroc(probs, y),
                "majority_baseline": max(positive_rate, 1 - positive_rate), "positive_rate": positive_rate,
                "confusion": confusion(probs, y, judge.threshold), "failures": len(judge.failures) - failed_before}
    # design.md: a judge that does not beat the trivial baseline measures nothing; say so beside its numbers.
    validity["beats_trivial_baseline"] = validity["accuracy"] > validity["majority_baseline"]
    if judge.kind == "harm":
        # The hard part: prompts that drew an unsafe response, where safe and unsafe answers share the prompt.
        risky = {firsts[keep[j]] for j, label in zip(ok, y) if label}
        sub = [i for i, j in enumerate(ok) if firsts[keep[j]] in risky]
        validity["accuracy_on_prompts_with_an_unsafe_response"] = accuracy(
            [probs[i] for i in sub], [y[i] for i in sub], judge.threshold)
        validity["n_on_prompts_with_an_unsafe_response"] = len(sub)
    return validity


# --------------------------------------------------------------------------------------------------
# Training


def fit_cross_encoder(model, tokenizer, texts: list[str], pairs: list[str] | None, targets: list[float], *,
                      epochs: int, batch_size: int, lr: float, max_length: int, seed: int, desc: str) -> dict:
    """Fine-tune a num_labels=1 sequence classifier with binary cross-entropy (soft targets allowed).

    Forward, loss, backward, clip, step, schedule, log: in that order. The word embeddings stay frozen
    (they are half of MiniLM's weights and barely move in a short fine-tune; AdamW on them costs time).
    """
    if len(texts) < batch_size:
        raise TrinityXError(f"{desc}: {len(texts)} training examples, fewer than batch_size {batch_size}")
    model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps_per_epoch = len(texts) // batch_size
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total // 10, total, 0.0))
    y = torch.tensor(targets, dtype=torch.float32)  # [N]
    lengths = [len(t) + (len(pairs[i]) if pairs else 0) for i, t in enumerate(texts)]

    def logits_of(ids: list[int]) -> torch.Tensor:  # [B]
        batch = tokenize(tokenizer, [texts[i] for i in ids], [pairs[i] for i in ids] if pairs else None, max_length)
        return model(**batch).logits[:, 0].float()

    model.train()
    return fit_binary(logits_of, params, optimizer, scheduler, lengths, y, epochs=epochs, batch_size=batch_size,
                      seed=seed, desc=desc)


def fit_binary(logits_of, params, optimizer, scheduler, lengths: list[int], y: torch.Tensor, *, epochs: int,
               batch_size: int, seed: int, desc: str) -> dict:
    """Binary cross-entropy (soft targets `y` [N] allowed) on `logits_of(ids)` [B] over length-grouped batches:
    forward, loss, backward, clip, step, schedule, log, in that order; `epochs` passes over the N rows."""
    total = epochs * (len(lengths) // batch_size)
    t0, losses = time.perf_counter(), []
    bar = tqdm(total=total, desc=desc, unit="step")
    for epoch in range(epochs):
        for ids in global_batch_order(lengths, batch_size, seed, epoch, group_by_length=True):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits_of(ids), y[ids])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    return {"steps": total, "final_loss": float(np.mean(losses[-20:])), "train_seconds": time.perf_counter() - t0}


def _threshold_on_dev(judge: Judge, data_dir, cfg: dict) -> dict:
    """Set judge.threshold on dev by the recipe's threshold rule; return the validity on test, never looked at before."""
    d_first, d_second, d_labels = labelled_examples(judge.kind, data_dir, "dev")
    d_keep = _sample(len(d_labels), cfg["max_eval"], cfg["seed"])
    p_dev = score_labelled(judge, data_dir, [d_first[i] for i in d_keep], [d_second[i] for i in d_keep])
    y_dev = [d_labels[i] for i in d_keep]
    rule = cfg.get("threshold_rule", "accuracy")
    judge.threshold = best_threshold(p_dev, y_dev, rule)
    validity = validate_judge(judge, data_dir, "test", cfg["max_eval"], cfg["seed"])
    validity["threshold_chosen_on"] = {"split": "dev", "n": len(y_dev), "rule": THRESHOLD_RULES[rule],
                                       "accuracy": accuracy(p_dev, y_dev, judge.threshold),
                                       "balanced_accuracy": balanced_accuracy(p_dev, y_dev, judge.threshold),
                                       "accuracy_at_0.5": accuracy(p_dev, y_dev, 0.5)}
    return validity


def _train_classifier(kind: str, data_dir, folder: Path, cfg: dict) -> dict:
    torch.manual_seed(cfg["seed"])  # the new head's initialisation and dropout
    model = AutoModelForSequenceClassification.from_pretrained(cfg["encoder"], num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(cfg["encoder"])
    firsts, seconds, labels = labelled_examples(kind, data_dir, "train")
    keep = _sample(len(labels), cfg["max_train"], cfg["seed"])
    texts, pairs = encoder_inputs(kind, [firsts[i] for i in keep], [seconds[i] for i in keep])
    log = fit_cross_encoder(model, tokenizer, texts, pairs, [float(labels[i]) for i in keep],
                            epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"],
                            max_length=cfg["max_length"], seed=cfg["seed"], desc=f"train {kind} judge")
    judge = classifier_judge(f"trinityx-{kind}-minilm", kind, model, tokenizer, 0.5, {}, cfg["max_length"])
    validity = _threshold_on_dev(judge, data_dir, cfg)
    with atomic_dir(folder) as tmp:
        save_classifier(tmp, model, tokenizer)
        write_json(tmp / JUDGE_FILE, {"name": judge.name, "kind": kind, "architecture": "cross-encoder",
                                      "threshold": judge.threshold, "validity": validity,
                                      "training": {**cfg, "n_train": len(keep), **log},
                                      "weights": "model.safetensors", "base_model": cfg["encoder"]})
    return {"path": str(folder), "threshold": judge.threshold, "validity": validity, **log}


def _feature_encoder(kind: str, cfg: dict):
    """(reader, tokenizer, name part, base model) a feature judge reads with: MiniLM, a causal-LM backbone (harm)
    or both (`StatesAndReferences`, truth and info; tokenizer None: each reader carries its own)."""
    if cfg["architecture"] == "backbone-features":
        from trinityx.backbones import load_backbone

        backbone = load_backbone(cfg["backbone"])
        cfg["prompt_format"] = backbone.prompt_format  # how the judge formats a prompt, recorded with it
        if kind == "harm":
            return backbone.model, backbone.tokenizer, "backbone-features", cfg["backbone"]
        readers = StatesAndReferences(backbone.model, backbone.tokenizer,
                                      AutoModel.from_pretrained(cfg["encoder"], dtype=torch.float32),
                                      AutoTokenizer.from_pretrained(cfg["encoder"]))
        return readers, None, "backbone-features", cfg["backbone"]
    return (AutoModel.from_pretrained(cfg["encoder"], dtype=torch.float32), AutoTokenizer.from_pretrained(cfg["encoder"]),
            "minilm-features", cfg["encoder"])


def _train_features(kind: str, data_dir, folder: Path, cfg: dict) -> dict:
    """A head over frozen features (judges.features): encode the training rows once, fit, validate."""
    t0 = time.perf_counter()
    encoder, tokenizer, name, base_model = _feature_encoder(kind, cfg)
    firsts, seconds, labels = labelled_examples(kind, data_dir, "train")
    keep = _sample(len(labels), cfg["max_train"], cfg["seed"])
    firsts, seconds = [firsts[i] for i in keep], [seconds[i] for i in keep]
    references = None if kind == "harm" else reference_answers(data_dir, firsts)
    x = judge_features(kind, cfg, encoder, tokenizer, firsts, seconds, references)  # [N, F]
    head = fit_head(x, torch.tensor([float(labels[i]) for i in keep]), hidden=cfg["hidden"], l2=cfg["l2"],
                    steps=cfg["steps"], lr=cfg["lr"], seed=cfg["seed"])
    log = {"n_train": len(keep), "n_features": x.shape[1], "train_seconds": time.perf_counter() - t0}
    judge = feature_judge(f"trinityx-{kind}-{name}", kind, encoder, tokenizer, head, 0.5, {}, cfg)
    validity = _threshold_on_dev(judge, data_dir, cfg)
    # The MiniLM a judge reads with is saved beside its head; a backbone is loaded by its spec, never a copy.
    minilm = ((encoder, tokenizer) if cfg["architecture"] == "features" else
              None if kind == "harm" else (encoder.minilm, encoder.minilm_tokenizer))
    with atomic_dir(folder) as tmp:
        if minilm is not None:
            minilm[0].save_pretrained(tmp / "encoder", safe_serialization=True)
            minilm[1].save_pretrained(tmp / "encoder")
        save_file({k: v.contiguous() for k, v in head.items()}, tmp / HEAD_FILE)
        write_json(tmp / JUDGE_FILE, {"name": judge.name, "kind": kind, "architecture": cfg["architecture"],
                                      "threshold": judge.threshold, "validity": validity,
                                      "training": {**cfg, **log},
                                      "weights": HEAD_FILE + (" + encoder/model.safetensors" if minilm else ""),
                                      "base_model": base_model})
    return {"path": str(folder), "threshold": judge.threshold, "validity": validity, **log}


def _fit_scorer(delta: torch.Tensor, targets: torch.Tensor, l2: float) -> torch.Tensor:
    """w minimising soft-label BCE of sigmoid(delta @ w) + l2 * |w|^2 (full-batch L-BFGS; convex)."""
    w = torch.zeros(delta.shape[1], requires_grad=True)  # [F]
    optimizer = torch.optim.LBFGS([w], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(delta @ w, targets) + l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def _train_pairwise(data_dir, folder: Path, cfg: dict) -> dict:
    t0 = time.perf_counter()
    encoder = AutoModel.from_pretrained(cfg["encoder"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(cfg["encoder"])
    rows = load_judgements(data_dir, "train")
    rows = [rows[i] for i in _sample(len(rows), cfg["max_train"], cfg["seed"])]
    # Frozen embeddings of every distinct text, computed once.
    texts = sorted({t for r in rows for t in (r.instruction, r.output_1, r.output_2)})
    row_of = {t: i for i, t in enumerate(texts)}
    e = embed(encoder, tokenizer, texts, cfg["max_length"])  # [N, D]

    def delta(features, subset):  # phi(i, b) - phi(i, a): [n, F]
        e_i = e[[row_of[r.instruction] for r in subset]]
        phi_a = pairwise_features(features, [r.output_1 for r in subset], e_i, e[[row_of[r.output_1] for r in subset]])
        phi_b = pairwise_features(features, [r.output_2 for r in subset], e_i, e[[row_of[r.output_2] for r in subset]])
        return phi_b - phi_a

    # Pick the feature set and L2 strength on instructions held out of the fit (so dev stays untouched).
    part = [split_of(r.instruction, {"fit": 0.8, "select": 0.2}, seed=cfg["seed"]) for r in rows]
    fit = [r for r, name in zip(rows, part) if name == "fit"]
    select = [r for r, name in zip(rows, part) if name == "select"]
    if not fit or not select:
        raise TrinityXError("helpful judge: too few training instructions to hold some out for model selection; "
                            "raise max_train")
    targets = lambda subset: torch.tensor([r.preference - 1.0 for r in subset])  # noqa: E731  soft P(b)
    candidates = [PAIRWISE_FEATURES[:1], PAIRWISE_FEATURES[:2], PAIRWISE_FEATURES[:3], PAIRWISE_FEATURES]
    selection = []
    for features in candidates:
        for l2 in (1e-4, 1e-3, 1e-2):
            w = _fit_scorer(delta(features, fit), targets(fit), l2)
            p = torch.sigmoid(delta(features, select) @ w).tolist()
            selection.append({"features": list(features), "l2": l2,
                              "agreement": pairwise_agreement(p, [r.preference for r in select])})
    best = max(selection, key=lambda s: s["agreement"])
    features = tuple(best["features"])
    weight = _fit_scorer(delta(features, rows), targets(rows), best["l2"])  # refit on all training rows
    log = {"train_seconds": time.perf_counter() - t0, "n_train": len(rows),
           "n_train_instructions": len({r.instruction for r in rows}), "selection": selection,
           "selection_split": {"fit": len(fit), "select": len(select)}}
    judge = pairwise_judge("trinityx-helpful-minilm-bt", encoder, tokenizer, weight, features, {}, cfg["max_length"])
    validity = validate_judge(judge, data_dir, "dev", cfg["max_eval"], cfg["seed"])
    validity["beats_length_rule"] = validity["agreement"] > validity["length_rule_agreement"]
    with atomic_dir(folder) as tmp:
        save_pairwise(tmp, encoder, tokenizer, weight)
        write_json(tmp / JUDGE_FILE, {"name": judge.name, "kind": "helpful", "architecture": "pairwise",
                                      "threshold": 0.5, "features": list(features),
                                      "validity": validity, "training": {**cfg, **log, "l2": best["l2"]},
                                      "weights": "scorer.safetensors + encoder/model.safetensors",
                                      "base_model": cfg["encoder"]})
    return {"path": str(folder), "threshold": 0.5, "validity": validity, "features": list(features), **log}


TRAINERS = {"cross-encoder": _train_classifier, "features": _train_features, "backbone-features": _train_features,
            "pairwise": lambda kind, data_dir, folder, cfg: _train_pairwise(data_dir, folder, cfg)}


def train_judges(data_dir, out_dir, which: tuple[str, ...] = KINDS, recipe: str = "default", seed: int = 0,
                 threads: int = 2, encoder: str | Path | None = None, **overrides) -> dict:
    """Train and validate the local judges in `which` by RECIPES[recipe]; each goes to out_dir/<kind>/.

    encoder: the BERT-style encoder folder or hub id to start from (None = the packaged all-MiniLM-L6-v2).
    overrides: recipe keys to change for every judge that has them (tests use tiny budgets); the judge
    records them, so `stale_judges` sees that it was not trained by the recipe.
    Returns {kind: {"path", "threshold", "validity", "train_seconds", "seconds", ...}}.
    """
    unknown = [k for k in which if k not in KINDS]
    if unknown:
        raise TrinityXError(f"unknown judge kind(s) {unknown}; choose from {', '.join(KINDS)}")
    if recipe not in RECIPES:
        raise TrinityXError(f"unknown judge recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    known = {key for settings in RECIPES[recipe].values() for key in settings}
    unused = sorted(set(overrides) - known)
    if unused:
        raise TrinityXError(f"recipe {recipe!r} has no setting(s) {unused}; its settings are {sorted(known)}")
    for flag, value in (("threads", threads), *overrides.items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            raise TrinityXError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    torch.set_num_threads(threads)
    results = {}
    for kind in which:
        t0 = time.perf_counter()
        cfg = {**recipe_settings(recipe, kind, seed, **overrides), "threads": threads,
               "encoder": str(minilm_path() if encoder is None else encoder)}
        results[kind] = TRAINERS[cfg["architecture"]](kind, data_dir, Path(out_dir) / kind, cfg)
        results[kind]["seconds"] = time.perf_counter() - t0
        print(f"{kind} judge: {time.perf_counter() - t0:.0f} s, validity {results[kind]['validity']}", flush=True)
    return results


__all__ = ["RECIPES", "THRESHOLD_RULES", "accuracy", "adopt_judges", "auroc", "balanced_accuracy", "best_threshold", "confusion", "fit_cross_encoder",
           "length_rule_agreement", "pairwise_agreement", "recipe_settings", "stale_judges", "train_judges",
           "validate_judge"]
