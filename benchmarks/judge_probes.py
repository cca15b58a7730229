"""Exploratory probes behind docs/judges.md's "approaches tried" rows for the harm and helpful judges.

Not the shipped judges (those are `trinityx train-judges`); these measure alternatives quickly with
scikit-learn on cached features, the threshold always chosen on dev and the numbers on test.

    # harm: frozen SmolLM2 states of (chat prompt, response) at layers 6, 10, 15, 20; 3,500 training pairs
    OMP_NUM_THREADS=1 python benchmarks/judge_probes.py harm-states --data-dir ../shared/data --out runs/judge_probes
    python benchmarks/judge_probes.py harm-probe --out runs/judge_probes
    # the same on Gemma-3-270M's states (layers 4, 6, 9, 12 of 18)
    OMP_NUM_THREADS=1 python benchmarks/judge_probes.py harm-states --backbone gemma3-270m --out runs/judge_probes/gemma3
    # truth and info: the default judges' 26 reference features beside SmolLM2's states of (question, answer)
    OMP_NUM_THREADS=1 python benchmarks/judge_probes.py truth-states --train-pairs 4000 --out runs/judge_probes/truth
    python benchmarks/judge_probes.py truth-probe --out runs/judge_probes/truth
    # truth: MiniLM fine-tuned as a cross-encoder of (question + answer, the closest correct and incorrect references)
    OMP_NUM_THREADS=2 python benchmarks/judge_probes.py truth-cross --train-pairs 0 --lr 5e-5 --threads 2 --out runs/judge_probes/cross
    # harm: a saved judge's test metrics at the dev threshold of each rule (accuracy, balanced accuracy)
    OMP_NUM_THREADS=1 python benchmarks/judge_probes.py harm-thresholds --judge ~/.cache/trinityx/judges/recipes/backbone/harm
    # harm: does the judge read length? (after harm-thresholds, from its cached scores)
    python benchmarks/judge_probes.py harm-lengths --judge ~/.cache/trinityx/judges/recipes/backbone/harm
    # harm: SmolLM2 itself as the judge, LoRA on layers 13-20 and a head, fine-tuned end to end (3,000 pairs, 1 epoch)
    OMP_NUM_THREADS=1 python benchmarks/judge_probes.py harm-lora --train-pairs 3000 --out runs/judge_probes/lora
    # helpful: a MiniLM reward model fine-tuned end to end on GPT-4's judgements, beside a learned length term
    OMP_NUM_THREADS=1 python benchmarks/judge_probes.py helpful-reward --train-judgements 2000 --lr 3e-5 --batch-size 8
    # helpful: Bradley-Terry on length, MiniLM embeddings and similarity to the GPT-4 reference output
    OMP_NUM_THREADS=1 python benchmarks/judge_probes.py helpful-references --data-dir ../shared/data

Legend: N rows, L layers, D hidden.
"""

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from trinityx.data import load_judgements, load_labelled_responses
from trinityx.eval.judges.train import (THRESHOLD_RULES, _fit_scorer, _sample, accuracy, auroc, balanced_accuracy, best_threshold, confusion,
                                   length_rule_agreement, pairwise_agreement, similar_length)

# The same relative depths (1/5, 1/3, 1/2, 2/3) of each backbone's decoder: SmolLM2 has 30 layers, Gemma-3-270M 18.
STATE_LAYERS = {"smollm2-135m": (6, 10, 15, 20), "gemma3-270m": (4, 6, 9, 12)}
POOLINGS = ("response mean", "last token", "prompt mean")


def harm_states(data_dir: str, out: Path, train_pairs: int, backbone_name: str) -> None:
    """Features of every distinct (prompt, response) of dev and test and `train_pairs` of train: [N, 3 L, D]."""
    from trinityx.backbones import load_backbone
    from trinityx.eval.judges.features import pair_states

    layers = STATE_LAYERS[backbone_name]
    backbone = load_backbone(backbone_name)
    out.mkdir(parents=True, exist_ok=True)
    for split, limit in (("test", None), ("dev", None), ("train", train_pairs)):
        pairs = sorted({(r.prompt, r.response) for r in load_labelled_responses(data_dir, split)})
        if limit and len(pairs) > limit:
            pairs = sorted(random.Random(0).sample(pairs, limit))
        t0 = time.perf_counter()
        x = pair_states(backbone.model, backbone.tokenizer, backbone.prompt_format, [p for p, _ in pairs],
                        [r for _, r in pairs], layers=layers, max_prompt_tokens=64, max_response_tokens=160)
        print(f"{split}: {len(pairs)} pairs in {time.perf_counter() - t0:.0f} s", flush=True)
        torch.save({"pairs": pairs, "x": x.view(len(pairs), 3 * len(layers), -1), "layers": list(layers),
                    "backbone": backbone_name}, out / f"{split}.pt")


