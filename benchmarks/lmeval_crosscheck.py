"""Cross-check our TruthfulQA MC1/MC2 against lm-evaluation-harness on the same model and questions.

    python benchmarks/lmeval_crosscheck.py --backbone smollm2-135m --data-dir ../shared/data --limit 100

lm-eval runs offline (docs/offline-notes.md in the shared folder): its own truthfulqa_mc1/mc2 task files are
copied to a temporary folder with the hub dataset replaced by a local JSON file of our TruthfulQA test-split
questions (`dataset_path: json`), so its prompt and scoring stay exactly its own; the folder is passed with
--include_path. Our numbers come from `trinityx.eval.evaluate.mc_scores` on the same questions. Target: the two
agree within 0.5 points. Prints a table for people and a JSON line for programs.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from trinityx import data
from trinityx.backbones import load_backbone
from trinityx.eval.evaluate import mc_scores
from trinityx.infer.systems import load_system

TARGET = 0.5  # points


def lm_eval_task_folder() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks" / "truthfulqa"


def write_tasks(folder: Path, questions) -> list[str]:
    """lm-eval's own truthfulqa_mc1/mc2 YAML and utils.py, reading a local JSON file instead of the hub."""
    records = folder / "truthfulqa_test.json"
    records.write_text(json.dumps([
        {"question": q.question,
         "mc1_targets": {"choices": list(q.mc1_choices), "labels": list(q.mc1_labels)},
         "mc2_targets": {"choices": list(q.mc2_choices), "labels": list(q.mc2_labels)}}
        for q in questions]))
    source = lm_eval_task_folder()
    shutil.copy(source / "utils.py", folder / "utils.py")
    mc1 = (source / "truthfulqa_mc1.yaml").read_text()
    local = f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    validation: {records}\n"
    mc1, n = re.subn(r"dataset_path: .*\ndataset_name: .*\n", local, mc1)
    assert n == 1, "lm-eval's truthfulqa_mc1.yaml changed layout: update write_tasks"
    mc1 = mc1.replace("task: truthfulqa_mc1", "task: tx_truthfulqa_mc1")
    mc1 = re.sub(r"tag:\n  - truthfulqa\n", "tag:\n  - tx_truthfulqa\n", mc1)
    (folder / "truthfulqa_mc1.yaml").write_text(mc1)
    mc2 = (source / "truthfulqa_mc2.yaml").read_text().replace("task: truthfulqa_mc2", "task: tx_truthfulqa_mc2")
    (folder / "truthfulqa_mc2.yaml").write_text(mc2)
    return ["tx_truthfulqa_mc1", "tx_truthfulqa_mc2"]


def run_lm_eval(model_folder: str, tasks: list[str], include: Path, limit: int, batch_size: int) -> dict:
    out = include / "results"
    command = [sys.executable, "-m", "lm_eval", "--model", "hf",
               "--model_args", f"pretrained={model_folder},dtype=float32",
               "--tasks", ",".join(tasks), "--include_path", str(include), "--limit", str(limit),
               "--batch_size", str(batch_size), "--output_path", str(out)]
    print("$", " ".join(command), flush=True)
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(command, check=True, env={**__import__("os").environ, **env})
    results = json.loads(max(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime).read_text())["results"]
    return {t: 100.0 * results[t]["acc,none"] for t in tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--limit", type=int, default=100, help="first N TruthfulQA test-split questions")
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    args = parser.parse_args()

    questions = data.load_truthfulqa_mc(args.data_dir, "test")[: args.limit]
    backbone = load_backbone(args.backbone)
    model_folder = backbone.model.config._name_or_path
    system = load_system("base", backbone=backbone)
    start = time.perf_counter()
    mc1, mc2 = mc_scores(system, questions, batch_size=32)
    ours_seconds = time.perf_counter() - start
    ours = {"mc1": 100.0 * float(np.mean(mc1)), "mc2": 100.0 * float(np.mean(mc2))}

    with tempfile.TemporaryDirectory(prefix="trinityx-lmeval-") as tmp:
        tasks = write_tasks(Path(tmp), questions)
        start = time.perf_counter()
        theirs = run_lm_eval(model_folder, tasks, Path(tmp), len(questions), args.batch_size)
        lm_eval_seconds = time.perf_counter() - start
    theirs = {"mc1": theirs[tasks[0]], "mc2": theirs[tasks[1]]}

    print(f"\nTruthfulQA test split, first {len(questions)} questions, {args.backbone} ({model_folder})")
    print(f"{'metric':<6} {'trinityx':>9} {'lm-eval':>9} {'diff':>7}  within {TARGET}")
    diffs = {}
    for key in ("mc1", "mc2"):
        diffs[key] = ours[key] - theirs[key]
        print(f"{key:<6} {ours[key]:>9.2f} {theirs[key]:>9.2f} {diffs[key]:>+7.2f}  {abs(diffs[key]) <= TARGET}")
    print(f"time: trinityx {ours_seconds:.0f} s, lm-eval {lm_eval_seconds:.0f} s")
    print(json.dumps({"benchmark": "lmeval_crosscheck", "backbone": args.backbone, "n_questions": len(questions),
                      "trinityx": ours, "lm_eval": theirs, "diff": diffs, "target": TARGET,
                      "agree": all(abs(d) <= TARGET for d in diffs.values()),
                      "seconds": {"trinityx": ours_seconds, "lm_eval": lm_eval_seconds}}))


if __name__ == "__main__":
    main()
