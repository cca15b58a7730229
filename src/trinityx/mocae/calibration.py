"""Calibration of the router (docs/design.md, "calibration"): metrics, temperature scaling, reliability diagram.

Everything except `reliability_diagram` (which writes a PNG) is a pure function: probabilities or logits
[N, K] and integer labels [N] in (torch tensors, numpy arrays or lists), Python numbers out. K is the
number of classes (experts / dimensions).

- ECE, the expected calibration error (Naeini et al. 2015; binned form as in Guo et al. 2017, eq. 3):
  sort items by confidence = max_k p_k into M equal-width bins, ECE = sum_m |B_m| / N * |acc(B_m) - conf(B_m)|.
- Brier score (Brier 1950), multi-class form: mean over items of sum over classes of (p_k - 1[y = k])^2.
  This is Brier's original definition, in [0, 2]; some libraries divide by K or score only the top class.
- NLL: mean of -log p_y, in nats.
- Temperature scaling (Guo et al. 2017, section 4.2): one scalar T > 0 for all logits, p = softmax(z / T),
  fitted by minimising NLL on held-out data. It does not change the argmax, so accuracy is unchanged.
- `routing_summary`: how a router sent one evaluation set's items (accuracy against the set's dimension, argmax
  counts, mean gates), for calibrate's every-item routing and evaluate's per-axis records alike.
"""

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from trinityx.io import atomic_file

N_BINS = 15  # Guo et al. 2017 use M = 15 bins


def _as_tensor(x, dtype=torch.float64) -> Tensor:
    return torch.as_tensor(x, dtype=dtype)


def reliability_bins(probs, labels, n_bins: int = N_BINS) -> dict[str, list]:
    """Per equal-width confidence bin ((m-1)/M, m/M]: mean confidence, accuracy and count (empty bins: 0)."""
    probs, labels = _as_tensor(probs), _as_tensor(labels, torch.long)
    conf, pred = probs.max(-1)  # [N], [N]
    correct = (pred == labels).to(probs.dtype)  # [N]
    # Bin m holds confidences in ((m-1)/M, m/M]; a confidence of exactly 0 goes to the first bin.
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)  # [N]
    count = torch.bincount(bins, minlength=n_bins).to(probs.dtype)  # [M]
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)  # [M]
    acc_sum = torch.bincount(bins, weights=correct, minlength=n_bins)  # [M]
    safe = count.clamp(min=1)
    return {
        "confidence": (conf_sum / safe).tolist(),
        "accuracy": (acc_sum / safe).tolist(),
        "count": count.long().tolist(),
    }


def ece(probs, labels, n_bins: int = N_BINS) -> float:
    """Expected calibration error with `n_bins` equal-width bins on the max probability (Naeini et al. 2015)."""
    bins = reliability_bins(probs, labels, n_bins)
    n = sum(bins["count"])
    return float(sum(c / n * abs(a - p) for c, a, p in zip(bins["count"], bins["accuracy"], bins["confidence"])))


def brier(probs, labels) -> float:
    """Multi-class Brier score (Brier 1950): mean over items of sum over classes of (p_k - onehot_k)^2."""
    probs, labels = _as_tensor(probs), _as_tensor(labels, torch.long)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).to(probs.dtype)  # [N, K]
    return float(((probs - onehot) ** 2).sum(-1).mean())


def nll(scores, labels, from_logits: bool = False) -> float:
    """Mean negative log-likelihood -log p_y (nats) of probabilities [N, K], or of logits if from_logits."""
    scores, labels = _as_tensor(scores), _as_tensor(labels, torch.long)
    log_probs = torch.log_softmax(scores, -1) if from_logits else torch.log(scores)  # [N, K]
    return float(-log_probs.gather(-1, labels[:, None]).mean())


def accuracy(probs, labels) -> float:
    """Share of items whose argmax is the label."""
    probs, labels = _as_tensor(probs), _as_tensor(labels, torch.long)
    return float((probs.argmax(-1) == labels).to(torch.float64).mean())