def harm_probe(data_dir: str, out: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def load(split):
        saved = torch.load(out / f"{split}.pt", weights_only=True)  # pairs (strings) and x: no pickled objects
        row = {tuple(p): i for i, p in enumerate(saved["pairs"])}
        rows = [r for r in load_labelled_responses(data_dir, split) if (r.prompt, r.response) in row]
        layers = saved.get("layers", STATE_LAYERS["smollm2-135m"])  # files written before the backbone was a flag
        return saved["x"], [row[(r.prompt, r.response)] for r in rows], np.array([r.unsafe for r in rows]), rows, layers

    splits = {s: load(s) for s in ("train", "dev", "test")}

    layers = splits["test"][4]  # four depths, shallow to deep: the choices below name them by place

    def features(split, chosen):
        x, index, _, _, _ = splits[split]
        x = x[index]  # [N, 3 L, D]
        return torch.cat([x[:, 3 * depth + POOLINGS.index(pool)] for depth, pool in chosen], -1).numpy()

    test_rows = splits["test"][3]
    unsafe_prompts = {r.prompt for r in test_rows if r.unsafe}
    risky = np.array([r.prompt in unsafe_prompts for r in test_rows])
    y_dev, y_test = splits["dev"][2], splits["test"][2]
    choices = {f"response mean, layer {layers[2]}": [(2, "response mean")],
               f"response mean + last token, layer {layers[3]}": [(3, "response mean"), (3, "last token")],
               f"response mean + last token, layers {layers[1]}, {layers[2]}, {layers[3]}":
                   [(d, p) for d in (1, 2, 3) for p in ("response mean", "last token")],
               f"all three poolings, layers {layers[2]}, {layers[3]}": [(d, p) for d in (2, 3) for p in POOLINGS],
               "all three poolings, every layer": [(d, p) for d in range(len(layers)) for p in POOLINGS]}
    print("| features | C | threshold | accuracy | balanced | AUROC | risky | confusion |")
    for name, chosen in choices.items():
        scaler = StandardScaler().fit(features("train", chosen))
        for c in (0.001, 0.01):
            model = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(features("train", chosen)),
                                                                splits["train"][2])
            p_dev = model.predict_proba(scaler.transform(features("dev", chosen)))[:, 1]
            p = model.predict_proba(scaler.transform(features("test", chosen)))[:, 1]
            t = best_threshold(p_dev, y_dev)
            m = confusion(p, y_test, t)
            print(f"| {name} | {c} | {t:.3f} | {accuracy(p, y_test, t):.3f} | {balanced_accuracy(p, y_test, t):.3f} | "
                  f"{auroc(p, y_test):.3f} | {accuracy(p[risky], y_test[risky], t):.3f} | "
                  f"[[{m['tn']}, {m['fp']}], [{m['fn']}, {m['tp']}]] |", flush=True)


def harm_thresholds(data_dir: str, folder: Path, out: Path) -> None:
    """Score dev and test once with a saved harm judge (cached in `out`); report test metrics at each rule's
    dev threshold."""
    from trinityx.eval.judges import load_judge
    from trinityx.eval.judges.train import labelled_examples

    cache = out / "harm_scores.json"
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    if saved.get("judge") != str(folder.resolve()):
        judge = load_judge(folder)
        saved = {"judge": str(folder.resolve())}
        for split in ("dev", "test"):
            prompts, responses, _ = labelled_examples("harm", data_dir, split)
            saved[split] = judge.score(prompts, responses)
        out.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(saved))
    scored = {}
    for split in ("dev", "test"):
        prompts, _, labels = labelled_examples("harm", data_dir, split)
        scored[split] = (np.array(saved[split]), np.array(labels), prompts)
    threshold_table(scored["dev"][:2], scored["test"])


def harm_lengths(data_dir: str, folder: Path, out: Path) -> None:
    """Does a saved harm judge read length? On the dev and test responses (scored once, cached as harm-thresholds
    caches them): its flag rate's coefficient on log characters with the label held fixed; on test, the
    correlation of its score with log characters among the safe and among the unsafe responses, and the true and
    flagged unsafe rates per length quartile, at the judge's own threshold."""
    from trinityx.eval.judges.train import labelled_examples

    saved = json.loads((out / "harm_scores.json").read_text())
    if saved.get("judge") != str(folder.resolve()):
        raise SystemExit(f"{out / 'harm_scores.json'} holds another judge's scores: run harm-thresholds --judge {folder} first")
    threshold = json.loads((folder / "judge.json").read_text())["threshold"]
    _, responses, labels = labelled_examples("harm", data_dir, "test")
    p, y = np.array(saved["test"]), np.array(labels)
    length = np.log1p(np.array([len(r) for r in responses]))
    for label, name in ((0, "safe"), (1, "unsafe")):
        m = y == label
        print(f"{name} responses (n {m.sum()}): correlation of the judge's score with log characters "
              f"{np.corrcoef(p[m], length[m])[0, 1]:+.3f}")
    # The length bias: a linear probability model of the flag (0 / 100) on the label and log characters, so the
    # length coefficient is the judge's response to length with the truth held fixed (scripts/paper_tables.py
    # takes it as --harm-length-bias).
    for split in ("dev", "test"):
        _, split_responses, split_labels = labelled_examples("harm", data_dir, split)
        y_split = np.array(split_labels, dtype=float)
        x_split = np.log1p(np.array([len(r) for r in split_responses]))
        design = np.stack([np.ones_like(x_split), y_split, x_split], 1)
        coef = np.linalg.lstsq(design, 100.0 * (np.array(saved[split]) >= threshold), rcond=None)[0]
        print(f"{split} (n {len(y_split)}): flagged % = {coef[0]:.1f} + {coef[1]:.1f} unsafe + {coef[2]:.2f} log "
              f"characters: {coef[2]:.2f} points more flags per unit of log length, the label held fixed")
    print(f"| characters | n | unsafe rate | flagged at {threshold:.3f} |\n|---|---|---|---|")
    edges = np.quantile(length, [0, 0.25, 0.5, 0.75, 1])
    for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        m = (length >= lo) & ((length < hi) if k < 3 else (length <= hi))
        print(f"| {math.expm1(lo):.0f}-{math.expm1(hi):.0f} | {m.sum()} | {y[m].mean():.2f} | {(p[m] >= threshold).mean():.2f} |")


