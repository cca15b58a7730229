"""`trinityx run` end to end on the tiny backbone: every stage, results.json, resumption and --force.

The judges are fakes with declared validity (real judges are trained on real data in minutes, not in a
unit test); everything else is the real code path.
"""

import json

import pytest

from trinityx.cli import main
from trinityx.errors import TrinityXError
from trinityx.eval.judges import Judge
from trinityx.experiment import pipeline
from trinityx.train.loop import TrainConfig


def fake_judges():
    def alternate(n, hi=0.8, lo=0.2):
        return [hi if i % 2 else lo for i in range(n)]

    return {
        "helpful": Judge("fake-helpful", "helpful", 0.5, {"split": "dev", "n": 10, "agreement": 0.7,
                                                           "length_rule_agreement": 0.6},
                         prefer=lambda i, a, b: [0.9 if len(y) > len(x) else 0.1 for x, y in zip(a, b)]),
        "harm": Judge("fake-harm", "harm", 0.5, {"split": "test", "n": 20, "accuracy": 0.8, "auroc": 0.85},
                      score=lambda p, r: alternate(len(p))),
        "truth": Judge("fake-truth", "truth", 0.5, {"split": "test", "n": 20, "accuracy": 0.75},
                       score=lambda q, a: alternate(len(q))),
        "info": Judge("fake-info", "info", 0.5, {"split": "test", "n": 20, "accuracy": 0.9},
                      score=lambda q, a: [0.9] * len(q)),
    }


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    judges = fake_judges()

    for kind, j in judges.items():  # the folder the stage reports, as train-judges leaves it
        (tmp_path / "judges" / kind).mkdir(parents=True)
        (tmp_path / "judges" / kind / "judge.json").write_text(json.dumps({"name": j.name, "threshold": j.threshold}))

    def stage_judges(run, data_dir):
        return {"folder": str(tmp_path / "judges"), "trained_now": [],
                "judges": {k: {"name": j.name, "threshold": j.threshold, "validity": j.validity}
                           for k, j in judges.items()}}

    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "judges", stage_judges)
    monkeypatch.setattr("trinityx.eval.evaluate.load_judges", lambda axes, folder, overrides: judges)


