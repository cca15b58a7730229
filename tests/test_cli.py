"""The command line: help, an end-to-end call with a YAML config, and errors that name the flag or key."""

import json
from pathlib import Path
import subprocess
import sys

import pytest

from trinityx.cli import main


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "trinityx", *args], capture_output=True, text=True, env=env)


def test_help_lists_commands_and_flags():
    top = run("--help")
    assert top.returncode == 0 and "train-expert" in top.stdout and "train-experts" in top.stdout
    sub = run("train-expert", "--help")
    assert sub.returncode == 0
    for flag in ("--dimension", "--backbone", "--data-dir", "--out", "--max-steps", "--lora-rank", "--seed"):
        assert flag in sub.stdout


def test_train_experts_end_to_end_from_a_yaml_config(tiny_backbone, data_dir, tmp_path, capsys):
    config = tmp_path / "experts.yaml"
    config.write_text(f"backbone: {tiny_backbone}\ndata_dir: {data_dir}\ndimensions: [helpful, honest]\n"
                      "train:\n  max_steps: 4\n  batch_size: 4\n  micro_batch_size: 4\n  eval_every: 2\n  lr: 0.01\n")
    out = tmp_path / "experts"
    main(["train-experts", "--config", str(config), "--out", str(out), "--max-steps", "3"])  # flags beat the file
    summary = json.loads((out / "experts_summary.json").read_text())
    assert set(summary["experts"]) == {"helpful", "honest"}
    assert all(row["steps"] == 3 for row in summary["experts"].values())
    resolved = json.loads((out / "honest" / "trinityx_config.json").read_text())
    assert resolved["train"]["max_steps"] == 3 and resolved["train"]["batch_size"] == 4
    # A rerun keeps finished experts instead of training them again.
    main(["train-experts", "--config", str(config), "--out", str(out), "--max-steps", "3"])
    assert "already trained" in capsys.readouterr().out


def test_bad_input_exits_with_a_message_naming_it(tiny_backbone, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRINITYX_DATA_DIR", raising=False)
    with pytest.raises(SystemExit):
        main(["train-expert", "--out", str(tmp_path / "x"), "--backbone", str(tiny_backbone)])
    assert "--data-dir" in capsys.readouterr().err

    config = tmp_path / "bad.yaml"
    config.write_text("max_stepz: 3\n")
    with pytest.raises(SystemExit):
        main(["train-expert", "--config", str(config), "--out", str(tmp_path / "x")])
    assert "unknown key 'max_stepz'" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["train-expert", "--out", str(tmp_path / "x"), "--dimension", "funny"])
    with pytest.raises(SystemExit):
        main(["no-such-command"])
    assert "unknown command" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train-expert", "train-experts", "run", "export", "evaluate"])
