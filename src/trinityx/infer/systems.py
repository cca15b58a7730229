"""Systems: everything that can be evaluated, loaded from a run folder by a short spec (the list of specs and
their folders is `trinityx.registry`).

    base                        the bare backbone
    expert:<dim>                RUN/experts/<dim>/            (PEFT LoRA adapter)
    datamix                     RUN/datamix/                  (one LoRA on all the data, PEFT)
    merge:linear|ties|dare      RUN/merges/<method>/          (static merge, PEFT)
    trinityx                    RUN/mocae/                    (MoCaE, sequence router, calibrated T)
    trinityx:no-calibration     RUN/mocae/ with T = 1
    trinityx:no-gl|no-rl        RUN/mocae-no-gl/, RUN/mocae-no-rl/
    trinityx:uniform|top1       RUN/mocae/ with that gate_mode
    trinityx:weights=1,1,-0.5   RUN/mocae/ with fixed user weights (negative negates an expert)
    trinityx:oracle             RUN/mocae/ with gates one-hot on the evaluation set's own dimension (a
                                diagnostic: what a perfect router reaches with these experts)
    trinityx-token              RUN/mocae-token/              (token router)
    trinityx:lm-router          RUN/mocae-lm/                 (sequence router trained by the LM-loss loop)

A `System` wraps one backbone (loaded once and shared): PEFT adapters are injected into it and removed by
`close()`, MoCaE experts are attached and detached the same way, so the next system starts from the bare
backbone. `fingerprint` hashes the backbone identity, the weights and config files of the adapters and the
gating overrides: the generation cache is keyed by it.

Legend: B batch, T tokens, K experts.
"""

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from torch import Tensor, nn

from trinityx.backbones import Backbone, format_prompt, load_backbone
from trinityx.errors import TrinityXError
from trinityx.lora.adapters import ADAPTER_FILES, CONFIG_FILE
from trinityx.mocae import MoCaEModel
from trinityx.paths import check_name
from trinityx.registry import CREATED_BY, MERGE_METHODS, MOCAE_SYSTEMS, SPECS_HELP


