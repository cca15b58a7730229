"""MoCaE model surgery and the `MoCaEModel` wrapper: experts attached to a frozen backbone, plus a router.

`attach_experts` swaps every linear layer the experts adapt for a `MixtureLinear` (the original weight
object is kept, frozen; nothing is written to the backbone's files). `MoCaEModel` owns that surgery (as
PEFT's LoRA model does): it attaches the experts, keeps the handles of the token router's hooks, and
`unload` / `merge_and_unload` give the backbone back bare or with one fixed mixture folded in. It owns the
router, sets the gates on the mixture layers around each backbone call, and saves/loads itself as

    folder/
      experts/<name>/adapter_config.json, adapter_model.safetensors   (PEFT adapter folders, one per expert)
      router.safetensors                                               (the router head(s))
      mocae_config.json                                                (MoCaEConfig)

Legend: B batch, T tokens, K experts, D hidden, L adapted decoder layers, V vocabulary.
"""

import json
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from trinityx.backbones import load_backbone
from trinityx.errors import TrinityXError
from trinityx.io import atomic_dir, write_json
from trinityx.lora.adapters import ADAPTER_FILES, Adapter, lora_scaling, read_adapter
from trinityx.mocae.layer import MixtureLinear, rank_gates
from trinityx.mocae.router import (GATE_MODES, SequenceRouter, TokenRouter, gates_from_logits, last_prompt_token,
                                   pool_prompt)
from trinityx.paths import check_name

ROUTER_GRANULARITIES = ("sequence", "token")
POOLINGS = ("mean", "last", "mean+last")


@dataclass
class MoCaEConfig:
    expert_names: list[str]
    """One name per expert, in gate order (gate k is expert k); saved as experts/<name>/."""
    expert_dims: list[str] = field(default_factory=list)
    """The dimension each expert serves (GL label k means expert k); empty means the expert names."""
    backbone: str = ""
    """Backbone id (hub id or local folder) that `from_pretrained` loads when no backbone is passed."""
    router: str = "sequence"
    """Routing granularity: `sequence` (one gate per prompt, foldable) or `token` (per token and layer)."""
    pool_layer: int = -1
    """Hidden state the sequence router pools: index into hidden_states (0 embeddings, -1 last layer)."""
    pool_layers: list[int] = field(default_factory=list)
    """More hidden states the sequence router reads, each pooled like pool_layer's and concatenated after it.
    Layers below pool_layer cost nothing more (the routing pass runs up to pool_layer anyway); the pass stops at
    the highest layer listed. Empty: pool_layer only."""
    pooling: str = "mean"
    """How a hidden state is pooled over the prompt tokens: `mean`, `last` (the last prompt token, which has
    attended to the whole request) or `mean+last` (both, concatenated)."""
    head_hidden: int = 0
    """Hidden width of the router head's MLP; 0 for a linear head."""
    normalize_hidden: bool = True
    """RMS-normalise each token's hidden state before a router reads it. Intermediate layers of Llama-style
    models carry a few huge activations (mostly on the first token), so an unnormalised pooled state makes the
    router's logits explode at usual learning rates. Folders saved before this field existed load with False."""
    temperature: float = 1.0
    """Softmax temperature T of the gates, fitted on held-out prompts after training (Guo et al. 2017)."""
    gate_mode: str = "learned"
    """`learned` softmax(z/T), `uniform` 1/K, `top1` one-hot argmax, `fixed` the fixed_weights as given."""
    fixed_weights: list[float] = field(default_factory=list)
    """Gate weights for gate_mode=fixed, one per expert, used as-is (negative values negate an expert)."""

    def __post_init__(self):
        K = len(self.expert_names)
        if K == 0:
            raise TrinityXError("expert_names is empty: give one name per expert adapter")
        for name in self.expert_names:
            check_name(name, "expert_names")  # each becomes experts/<name>/
        if len(set(self.expert_names)) != K:
            raise TrinityXError(f"expert_names {self.expert_names} has duplicates: names must be unique")
        if not self.expert_dims:
            self.expert_dims = list(self.expert_names)
        if len(self.expert_dims) != K:
            raise TrinityXError(f"expert_dims has {len(self.expert_dims)} entries for {K} experts: give one each")
        if self.router not in ROUTER_GRANULARITIES:
            raise TrinityXError(f"router={self.router!r} is not one of {ROUTER_GRANULARITIES}")
        if self.gate_mode not in GATE_MODES:
            raise TrinityXError(f"gate_mode={self.gate_mode!r} is not one of {GATE_MODES}")
        if not self.temperature > 0:
            raise TrinityXError(f"temperature={self.temperature} must be > 0")
        if self.pooling not in POOLINGS:
            raise TrinityXError(f"pooling={self.pooling!r} is not one of {POOLINGS}")
        if self.head_hidden < 0:
            raise TrinityXError(f"head_hidden={self.head_hidden} must be >= 0 (0 = linear head)")
        if self.gate_mode == "fixed" and len(self.fixed_weights) != K:
            raise TrinityXError(
                f"gate_mode=fixed needs fixed_weights with one weight per expert ({K}), got {self.fixed_weights}"
            )

    @property
    def n_experts(self) -> int:
        return len(self.expert_names)

    @property
    def router_layers(self) -> list[int]:
        """The hidden states a sequence router reads, pool_layer first."""
        return [self.pool_layer, *self.pool_layers]

    def router_features(self, d_model: int) -> int:
        """Width F of what a sequence router head reads: D per pooled state, per layer."""
        return d_model * len(self.router_layers) * (2 if self.pooling == "mean+last" else 1)


