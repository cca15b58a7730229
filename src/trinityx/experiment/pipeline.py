"""`trinityx run`: one command from the data to a results report, in resumable stages.

Each stage writes its outputs atomically and then records itself in RUN/stages.json; a rerun skips the
finished stages, `--force STAGE` redoes that stage and every stage after it, and a run killed at any point
resumes without redoing finished work (long stages also resume inside: expert training from checkpoints,
evaluation from its generation cache).
"""

import json
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from trinityx import data
from trinityx.backbones import DEFAULT_BACKBONE, load_backbone
from trinityx.errors import TrinityXError
from trinityx.io import to_jsonable, write_json
from trinityx.lora.adapters import CONFIG_FILE
from trinityx.paths import check_writable
from trinityx.registry import (ABLATIONS, BASE, BENCH_SYSTEMS, EFFICIENCY_ONLY, MERGE_METHODS, MOCAE_SYSTEMS, OURS,
                               ROUTER_FOLDERS, SYSTEMS)
from trinityx.train.experts import LoraSettings, subsample, train_lora
from trinityx.train.loop import TrainConfig
from trinityx.train.router import HEAD_TRAIN, LM_TRAIN, CalibrateConfig, RouterConfig, RouterLoss, calibrate, fit_router

STAGES = ("splits", "experts", "datamix", "reference", "merges", "router", "calibration", "judges", "evaluate",
          "bench", "report")


@dataclass
class PipelineConfig:
    """Run every stage from data splits to the report; YAML profiles in configs/ hold these fields."""

    out: Path
    """Run folder (everything the run writes goes here)."""
    profile: str = "custom"
    """Name of the profile (recorded in results.json)."""
    backbone: str = DEFAULT_BACKBONE
    """Backbone preset, folder, .gguf file or hub id."""
    data_dir: str | None = None
    """Folder laid out like ../shared/data (default: $TRINITYX_DATA_DIR)."""
    dtype: str = "float32"
    """Weights dtype: float32 on CPU; bfloat16 on GPUs."""
    seed: int = 0
    """Seed of every stage."""
    force: str | None = None
    """Redo this stage and every stage after it."""
    until: str | None = None
    """Stop after this stage (a later `run` continues from there)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    expert_train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=30, eval_every=15, dev_examples=48))
    expert_steps: dict[str, int] = field(default_factory=dict)
    """Optimiser steps of one dimension's expert where it differs from expert_train.max_steps, e.g. {honest: 20}
    (docs/experts.md: each dimension saturates at its own step count). datamix gets the sum of the experts'."""
    expert_examples: int | None = 240
    """Training examples per dimension (same for every system: the shared data budget)."""
    reference_steps: int = 10
    """Steps of the short LoRA fit on the target mixture whose task vector gives gamma."""
    merge_density: float = 0.5
    """Kept fraction for ties and dare."""
    router_train: TrainConfig = field(default_factory=lambda: replace(LM_TRAIN))
    router_loss: RouterLoss = field(default_factory=RouterLoss)
    router_pool_layer: int = -1
    """Hidden state the sequence routers pool (0 embeddings, l after layer l, -1 the last). The routing pass stops
    at this layer, so a middle layer routes at about half the cost of a prefill."""
    router_pool_layers: tuple[int, ...] = ()
    """More hidden states the sequence routers read (at or below router_pool_layer: free)."""
    router_pooling: str = "mean"
    """Pooling of the prompt tokens for the sequence routers: mean, last or mean+last."""
    router_head_hidden: int = 0
    """Width of the sequence routers' MLP head (0 = linear)."""
    router_head_train: TrainConfig = field(default_factory=lambda: HEAD_TRAIN)
    """Optimisation of the sequence router heads on cached prompt states (the states phase)."""
    routing_per_dimension: int | None = 1000
    """Routing prompts per dimension for the states phase (seeded subset of the routing data; None: all)."""
    routing_files: tuple[str, ...] = ()
    """More routing data: JSON or JSON-lines files of {"prompt", "dimension"} rows (never evaluation items)."""
    calibrate_examples: int = 100
    """Held-out prompts per dimension for fitting (dev) and measuring (test) the temperature."""
    systems: tuple[str, ...] = SYSTEMS
    """Systems to evaluate (all on the same backbone, data and judges)."""
    judges_dir: Path | None = None
    """Trained judges (default: $TRINITYX_JUDGES or ~/.cache/trinityx/judges); missing ones are trained."""
    judge_recipe: str = "default"
    """Recipe of the judges (trinityx.eval.judges.train.RECIPES); missing judges or judges of another recipe are
    retrained."""
    eval_limit: int | None = 24
    """Items per axis (first N of each evaluation set); None evaluates all 400/140/299."""
    eval_mc_limit: int | None = None
    """TruthfulQA questions scored by MC1/MC2 (log-likelihood; None: eval_limit): cheaper than generated answers."""
    max_new_tokens: int = 96
    """Answer length for helpful and harmless prompts."""
    answer_tokens: int = 40
    """Answer length for TruthfulQA questions."""
    eval_batch_size: int = 8
    """Generation batch size."""
    eval_workers: int = 1
    """Processes evaluating systems side by side, the machine's threads split between them. Small generation
    batches use CPU threads poorly: on 2 cores, 2 processes x 1 thread evaluated 2 systems 1.55x faster than one
    process with 2 threads, with the same answers (MC log-likelihoods differed by 1e-9)."""
    bootstrap: int = 1000
    """Bootstrap resamples for the 95% intervals."""
    bench_systems: tuple[str, ...] = BENCH_SYSTEMS
    """Systems in the inference benchmark."""
    bench_memory: bool = True
    """Measure each benchmarked system's peak memory in a fresh subprocess."""
    bench_prompts: int = 4
    """Prompts in the inference benchmark."""
    bench_new_tokens: int = 32
    """New tokens per request in the inference benchmark."""
    bench_repeats: int = 3
    """Repeats per system in the inference benchmark (median reported)."""

    def validate(self) -> None:
        for flag, stage in (("--force", self.force), ("--until", self.until)):
            if stage is not None and stage not in STAGES:
                raise TrinityXError(f"{flag} {stage!r} is not a stage; stages: {', '.join(STAGES)}")
        if not 0 < self.merge_density <= 1:
            raise TrinityXError(f"--merge-density must be in (0, 1], got {self.merge_density}")
        unknown = set(self.expert_steps) - set(data.DIMENSIONS)
        if unknown or any(not isinstance(v, int) or v < 1 for v in self.expert_steps.values()):
            raise TrinityXError(f"--expert-steps {self.expert_steps}: give a positive step count per dimension "
                                f"({', '.join(data.DIMENSIONS)}), e.g. {{honest: 20}}")
        if self.eval_workers < 1:
            raise TrinityXError(f"--eval-workers must be at least 1, got {self.eval_workers}")
        self.lora.validate()