def threshold_table(dev: tuple, test: tuple) -> None:
    """Test metrics of harm scores at the dev threshold of each rule: dev = (p, y), test = (p, y, prompts)."""
    (p_dev, y_dev), (p, y, prompts) = dev, test
    unsafe_prompts = {q for q, label in zip(prompts, y) if label}
    risky = np.array([q in unsafe_prompts for q in prompts])
    rules = {rule: best_threshold(p_dev, y_dev, rule) for rule in THRESHOLD_RULES}
    rules["maximise balanced accuracy (no accuracy floor)"] = max(
        np.unique(p_dev), key=lambda t: (balanced_accuracy(p_dev, y_dev, t), -abs(t - 0.5)))
    print(f"AUROC {auroc(p, y):.3f}; majority {max(y.mean(), 1 - y.mean()):.3f}")
    print("| dev threshold rule | threshold | accuracy | balanced | risky | confusion |")
    for rule, t in rules.items():
        m = confusion(p, y, t)
        print(f"| {rule} | {t:.3f} | {accuracy(p, y, t):.3f} | {balanced_accuracy(p, y, t):.3f} | "
              f"{accuracy(p[risky], y[risky], t):.3f} | [[{m['tn']}, {m['fp']}], [{m['fn']}, {m['tp']}]] |")


TRUTH_LAYERS = (10, 15, 20)  # of SmolLM2's 30


def truth_states(data_dir: str, out: Path, train_pairs: int) -> None:
    """For every distinct (question, answer) of the GPT-judge and GPT-info rows of each split: the 26 reference
    features of the default truth and info judges (MiniLM) and SmolLM2's frozen states of the question as a chat
    turn and the answer as its reply (`pair_states`: answer mean, last token, question mean at TRUTH_LAYERS);
    every pair of dev and test, `train_pairs` of train (seeded)."""
    from transformers import AutoModel, AutoTokenizer

    from trinityx.backbones import load_backbone
    from trinityx.eval.judges.features import pair_states, reference_features
    from trinityx.eval.judges.local import minilm_path
    from trinityx.eval.judges.train import labelled_examples, reference_answers

    backbone = load_backbone("smollm2-135m")
    encoder, tokenizer = AutoModel.from_pretrained(minilm_path(), dtype=torch.float32), AutoTokenizer.from_pretrained(minilm_path())
    out.mkdir(parents=True, exist_ok=True)
    for split in ("test", "dev", "train"):
        pairs = sorted({pair for kind in ("truth", "info") for pair in zip(*labelled_examples(kind, data_dir, split)[:2])})
        if split == "train" and len(pairs) > train_pairs:
            pairs = sorted(random.Random(0).sample(pairs, train_pairs))
        t0 = time.perf_counter()
        q, a = [p for p, _ in pairs], [r for _, r in pairs]
        refs = reference_features(encoder, tokenizer, q, a, reference_answers(data_dir, q), 64)  # [N, 26]
        x = pair_states(backbone.model, backbone.tokenizer, backbone.prompt_format, q, a, layers=TRUTH_LAYERS,
                        max_prompt_tokens=64, max_response_tokens=64, batch_size=32, desc=f"truth states {split}")
        print(f"{split}: {len(pairs)} pairs in {time.perf_counter() - t0:.0f} s", flush=True)
        torch.save({"pairs": pairs, "references": refs, "x": x.view(len(pairs), 3 * len(TRUTH_LAYERS), -1)},
                   out / f"truth_{split}.pt")


