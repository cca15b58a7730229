"""The router objective (docs/design.md, "router objective"), as pure functions of tensors.

    total = w_lm * LM + w_gl * GL + w_rl * RL + w_entropy * H + w_step_kl * KL_step

- LM: the language-model loss of the mixed model on the HHH training data (computed by the model).
- GL, the gating loss: cross-entropy between the gate logits z [B, K] and the example's dimension label
  (each training example's source dataset is a free label; gate k serves expert k's dimension).
- RL, the regularisation loss: KL(mean_b g_b || gamma), the batch-mean gate against the task-adaptive prior
  gamma [K] (`trinityx.lora.taskvectors`). It keeps the router from collapsing onto one expert, as the load
  balancing loss of sparse mixtures does (Shazeer et al. 2017; Fedus et al. 2022).
- H: mean per-example gate entropy; a positive weight pushes each example towards confident routing while
  RL keeps the batch as a whole spread out.
- KL_step: KL(current batch-mean gate || previous step's, detached), which damps oscillation of the routing
  distribution between steps.

A weight of 0 switches a term off (it is then not computed). Gates inside the objective are softmax(z),
T = 1: the temperature is fitted after training (Guo et al. 2017), never trained.

Legend: B batch, K experts.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_WEIGHTS = {"lm": 1.0, "gl": 1.0, "rl": 0.1, "entropy": 0.0, "step_kl": 0.0}
"""Our defaults, not the paper's (it gives none): LM and GL equal, a light prior, optional terms off."""


def kl_divergence(p: Tensor, q: Tensor) -> Tensor:
    """KL(p || q) = sum_k p_k log(p_k / q_k) for distributions [..., K] -> [...]; 0 log 0 = 0."""
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q)).sum(-1)


def mean_gate(logits: Tensor) -> Tensor:
    """Batch-mean gate softmax(z) over B: [B, K] -> [K]. Keep it (detached) for next step's step KL."""
    return torch.softmax(logits, dim=-1).mean(0)


def gating_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """GL: cross-entropy of gate logits [B, K] against dimension labels [B] (mean over B)."""
    return F.cross_entropy(logits, labels)


def prior_loss(logits: Tensor, gamma: Tensor) -> Tensor:
    """RL: KL(batch-mean gate [K] || prior gamma [K])."""
    return kl_divergence(mean_gate(logits), gamma.to(logits))


def gate_entropy(logits: Tensor) -> Tensor:
    """Mean over B of the entropy of each example's gate softmax(z): [B, K] -> scalar (nats)."""
    return -torch.special.xlogy(torch.softmax(logits, -1), torch.softmax(logits, -1)).sum(-1).mean()


def step_kl(logits: Tensor, prev_mean: Tensor) -> Tensor:
    """KL(current batch-mean gate [K] || previous step's batch-mean gate [K], detached)."""
    return kl_divergence(mean_gate(logits), prev_mean.detach().to(logits))


def router_objective(
    lm_loss: Tensor | None,
    logits: Tensor,
    labels: Tensor,
    gamma: Tensor,
    weights: dict[str, float],
    prev_mean: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the router loss terms -> (total, {term: value} of the terms switched on, plus total).

    `weights` overrides DEFAULT_WEIGHTS by key. `lm_loss` may be None only if weights["lm"] is 0;
    the step KL term is skipped on the first step (prev_mean None).
    """
    unknown = set(weights) - set(DEFAULT_WEIGHTS)
    if unknown:
        raise ValueError(f"unknown router loss weights {sorted(unknown)}; known: {sorted(DEFAULT_WEIGHTS)}")
    w = DEFAULT_WEIGHTS | weights
    terms = {
        "lm": lambda: lm_loss,
        "gl": lambda: gating_loss(logits, labels),
        "rl": lambda: prior_loss(logits, gamma),
        "entropy": lambda: gate_entropy(logits),
        "step_kl": lambda: step_kl(logits, prev_mean),
    }
    total = logits.new_zeros(())
    parts = {}
    for name, term in terms.items():
        if w[name] == 0 or (name == "step_kl" and prev_mean is None):
            continue
        value = term()
        if value is None:
            raise ValueError(f"weight {name}={w[name]} but no {name} loss was given; pass it or set the weight to 0")
        total = total + w[name] * value
        parts[name] = value.item()
    parts["total"] = total.item()
    return total, parts