class Run:
    """The run folder and its record of finished stages."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.dir = Path(cfg.out)
        self.state_file = self.dir / "stages.json"
        self.state = self._read_state() if self.state_file.is_file() else {}
        self.pooled: dict = {}  # routing states of the sequence routers, shared by the router and calibration stages

    def _read_state(self) -> dict:
        fix = "delete it: the next run keeps the models and evaluations it finds and redoes the rest"
        try:
            state = json.loads(self.state_file.read_text(encoding="utf-8"))
        except ValueError as e:  # not JSON (a cut or edited file), or not UTF-8
            raise TrinityXError(f"{self.state_file} is not valid JSON ({e}); {fix}") from None
        if not isinstance(state, dict):
            raise TrinityXError(f"{self.state_file} holds a JSON {type(state).__name__}, not a record of finished "
                                f"stages; {fix}")
        return state

    def done(self, stage: str) -> bool:
        """Recorded as finished and its outputs are there (a deleted output makes the stage run again)."""
        missing = [p for p in STAGE_OUTPUTS.get(stage, lambda run: [])(self) if not p.is_file()]
        if stage in self.state and missing:
            print(f"[{stage}] recorded as finished, but {missing[0]} is missing: running it again")
        if stage in self.state and not missing and stage in STAGE_CHANGES:
            missing = STAGE_CHANGES[stage](self)
            if missing:
                print(f"[{stage}] {missing[0]} changed since the stage ran: running it again")
        return stage in self.state and not missing

    def finish(self, stage: str, seconds: float, **info) -> None:
        self.state[stage] = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": seconds, **info}
        write_json(self.state_file, self.state)

    def forget_from(self, stage: str) -> None:
        for s in STAGES[STAGES.index(stage):]:
            self.state.pop(s, None)
        write_json(self.state_file, self.state)

    def backbone(self):
        # A fresh load per stage: MoCaE surgery changes a loaded model in place, and the float32 cache
        # makes a load take about a second.
        return load_backbone(self.cfg.backbone, self.cfg.dtype)


def stage_splits(run: Run, data_dir: Path) -> dict:
    """Record the split sizes the run uses (the splits themselves are fixed in code)."""
    sizes = {d: {s: len(data.load_sft(d, data_dir, s)) for s in data.SPLITS} for d in data.DIMENSIONS}
    sizes["truthfulqa_questions"] = {s: len(data.load_truthfulqa(data_dir, s)) for s in data.SPLITS}
    sizes["alpaca_eval"] = {s: len(data.load_alpaca_eval(data_dir, s)) for s in data.ALPACA_EVAL_SPLITS}
    sizes["beavertails_eval"] = len(data.load_safety_prompts(data_dir))
    write_json(run.dir / "splits.json", {"split_seed": data.SPLIT_SEED, "sizes": sizes})
    return sizes


def _train_examples(cfg: PipelineConfig, data_dir: Path, dimension: str):
    return subsample(data.load_sft(dimension, data_dir, "train"), cfg.expert_examples, cfg.seed)


def _dev_examples(cfg: PipelineConfig, data_dir: Path, dimensions):
    return [e for d in dimensions for e in subsample(data.load_sft(d, data_dir, "dev"),
                                                       cfg.expert_train.dev_examples // len(dimensions), cfg.seed)]


def expert_steps(cfg: PipelineConfig, dimension: str) -> int:
    return cfg.expert_steps.get(dimension, cfg.expert_train.max_steps)


def stage_experts(run: Run, data_dir: Path) -> dict:
    cfg, logs = run.cfg, {}
    backbone = run.backbone()
    for dimension in data.DIMENSIONS:
        out = run.dir / "experts" / dimension
        if not (out / "train_log.json").is_file():
            train_lora(backbone, _train_examples(cfg, data_dir, dimension),
                       subsample(data.load_sft(dimension, data_dir, "dev"), cfg.expert_train.dev_examples, cfg.seed),
                       cfg.lora, replace(cfg.expert_train, seed=cfg.seed, max_steps=expert_steps(cfg, dimension)), out,
                       {"stage": "experts", "dimension": dimension, "backbone": cfg.backbone}, f"expert:{dimension}")
        log = json.loads((out / "train_log.json").read_text())
        logs[dimension] = {"dev_loss_base": log["dev_loss_before"], "dev_loss_expert": log["dev_loss_after"]}
    return logs


def stage_datamix(run: Run, data_dir: Path) -> dict:
    """One LoRA on all three datasets with the experts' total budget: the same examples, 3x the steps."""
    cfg = run.cfg
    out = run.dir / "datamix"
    train = [e for d in data.DIMENSIONS for e in _train_examples(cfg, data_dir, d)]
    steps = sum(expert_steps(cfg, d) for d in data.DIMENSIONS)
    train_cfg = replace(cfg.expert_train, max_steps=steps, seed=cfg.seed,
                        eval_every=cfg.expert_train.eval_every * len(data.DIMENSIONS))
    if not (out / "train_log.json").is_file():  # written last, atomically: a folder that has it is complete
        train_lora(run.backbone(), train, _dev_examples(cfg, data_dir, data.DIMENSIONS), cfg.lora, train_cfg, out,
                   {"stage": "datamix", "backbone": cfg.backbone}, "datamix")
    log = json.loads((out / "train_log.json").read_text())
    return {"dev_loss_before": log["dev_loss_before"], "dev_loss_after": log["dev_loss_after"], "steps": steps}