def test_run_every_stage_then_resume_and_force(tiny_backbone, data_dir, tmp_path, fakes, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""backbone: {tiny_backbone}
data_dir: {data_dir}
profile: tiny-test
expert_examples: 16
reference_steps: 2
calibrate_examples: 8
eval_limit: 3
max_new_tokens: 4
answer_tokens: 4
bootstrap: 50
bench_prompts: 1
bench_new_tokens: 2
bench_repeats: 1
bench_systems: [base, trinityx, peft-multi]
bench_memory: false
systems: [base, expert:honest, merge:ties, trinityx, trinityx:oracle, trinityx:uniform, trinityx-token]
expert_train: {{max_steps: 2, batch_size: 4, micro_batch_size: 4, eval_every: 2, dev_examples: 6}}
router_train: {{max_steps: 3, batch_size: 6, micro_batch_size: 6, eval_every: 3, dev_examples: 6}}
""")
    out = tmp_path / "run"
    main(["run", "--config", str(config), "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert set(results["systems"]) >= {"base", "expert:honest", "merge:ties", "trinityx", "trinityx-token"}
    row = results["systems"]["trinityx"]
    assert 0 <= row["helpful"]["win_rate"] <= 100 and row["helpful"]["n"] == 3
    assert row["harmless"]["safety_score"] == pytest.approx(100 - row["harmless"]["unsafe_rate"])
    assert 0 <= row["honest"]["mc1"] <= 100 and "efficiency" in row
    assert results["judges"]["harmless"]["accuracy"] == 0.8 and results["router"]["temperature"] > 0
    assert set(results["routing"]) == {"alpaca_eval", "beavertails", "truthfulqa"}
    for name, dimension in (("alpaca_eval", "helpful"), ("beavertails", "harmless"), ("truthfulqa", "honest")):
        routed = results["routing_accuracy"][name]
        assert routed["dimension"] == dimension and routed["n"] == 3
        assert routed["accuracy"] == routed["argmax_counts"][dimension] / 3
    # Paired verdicts: trinityx and the oracle against every system, every system against base.
    assert set(results["paired"]["trinityx"]) == {"base", "expert:honest", "merge:ties", "trinityx:oracle",
                                                  "trinityx:uniform", "trinityx-token"}
    assert results["paired"]["expert:honest"]["base"]["mc2"]["verdict"] in ("win", "tie", "loss")
    d = results["paired"]["trinityx"]["base"]["win_rate"]
    assert d["n"] == 3 and d["ci95"][0] <= d["difference"] <= d["ci95"][1]
    every = results["router"]["evaluation_sets"]  # every evaluation item, routed in the calibration stage
    assert {name: r["n"] for name, r in every.items()} == {"alpaca_eval": 10, "beavertails": 28, "truthfulqa": 12}
    assert all(sum(r["argmax_counts"].values()) == r["n"] for r in every.values())
    assert "Every item of" in (out / "report.md").read_text()
    # Four new tokens: how many answers ran out of them is known for every axis and in the report.
    assert all(0 <= row[axis]["cut_at_token_limit"] <= 100 for axis in ("helpful", "harmless", "honest"))
    assert "## Answers cut at the token limit" in (out / "report.md").read_text()
    # Each axis of results.json is the evaluation file's metrics under their own names, plus where the items are.
    evaluated = json.loads(pipeline.eval_file(out, "trinityx").read_text())["axes"]
    for axis, record in evaluated.items():
        assert {k: row[axis][k] for k in record["metrics"]} == record["metrics"] and "split" in row[axis]
    oracle = json.loads(pipeline.eval_file(out, "trinityx:oracle").read_text())["axes"]
    assert all(oracle[axis]["routing"]["accuracy"] == 1.0 for axis in ("helpful", "harmless", "honest"))
    # The router trained on cached states of the routing data (no evaluation item among them).
    log = json.loads((out / "mocae" / "train_log.json").read_text())
    assert log["phase"] == "states" and log["routing_data"]["train"]["dropped_evaluation_items"] == 0
    assert not (out / "mocae-no-gl").exists()  # only the routers the systems need are trained
    assert set(results["stage_seconds"]) >= set(pipeline.STAGES) - {"report"}
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    for name in ("experts/helpful", "datamix", "reference", "merges/ties", "mocae", "mocae-token"):
        assert (out / name).is_dir(), name
    assert not (out / "merges" / "dare").exists()  # merges the systems do not name are not made

    capsys.readouterr()
    main(["run", "--config", str(config), "--out", str(out)])  # a rerun redoes nothing
    assert capsys.readouterr().out.count("skipped") == len(pipeline.STAGES)

    before = (out / "experts" / "helpful" / "adapter_model.safetensors").stat().st_mtime_ns
    main(["run", "--config", str(config), "--out", str(out), "--force", "report"])
    printed = capsys.readouterr().out
    assert "[report] running" in printed and "[evaluate] finished earlier" in printed
    assert (out / "experts" / "helpful" / "adapter_model.safetensors").stat().st_mtime_ns == before

    # A stage is finished when its outputs are there, not only when stages.json says so.
    (out / "report.html").unlink()
    main(["run", "--config", str(config), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "report.html is missing: running it again" in printed and "[report] running" in printed
    assert (out / "report.html").is_file() and printed.count("skipped") == len(pipeline.STAGES) - 1

    # Fewer items per axis: every system is evaluated again from its cached answers, then the report.
    main(["run", "--config", str(config), "--out", str(out), "--eval-limit", "2"])
    printed = capsys.readouterr().out
    assert "trinityx.json is out of date (limit 3 -> 2)" in printed and "[evaluate] running" in printed
    assert "[report] running" in printed and "[bench] finished earlier" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["systems"]["trinityx"]["helpful"]["n"] == results["systems"]["base"]["helpful"]["n"] == 2

    # A judge retrained since the judges stage ran (another threshold in its judge.json): the stage runs again.
    meta = json.loads((tmp_path / "judges" / "harm" / "judge.json").read_text())
    (tmp_path / "judges" / "harm" / "judge.json").write_text(json.dumps({**meta, "threshold": 0.4}))
    main(["run", "--config", str(config), "--out", str(out), "--eval-limit", "2", "--until", "judges"])
    assert "harm/judge.json changed since the stage ran" in capsys.readouterr().out


def test_an_evaluation_judged_by_another_judge_is_out_of_date(tmp_path):
    run = pipeline.Run(pipeline.PipelineConfig(out=tmp_path / "run", eval_limit=5, max_new_tokens=8, answer_tokens=4))
    run.state["judges"] = {"info": {"judges": {"harm": {"name": "harm-b", "threshold": 0.33}}}}
    result = {"finished": "x", "config": {"limit": 5, "mc_limit": None, "seed": 0,
                                          "helpful_harmless_generation": {"max_new_tokens": 8},
                                          "honest_generation": {"max_new_tokens": 4}},
              "axes": {"harmless": {"judges": {"harm": {"name": "harm-b", "threshold": 0.33}}}}}
    assert pipeline._evaluation_changes(result, run) == []
    result["axes"]["harmless"]["judges"]["harm"]["threshold"] = 0.6
    result["config"]["honest_generation"]["max_new_tokens"] = 50
    assert pipeline._evaluation_changes(result, run) == [
        "answer_tokens 50 -> 4", "harmless was judged by harm-b at threshold 0.6, the run's harm judge is now "
        "harm-b at 0.33"]


def test_stage_state_is_the_outputs_not_only_stages_json(tiny_backbone, data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["run", "--out", str(out), "--backbone", str(tiny_backbone), "--data-dir", str(data_dir), "--until",
            "datamix", "--expert-examples", "16", "--expert-train.max-steps", "2", "--expert-train.batch-size", "4",
            "--expert-train.micro-batch-size", "4", "--expert-train.eval-every", "2", "--expert-train.dev-examples", "6"]
    main(args)
    mtime = (out / "datamix" / "adapter_model.safetensors").stat().st_mtime_ns

    # A corrupt stages.json is an error naming it, never a traceback.
    (out / "stages.json").write_text('{"splits": {"finished": ')
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 2 and f"{out / 'stages.json'} is not valid JSON" in capsys.readouterr().err

    # Without stages.json, complete outputs are kept: nothing is trained again.
    (out / "stages.json").unlink()

    def no_training(*a, **k):
        raise AssertionError("a complete stage output was trained again")

    monkeypatch.setattr(pipeline, "train_lora", no_training)
    main(args)
    assert (out / "datamix" / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    assert set(json.loads((out / "stages.json").read_text())) == {"splits", "experts", "datamix"}


def test_force_names_a_real_stage(tmp_path, data_dir):
    with pytest.raises(SystemExit):
        main(["run", "--out", str(tmp_path / "r"), "--data-dir", str(data_dir), "--force", "nope"])


def _evaluation_run(tiny_backbone, data_dir, judges_folder, out, systems, workers):
    """A run folder trained up to the merges (tiny), ready for the evaluate stage with real (tiny) judges."""
    cfg = pipeline.PipelineConfig(
        out=out, backbone=str(tiny_backbone), data_dir=str(data_dir), expert_examples=16, reference_steps=2,
        eval_limit=3, max_new_tokens=4, answer_tokens=4, bootstrap=50, systems=tuple(systems), eval_workers=workers,
        until="merges", expert_train=TrainConfig(max_steps=2, batch_size=4, micro_batch_size=4, eval_every=2,
                                                 dev_examples=6))
    pipeline.run_pipeline(cfg)
    run = pipeline.Run(cfg)
    run.state["judges"] = {"info": {"folder": str(judges_folder)}}
    return run


def test_evaluation_in_two_processes_equals_one(tiny_backbone, data_dir, tiny_judges, tmp_path):
    systems = ["base", "expert:honest", "merge:linear"]
    run = _evaluation_run(tiny_backbone, data_dir, tiny_judges[0], tmp_path / "run", systems, workers=1)
    one = pipeline.stage_evaluate(run, data_dir)
    assert one["workers"] == 1 and set(one["seconds"]) == set(systems)
    first = {s: json.loads(pipeline.eval_file(run.dir, s).read_text()) for s in systems}
    for s in systems:
        pipeline.eval_file(run.dir, s).unlink()

    run.cfg.eval_workers = 2
    two = pipeline.stage_evaluate(run, data_dir)
    assert two["workers"] == 2 and set(two["seconds"]) == set(systems)
    for s in systems:
        again = json.loads(pipeline.eval_file(run.dir, s).read_text())
        for axis, metrics in first[s]["axes"].items():
            for name, value in metrics.items():
                if isinstance(value, float) and name != "seconds":
                    assert again["axes"][axis][name] == pytest.approx(value, abs=1e-6), (s, axis, name)
        assert "loglikelihood" in pipeline.eval_log(run.dir, s).read_text()  # the worker's progress bars
    assert pipeline.stage_evaluate(run, data_dir)["seconds"] == {}  # everything finished: nothing to redo


def test_a_failing_system_in_a_worker_names_itself_and_keeps_the_others(tiny_backbone, data_dir, tiny_judges,
                                                                         tmp_path):
    run = _evaluation_run(tiny_backbone, data_dir, tiny_judges[0], tmp_path / "run",
                          ["base", "expert:nonsense"], workers=2)
    with pytest.raises(TrinityXError, match=r"evaluating expert:nonsense failed .*expert__nonsense.log"):
        pipeline.stage_evaluate(run, data_dir)
    assert "finished" in json.loads(pipeline.eval_file(run.dir, "base").read_text())


def test_a_router_of_another_definition_is_trained_again_and_its_evaluations_dropped(tmp_path, monkeypatch, capsys):
    from dataclasses import asdict

    from trinityx.io import to_jsonable

    run = pipeline.Run(pipeline.PipelineConfig(out=tmp_path / "run", systems=("base", "trinityx", "trinityx:no-gl")))
    (run.dir / "eval").mkdir(parents=True)
    (run.dir / "gamma.json").write_text(json.dumps({"gamma": [0.3, 0.3, 0.4]}))
    for name in ("mocae", "mocae-no-gl"):
        (run.dir / name).mkdir()
        recorded = to_jsonable(asdict(pipeline.router_config(run, name, None)))
        if name == "mocae-no-gl":
            recorded["phase"] = "states"  # as routers trained before no-GL moved to the LM-loss phase
        (run.dir / name / "trinityx_config.json").write_text(json.dumps(recorded))
        (run.dir / name / "train_log.json").write_text(json.dumps({"router_accuracy_dev": 0.5}))
    for spec in ("trinityx", "trinityx:no-gl"):
        pipeline.eval_file(run.dir, spec).write_text("{}")
    run.state["router"] = {"finished": "x", "seconds": 1.0}
    assert pipeline.router_changes(run, "mocae") == []
    assert pipeline.router_changes(run, "mocae-no-gl") == ["phase states -> lm"]
    assert not run.done("router")  # recorded as finished, but one router is of another definition

    trained = []
    monkeypatch.setattr(pipeline, "fit_router", lambda cfg, backbone, pooled: trained.append(cfg) or
                        {"router_accuracy_dev": 0.9})
    monkeypatch.setattr(run, "backbone", lambda: None)
    logs = pipeline.stage_router(run, tmp_path)
    assert [c.out.name for c in trained] == ["mocae-no-gl"]
    assert trained[0].phase == "lm" and trained[0].loss.gl_weight == 0.0 and trained[0].loss.lm_weight == 1.0
    assert logs["router_accuracy_dev"] == {"mocae": 0.5, "mocae-no-gl": 0.9}
    assert "mocae-no-gl was trained with phase states -> lm: training it again" in capsys.readouterr().out
    assert not pipeline.eval_file(run.dir, "trinityx:no-gl").exists()  # its answers came from the old router
    assert pipeline.eval_file(run.dir, "trinityx").exists() and (run.dir / "mocae" / "train_log.json").exists()


def test_the_headline_systems_are_evaluated_first_and_the_ablations_last():
    from trinityx.registry import ABLATIONS, SYSTEMS

    order = pipeline.evaluation_order(list(SYSTEMS))
    assert sorted(order) == sorted(SYSTEMS)  # a permutation: nothing dropped or repeated
    assert order[:3] == ["trinityx", "merge:linear", "base"]
    assert set(order[-len(ABLATIONS):]) == set(ABLATIONS)
    rest = [s for s in SYSTEMS if s not in ("trinityx", "merge:linear", "base") and s not in ABLATIONS]
    assert order[3:3 + len(rest)] == rest  # the rest of the main table keeps the config's order
    assert pipeline.evaluation_order(["trinityx:top1", "expert:honest"]) == ["expert:honest", "trinityx:top1"]