def _sha256_files(files: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def backbone_fingerprint(backbone: Backbone) -> str:
    """Backbone identity: its config, tokenizer chat template, and the size and mtime of its weight files."""
    digest = hashlib.sha256(backbone.model.config.to_json_string().encode())
    digest.update(str(backbone.tokenizer.chat_template).encode())
    folder = Path(backbone.model.config._name_or_path)
    if folder.is_dir():
        for file in sorted(folder.glob("*.safetensors")):
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:
        digest.update(str(folder).encode())  # a hub id: its revision is in the config's name
    return digest.hexdigest()


@dataclass
class System:
    """A model to evaluate: the backbone, possibly with a PEFT adapter or MoCaE experts attached."""

    name: str
    """The spec it was loaded from."""
    backbone: Backbone
    model: nn.Module
    """What runs: the backbone model, a PeftModel around it, or a MoCaEModel around it."""
    folder: Path | None = None
    """The adapter or MoCaE folder (None for `base`)."""
    fingerprint: str = ""
    """sha256 of the backbone identity, the adapter/MoCaE files and the gating overrides."""
    details: dict = field(default_factory=dict)
    """JSON-able description for results files (spec, folder, gating)."""
    oracle: bool = False
    """Route every item to its evaluation set's own dimension (one-hot gates) instead of by the router."""

    @property
    def mocae(self) -> MoCaEModel | None:
        return self.model if isinstance(self.model, MoCaEModel) else None

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    # --- running the model ---------------------------------------------------------------------------

    def causal_lm(self) -> nn.Module:
        """The Hugging Face causal LM to call for logits (the MoCaE backbone carries the mixture layers)."""
        return self.mocae.backbone if self.mocae is not None else self.model

    def route(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor | None:
        """Sequence gates [B, K] of left- or right-padded prompts; None when the system has no sequence router."""
        if self.mocae is None or self.mocae.config.router != "sequence":
            return None
        return self.mocae.gates(self.mocae.route(input_ids, attention_mask))  # [B, K]

    @contextmanager
    def gated(self, gates: Tensor | None):
        """Run `causal_lm()` under these sequence gates [B, K]; token routers set their own gates per call."""
        if gates is not None:
            with self.mocae.apply_gates(gates):
                yield
            return
        try:
            yield
        finally:
            if self.mocae is not None:
                self.mocae.clear_gates()

    def generate_ids(self, input_ids: Tensor, attention_mask: Tensor, gates: Tensor | None = None,
                     **kwargs) -> Tensor:
        """HF `generate` on a left-padded batch [B, T] -> [B, T + new]; `gates` [B, K] routed by the caller."""
        if gates is not None:
            return self.mocae.generate(input_ids, attention_mask, gates=gates, **kwargs)
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.inference_mode()
    def request_gates(self, requests: list[str], dimension: str, batch_size: int = 16) -> Tensor | None:
        """Sequence gates [N, K] of evaluation items, routed from each item's request as the user wrote it (the
        instruction, the prompt, the question; never a few-shot primer), in the backbone's prompt format.

        The oracle's gates are one-hot on `dimension`, the evaluation set's own. None for systems without a
        sequence router (base, adapters, token routing: it routes each token inside the forward pass)."""
        if self.mocae is None or self.mocae.config.router != "sequence":
            return None
        if self.oracle:
            dims = self.mocae.config.expert_dims
            if dimension not in dims:
                raise TrinityXError(f"system {self.name!r}: no expert serves {dimension!r} (experts: {dims}), so "
                                    "the oracle has no gate for it")
            return nn.functional.one_hot(torch.full((len(requests),), dims.index(dimension)), len(dims)).float()
        return torch.cat([self.gates(requests[s:s + batch_size]) for s in range(0, len(requests), batch_size)])

    # --- what evaluation calls -------------------------------------------------------------------------

    def generate(self, prompts: list[str], settings=None, cache_dir: str | Path | None = None,
                 gates: Tensor | None = None):
        """Greedy (by default) answers (`generation.Answers`: a list of str with `.cut`), prompts in the
        backbone's prompt format (unless settings.raw), cached; `gates` [N, K] from `request_gates` (None: the
        system routes each prompt as given)."""
        from trinityx.infer.generation import GenerationSettings, generate

        return generate(self, prompts, settings or GenerationSettings(), cache_dir, gates=gates)

    def loglikelihoods(self, contexts: list[str], continuations: list[str], batch_size: int = 32,
                       gates: Tensor | None = None, cache_dir: str | Path | None = None) -> list[float]:
        """Summed log P(continuation | context) per pair, tokenised as lm-evaluation-harness does; `gates` [N, K]
        one row per pair, as in `generate`; `cache_dir` as in `generate` (each context's scores cached)."""
        from trinityx.infer.generation import loglikelihoods

        return loglikelihoods(self, contexts, continuations, batch_size, gates=gates, cache_dir=cache_dir)

    @torch.inference_mode()
    def gates(self, prompts: list[str]) -> Tensor:
        """The router's gates [N, K] for raw prompts (formatted like generation prompts)."""
        if self.mocae is None:
            raise TrinityXError(f"system {self.name!r} has no router; gates exist for trinityx systems only")
        texts = [format_prompt(self.tokenizer, self.backbone.prompt_format, p) for p in prompts]
        batch = self.tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left",
                               return_tensors="pt").to(self.backbone.model.device)
        if self.mocae.config.router == "sequence":
            return self.route(batch.input_ids, batch.attention_mask)
        out = self.mocae(batch.input_ids, batch.attention_mask)
        return self.mocae.gates(out.gate_logits)  # [N, K]

    def close(self) -> None:
        """Remove this system's adapter or experts from the shared backbone, which is left bare."""
        if isinstance(self.model, (PeftModel, MoCaEModel)):
            self.backbone.model = self.model.unload()
        self.model = self.backbone.model


# --------------------------------------------------------------------------------------------------
# Loading


def run_backbone(run_dir: Path | None) -> str | None:
    """The backbone recorded in RUN/run.json, if there is a run folder."""
    if run_dir is None:
        return None
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise TrinityXError(f"--run {run_dir} has no run.json; pass a run folder written by the pipeline "
                            "or give --backbone")
    return json.loads(path.read_text())["backbone"]


def _folder(spec: str, run_dir: Path | None, relative: str) -> Path:
    stage = relative.split("/")[0]
    if run_dir is None:
        raise TrinityXError(f"system {spec!r} is read from a run folder (RUN/{relative}/): pass --run RUN")
    folder = Path(run_dir) / relative
    marker = "mocae_config.json" if stage.startswith("mocae") else CONFIG_FILE
    if not (folder / marker).is_file():
        raise TrinityXError(f"system {spec!r} needs {folder}/ (with {marker}), which does not exist; "
                            f"it is created by {CREATED_BY[stage]}")
    return folder


def _parse_weights(spec: str) -> list[float]:
    try:
        return [float(w) for w in spec.removeprefix("trinityx:weights=").split(",")]
    except ValueError:
        raise TrinityXError(f"system {spec!r}: weights must be numbers separated by commas, e.g. "
                            "trinityx:weights=1,1,-0.5 (one per expert, in gate order)") from None


def load_system(spec: str, run_dir: str | Path | None = None, backbone: str | Backbone | None = None) -> System:
    """Load a system by spec; `backbone` (a loaded Backbone to share, or a name) defaults to RUN/run.json's.

    Call `close()` on the system before loading the next one on the same Backbone.
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    # Validate the spec and find its folder before loading any weights.
    if spec == "base":
        folder, kind, gating = None, "base", {}
    elif spec.startswith("expert:") and spec != "expert:":
        name = check_name(spec.removeprefix("expert:"), f"system {spec!r}")  # stays inside RUN/experts/
        folder, kind, gating = _folder(spec, run_dir, f"experts/{name}"), "peft", {}
    elif spec == "datamix":
        folder, kind, gating = _folder(spec, run_dir, "datamix"), "peft", {}
    elif spec.startswith("merge:") and spec.removeprefix("merge:") in MERGE_METHODS:
        folder, kind, gating = _folder(spec, run_dir, f"merges/{spec.removeprefix('merge:')}"), "peft", {}
    elif spec in MOCAE_SYSTEMS:
        relative, gating = MOCAE_SYSTEMS[spec]
        folder, kind = _folder(spec, run_dir, relative), "mocae"
    elif spec.startswith("trinityx:weights="):
        gating = {"gate_mode": "fixed", "fixed_weights": _parse_weights(spec)}
        folder, kind = _folder(spec, run_dir, "mocae"), "mocae"
    else:
        raise TrinityXError(f"unknown system {spec!r}; choose one of {SPECS_HELP}")

    if not isinstance(backbone, Backbone):
        name = backbone or run_backbone(run_dir)
        if name is None:
            raise TrinityXError(f"system {spec!r}: no backbone: pass --backbone NAME or --run RUN (its run.json)")
        backbone = load_backbone(name)

    digest = hashlib.sha256(backbone_fingerprint(backbone).encode())
    if kind == "base":
        model = backbone.model
    elif kind == "peft":
        digest.update(_sha256_files([folder / f for f in ADAPTER_FILES], folder).encode())
        model = PeftModel.from_pretrained(backbone.model, folder).eval()
    else:
        files = [folder / "mocae_config.json", folder / "router.safetensors",
                 *sorted(folder.glob("experts/*/adapter_*"))]
        digest.update(_sha256_files(files, folder).encode())
        model = MoCaEModel.from_pretrained(folder, backbone_model=backbone.model)
        try:
            model.set_gating(**{k: v for k, v in gating.items() if k != "oracle"})
        except TrinityXError as e:
            model.unload()  # leave the shared backbone bare
            raise TrinityXError(f"system {spec!r}: {e}") from None
    digest.update(json.dumps(gating, sort_keys=True).encode())
    details = {"spec": spec, "kind": kind, "folder": str(folder) if folder else None, "gating": gating,
               "backbone": backbone.name}
    return System(spec, backbone, model, folder, digest.hexdigest(), details, oracle=gating.get("oracle", False))