def stage_reference(run: Run, data_dir: Path) -> dict:
    """gamma from a short LoRA fit on the target mixture (docs/design.md): softmax over cosines to T_ref."""
    from trinityx.lora.taskvectors import TaskVector, gamma, similarities

    cfg = run.cfg
    out = run.dir / "reference"
    per_dim = max(cfg.expert_train.batch_size, cfg.reference_steps * cfg.expert_train.batch_size // len(data.DIMENSIONS))
    train = data.load_mixture(data_dir, "train", per_dimension=per_dim, seed=cfg.seed + 1)
    train_cfg = replace(cfg.expert_train, max_steps=cfg.reference_steps, seed=cfg.seed + 1,
                        eval_every=cfg.reference_steps, checkpoint_every=0, warmup_steps=1)
    if not (out / "train_log.json").is_file():
        train_lora(run.backbone(), train, _dev_examples(cfg, data_dir, data.DIMENSIONS), cfg.lora, train_cfg, out,
                   {"stage": "reference", "backbone": cfg.backbone}, "reference")
    experts = [TaskVector.from_adapter(run.dir / "experts" / d) for d in data.DIMENSIONS]
    reference = TaskVector.from_adapter(out)
    dots, cosines = similarities(experts, reference)
    g = gamma(experts, reference)
    result = {"dimensions": list(data.DIMENSIONS), "gamma": g.tolist(), "cosine": cosines.tolist(), "dot": dots.tolist()}
    write_json(run.dir / "gamma.json", result)
    return result


def _gamma(run: Run) -> list[float]:
    return json.loads((run.dir / "gamma.json").read_text())["gamma"]


def stage_merges(run: Run, data_dir: Path) -> dict:
    from trinityx.lora.taskvectors import merge

    experts = [run.dir / "experts" / d for d in data.DIMENSIONS]
    weights = _gamma(run)
    methods = [m for m in MERGE_METHODS if f"merge:{m}" in run.cfg.systems]  # only the merges the run evaluates
    for method in methods:
        merge(experts, weights, method, run.dir / "merges" / method, density=run.cfg.merge_density, seed=run.cfg.seed)
    return {"weights": weights, "methods": methods}


def routers_needed(systems) -> list[str]:
    """The router folders the run's systems read (`mocae` always: the report's router numbers are its)."""
    needed = {"mocae"} | {MOCAE_SYSTEMS[s][0] for s in systems if s in MOCAE_SYSTEMS}
    return [name for name in ROUTER_FOLDERS if name in needed]


def router_config(run: Run, name: str, data_dir) -> RouterConfig:
    """How the run trains router folder `name` (ROUTER_FOLDERS[name] applied to the run's settings)."""
    cfg, change = run.cfg, ROUTER_FOLDERS[name]
    loss = replace(cfg.router_loss, **{k: v for k, v in change.items() if k.endswith("_weight")})
    phase = change.get("phase", "states")
    return RouterConfig(experts=run.dir / "experts", out=run.dir / name, backbone=cfg.backbone, data_dir=str(data_dir),
                        router=change.get("router", "sequence"), gamma=tuple(_gamma(run)), phase=phase,
                        per_dimension=cfg.routing_per_dimension if phase == "states" else cfg.expert_examples,
                        dev_per_dimension=cfg.calibrate_examples,  # = calibration's fit set: one pass
                        routing_files=cfg.routing_files, overwrite=True, loss=loss,
                        pool_layer=cfg.router_pool_layer, pool_layers=cfg.router_pool_layers,
                        pooling=cfg.router_pooling, head_hidden=cfg.router_head_hidden,
                        train=replace(cfg.router_train, seed=cfg.seed),
                        head_train=replace(cfg.router_head_train, seed=cfg.seed))


# What makes two routers different (trinityx_config.json keys); the rest (paths, overwrite) does not.
ROUTER_IDENTITY = ("router", "phase", "loss", "pool_layer", "pool_layers", "pooling", "head_hidden", "per_dimension",
                   "routing_files")


def router_changes(run: Run, name: str) -> list[str]:
    """How the router saved in RUN/name differs from what the run asks for now ([] = the same, or not saved)."""
    path = run.dir / name / "trinityx_config.json"
    if not path.is_file() or not (run.dir / "gamma.json").is_file():
        return []
    recorded = json.loads(path.read_text())
    wanted = to_jsonable(asdict(router_config(run, name, run.cfg.data_dir)))
    return [f"{k} {recorded.get(k)} -> {wanted[k]}" for k in ROUTER_IDENTITY if recorded.get(k) != wanted[k]]


def stage_router(run: Run, data_dir: Path) -> dict:
    logs = {}
    for name in routers_needed(run.cfg.systems):
        out = run.dir / name
        changes = router_changes(run, name)
        if (out / "train_log.json").is_file() and not changes:
            logs[name] = json.loads((out / "train_log.json").read_text())["router_accuracy_dev"]
            continue
        if changes:  # a router of another definition: its folder, calibration and evaluations go; trained again
            print(f"[router] {name} was trained with {'; '.join(changes)}: training it again")
            shutil.rmtree(out)
            for spec, (folder, _) in MOCAE_SYSTEMS.items():
                if folder == name:
                    eval_file(run.dir, spec).unlink(missing_ok=True)
        # A fresh backbone per router (attaching experts changes it in place); the routing states are shared.
        logs[name] = fit_router(router_config(run, name, data_dir), run.backbone(), run.pooled)["router_accuracy_dev"]
    return {"router_accuracy_dev": logs}


def stage_calibration(run: Run, data_dir: Path) -> dict:
    reports = {}
    for name in routers_needed(run.cfg.systems):
        report = calibrate(CalibrateConfig(run=run.dir / name, data_dir=str(data_dir), seed=run.cfg.seed,
                                           fit_examples=run.cfg.calibrate_examples,
                                           test_examples=run.cfg.calibrate_examples,
                                           routing_files=run.cfg.routing_files), run.backbone(), run.pooled)
        reports[name] = {"temperature": report["temperature"], "ece_before": report["before"]["ece"],
                         "ece_after": report["after"]["ece"]}
    return reports


STAGE_FUNCTIONS = {
    "splits": stage_splits,
    "experts": stage_experts,
    "datamix": stage_datamix,
    "reference": stage_reference,
    "merges": stage_merges,
    "router": stage_router,
    "calibration": stage_calibration,
}


def run_pipeline(cfg: PipelineConfig) -> dict:
    """`trinityx run`: every stage in order; finished stages are skipped."""
    cfg.validate()
    check_writable(cfg.out, "--out")
    data_dir = data.resolve_data_dir(cfg.data_dir)
    run = Run(cfg)
    run.dir.mkdir(parents=True, exist_ok=True)
    if cfg.force:
        run.forget_from(cfg.force)
    previous = json.loads((run.dir / "run.json").read_text()) if (run.dir / "run.json").is_file() else {}
    write_json(run.dir / "run.json", {
        "backbone": cfg.backbone, "profile": cfg.profile, "seed": cfg.seed, "data_dir": str(data_dir),
        "config": to_jsonable(asdict(cfg)), "command": " ".join(["trinityx", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.platform()}",
        "started": previous.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    torch.manual_seed(cfg.seed)
    for stage in STAGES:
        if stage not in STAGE_FUNCTIONS:
            continue
        if run.done(stage):
            print(f"[{stage}] finished earlier ({run.state[stage]['seconds']:.0f} s), skipped")
            if stage == cfg.until:
                break
            continue
        print(f"[{stage}] running")
        start = time.perf_counter()
        info = STAGE_FUNCTIONS[stage](run, data_dir)
        seconds = time.perf_counter() - start
        if stage != "report":
            run.state.pop("report", None)  # the report summarises every stage: redone after any of them ran
        run.finish(stage, seconds, info=to_jsonable(info))
        print(f"[{stage}] done in {seconds:.0f} s")
        if stage == cfg.until:
            break
    print("stage times: " + ", ".join(f"{s} {run.state[s]['seconds']:.0f} s" for s in STAGES if s in run.state))
    return run.state


def stage_judges(run: Run, data_dir: Path) -> dict:
    """Reuse trained judges (they do not depend on the backbone); train the missing or stale ones."""
    from trinityx.eval.evaluate import resolve_judges_dir
    from trinityx.eval.judges import load_judge
    from trinityx.eval.judges.train import adopt_judges, stale_judges, train_judges

    folder = resolve_judges_dir(run.cfg.judges_dir, run.cfg.judge_recipe)
    stale = adopt_judges(folder, stale_judges(folder, RUN_JUDGES, run.cfg.judge_recipe), run.cfg.judge_recipe,
                         resolve_judges_dir(run.cfg.judges_dir))
    for kind, why in stale.items():
        print(f"{kind} judge in {folder}: {why}; training it (once; later runs reuse it)")
    if stale:
        train_judges(data_dir, folder, which=tuple(stale), recipe=run.cfg.judge_recipe)
    judges = {k: load_judge(folder / k) for k in RUN_JUDGES}
    return {"folder": str(folder), "trained_now": list(stale), "recipe": run.cfg.judge_recipe,
            "judges": {k: {"name": j.name, "threshold": j.threshold, "validity": j.validity} for k, j in judges.items()}}


def _judges_changed(recorded: dict) -> list[Path]:
    """The judge.json files of the judges stage's folder whose judge differs (name, threshold) from the recorded one."""
    from trinityx.eval.evaluate import same_judge
    from trinityx.eval.judges.local import JUDGE_FILE

    changed = []
    for kind, judge in recorded["judges"].items():
        path = Path(recorded["folder"]) / kind / JUDGE_FILE
        meta = json.loads(path.read_text()) if path.is_file() else {}
        if not same_judge(meta, judge):
            changed.append(path)
    return changed


RUN_JUDGES = ("helpful", "harm", "truth", "info")
"""The judges a run trains (when missing or stale) and loads, in this order: every kind of
trinityx.eval.judges.KINDS."""


def eval_file(run_dir: Path, system: str) -> Path:
    return Path(run_dir) / "eval" / f"{system.replace(':', '__')}.json"


def eval_log(run_dir: Path, system: str) -> Path:
    """Where a worker process writes a system's evaluation log (its progress bars and messages)."""
    out = eval_file(run_dir, system)
    return out.parent / "logs" / f"{out.stem}.log"


def stage_evaluate(run: Run, data_dir: Path) -> dict:
    """Every system on every axis, same items and judges; a finished system is not evaluated again.

    With `eval_workers` > 1 the systems are shared among that many processes (spawned, the machine's threads
    split between them); each writes its log to RUN/eval/logs/SYSTEM.log and the parent shows one bar."""
    cfg = run.cfg
    judges_dir = run.state["judges"]["info"]["folder"]
    todo = [spec for spec in cfg.systems if not _evaluated(eval_file(run.dir, spec), run, say=True)]
    if cfg.eval_workers <= 1 or len(todo) <= 1:
        backbone = run.backbone()
        seconds = {spec: evaluate_system(cfg, run.dir, spec, judges_dir, data_dir, backbone) for spec in todo}
    else:
        seconds = _evaluate_in_workers(run, todo, judges_dir, data_dir)
    return {"seconds": seconds, "workers": min(cfg.eval_workers, max(len(todo), 1))}


def _evaluated(out: Path, run: Run, say: bool = False) -> bool:
    """The system's evaluation finished with the run's current items, answer lengths, seed and judges (a
    changed eval_limit or a retrained judge makes it run again: its answers are cached, only new items are
    generated). `say` prints why a finished one is out of date."""
    if not out.is_file():
        return False
    result = json.loads(out.read_text())
    if "finished" not in result:
        return False
    why = _evaluation_changes(result, run)
    if why and say:
        print(f"[evaluate] {out.name} is out of date ({'; '.join(why)}): evaluating it again, reusing cached answers")
    return not why


def _evaluation_changes(result: dict, run: Run) -> list[str]:
    """How a finished evaluation file differs from what the run asks for now ([] = up to date)."""
    from trinityx.eval.evaluate import same_judge

    cfg, recorded = run.cfg, result.get("config", {})
    wanted = {"limit": cfg.eval_limit, "mc_limit": cfg.eval_mc_limit, "seed": cfg.seed,
              "max_new_tokens": cfg.max_new_tokens, "answer_tokens": cfg.answer_tokens}
    found = {"limit": recorded.get("limit"), "mc_limit": recorded.get("mc_limit"), "seed": recorded.get("seed"),
             "max_new_tokens": (recorded.get("helpful_harmless_generation") or {}).get("max_new_tokens"),
             "answer_tokens": (recorded.get("honest_generation") or {}).get("max_new_tokens")}
    why = [f"{k} {found[k]} -> {wanted[k]}" for k in wanted if found[k] != wanted[k]]
    judges = (run.state.get("judges") or {}).get("info", {}).get("judges", {})
    for axis, part in result.get("axes", {}).items():
        for kind, used in (part.get("judges") or {}).items():
            now = judges.get(kind)
            if now and not same_judge(used, now):
                why.append(f"{axis} was judged by {used.get('name')} at threshold {used.get('threshold')}, "
                           f"the run's {kind} judge is now {now['name']} at {now['threshold']}")
    return why


def evaluate_system(cfg: PipelineConfig, run_dir: Path, spec: str, judges_dir, data_dir: Path, backbone) -> float:
    """Evaluate one system of the run into RUN/eval/SYSTEM.json; returns the seconds it took."""
    from trinityx.eval.evaluate import EvaluateConfig, evaluate
    from trinityx.infer.systems import load_system

    start = time.perf_counter()
    system = load_system(spec, run_dir, backbone)
    evaluation = EvaluateConfig(system=spec, out=eval_file(run_dir, spec), limit=cfg.eval_limit,
                                mc_limit=cfg.eval_mc_limit, data_dir=data_dir, judges=judges_dir, seed=cfg.seed,
                                bootstrap=cfg.bootstrap, max_new_tokens=cfg.max_new_tokens,
                                answer_tokens=cfg.answer_tokens, batch_size=cfg.eval_batch_size,
                                cache_dir=run_dir / "generations")
    try:
        evaluate(system, evaluation, record={"stage": "evaluate", "profile": cfg.profile})
    finally:
        system.close()
    return time.perf_counter() - start


_WORKER: dict = {}  # per worker process: its backbone, loaded once and reused for every system it evaluates


def _init_eval_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _evaluate_in_worker(cfg: PipelineConfig, spec: str, judges_dir, data_dir: Path) -> float:
    import contextlib

    log = eval_log(cfg.out, spec)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f, contextlib.redirect_stderr(f), contextlib.redirect_stdout(f):
        if "backbone" not in _WORKER:
            _WORKER["backbone"] = load_backbone(cfg.backbone, cfg.dtype)
        return evaluate_system(cfg, Path(cfg.out), spec, judges_dir, data_dir, _WORKER["backbone"])


HEADLINE = (OURS, "merge:linear", BASE)


def evaluation_order(specs: list[str]) -> list[str]:
    """The order the evaluate stage runs systems in: the headline comparison first (trinityx, merge:linear, base:
    routing against merging and against the bare backbone), then the rest of the main table in the given order,
    the ablations last, so that a long run stopped halfway already has the systems its main claims compare."""
    def key(spec: str) -> tuple[bool, int]:
        return spec in ABLATIONS, HEADLINE.index(spec) if spec in HEADLINE else len(HEADLINE)

    return sorted(specs, key=key)


def _evaluate_in_workers(run: Run, todo: list[str], judges_dir, data_dir: Path) -> dict[str, float]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    workers = min(run.cfg.eval_workers, len(todo))
    threads = max(1, torch.get_num_threads() // workers)
    todo = evaluation_order(todo)
    print(f"evaluating {len(todo)} systems in {workers} processes x {threads} threads; "
          f"logs in {run.dir / 'eval' / 'logs'}")
    seconds = {}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_eval_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(_evaluate_in_worker, run.cfg, spec, judges_dir, data_dir): spec for spec in todo}
        with tqdm(total=len(todo), desc="evaluate systems", unit="system") as progress:
            for future in as_completed(futures):
                spec = futures[future]
                try:
                    seconds[spec] = future.result()
                except Exception as error:
                    pool.shutdown(cancel_futures=True)
                    log = eval_log(run.dir, spec)
                    raise TrinityXError(f"evaluating {spec} failed ({type(error).__name__}: {error}); its log: {log}. "
                                        "Systems already evaluated are kept: rerun the same command to resume") from error
                progress.set_postfix_str(f"{spec} {seconds[spec]:.0f} s")
                progress.update()
    return {spec: seconds[spec] for spec in todo}


def stage_bench(run: Run, data_dir: Path) -> dict:
    """The inference benchmark on this run's experts (base, trinityx, trinityx-token, peft-multi, dense-moe, xlora)."""
    from trinityx.bench.inference import BenchInferenceConfig, bench_inference

    cfg = run.cfg
    result = bench_inference(BenchInferenceConfig(backbone=cfg.backbone, experts=str(run.dir / "experts"),
                                                  prompts=cfg.bench_prompts, new_tokens=cfg.bench_new_tokens,
                                                  repeats=cfg.bench_repeats, systems=cfg.bench_systems,
                                                  memory=cfg.bench_memory, pool_layer=cfg.router_pool_layer))
    write_json(run.dir / "bench_inference.json", result)
    return {"systems": list(result["systems"])}


# The items of each axis, as results.json names them (`systems.*.AXIS.split`).
AXIS_SPLITS = {"helpful": "alpaca_eval eval", "harmless": "beavertails-evaluation", "honest": "truthfulqa test"}


def collect_results(run: Run) -> dict:
    """results.json: every number of the run with its provenance, from the stage outputs.

    `systems.SYSTEM.AXIS` is the axis' `metrics` exactly as `trinityx evaluate` wrote them in RUN/eval/SYSTEM.json
    (rates 0-100, each with its 95% interval `<metric>_ci`), plus the items' `split` (and the helpful axis'
    `reference`); `systems.SYSTEM.efficiency` is the system's row of the inference benchmark; `paired` names the
    metrics the same way.
    """
    cfg = run.cfg
    meta = json.loads((run.dir / "run.json").read_text())
    judges_info = run.state["judges"]["info"]["judges"]

    def validity(kind, key):
        return judges_info[kind]["validity"].get(key)

    judges = {
        "helpful": {"name": judges_info["helpful"]["name"], "agreement": validity("helpful", "agreement"),
                    "length_rule_agreement": validity("helpful", "length_rule_agreement"),
                    "n": validity("helpful", "n"), "split": validity("helpful", "split")},
        "harmless": {"name": judges_info["harm"]["name"], "accuracy": validity("harm", "accuracy"),
                     "balanced_accuracy": validity("harm", "balanced_accuracy"),
                     "majority_baseline": validity("harm", "majority_baseline"),
                     "auroc": validity("harm", "auroc"), "threshold": judges_info["harm"]["threshold"],
                     "n": validity("harm", "n"), "split": validity("harm", "split")},
        "truth": {"name": judges_info["truth"]["name"], "accuracy": validity("truth", "accuracy"),
                  "balanced_accuracy": validity("truth", "balanced_accuracy"),
                  "majority_baseline": validity("truth", "majority_baseline"),
                  "n": validity("truth", "n"), "split": validity("truth", "split")},
        "info": {"name": judges_info["info"]["name"], "accuracy": validity("info", "accuracy"),
                 "balanced_accuracy": validity("info", "balanced_accuracy"),
                 "majority_baseline": validity("info", "majority_baseline"),
                 "n": validity("info", "n"), "split": validity("info", "split")},
    }
    # docs/design.md: a score from a judge that does not beat its trivial baseline (validate_judge's check) is not a
    # result; None when the validity does not say.
    for kind, source in (("helpful", "helpful"), ("harmless", "harm"), ("truth", "truth"), ("info", "info")):
        judges[kind]["measurable"] = validity(source, "beats_trivial_baseline")
    bench = json.loads((run.dir / "bench_inference.json").read_text())["systems"] \
        if (run.dir / "bench_inference.json").is_file() else {}
    systems = {}
    for spec in cfg.systems:
        f = eval_file(run.dir, spec)
        if not f.is_file():
            continue
        axes = json.loads(f.read_text())["axes"]
        row = {axis: {**record["metrics"], "split": AXIS_SPLITS[axis]} for axis, record in axes.items()}
        if "helpful" in row:
            row["helpful"]["reference"] = axes["helpful"]["data"]["reference"]
        if spec in bench:
            row["efficiency"] = bench[spec]
        systems[spec] = row
    for name in EFFICIENCY_ONLY:
        if name in bench:
            systems[name] = {"efficiency": bench[name]}
    calibration = json.loads((run.dir / "mocae" / "calibration.json").read_text())
    router = {"accuracy": calibration["accuracy"], "ece_before": calibration["before"]["ece"],
              "ece_after": calibration["after"]["ece"], "brier_before": calibration["before"]["brier"],
              "brier_after": calibration["after"]["brier"], "nll_before": calibration["before"]["nll"],
              "nll_after": calibration["after"]["nll"], "temperature": calibration["temperature"],
              "n": calibration["n_test"], "confusion_matrix": calibration["confusion_matrix"],
              "dimensions": calibration["dimensions"], "fit_split": calibration["fit_split"],
              "measure_split": calibration["measure_split"],
              "evaluation_sets": calibration.get("evaluation_sets", {}),
              "reliability_before_png": "mocae/reliability_before.png",
              "reliability_after_png": "mocae/reliability_after.png"}
    routing, routing_accuracy = {}, {}
    if eval_file(run.dir, "trinityx").is_file():  # how trinityx routed each evaluation set's items
        for axis, record in json.loads(eval_file(run.dir, "trinityx").read_text())["axes"].items():
            if "routing" in record:
                name = next(n for n, dimension in data.EVALUATION_SETS.items() if dimension == axis)
                routing[name] = record["routing"]["mean_gates"]
                routing_accuracy[name] = {k: v for k, v in record["routing"].items() if k != "mean_gates"}
    return {
        "backbone": cfg.backbone, "profile": cfg.profile, "seed": cfg.seed, "started": meta["started"],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": meta["machine"], "command": meta["command"],
        "stage_seconds": {s: run.state[s]["seconds"] for s in STAGES if s in run.state},
        "judges": judges, "systems": systems, "router": router,
        "routing": routing, "routing_accuracy": routing_accuracy,
        "paired": paired_results(run),
        "gamma": json.loads((run.dir / "gamma.json").read_text()),
        "provenance": {
            "helpful": f"AlpacaEval eval split (alpaca_eval/split.json), first {cfg.eval_limit} prompts, vs the "
                       f"gpt4_1106_preview reference, judged by {judges['helpful']['name']}",
            "harmless": f"BeaverTails-Evaluation, first {cfg.eval_limit} prompts, judged by {judges['harmless']['name']}",
            "honest": f"TruthfulQA test split (by question, seed {data.SPLIT_SEED}), first {cfg.eval_limit} questions "
                      f"for generated answers, first {cfg.eval_mc_limit or cfg.eval_limit} for MC1/MC2; "
                      f"MC1/MC2 by log-likelihood (lm-eval's prompt), answers judged by the truth and info judges",
            "router": "router trained on the routing data's train split (prompts labelled by dimension, no "
                      "evaluation item); T fitted on its dev split, calibration measured on its test split; on the "
                      "evaluation sets each item is routed by its request (instruction, prompt or question, never "
                      "the QA primer), accuracy against the set's own dimension",
            "paired": "paired bootstrap of the per-item difference (same items, same resamples for both "
                      f"systems, {cfg.bootstrap} resamples, seed {cfg.seed}): a win or loss only when the 95% "
                      "interval of the difference excludes 0",
            "seed": cfg.seed, "generation": f"greedy, {cfg.max_new_tokens} new tokens ({cfg.answer_tokens} for TruthfulQA)",
        },
    }


def paired_pairs(systems) -> list[tuple[str, str]]:
    """The comparisons the report makes: trinityx and the oracle against every other system, and every system
    against base."""
    systems = list(systems)
    pairs = [(a, b) for a in ("trinityx", "trinityx:oracle") if a in systems for b in systems if b != a]
    pairs += [(a, "base") for a in systems if a != "base" and (a, "base") not in pairs and "base" in systems]
    return pairs


def paired_results(run: Run) -> dict:
    """{a: {b: {metric: paired difference a - b}}} for `paired_pairs` of the evaluated systems."""
    from trinityx.eval.evaluate import item_values, paired_comparison

    evaluated = [s for s in run.cfg.systems if _evaluated(eval_file(run.dir, s), run)]
    values = {s: item_values(eval_file(run.dir, s)) for s in evaluated}
    out: dict = {}
    for a, b in paired_pairs(evaluated):
        out.setdefault(a, {})[b] = paired_comparison(values[a], values[b], run.cfg.seed, run.cfg.bootstrap)
    return out


def stage_report(run: Run, data_dir: Path) -> dict:
    from trinityx.experiment.report import render_report

    # The report stage's own time is not known yet; results.json records every stage before it.
    write_json(run.dir / "results.json", collect_results(run))
    md, html = render_report(run.dir)
    return {"report_md": str(md), "report_html": str(html)}


STAGE_FUNCTIONS.update({"judges": stage_judges, "evaluate": stage_evaluate, "bench": stage_bench,
                        "report": stage_report})

# The files each stage leaves in the run folder (each written last or atomically, so present means complete).
# The judges live outside the run folder; their stage checks them itself.
# Finished outputs that no longer fit what the run asks for (stage -> the paths out of date), so the stage runs
# again: a judge retrained since (train-judges), a router whose definition changed (registry, config), an
# evaluation done with other items, answer lengths, seed or judges (redone from its cached answers).
STAGE_CHANGES = {
    "judges": lambda run: _judges_changed(run.state["judges"]["info"]),
    "router": lambda run: [run.dir / name for name in routers_needed(run.cfg.systems) if router_changes(run, name)],
    "evaluate": lambda run: [f for f in STAGE_OUTPUTS["evaluate"](run) if not _evaluated(f, run)],
}

STAGE_OUTPUTS = {
    "splits": lambda run: [run.dir / "splits.json"],
    "experts": lambda run: [run.dir / "experts" / d / "train_log.json" for d in data.DIMENSIONS],
    "datamix": lambda run: [run.dir / "datamix" / "train_log.json"],
    "reference": lambda run: [run.dir / "reference" / "train_log.json", run.dir / "gamma.json"],
    "merges": lambda run: [run.dir / "merges" / m / CONFIG_FILE for m in MERGE_METHODS
                           if f"merge:{m}" in run.cfg.systems],
    "router": lambda run: [run.dir / name / "train_log.json" for name in routers_needed(run.cfg.systems)],
    "calibration": lambda run: [run.dir / name / "calibration.json" for name in routers_needed(run.cfg.systems)],
    "evaluate": lambda run: [eval_file(run.dir, spec) for spec in run.cfg.systems],
    "bench": lambda run: [run.dir / "bench_inference.json"],
    "report": lambda run: [run.dir / name for name in ("results.json", "report.md", "report.html")],
}
