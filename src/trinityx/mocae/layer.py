"""The MoCaE mixture layer: one frozen linear layer plus K stacked LoRA experts, mixed by gates.

Every linear layer the experts adapt computes (docs/design.md, "MoCaE")

    y = W x + sum_k g_k * s * B_k A_k x,        s = alpha / r   (LoRA, Hu et al. 2021, section 4.1)

with the K experts stacked, so the sum over experts is never a Python loop. K is whatever the experts given
are; nothing here assumes 3. The sum is computed in rank space,

    sum_k g_k s B_k A_k x = B_cat (g_rank * (A_cat x)),     A_cat = cat_k A_k: [K*R, D_in],
                                                            B_cat = cat_k B_k: [D_out, K*R],
                                                            g_rank = each g_k * s repeated R times: [K*R],

which is PEFT's `add_weighted_adapter(..., combination_type="cat")` with the gates applied between the two
products instead of folded into B. Both products run over the whole batch with the same matrices, whatever
each row's gates, and the gates are K*R numbers per row (per token for token routing), the same in every
layer: setting them costs nothing, and no layer ever holds a per-row copy of its experts (the per-row folded
deltas this replaced held one per row: +50 % peak memory at batch 8 on SmolLM2, docs/routing.md). A_cat and
B_cat^T are views of the stored experts (`lora_A` [K, R, D_in] is kept contiguous, `lora_B` [K, D_out, R] is
stored with the [K, R, D_out] layout), so the layer holds each expert weight once.

The gates come in one of three forms, set on every layer by `MoCaEModel.set_gates` before the backbone runs:

- none:          experts off, the layer is the bare backbone layer (used for the router's pooling pass);
- [B, K]:        sequence routing, one gate vector per example (g_rank [B, 1, K*R]);
- [B, T, K]:     token routing, one gate vector per token (g_rank [B, T, K*R], set by that decoder layer's
                 router head).

Legend: B batch, T tokens, K experts, D hidden (D_in, D_out), R rank.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rank_gates(gates: Tensor, rank: int, scaling: float) -> Tensor:
    """Gates [B, K] or [B, T, K] -> the scale of each rank-space row, g_k * s repeated R times: [B, 1 or T, K*R]."""
    g = (gates * scaling).repeat_interleave(rank, dim=-1)
    return g[:, None, :] if gates.dim() == 2 else g


def mixture_delta(x: Tensor, A_cat: Tensor, B_cat_T: Tensor, g_rank: Tensor) -> Tensor:
    """sum_k g_k s B_k A_k x = B_cat (g_rank * (A_cat x)): x [B, T, D_in], g_rank [B, 1 or T, K*R] -> [B, T, D_out]."""
    return (F.linear(x, A_cat) * g_rank) @ B_cat_T


class MixtureLinear(nn.Module):
    """A frozen `nn.Linear` (the original object, kept as `base_layer`) plus K stacked LoRA experts.

    The experts are frozen parameters (`requires_grad=False`); only the router learns. The gates are state
    set by the owner model (`use_gates`), cleared after each call, and never saved.
    """

    def __init__(self, base_layer: nn.Linear, A: Tensor, B: Tensor, scaling: float):
        super().__init__()
        K, R, D_in = A.shape
        if D_in != base_layer.in_features or B.shape != (K, base_layer.out_features, R):
            raise ValueError(
                f"expert shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit a Linear "
                f"{base_layer.in_features} -> {base_layer.out_features}"
            )
        self.base_layer = base_layer.requires_grad_(False)
        dtype = base_layer.weight.dtype
        self.lora_A = nn.Parameter(A.to(dtype).contiguous(), requires_grad=False)  # [K, R, D_in]
        # [K, D_out, R] with the memory layout of [K, R, D_out], so that B_cat^T [K*R, D_out] is a view.
        self.lora_B = nn.Parameter(B.to(dtype).transpose(1, 2).contiguous().transpose(1, 2), requires_grad=False)
        self.scaling = scaling
        self.routed: tuple[Tensor, Tensor, Tensor] | None = None  # (A_cat, B_cat^T, g_rank); None = experts off

    # The backbone's own code may read these off any of its linear layers.
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def n_experts(self) -> int:
        return self.lora_A.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    def stacked(self) -> tuple[Tensor, Tensor]:
        """(A_cat [K*R, D_in], B_cat^T [K*R, D_out]): views of `lora_A` and `lora_B` (copies only if something
        re-laid them out), taken when the gates are set so that they follow the parameters' requires_grad."""
        return self.lora_A.reshape(-1, self.in_features), self.lora_B.transpose(1, 2).reshape(-1, self.out_features)

    def use_gates(self, g_rank: Tensor) -> None:
        """Rank-space gates [B, 1 or T, K*R] (`rank_gates`) for the next calls, until `clear()`."""
        self.routed = (*self.stacked(), g_rank)

    def set_gates(self, gates: Tensor) -> None:
        """Gates [B, K] (sequence) or [B, T, K] (token) for the next calls, until `clear()`."""
        self.use_gates(rank_gates(gates.to(self.lora_A.dtype), self.rank, self.scaling))

    def clear(self) -> None:
        self.routed = None

    @torch.no_grad()
    def merge(self, gates: Tensor) -> None:
        """Add one fixed mixture, gates [K], to the base weight: W += sum_k g_k s B_k A_k (computed in float32)."""
        A, B = self.lora_A.float(), self.lora_B.float()  # [K, R, D_in], [K, D_out, R]
        delta = torch.einsum("k,kor,kri->oi", gates.float() * self.scaling, B, A)  # [D_out, D_in]
        weight = self.base_layer.weight
        weight.copy_((weight.float() + delta).to(weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.base_layer.weight, self.base_layer.bias)  # [B, T, D_out]
        if self.routed is None:
            return y
        A_cat, B_cat_T, g = self.routed
        if x.dtype == A_cat.dtype == y.dtype:  # the usual case, kept to the fewest operations
            h = F.linear(x, A_cat) * g  # [B, T, K*R]
            # y + B_cat h as one batched product that accumulates into y (BLAS beta = 1), B_cat shared by the rows.
            return torch.baddbmm(y, h, B_cat_T.expand(x.shape[0], -1, -1))
        return y + mixture_delta(x.to(A_cat.dtype), A_cat, B_cat_T, g).to(y.dtype)

    def extra_repr(self) -> str:
        K, R, _ = self.lora_A.shape
        return f"experts={K}, rank={R}, scaling={self.scaling}"