def read_config(folder: Path) -> MoCaEConfig:
    """folder/mocae_config.json as a validated config; a missing, malformed or invalid file is an error naming it."""
    path = Path(folder) / "mocae_config.json"
    if not path.is_file():
        raise TrinityXError(f"{folder} is not a MoCaE folder (no mocae_config.json); create it with `trinityx fit-router`")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        # Folders saved before normalize_hidden existed were not normalised.
        return MoCaEConfig(**{"normalize_hidden": False, **values})
    except (ValueError, TypeError) as e:  # not JSON, not UTF-8, not a mapping of MoCaEConfig fields, or invalid
        raise TrinityXError(f"{path}: {e}; fix the file or recreate the folder with `trinityx fit-router`") from None


@dataclass
class MoCaEOutput:
    loss: Tensor | None
    """Language-model loss of the backbone (None without labels)."""
    logits: Tensor
    """[B, T, V] next-token logits."""
    gate_logits: Tensor
    """[B, K] router logits; for token routing the mean over layers and pooled tokens."""
    gates: Tensor
    """The gates applied: [B, K] (sequence) or [L, B, T, K] (token)."""


class _PoolLayerReached(Exception):
    """Raised by the pooling hook to stop the routing pass at the pool layer."""


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids that skip left padding: [B, T] -> [B, T] (what HF `generate` computes too)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def backbone_hidden_states(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                           layers: list[int]) -> list[Tensor]:
    """hidden_states[l] of a causal LM [B, T, D] for each l in `layers`, computing no layer above them.

    An intermediate layer's output is caught by a hook on that layer; the hook of the highest one then stops
    the forward pass (the layers above would cost as much as they do in the prefill: a router pooled at the
    middle layer routes at half the price). The last layer (-1 or L) is the final normed state: a full pass.
    Left or right padding: positions come from the attention mask.
    """
    decoder = backbone.get_decoder()
    n_layers = len(decoder.layers)
    wanted = [layer % (n_layers + 1) for layer in layers]  # hidden_states has L + 1 entries: embeddings, layers
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                  use_cache=False)
    if n_layers in wanted or 0 in wanted:  # the embeddings as the model scales them, or the final normed state
        hidden = decoder(**kwargs, output_hidden_states=True).hidden_states
        return [hidden[layer] for layer in wanted]
    caught = {}
    top = max(wanted)

    def catcher(layer: int):
        def catch(module, args, output):
            caught[layer] = output[0] if isinstance(output, tuple) else output
            if layer == top:
                raise _PoolLayerReached
        return catch

    handles = [decoder.layers[layer - 1].register_forward_hook(catcher(layer)) for layer in set(wanted)]
    try:
        decoder(**kwargs)
    except _PoolLayerReached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return [caught[layer] for layer in wanted]


