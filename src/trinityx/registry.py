"""The one registry of systems: every spec a run evaluates or benchmarks, and the run folder it reads.

The pipeline trains what these entries need and evaluates `SYSTEMS`, `trinityx.infer.systems` loads a spec from its
entry, the report orders its tables by them and the inference benchmark measures `BENCH_SYSTEMS`. Adding an
ablation is one entry in `MOCAE_SYSTEMS` (and, for a new router, one in `ROUTER_FOLDERS`). Plain data only: the
report reads it without loading torch.
"""

from trinityx.data import DIMENSIONS

BASE = "base"
OURS = "trinityx"
ORACLE = "trinityx:oracle"
MERGE_METHODS = ("linear", "ties", "dare")
"""The static merges of `taskvectors.merge`, each a system `merge:<method>` read from RUN/merges/<method>/."""
BASELINES = (*(f"expert:{d}" for d in DIMENSIONS), "datamix", *(f"merge:{m}" for m in MERGE_METHODS))
"""PEFT adapters the paper compares against: one expert per dimension, one LoRA on all the data, the merges."""

ROUTER_FOLDERS: dict[str, dict] = {
    "mocae": {},
    # The paper's w/o GL keeps the LM loss: on cached states a router without GL has no signal at all (no label,
    # no LM loss) and learns an arbitrary assignment (measured: 0.109 on the routing test split), so it trains
    # through the mixture like mocae-lm, with GL off.
    "mocae-no-gl": {"gl_weight": 0.0, "phase": "lm"},
    "mocae-no-rl": {"rl_weight": 0.0},
    "mocae-lm": {"phase": "lm"},
    "mocae-token": {"router": "token"},
}
"""MoCaE folders of a run: folder name -> the RouterConfig changes that make it (the paper's ablations)."""

MOCAE_SYSTEMS: dict[str, tuple[str, dict]] = {
    OURS: ("mocae", {}),
    ORACLE: ("mocae", {"oracle": True}),
    "trinityx:no-calibration": ("mocae", {"temperature": 1.0}),
    "trinityx:no-gl": ("mocae-no-gl", {}),
    "trinityx:no-rl": ("mocae-no-rl", {}),
    "trinityx:uniform": ("mocae", {"gate_mode": "uniform"}),
    "trinityx:top1": ("mocae", {"gate_mode": "top1"}),
    "trinityx:lm-router": ("mocae-lm", {}),
    "trinityx-token": ("mocae-token", {}),
}
"""MoCaE systems: spec -> (its folder in ROUTER_FOLDERS, the gating applied on top of the saved config)."""
ABLATIONS = tuple(spec for spec in MOCAE_SYSTEMS if spec not in (OURS, ORACLE))

SYSTEMS = (BASE, *BASELINES, *MOCAE_SYSTEMS)
"""Every system a run evaluates by default, in this order."""

MOE_BASELINES = ("dense-moe", "xlora")
"""The MoE-style systems the paper's efficiency claims compare against (docs/design.md)."""
EFFICIENCY_ONLY = (*MOE_BASELINES, "peft-multi")
"""Systems that exist only in the inference benchmark (built there from the experts, never evaluated)."""
BENCH_SYSTEMS = (BASE, OURS, "trinityx-token", "peft-multi", *MOE_BASELINES)
"""What `trinityx bench inference` measures, in this order."""

CREATED_BY = {
    "experts": "`trinityx train-experts --out RUN/experts` (or the pipeline's experts stage)",
    "datamix": "the pipeline's datamix stage (`trinityx run --config CONFIG --out RUN`)",
    "merges": "the pipeline's merge stage (`trinityx run --config CONFIG --out RUN`)",
    **{folder: "the pipeline's router and calibration stages (`trinityx run --config CONFIG --out RUN`)"
       for folder in ROUTER_FOLDERS},
}
"""Which command writes each folder of a run (named in the error when a folder is missing)."""
SPECS_HELP = ", ".join([BASE, "expert:<dim>", "datamix", "merge:" + "|".join(MERGE_METHODS), *MOCAE_SYSTEMS,
                        "trinityx:weights=w1,w2,..."])
