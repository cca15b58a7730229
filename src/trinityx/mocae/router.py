"""MoCaE routers: small heads from hidden states to gate logits z, and the gates g = softmax(z / T).

Two granularities (docs/design.md, "routing granularity"):

- `sequence` (default): z = f(mean of the base model's hidden state over the non-pad prompt tokens), one
  gate vector per example, the same in every adapted layer (applied in rank space, see `layer.py`).
- `token`: one head per decoder layer, reading that layer's input hidden state; a gate per token and per
  layer, shared by the adapted modules of that layer.

The last linear layer of every head starts at zero, so an untrained router gives g = 1/K, a plain task
arithmetic merge, and learns away from it.

Gate modes for ablations: `learned` (softmax(z / T), T from calibration; Guo et al. 2017), `uniform`
(g = 1/K, task arithmetic; Ilharco et al. 2023), `top1` (one-hot of argmax z), `fixed` (user weights used
as given, not softmaxed, so negative weights negate behaviour: T_new = -T_j, Ilharco et al. 2023).

Legend: B batch, T tokens, K experts, D hidden.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GATE_MODES = ("learned", "uniform", "top1", "fixed")


def build_head(d_model: int, n_experts: int, hidden: int) -> nn.Sequential:
    """Linear head (hidden == 0) or a one-hidden-layer GELU MLP; the output layer starts at zero."""
    if hidden == 0:
        head = nn.Sequential(nn.Linear(d_model, n_experts))
    else:
        head = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, n_experts))
    nn.init.zeros_(head[-1].weight)
    nn.init.zeros_(head[-1].bias)
    return head


def pool_prompt(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of hidden [B, T, D] over the tokens where mask [B, T] is 1 -> [B, D]."""
    mask = mask.to(hidden.dtype).unsqueeze(-1)  # [B, T, 1]
    count = mask.sum(1)  # [B, 1]
    if (count == 0).any():
        raise ValueError("a row has no prompt tokens to pool: check prompt_mask / attention_mask")
    return (hidden * mask).sum(1) / count  # [B, D]


def last_prompt_token(hidden: Tensor, mask: Tensor) -> Tensor:
    """hidden [B, T, D] at each row's last position where mask [B, T] is 1 -> [B, D] (left or right padding)."""
    if (mask.sum(1) == 0).any():
        raise ValueError("a row has no prompt tokens to pool: check prompt_mask / attention_mask")
    position = torch.arange(mask.shape[1], device=mask.device)  # [T]
    last = (mask.long() * (position + 1)).argmax(1)  # [B]: the largest position with mask 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def gates_from_logits(
    logits: Tensor, mode: str = "learned", temperature: float = 1.0, fixed_weights: Tensor | None = None
) -> Tensor:
    """Gate logits [..., K] -> gates [..., K] under one of GATE_MODES."""
    if mode == "learned":
        return torch.softmax(logits / temperature, dim=-1)
    if mode == "uniform":
        return torch.full_like(logits, 1.0 / logits.shape[-1])
    if mode == "top1":
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    if mode == "fixed":
        return fixed_weights.to(logits).expand_as(logits)
    raise ValueError(f"gate mode {mode!r} is not one of {GATE_MODES}")


class SequenceRouter(nn.Module):
    """z = head((pooled prompt state - mean) / std): [B, F] -> [B, K].

    `feature_mean` and `feature_std` are fixed statistics of the routing data's states (set by `standardise`
    before training; 0 and 1 until then). Standardised inputs let one weight decay fit every feature's scale:
    a linear probe on raw states over-weights the few large dimensions."""

    def __init__(self, d_model: int, n_experts: int, hidden: int = 0):
        super().__init__()
        self.head = build_head(d_model, n_experts, hidden)
        self.register_buffer("feature_mean", torch.zeros(d_model))
        self.register_buffer("feature_std", torch.ones(d_model))

    @torch.no_grad()
    def standardise(self, states: Tensor) -> None:
        """Fix the input statistics to those of `states` [N, F] (the routing data's training states)."""
        self.feature_mean.copy_(states.float().mean(0))
        self.feature_std.copy_(states.float().std(0) + 1e-4)

    def forward(self, pooled: Tensor) -> Tensor:
        # The router runs in float32 whatever the backbone dtype.
        return self.head((pooled.float() - self.feature_mean) / self.feature_std)  # [B, K]


class TokenRouter(nn.Module):
    """One head per adapted decoder layer: (layer, h [B, T, D]) -> z [B, T, K]."""

    def __init__(self, d_model: int, n_experts: int, layers: list[int], hidden: int = 0):
        super().__init__()
        self.heads = nn.ModuleDict({str(i): build_head(d_model, n_experts, hidden) for i in layers})

    def forward(self, layer: int, hidden: Tensor) -> Tensor:
        return self.heads[str(layer)](hidden.float())  # [B, T, K]