def check_experts(experts: list[Adapter]) -> float:
    """Experts must be plain LoRA with one rank, alpha and set of targets so they stack; returns their scaling s."""
    first = experts[0]
    for expert in experts:
        config, folder = expert.config, expert.folder
        for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
            if config.get(key):
                raise TrinityXError(f"{folder}: {key} is set; experts need one rank and alpha everywhere")
        if config.get("bias", "none") != "none":
            raise TrinityXError(f"{folder}: bias={config['bias']!r}; experts must use bias='none'")
        for key in ("r", "lora_alpha", "use_rslora"):
            if config.get(key) != first.config.get(key):
                raise TrinityXError(
                    f"{folder}: {key}={config.get(key)} but {first.folder} has {first.config.get(key)}; "
                    "experts must share rank, alpha and rslora to stack"
                )
    return lora_scaling(first.config["lora_alpha"], first.config["r"], bool(first.config.get("use_rslora")))


def attach_experts(model: nn.Module, adapter_dirs: list[str | Path]) -> nn.Module:
    """Replace each linear layer the experts adapt by a `MixtureLinear` holding all K experts; freeze the rest.

    Modifies `model` in place and returns it. The experts' adapters must share rank, alpha and targets.
    """
    folders = [Path(d) for d in adapter_dirs]
    if not folders:
        raise TrinityXError("no expert adapter folders given")
    experts = [read_adapter(f) for f in folders]
    scaling = check_experts(experts)
    names = list(experts[0].factors)
    for expert in experts:
        if list(expert.factors) != names:
            raise TrinityXError(
                f"{expert.folder} adapts other modules than {folders[0]}: experts must share target modules"
            )
    model.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        if type(base) is not nn.Linear:
            raise TrinityXError(f"module {name} is a {type(base).__name__}, MoCaE adapts nn.Linear layers only")
        A = torch.stack([expert.factors[name][0] for expert in experts])  # [K, R, D_in]
        B = torch.stack([expert.factors[name][1] for expert in experts])  # [K, D_out, R]
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, MixtureLinear(base, A, B, scaling))
    return model


def decoder_layers(model: nn.Module, names: list[str]) -> dict[int, tuple[nn.Module, list[MixtureLinear]]]:
    """Group adapted modules by decoder layer: {layer index: (decoder layer, its mixture layers)}.

    The decoder layer is the element of the first numbered container in the module's name, as in PEFT's
    `layers_pattern` (e.g. `model.layers.3.mlp.up_proj` -> `model.layers.3`).
    """
    groups: dict[int, tuple[nn.Module, list[MixtureLinear]]] = {}
    containers = set()
    for name in names:
        match = re.match(r"(.+?)\.(\d+)\.", name)
        if match is None:
            raise TrinityXError(f"token routing needs adapted modules inside numbered decoder layers, got {name}")
        containers.add(match.group(1))
        index = int(match.group(2))
        layer = model.get_submodule(f"{match.group(1)}.{index}")
        groups.setdefault(index, (layer, []))[1].append(model.get_submodule(name))
    if len(containers) != 1:
        raise TrinityXError(f"adapted modules sit in several layer stacks {sorted(containers)}; token routing needs one")
    return dict(sorted(groups.items()))


