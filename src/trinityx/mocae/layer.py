"""The MoCaE mixture layer: one frozen linear layer plus K stacked LoRA experts, mixed by gates.

Every linear layer the experts adapt computes (docs/design.md, "MoCaE")

    y = W x + sum_k g_k * s * B_k A_k x,        s = alpha / r   (LoRA, Hu et al. 2021, section 4.1)

with the K experts stacked, A: [K, R, D_in] and B: [K, D_out, R], so the sum over experts is one einsum and
never a Python loop. K is whatever the experts given are; nothing here assumes 3.

The gates come in one of three forms, set on the layer by `MoCaEModel` before the backbone runs:

- none:          experts off, the layer is the bare backbone layer (used for the router's pooling pass);
- [B, K]:        sequence routing, one gate vector per example;
- [B, T, K]:     token routing, one gate vector per token (set by that decoder layer's router head).

Sequence gates can also be *folded*: the weighted experts of example b become a single low-rank delta
`B_b A_cat` with A_cat = cat_k A_k: [K*R, D_in] shared by the batch and B_b = cat_k(g_bk * s * B_k):
[D_out, K*R]. This is PEFT's `add_weighted_adapter(..., combination_type="cat")` done per row, so decoding
costs one rank-(K*R) LoRA, about what the bare backbone costs, and rows with different gates never mix.

Legend: B batch, T tokens, K experts, D hidden (D_in, D_out), R rank.
"""

import torch
from torch import Tensor, nn


def mixture_delta(x: Tensor, A: Tensor, B: Tensor, gates: Tensor, scaling: float) -> Tensor:
    """sum_k g_k * s * B_k A_k x for x [B, T, D_in] and gates [B, K] or [B, T, K] -> [B, T, D_out]."""
    h = torch.einsum("btd,krd->btkr", x, A)  # [B, T, K, R]
    if gates.dim() == 2:
        return torch.einsum("btkr,kor,bk->bto", h, B, gates * scaling)  # [B, T, D_out]
    return torch.einsum("btkr,kor,btk->bto", h, B, gates * scaling)  # [B, T, D_out]


def fold_experts(A: Tensor, B: Tensor, gates: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """Fold sequence gates [B, K] into one low-rank delta per example: (A_cat^T [D_in, K*R], B_b^T [B, K*R, D_out]).

    Both come back in the layout the decode step multiplies with, contiguous, so each step is two plain
    matrix products and no copy (`folded_add`).
    """
    K, R, D_in = A.shape
    A_cat_T = A.reshape(K * R, D_in).T.contiguous()  # [D_in, K*R]
    B_b_T = torch.einsum("bk,kor->bkro", gates * scaling, B)  # [B, K, R, D_out]
    return A_cat_T, B_b_T.reshape(gates.shape[0], K * R, B.shape[1]).contiguous()  # [B, K*R, D_out]


def folded_add(y: Tensor, x: Tensor, A_cat_T: Tensor, B_b_T: Tensor) -> Tensor:
    """y + B_b A_cat x for x [B, T, D_in], y [B, T, D_out]: one matmul and one fused batched multiply-add."""
    return torch.baddbmm(y, x @ A_cat_T, B_b_T)  # [B, T, K*R] @ [B, K*R, D_out] + y


class MixtureLinear(nn.Module):
    """A frozen `nn.Linear` (the original object, kept as `base_layer`) plus K stacked LoRA experts.

    The experts are frozen parameters (`requires_grad=False`); only the router learns. Gates are state
    set by the owner model (`gates` or `folded`), cleared after each call, and never saved.
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
        self.lora_A = nn.Parameter(A.to(dtype), requires_grad=False)  # [K, R, D_in]
        self.lora_B = nn.Parameter(B.to(dtype), requires_grad=False)  # [K, D_out, R]
        self.scaling = scaling
        self.gates: Tensor | None = None  # [B, K] or [B, T, K]; None = experts off
        self.folded: tuple[Tensor, Tensor] | None = None  # (A_cat^T [D_in, K*R], B_b^T [B, K*R, D_out])

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

    def fold(self, gates: Tensor) -> None:
        """Fold sequence gates [B, K] into one delta per example; later calls use it until `clear()`."""
        self.folded = fold_experts(self.lora_A, self.lora_B, gates.to(self.lora_A.dtype), self.scaling)
        self.gates = None

    def clear(self) -> None:
        self.gates = None
        self.folded = None

    @torch.no_grad()
    def merge(self, gates: Tensor) -> None:
        """Add one fixed mixture, gates [K], to the base weight: W += sum_k g_k s B_k A_k (computed in float32)."""
        A, B = self.lora_A.float(), self.lora_B.float()  # [K, R, D_in], [K, D_out, R]
        delta = torch.einsum("k,kor,kri->oi", gates.float() * self.scaling, B, A)  # [D_out, D_in]
        weight = self.base_layer.weight
        weight.copy_((weight.float() + delta).to(weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)  # [B, T, D_out]
        if self.folded is not None:  # the decode path: kept to the fewest operations
            A_cat_T, B_b_T = self.folded
            if B_b_T.shape[0] != x.shape[0]:
                raise ValueError(f"folded gates are for a batch of {B_b_T.shape[0]}, the input has {x.shape[0]} rows")
            if x.dtype == A_cat_T.dtype == y.dtype:
                return folded_add(y, x, A_cat_T, B_b_T)
            return y + folded_add(torch.zeros_like(y, dtype=A_cat_T.dtype), x.to(A_cat_T.dtype), A_cat_T,
                                  B_b_T).to(y.dtype)
        xa = x.to(self.lora_A.dtype)
        if self.gates is not None:
            return y + mixture_delta(xa, self.lora_A, self.lora_B, self.gates.to(xa.dtype), self.scaling).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        K, R, _ = self.lora_A.shape
        return f"experts={K}, rank={R}, scaling={self.scaling}"