def test_an_unwritable_out_is_refused_before_any_work(command, tiny_backbone, data_dir, tmp_path, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before --out was checked")

    for module in ("train.experts", "experiment.pipeline", "infer.systems", "apps.export"):
        monkeypatch.setattr(f"trinityx.{module}.load_backbone", no_work)
    monkeypatch.setattr("trinityx.backbones.load_backbone", no_work)
    (tmp_path / "a-file").write_text("")
    extra = {"train-expert": [], "train-experts": [], "run": [],
             "export": ["--run", str(tmp_path), "--format", "merged"],
             "evaluate": ["--system", "base"]}[command]
    unwritable = [(tmp_path / "a-file" / "out", "is a file, not a folder"), (Path("/proc/trinityx/out"), "cannot be written")]
    for out, why in unwritable:
        if command == "export":
            (tmp_path / "mocae_config.json").write_text(json.dumps({"expert_names": ["a"], "backbone": "x"}))
        with pytest.raises(SystemExit) as exit:
            main([command, "--backbone", str(tiny_backbone), "--data-dir", str(data_dir), "--out", str(out), *extra]
                 if command != "export" else [command, "--out", str(out), *extra])
        assert exit.value.code == 2
        err = capsys.readouterr().err
        assert f"--out {out}" in err and why in err


def test_flags_and_yaml_values_are_checked_before_a_model_loads(tiny_backbone, data_dir, tmp_path, monkeypatch,
                                                                  capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    for module in ("train.experts", "train.router"):
        monkeypatch.setattr(f"trinityx.{module}.load_backbone", no_load)
    common = ["--backbone", str(tiny_backbone), "--data-dir", str(data_dir), "--out", str(tmp_path / "e")]
    nested = tmp_path / "nested.yaml"
    nested.write_text('train:\n  max_steps: "abc"\n')
    top = tmp_path / "top.yaml"
    top.write_text("max_steps: 3\n")
    (tmp_path / "mocae").mkdir()
    (tmp_path / "mocae" / "mocae_config.json").write_text(json.dumps({"expert_names": ["a", "b"], "backbone": "x"}))
    cases = [
        (["train-expert", "--config", str(nested), *common], f"{nested}: train: max_steps: 'abc' is not a valid int"),
        (["train-expert", "--config", str(top), *common], f"{top}: 'max_steps' belongs under 'train'"),
        (["train-expert", "--lora-rank", "0", *common], "--lora-rank must be at least 1, got 0"),
        (["train-experts", "--lora-dropout", "1.5", *common], "--lora-dropout must be in [0, 1)"),
        (["train-expert", "--warmup-steps", "1", "--max-steps", "0", *common], "--max-steps must be positive"),
        (["generate", "--run", str(tmp_path / "mocae"), "--prompt", "hi", "--max-new-tokens", "0"],
         "--max-new-tokens must be at least 1, got 0"),
        (["generate", "--run", str(tmp_path / "mocae"), "--prompt", "hi", "--weights", "1", "1", "1"],
         "--weights has 3 values for the 2 experts"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2 and message in capsys.readouterr().err, argv


def test_train_judges_checks_out_and_recipe_before_training(data_dir, tmp_path, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("a judge trained before --out was checked")

    monkeypatch.setattr("trinityx.eval.judges.cli.train_judges", no_work)
    (tmp_path / "a-file").write_text("")
    for out, why in ((tmp_path / "a-file" / "judges", "is a file, not a folder"),
                     (Path("/proc/trinityx/judges"), "cannot be written")):
        with pytest.raises(SystemExit) as exit:
            main(["train-judges", "--data-dir", str(data_dir), "--out", str(out)])
        assert exit.value.code == 2
        err = capsys.readouterr().err
        assert f"--out {out}" in err and why in err
    with pytest.raises(SystemExit) as exit:
        main(["train-judges", "--data-dir", str(data_dir), "--out", str(tmp_path / "j"), "--recipe", "bigger"])
    assert exit.value.code == 2 and "--recipe 'bigger' is unknown; choose from default, backbone" in capsys.readouterr().err


def test_a_dict_field_takes_new_keys_from_a_flag_beside_a_yaml_file(tmp_path):
    from trinityx.config import parse
    from trinityx.experiment.pipeline import PipelineConfig

    config = tmp_path / "run.yaml"
    config.write_text(f"expert_steps: {{honest: 20}}\nseed: 3\nout: {tmp_path / 'run'}\n")
    from_file = parse(PipelineConfig, ["--config", str(config)], "trinityx run")
    assert from_file.expert_steps == {"honest": 20} and from_file.seed == 3
    flagged = parse(PipelineConfig, ["--config", str(config), "--expert-steps", "honest", "12", "harmless", "40"],
                    "trinityx run")
    assert flagged.expert_steps == {"honest": 12, "harmless": 40} and flagged.seed == 3
    cleared = parse(PipelineConfig, ["--config", str(config), "--expert-steps"], "trinityx run")
    assert cleared.expert_steps == {}
    without_file = parse(PipelineConfig, ["--out", str(tmp_path / "run"), "--expert-steps", "helpful", "5"], "trinityx run")
    assert without_file.expert_steps == {"helpful": 5}