class MoCaEModel(nn.Module):
    """A frozen backbone with K LoRA experts mixed in every adapted layer by a (calibrated) router."""

    def __init__(self, backbone: nn.Module, adapter_dirs: list[str | Path], config: MoCaEConfig):
        super().__init__()
        if len(adapter_dirs) != config.n_experts:
            raise TrinityXError(
                f"{len(adapter_dirs)} adapter folders for {config.n_experts} expert_names: give one folder per name"
            )
        self.config = config
        self.adapter_dirs = [Path(d) for d in adapter_dirs]
        self.backbone = attach_experts(backbone, self.adapter_dirs)
        names = [n for n, m in self.backbone.named_modules() if isinstance(m, MixtureLinear)]
        self.mixture_names = names  # the adapted modules, in the order of `mixtures`
        self.mixtures = [self.backbone.get_submodule(n) for n in names]  # plain list: not registered twice
        self._hooks: list[RemovableHandle] = []  # the token router's hooks on the decoder layers
        d_model = self.backbone.get_input_embeddings().embedding_dim
        K = config.n_experts
        if config.router == "sequence":
            self.router = SequenceRouter(config.router_features(d_model), K, config.head_hidden)
        else:
            layers = decoder_layers(self.backbone, names)
            self.router = TokenRouter(d_model, K, list(layers), config.head_hidden)
            self._token_logits: dict[int, Tensor] = {}
            for index, (layer, mixtures) in layers.items():
                hook = layer.register_forward_pre_hook(self._token_hook(index, mixtures), with_kwargs=True)
                self._hooks.append(hook)

    # --- surgery -----------------------------------------------------------------------------------------

    def unload(self) -> nn.Module:
        """Undo the surgery: remove the token hooks and put each original linear layer back; returns the backbone.

        The backbone is left bare (as before `attach_experts`); this model has no mixture layers afterwards."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for name, mixture in zip(self.mixture_names, self.mixtures):
            parent, _, child = name.rpartition(".")
            setattr(self.backbone.get_submodule(parent), child, mixture.base_layer)
        self.mixture_names, self.mixtures = [], []
        return self.backbone

    def merge_and_unload(self, gates: Tensor) -> nn.Module:
        """Fold fixed gates [K] into the backbone's weights (`MixtureLinear.merge`), then `unload`."""
        for mixture in self.mixtures:
            mixture.merge(gates)
        return self.unload()

    # --- gates -------------------------------------------------------------------------------------------

    def gates(self, gate_logits: Tensor) -> Tensor:
        """Gate logits [..., K] -> gates [..., K] under the configured gate mode and temperature."""
        fixed = torch.tensor(self.config.fixed_weights) if self.config.gate_mode == "fixed" else None
        return gates_from_logits(gate_logits, self.config.gate_mode, self.config.temperature, fixed)

    def set_gating(self, **changes) -> None:
        """Change gate_mode / temperature / fixed_weights (ablations, calibration), validated like the config."""
        self.config = replace(self.config, **changes)

    def set_gates(self, gates: Tensor, mixtures: list[MixtureLinear] | None = None) -> None:
        """Gates [B, K] (sequence) or [B, T, K] (token) on the mixture layers (default all) until `clear_gates()`.

        Every layer has one rank and scaling (`check_experts`), so the rank-space gates are computed once."""
        mixtures = self.mixtures if mixtures is None else mixtures
        if not mixtures:
            return
        first = mixtures[0]
        g = rank_gates(gates.to(first.lora_A.dtype), first.rank, first.scaling)
        for m in mixtures:
            m.use_gates(g)

    def clear_gates(self) -> None:
        """Experts off in every mixture layer (the bare backbone)."""
        for m in self.mixtures:
            m.clear()

    @contextmanager
    def apply_gates(self, gates: Tensor):
        """Sequence gates [B, K] on every mixture layer for the duration of the block."""
        self.set_gates(gates)
        try:
            yield
        finally:
            self.clear_gates()

    def _token_hook(self, index: int, mixtures: list[MixtureLinear]):
        def hook(module, args, kwargs):
            # Decoder layers take the hidden state first, positionally (Llama, Qwen, Gemma) or by name.
            hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, D]
            logits = self.router(index, self.router_input(hidden))  # [B, T, K]
            self._token_logits[index] = logits
            self.set_gates(self.gates(logits), mixtures)  # [B, T, K]

        return hook

    # --- forward -----------------------------------------------------------------------------------------

    def route(self, input_ids: Tensor, attention_mask: Tensor, prompt_mask: Tensor | None = None) -> Tensor:
        """Gate logits [B, K] of each example from its prompt tokens (prompt_mask; default all non-pad tokens)."""
        if self.config.router == "token":
            return self(input_ids, attention_mask, prompt_mask).gate_logits
        return self.router(self.pooled_prompt(input_ids, attention_mask, prompt_mask))  # [B, K]

    @torch.no_grad()
    def pooled_prompt(self, input_ids: Tensor, attention_mask: Tensor, prompt_mask: Tensor | None = None) -> Tensor:
        """What a sequence router head reads [B, D]: the prompt tokens' pooled (normalised) hidden states.

        The pass runs the bare backbone (no gates set = experts off) and is frozen, so it builds no graph and
        depends only on the backbone, `pool_layer`, `normalize_hidden` and the tokens: routers that share those
        can share it (calibration scores the pipeline's three sequence routers with one pass)."""
        mask = attention_mask if prompt_mask is None else prompt_mask * attention_mask  # [B, T]
        pooled = []
        for hidden in self.hidden_states_at(input_ids, attention_mask, self.config.router_layers):
            hidden = self.router_input(hidden)  # [B, T, D]
            if self.config.pooling in ("mean", "mean+last"):
                pooled.append(pool_prompt(hidden, mask))  # [B, D]
            if self.config.pooling in ("last", "mean+last"):
                pooled.append(last_prompt_token(hidden, mask))  # [B, D]
        return torch.cat(pooled, -1)  # [B, F]

    def router_input(self, hidden: Tensor) -> Tensor:
        """What a router head reads of a hidden state [B, T, D]: RMS-normalised per token if configured."""
        if not self.config.normalize_hidden:
            return hidden
        hidden = hidden.float()
        return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)

    def pooled_hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """hidden_states[pool_layer] of the bare backbone [B, T, D], computing no layer above pool_layer."""
        return self.hidden_states_at(input_ids, attention_mask, [self.config.pool_layer])[0]

    def hidden_states_at(self, input_ids: Tensor, attention_mask: Tensor, layers: list[int]) -> list[Tensor]:
        """hidden_states[l] of the bare backbone [B, T, D] for each l in `layers` (`backbone_hidden_states`)."""
        return backbone_hidden_states(self.backbone, input_ids, attention_mask, layers)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, prompt_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> MoCaEOutput:
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask))
        if self.config.router == "sequence":
            gate_logits = self.route(input_ids, attention_mask, prompt_mask)  # [B, K]
            gates = self.gates(gate_logits)  # [B, K]
            with self.apply_gates(gates):
                out = self.backbone(**kwargs, labels=labels)
            return MoCaEOutput(loss=out.loss, logits=out.logits, gate_logits=gate_logits, gates=gates)
        self._token_logits.clear()
        out = self.backbone(**kwargs, labels=labels)
        self.clear_gates()
        layer_logits = torch.stack([self._token_logits[i] for i in sorted(self._token_logits)])  # [L, B, T, K]
        mask = attention_mask if prompt_mask is None else prompt_mask * attention_mask  # [B, T]
        gate_logits = pool_prompt(layer_logits.mean(0), mask)  # [B, K]
        return MoCaEOutput(loss=out.loss, logits=out.logits, gate_logits=gate_logits, gates=self.gates(layer_logits))

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, gates: Tensor | None = None, **kwargs) -> Tensor:
        """HF `generate` on a left-padded batch. Sequence routing: gates from the prompt once (or the given
        gates [B, K]), set once for the whole generation."""
        if self.config.router == "token":
            # Each step's new tokens pass through the decoder layers, whose hooks route them.
            out = self.backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            self.clear_gates()
            return out
        if gates is None:
            gates = self.gates(self.route(input_ids, attention_mask))  # [B, K]
        # HF expands each row num_beams * num_return_sequences times, consecutively.
        gates = gates.repeat_interleave(kwargs.get("num_beams", 1) * kwargs.get("num_return_sequences", 1), dim=0)
        with self.apply_gates(gates):
            return self.backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # --- artifacts ---------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write experts/<name>/ (PEFT folders), router.safetensors and mocae_config.json, atomically."""
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            for name, source in zip(self.config.expert_names, self.adapter_dirs):
                (tmp / "experts" / name).mkdir(parents=True)
                for file in ADAPTER_FILES:
                    shutil.copy2(source / file, tmp / "experts" / name / file)
            state = {k: v.detach().contiguous() for k, v in self.router.state_dict().items()}
            save_file(state, tmp / "router.safetensors")
            write_json(tmp / "mocae_config.json", asdict(self.config))
        self.adapter_dirs = [folder / "experts" / name for name in self.config.expert_names]
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, backbone_model: nn.Module | None = None) -> "MoCaEModel":
        """Rebuild a saved MoCaEModel; the backbone is loaded from config.backbone unless one is given."""
        folder = Path(folder)
        config = read_config(folder)
        if backbone_model is None:
            if not config.backbone:
                raise TrinityXError(f"{folder}/mocae_config.json has no backbone: pass backbone_model=")
            backbone_model = load_backbone(config.backbone).model  # a preset, folder, GGUF file or hub id
        model = cls(backbone_model, [folder / "experts" / name for name in config.expert_names], config)
        # Folders saved before the sequence router standardised its inputs lack those buffers: they keep 0 and 1.
        model.router.load_state_dict({**model.router.state_dict(), **load_file(folder / "router.safetensors")})
        return model.eval()
