"""`trinityx train-judges`: train and validate the offline judges (they do not depend on the backbone)."""

from dataclasses import dataclass
from pathlib import Path

from trinityx import data
from trinityx.errors import TrinityXError
from trinityx.eval.judges.train import KINDS, RECIPES, adopt_judges, stale_judges, train_judges
from trinityx.paths import check_writable


@dataclass
class TrainJudgesConfig:
    """Train the local judges by a recipe (trinityx.eval.judges.train.RECIPES) and measure their held-out validity."""

    out: Path | None = None
    """Judges folder (default: $TRINITYX_JUDGES or ~/.cache/trinityx/judges, where `evaluate` and `run` look; a
    recipe other than default in its subfolder recipes/<recipe>, where `run` with that judge_recipe looks)."""
    data_dir: str | None = None
    """Folder laid out like ../shared/data (default: $TRINITYX_DATA_DIR)."""
    which: tuple[str, ...] = KINDS
    """Judges to train: harm, truth, info, helpful."""
    recipe: str = "default"
    """How the judges are trained: default (frozen MiniLM features + a small head), backbone (the harm judge on the
    embedded SmolLM2's frozen states; slower, more accurate) or finetune (MiniLM end to end)."""
    resume: bool = False
    """Train only the judges in `which` that are missing or were trained by another recipe (a killed run resumes);
    a judge the default folder holds with this recipe's settings is copied, not trained again."""
    seed: int = 0
    """Seed of the subsets and the training."""
    threads: int = 2
    """CPU threads for torch."""


def train_judges_cli(cfg: TrainJudgesConfig) -> dict:
    from trinityx.eval.evaluate import resolve_judges_dir

    if cfg.recipe not in RECIPES:
        raise TrinityXError(f"--recipe {cfg.recipe!r} is unknown; choose from {', '.join(RECIPES)}")
    out = resolve_judges_dir(cfg.out, cfg.recipe)
    check_writable(out, "--out")  # before any judge trains (issue 15: no work lost to an unwritable folder)
    which = cfg.which
    if cfg.resume:
        which = tuple(adopt_judges(out, stale_judges(out, cfg.which, cfg.recipe, cfg.seed), cfg.recipe,
                                   resolve_judges_dir(cfg.out), cfg.seed))
    results = train_judges(data.resolve_data_dir(cfg.data_dir), out, which=which, recipe=cfg.recipe,
                           seed=cfg.seed, threads=cfg.threads)
    for kind, r in results.items():
        v = r["validity"]
        print(f"{kind:<8} {r['seconds']:.0f} s -> {out / kind}; beats its trivial baseline: {v['beats_trivial_baseline']}")
    return results