def confusion_matrix(pred, labels, K: int) -> list[list[int]]:
    """K x K counts; row = true label, column = predicted label."""
    pred, labels = _as_tensor(pred, torch.long), _as_tensor(labels, torch.long)
    return torch.bincount(labels * K + pred, minlength=K * K).reshape(K, K).tolist()


T_RANGE = (0.01, 100.0)


def fit_temperature(logits, labels, max_iter: int = 100) -> float:
    """T > 0 minimising NLL of softmax(logits / T) (Guo et al. 2017), by L-BFGS over log T (keeps T > 0).

    T is kept in T_RANGE: a router whose logits are all near zero would otherwise drive T towards 0 or
    infinity, which only rescales noise.
    """
    logits, labels = _as_tensor(logits), _as_tensor(labels, torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        T = log_t.clamp(math.log(T_RANGE[0]), math.log(T_RANGE[1])).exp()
        loss = torch.nn.functional.cross_entropy(logits / T, labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().clamp(math.log(T_RANGE[0]), math.log(T_RANGE[1])).exp())


def calibration_report(logits_dev, labels_dev, logits_test, labels_test, n_bins: int = N_BINS) -> dict:
    """Fit T on dev; ECE, Brier, NLL on test before (T = 1) and after; accuracy and confusion matrix on test."""
    logits_test, labels_test = _as_tensor(logits_test), _as_tensor(labels_test, torch.long)
    T = fit_temperature(logits_dev, labels_dev)

    def metrics(temperature: float) -> dict[str, float]:
        probs = torch.softmax(logits_test / temperature, -1)
        return {"ece": ece(probs, labels_test, n_bins), "brier": brier(probs, labels_test),
                "nll": nll(logits_test / temperature, labels_test, from_logits=True)}

    K = logits_test.shape[-1]
    return {
        "temperature": T,
        "n_dev": len(labels_dev),
        "n_test": len(labels_test),
        "n_bins": n_bins,
        "accuracy": accuracy(logits_test, labels_test),
        "before": metrics(1.0),
        "after": metrics(T),
        "confusion_matrix": confusion_matrix(logits_test.argmax(-1), labels_test, K),
    }


def reliability_diagram(probs, labels, path: str | Path, title: str = "", n_bins: int = N_BINS) -> Path:
    """Write a reliability diagram PNG: accuracy per confidence bin against the diagonal, counts below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bins = reliability_bins(probs, labels, n_bins)
    edges = [m / n_bins for m in range(n_bins)]
    width = 1 / n_bins
    fig = Figure(figsize=(5, 6))
    FigureCanvasAgg(fig)  # Agg canvas without touching pyplot's global backend
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(edges, bins["accuracy"], width=width, align="edge", edgecolor="black", label="accuracy")
    top.bar(edges, [c - a for c, a in zip(bins["confidence"], bins["accuracy"])], bottom=bins["accuracy"],
            width=width, align="edge", color="red", alpha=0.3, edgecolor="red", label="gap")
    top.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"{title}\nECE = {ece(probs, labels, n_bins):.3f}".strip(), fontsize=10)
    top.legend(loc="upper left")
    bottom.bar(edges, bins["count"], width=width, align="edge", edgecolor="black")
    bottom.set_xlabel("confidence (max gate probability)")
    bottom.set_ylabel("count")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)


def routing_summary(records: list[dict], dimension: str, dimensions: list[str]) -> dict:
    """How the router sent an evaluation set's items: the share routed to the set's own dimension (argmax gate),
    the argmax counts per expert (this set's row of the confusion matrix) and the mean gates."""
    gates = np.array([r["gates"] for r in records])  # [N, K]
    picked = gates.argmax(1)
    return {"dimension": dimension, "n": len(records),
            "accuracy": float(np.mean(picked == dimensions.index(dimension))) if dimension in dimensions else None,
            "argmax_counts": {d: int(np.sum(picked == k)) for k, d in enumerate(dimensions)},
            "mean_gates": dict(zip(dimensions, gates.mean(0).tolist()))}