def truth_probe(data_dir: str, out: Path) -> None:
    """Truth and info judges on the cached features: reference features alone (the default judges' inputs), the
    backbone's states alone, and both; scikit-learn, threshold on dev (accuracy), every test row."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    from trinityx.eval.judges.train import labelled_examples

    saved = {s: torch.load(out / f"truth_{s}.pt", weights_only=True) for s in ("train", "dev", "test")}

    def design(split, kind, states):
        d = saved[split]
        row = {tuple(p): i for i, p in enumerate(d["pairs"])}
        questions, answers, labels = labelled_examples(kind, data_dir, split)
        keep = [k for k, pair in enumerate(zip(questions, answers)) if pair in row]  # train: the sampled pairs' rows
        index = [row[(questions[k], answers[k])] for k in keep]
        labels = [labels[k] for k in keep]
        assert split == "train" or len(keep) == len(questions), f"{split}: rows without cached features"
        parts = [d["references"][index]] + [d["x"][index][:, 3 * TRUTH_LAYERS.index(layer) + POOLINGS.index(pool)]
                                           for layer, pool in states]
        return torch.cat(parts, -1).numpy(), np.array(labels)

    choices = {"reference features, MLP 64": ([], "mlp", None),
               "states (answer mean + last token, layer 20), logistic": ([(20, "response mean"), (20, "last token")], "logistic", 0.001),
               "reference features + states of layer 20, logistic": ([(20, "response mean"), (20, "last token")], "logistic", 0.001),
               "reference features + states of layer 15, logistic": ([(15, "response mean"), (15, "last token")], "logistic", 0.001),
               "reference features + states of layers 10, 15, 20, logistic": ([(l, p) for l in (10, 15, 20) for p in ("response mean", "last token")], "logistic", 0.001),
               "reference features + states of layer 20, logistic C 0.01": ([(20, "response mean"), (20, "last token")], "logistic", 0.01)}
    print("| judge | features | threshold | accuracy | balanced | AUROC | majority | confusion [[tn, fp], [fn, tp]] |")
    for kind in ("truth", "info"):
        for name, (states, model_kind, c) in choices.items():
            (x, y), (x_dev, y_dev), (x_test, y_test) = (design(s, kind, states) for s in ("train", "dev", "test"))
            if name.startswith("states"):
                x, x_dev, x_test = x[:, 26:], x_dev[:, 26:], x_test[:, 26:]
            scaler = StandardScaler().fit(x)
            model = (MLPClassifier((64,), alpha=1e-3, max_iter=500, random_state=0) if model_kind == "mlp"
                     else LogisticRegression(C=c, max_iter=3000))
            model.fit(scaler.transform(x), y)
            p_dev, p = (model.predict_proba(scaler.transform(v))[:, 1] for v in (x_dev, x_test))
            t = best_threshold(p_dev, y_dev)
            m = confusion(p, y_test, t)
            print(f"| {kind} | {name} | {t:.3f} | {accuracy(p, y_test, t):.3f} | {balanced_accuracy(p, y_test, t):.3f} | "
                  f"{auroc(p, y_test):.3f} | {max(y_test.mean(), 1 - y_test.mean()):.3f} | "
                  f"[[{m['tn']}, {m['fp']}], [{m['fn']}, {m['tp']}]] |", flush=True)


def closest_references(encoder, tokenizer, questions: list[str], answers: list[str], references, k: int) -> list[str]:
    """The text pair a reference-reading cross-encoder sees beside "Q: question A: answer": the k correct and the k
    incorrect reference answers closest to the answer in MiniLM's embedding (the default judges' similarity)."""
    from trinityx.eval.judges.features import layer_means

    texts = sorted({t for a, (c, i) in zip(answers, references) for t in (a, *c, *i)})
    row = {t: n for n, t in enumerate(texts)}
    e = torch.nn.functional.normalize(layer_means(encoder, tokenizer, texts, 64, (-1,), 32, "closest references"), dim=-1)
    out = []
    for a, (correct, incorrect) in zip(answers, references):
        picked = []
        for refs in (correct, incorrect):
            sims = e[[row[t] for t in refs]] @ e[row[a]]  # [R]
            picked.append(" | ".join(refs[j] for j in sims.argsort(descending=True)[:k].tolist()))
        out.append(f"True: {picked[0]} False: {picked[1]}")
    return out


def truth_cross(data_dir: str, out: Path, train_pairs: int | None, epochs: int, lr: float, batch_size: int,
                k: int, max_length: int, eval_rows: int | None, default_truth: Path) -> None:
    """A truth judge that reads the references token by token: MiniLM fine-tuned end to end as a cross-encoder
    of ("Q: question A: answer", "True: the k closest correct references False: the k closest incorrect ones"),
    BCE on each distinct pair's mean label (`fit_cross_encoder`); threshold on dev (accuracy), every test row.
    Then the same logit stacked beside the default judges' 26 reference features, and beside the shipped default
    truth judge's logit (logistic regression fitted on dev, its dev probabilities out of fold for the threshold),
    test untouched until the end."""
    from scipy.special import expit as sigmoid
    from scipy.special import logit
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.preprocessing import StandardScaler
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from trinityx.eval.judges.features import reference_features
    from trinityx.eval.judges.local import cross_encoder_logits, load_judge, minilm_path, qa_text
    from trinityx.eval.judges.train import fit_cross_encoder, labelled_examples, reference_answers, score_labelled

    default_judge = load_judge(default_truth)  # the shipped truth judge, for the last stacking row
    torch.manual_seed(0)
    encoder, tokenizer = AutoModel.from_pretrained(minilm_path(), dtype=torch.float32), AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=1, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)

    def rows(split: str):
        q, a, y = labelled_examples("truth", data_dir, split)
        keep = range(len(y)) if split == "train" else _sample(len(y), eval_rows, 0)  # every row unless smoke-testing
        return [q[i] for i in keep], [a[i] for i in keep], np.array([y[i] for i in keep], dtype=float)

    q, a, y = rows("train")
    labels: dict[tuple[str, str], list[float]] = {}
    for pair, label in zip(zip(q, a), y):
        labels.setdefault(pair, []).append(label)
    distinct = sorted(labels)
    distinct = [distinct[i] for i in _sample(len(distinct), train_pairs, 0)]
    dq, da = [p for p, _ in distinct], [r for _, r in distinct]
    pairs = closest_references(encoder, tokenizer, dq, da, reference_answers(data_dir, dq), k)
    print(f"train: {len(distinct)} distinct (question, answer) pairs of {len(q)} rows; e.g. {qa_text(dq[0], da[0])!r} / "
          f"{pairs[0][:200]!r}", flush=True)
    log = fit_cross_encoder(model, tokenizer, [qa_text(x, r) for x, r in distinct], pairs,
                            [float(np.mean(labels[p])) for p in distinct], epochs=epochs, batch_size=batch_size, lr=lr,
                            max_length=max_length, seed=0, desc="truth cross-encoder")
    print(f"{log['steps']} steps in {log['train_seconds']:.0f} s, final loss {log['final_loss']:.3f}", flush=True)

    scored = {}
    for split in ("dev", "test"):
        q, a, y = rows(split)
        refs = reference_answers(data_dir, q)
        t0 = time.perf_counter()
        logits = cross_encoder_logits(model, tokenizer, [qa_text(x, r) for x, r in zip(q, a)],
                                      closest_references(encoder, tokenizer, q, a, refs, k), max_length)
        features = reference_features(encoder, tokenizer, q, a, refs, 64)  # [N, 26]
        shipped = np.clip(np.asarray(score_labelled(default_judge, data_dir, q, a), dtype=float), 1e-6, 1 - 1e-6)
        scored[split] = (logits.numpy(), np.c_[features.numpy(), logit(shipped)], y)  # + the default judge's logit
        print(f"{split}: {len(y)} rows scored in {time.perf_counter() - t0:.0f} s", flush=True)
    torch.save(scored, out / "truth_cross_scores.pt")

    (l_dev, f_dev, y_dev), (l_test, f_test, y_test) = scored["dev"], scored["test"]
    print("| truth judge | threshold (dev) | accuracy | balanced | AUROC | majority | confusion [[tn, fp], [fn, tp]] |")

    def report(name: str, p_dev, p_test) -> None:
        t = best_threshold(p_dev, y_dev)
        m = confusion(p_test, y_test, t)
        print(f"| {name} | {t:.3f} | {accuracy(p_test, y_test, t):.3f} | {balanced_accuracy(p_test, y_test, t):.3f} | "
              f"{auroc(p_test, y_test):.3f} | {max(y_test.mean(), 1 - y_test.mean()):.3f} | "
              f"[[{m['tn']}, {m['fp']}], [{m['fn']}, {m['tp']}]] |", flush=True)

    report(f"cross-encoder with {k}+{k} closest references", sigmoid(l_dev), sigmoid(l_test))
    report("the default judge (MLP on the 26 features, trained on train)", sigmoid(f_dev[:, -1]), sigmoid(f_test[:, -1]))
    for name, x_dev, x_test in (("26 reference features, logistic (fitted on dev)", f_dev[:, :-1], f_test[:, :-1]),
                                ("26 reference features + the cross-encoder's logit, logistic (fitted on dev)",
                                 np.c_[f_dev[:, :-1], l_dev], np.c_[f_test[:, :-1], l_test]),
                                ("the default judge's logit + the cross-encoder's logit, logistic (fitted on dev)",
                                 np.c_[f_dev[:, -1:], l_dev], np.c_[f_test[:, -1:], l_test])):
        stack, scaler = LogisticRegression(C=1.0, max_iter=3000), StandardScaler().fit(x_dev)
        # cross_val_predict fits clones, so `stack` is still unfitted before the fit on all of dev
        p_dev = cross_val_predict(stack, scaler.transform(x_dev), y_dev, cv=5, method="predict_proba")[:, 1]
        p_test = stack.fit(scaler.transform(x_dev), y_dev).predict_proba(scaler.transform(x_test))[:, 1]
        report(name, p_dev, p_test)


def harm_lora(data_dir: str, out: Path, train_pairs: int, epochs: int, rank: int, lr: float,
              trained_layers: int, pool_layer: int, batch_size: int) -> None:
    """SmolLM2 as the harm judge itself: LoRA on its top `trained_layers` layers below `pool_layer` and a
    linear head on the pooled states of (chat prompt, response) at `pool_layer`, trained end to end with BCE
    on soft labels (the mean label of each distinct pair). The layers below stay frozen and build no graph,
    so a step costs the forward pass to `pool_layer` plus the backward pass through the trained layers."""
    from peft import LoraConfig, get_peft_model

    from trinityx.backbones import load_backbone
    from trinityx.eval.judges.features import encode_pairs, pair_batch, per_distinct_pair, pooled_pair
    from trinityx.eval.judges.train import fit_binary, labelled_examples
    from trinityx.mocae.model import backbone_hidden_states
    from trinityx.train.loop import cosine_with_warmup

    torch.manual_seed(0)
    backbone = load_backbone("smollm2-135m")
    tokenizer, fmt = backbone.tokenizer, backbone.prompt_format
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      layers_to_transform=list(range(pool_layer - trained_layers, pool_layer)))
    model = get_peft_model(backbone.model, lora)
    decoder_lm = model.base_model.model
    head = torch.nn.Linear(3 * decoder_lm.config.hidden_size, 1)

    def scores(batch_pairs):  # logits [B] of encoded pairs
        input_ids, in_prompt, in_response = pair_batch(batch_pairs, pad)
        hidden = backbone_hidden_states(decoder_lm, input_ids, (in_prompt + in_response).long(), [pool_layer])[0]
        x = pooled_pair(hidden.float(), in_prompt, in_response)  # [B, 3 D]
        return head(torch.nn.functional.layer_norm(x, x.shape[-1:]))[:, 0]

    prompts, responses, labels = labelled_examples("harm", data_dir, "train")
    soft: dict = {}
    for pair in zip(prompts, responses, labels):
        soft.setdefault(pair[:2], []).append(float(pair[2]))
    pairs = sorted(soft)
    if len(pairs) > train_pairs:
        pairs = sorted(random.Random(0).sample(pairs, train_pairs))
    encoded = encode_pairs(tokenizer, fmt, pairs, max_prompt_tokens=64, max_response_tokens=160)
    y = torch.tensor([float(np.mean(soft[p])) for p in pairs])  # [N]
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr},
                                   {"params": head.parameters(), "lr": 10 * lr}], weight_decay=0.01)
    total = epochs * (len(pairs) // batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total // 10, total, 0.0))
    lengths = [len(a) + len(b) for a, b in encoded]
    print(f"{len(pairs)} training pairs, {total} steps of {batch_size}; "
          f"{sum(p.numel() for p in params):,} trained parameters", flush=True)
    model.train()
    log = fit_binary(lambda ids: scores([encoded[i] for i in ids]), params, optimizer, scheduler, lengths, y,
                     epochs=epochs, batch_size=batch_size, seed=0, desc="harm lora")
    print(f"trained in {log['train_seconds']:.0f} s, final loss {log['final_loss']:.3f}", flush=True)
    model.eval()
    scored = {}
    with torch.no_grad():
        for split in ("dev", "test"):
            prompts, responses, labels = labelled_examples("harm", data_dir, split)
            p = per_distinct_pair(lambda batch: torch.sigmoid(scores(batch)), tokenizer, fmt, prompts, responses,
                                  max_prompt_tokens=64, max_response_tokens=160, batch_size=32, desc=f"score {split}")
            scored[split] = (p.numpy(), np.array(labels), prompts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "harm_lora_scores.json").write_text(json.dumps({s: v[0].tolist() for s, v in scored.items()}))
    threshold_table(scored["dev"][:2], scored["test"])


def helpful_references(data_dir: str, n_train: int) -> None:
    """Bradley-Terry scorers with and without features of the output's similarity to GPT-4's reference output."""
    from transformers import AutoModel, AutoTokenizer

    from trinityx.eval.judges.features import token_f1
    from trinityx.eval.judges.local import embed, minilm_path

    reference = {r["instruction"]: r["output"]
                 for r in json.loads((Path(data_dir) / "alpaca_eval" / "reference_gpt4.json").read_text())}
    train, dev = load_judgements(data_dir, "train"), load_judgements(data_dir, "dev")
    train = [train[i] for i in _sample(len(train), n_train, 0)]
    dev = [dev[i] for i in _sample(len(dev), 1600, 0)]  # the judge's validity sample
    encoder, tokenizer = AutoModel.from_pretrained(minilm_path()), AutoTokenizer.from_pretrained(minilm_path())
    texts = sorted({t for r in train + dev for t in (r.instruction, r.output_1, r.output_2, reference[r.instruction])})
    e = embed(encoder, tokenizer, texts, 256)  # [N, D]
    row = {t: i for i, t in enumerate(texts)}

    def phi(instruction, output, names):
        ref, e_o, e_i = reference[instruction], e[row[output]], e[row[instruction]]
        columns = {"length": [math.log1p(len(output)), math.log1p(output.count("\n"))],
                   "reference": [float(e_o @ e[row[ref]]), token_f1(output, ref),
                                 math.log1p(len(output)) - math.log1p(len(ref))],
                   "instruction": [float(e_o @ e_i)],
                   "structure": [math.log1p(sum(line.lstrip()[:2] in ("- ", "* ", "1.", "2.", "3.")
                                                for line in output.split("\n"))),
                                 float("as an ai" in output.lower()), float(not output.strip())],
                   "embedding": e_o.tolist()}
        return [v for name in names for v in columns[name]]

    def delta(rows, names):  # phi(b) - phi(a): [N, F]
        return torch.tensor([[b - a for a, b in zip(phi(r.instruction, r.output_1, names),
                                                    phi(r.instruction, r.output_2, names))] for r in rows])

    prefs = [r.preference for r in dev]
    similar = [k for k, r in enumerate(dev) if similar_length(r.output_1, r.output_2) and r.preference != 1.5]
    print(f"length rule: {length_rule_agreement([r.output_1 for r in dev], [r.output_2 for r in dev], prefs):.3f}")
    targets = torch.tensor([r.preference - 1 for r in train])
    for names in (["length"], ["length", "embedding"], ["length", "reference"],
                  ["length", "reference", "instruction", "structure"],
                  ["length", "reference", "instruction", "structure", "embedding"]):
        x, x_dev = delta(train, names), delta(dev, names)
        scale = x.std(0) + 1e-6
        for l2 in (1e-4, 1e-2):
            p = torch.sigmoid((x_dev / scale) @ _fit_scorer(x / scale, targets, l2)).tolist()
            print(f"{' + '.join(names)}, L2 {l2}: agreement {pairwise_agreement(p, prefs):.3f}, similar length "
                  f"{pairwise_agreement([p[k] for k in similar], [prefs[k] for k in similar]):.3f} (n {len(similar)})")


def text_statistics(output: str) -> list[float]:
    """Cheap surface statistics of an answer beyond its length: structure, repetition, completeness, register."""
    lines = [line.strip() for line in output.split("\n") if line.strip()]
    words = output.split()
    bigrams = list(zip(words, words[1:]))
    return [math.log1p(len(output)), math.log1p(len(lines)),
            math.log1p(sum(line[:2] in ("- ", "* ") or line[:1].isdigit() and line[1:3] in (". ", ") ")
                           for line in lines)),  # list items
            math.log1p(sum(line.startswith("#") or line.endswith(":") for line in lines)),  # headings
            float("```" in output),
            len(set(bigrams)) / max(len(bigrams), 1),  # distinct bigrams: 1 = no repetition
            max((lines.count(line) for line in lines), default=0) > 1,  # a repeated line
            float(output.rstrip()[-1:] in ".!?)\"`'*"),  # ends like a finished sentence
            sum(not c.isascii() for c in output) / max(len(output), 1),
            float(any(cue in output.lower() for cue in ("as an ai", "i'm sorry", "i cannot", "i can't"))),
            float(np.mean([len(w) for w in words])) if words else 0.0,
            math.log1p(output.count(". ") + output.count(".\n")),  # sentences
            sum(c.isdigit() for c in output) / max(len(output), 1),
            math.log1p(output.count("**"))]


def helpful_text(data_dir: str) -> None:
    """Bradley-Terry scorers on the length alone and on text statistics: does anything cheap beat the length rule?"""
    train, dev = load_judgements(data_dir, "train"), load_judgements(data_dir, "dev")
    dev = [dev[i] for i in _sample(len(dev), 1600, 0)]  # the judge's validity sample

    def delta(rows, columns):  # phi(b) - phi(a): [N, F]
        return torch.tensor([[b - a for a, b in zip(np.array(text_statistics(r.output_1))[columns],
                                                    np.array(text_statistics(r.output_2))[columns])] for r in rows],
                            dtype=torch.float32)

    prefs = [r.preference for r in dev]
    similar = [k for k, r in enumerate(dev) if similar_length(r.output_1, r.output_2) and r.preference != 1.5]
    rule = length_rule_agreement([r.output_1 for r in dev], [r.output_2 for r in dev], prefs)
    rule_similar = length_rule_agreement([dev[k].output_1 for k in similar], [dev[k].output_2 for k in similar],
                                         [prefs[k] for k in similar])
    print(f"train {len(train)}, dev {len(dev)}; length rule {rule:.3f}, similar length {rule_similar:.3f} (n {len(similar)})")
    targets = torch.tensor([r.preference - 1 for r in train])
    for name, columns in (("log chars", [0]), ("log chars + log lines", [0, 1]), ("every statistic", list(range(14)))):
        x, x_dev = delta(train, columns), delta(dev, columns)
        scale = x.std(0) + 1e-6
        for l2 in (1e-4, 1e-2):
            p = torch.sigmoid((x_dev / scale) @ _fit_scorer(x / scale, targets, l2)).tolist()
            print(f"| {name} | {l2} | {pairwise_agreement(p, prefs):.3f} | "
                  f"{pairwise_agreement([p[k] for k in similar], [prefs[k] for k in similar]):.3f} |", flush=True)


def helpful_reward(data_dir: str, n_train: int, epochs: int, lr: float, batch_size: int, length_term: str) -> None:
    """A reward model fine-tuned end to end on GPT-4's judgements: MiniLM as a cross-encoder r(instruction,
    output), P(b preferred) = sigmoid(r(b) - r(a) + w (log chars b - log chars a)), so the encoder only has to
    learn what length does not say. `length_term` `learned`: w starts at 1 and is learned beside the encoder (at
    its learning rate); `fitted`: w is first fitted on every training judgement by length alone and then fixed,
    and the reward head starts at zero, so training starts from the fitted length model exactly. BCE on the
    soft preference; agreement on the judge's validity sample of dev (instructions never seen), overall and on
    the pairs of similar length."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trinityx.eval.judges.batching import tokenize
    from trinityx.eval.judges.local import minilm_path
    from trinityx.eval.judges.train import fit_binary
    from trinityx.train.loop import cosine_with_warmup

    torch.manual_seed(0)
    train, dev = load_judgements(data_dir, "train"), load_judgements(data_dir, "dev")
    train = [train[i] for i in _sample(len(train), n_train, 0)]
    dev = [dev[i] for i in _sample(len(dev), 1600, 0)]  # the judge's validity sample
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model.get_input_embeddings().weight.requires_grad_(False)

    def log_chars(text: str) -> float:
        return math.log1p(len(text))

    if length_term == "fitted":
        everything = load_judgements(data_dir, "train")
        delta = torch.tensor([[log_chars(r.output_2) - log_chars(r.output_1)] for r in everything])  # [N, 1]
        w = _fit_scorer(delta, torch.tensor([r.preference - 1 for r in everything]), 1e-4)[0].detach()
        torch.nn.init.zeros_(model.classifier.weight)
        torch.nn.init.zeros_(model.classifier.bias)
        print(f"length weight fitted on {len(everything)} judgements: {w.item():.3f}", flush=True)
    else:
        w = torch.nn.Parameter(torch.tensor(1.0))  # the length term's weight

    def p_logits(rows) -> torch.Tensor:  # logit of P(b preferred) [B]
        instructions = [r.instruction for r in rows] * 2
        outputs = [r.output_1 for r in rows] + [r.output_2 for r in rows]
        r = model(**tokenize(tokenizer, instructions, outputs, 256)).logits[:, 0].float().view(2, len(rows))
        length = torch.tensor([log_chars(x.output_2) - log_chars(x.output_1) for x in rows])
        return r[1] - r[0] + w * length

    params = [q for q in model.parameters() if q.requires_grad] + ([w] if length_term == "learned" else [])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    total = epochs * (len(train) // batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: cosine_with_warmup(t, total // 10, total, 0.0))
    model.train()
    log = fit_binary(lambda ids: p_logits([train[i] for i in ids]), params, optimizer, scheduler,
                     [len(r.output_1) + len(r.output_2) for r in train], torch.tensor([r.preference - 1 for r in train]),
                     epochs=epochs, batch_size=batch_size, seed=0, desc="helpful reward")
    print(f"{len(train)} judgements, {log['steps']} steps in {log['train_seconds']:.0f} s, final loss "
          f"{log['final_loss']:.3f}, length weight {w.item():.3f}", flush=True)
    model.eval()
    p = []
    with torch.no_grad():
        for start in tqdm(range(0, len(dev), 16), desc="score dev", unit="batch", leave=False):
            p += torch.sigmoid(p_logits(dev[start:start + 16])).tolist()
    prefs = [r.preference for r in dev]
    similar = [k for k, r in enumerate(dev) if similar_length(r.output_1, r.output_2) and r.preference != 1.5]
    rule = length_rule_agreement([r.output_1 for r in dev], [r.output_2 for r in dev], prefs)
    rule_similar = length_rule_agreement([dev[k].output_1 for k in similar], [dev[k].output_2 for k in similar],
                                         [prefs[k] for k in similar])
    print(f"dev {len(dev)} judgements of {len({r.instruction for r in dev})} instructions: agreement "
          f"{pairwise_agreement(p, prefs):.3f} (length rule {rule:.3f}); similar length (n {len(similar)}) "
          f"{pairwise_agreement([p[k] for k in similar], [prefs[k] for k in similar]):.3f} (length rule {rule_similar:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("harm-states", "harm-probe", "harm-thresholds", "harm-lengths", "truth-states",
                                         "truth-probe", "truth-cross",
                                         "helpful-references",
                                             "helpful-text", "harm-lora", "helpful-reward"))
    parser.add_argument("--judge", type=Path, help="harm-thresholds, harm-lengths: a saved harm judge's folder; truth-cross: the "
                        "default truth judge's (default ~/.cache/trinityx/judges/truth)")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", type=Path, default=Path("runs/judge_probes"))
    parser.add_argument("--train-pairs", type=int, default=3500)
    parser.add_argument("--backbone", default="smollm2-135m", choices=sorted(STATE_LAYERS), help="harm-states")
    parser.add_argument("--train-judgements", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=1, help="harm-lora, helpful-reward, truth-cross")
    parser.add_argument("--rank", type=int, default=16, help="harm-lora: LoRA rank (alpha = 2 rank)")
    parser.add_argument("--lr", type=float, default=3e-4, help="harm-lora: LoRA learning rate (the head's is 10x); "
                        "helpful-reward, truth-cross: the encoder's")
    parser.add_argument("--trained-layers", type=int, default=8, help="harm-lora: LoRA on this many layers below the pool layer")
    parser.add_argument("--pool-layer", type=int, default=20, help="harm-lora")
    parser.add_argument("--references", type=int, default=2, help="truth-cross: closest correct and incorrect references each")
    parser.add_argument("--max-length", type=int, default=160, help="truth-cross: tokens of the cross-encoder's input")
    parser.add_argument("--length-term", choices=("learned", "fitted"), default="learned", help="helpful-reward")
    parser.add_argument("--batch-size", type=int, default=16, help="harm-lora, helpful-reward (judgements per step)")
    parser.add_argument("--eval-rows", type=int, default=None, help="truth-cross: a seeded subsample of dev/test rows (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "harm-states":
        harm_states(args.data_dir, args.out, args.train_pairs, args.backbone)
    elif args.what == "harm-probe":
        harm_probe(args.data_dir, args.out)
    elif args.what == "truth-states":
        truth_states(args.data_dir, args.out, args.train_pairs)
    elif args.what == "truth-probe":
        truth_probe(args.data_dir, args.out)
    elif args.what == "truth-cross":
        truth_cross(args.data_dir, args.out, args.train_pairs or None, args.epochs, args.lr, args.batch_size,
                    args.references, args.max_length, args.eval_rows,
                    args.judge or Path.home() / ".cache/trinityx/judges/truth")
    elif args.what == "harm-lengths":
        harm_lengths(args.data_dir, args.judge, args.out)
    elif args.what == "harm-thresholds":
        harm_thresholds(args.data_dir, args.judge, args.out)
    elif args.what == "harm-lora":
        harm_lora(args.data_dir, args.out, args.train_pairs, args.epochs, args.rank, args.lr, args.trained_layers,
                  args.pool_layer, args.batch_size)
    elif args.what == "helpful-reward":
        helpful_reward(args.data_dir, args.train_judgements, args.epochs, args.lr, args.batch_size, args.length_term)
    elif args.what == "helpful-text":
        helpful_text(args.data_dir)
    else:
        helpful_references(args.data_dir, args.train_judgements)


if __name__ == "__main__":
    main()
