"""`trinityx <command> ...`: each command is one entry in COMMANDS, a config dataclass and the function it runs."""

import os
import sys

from trinityx.errors import TrinityXError


def _commands() -> dict:
    # Imported here so `trinityx --help` stays fast.
    from trinityx import backbones_cli
    from trinityx.apps import chat, export, serve
    from trinityx.bench import inference as bench_inference, serve as bench_serve, train as bench_train
    from trinityx.eval import evaluate
    from trinityx.eval.judges import cli as judges_cli
    from trinityx.experiment import pipeline, report
    from trinityx.train import experts, router

    return {
        "run": (pipeline.PipelineConfig, pipeline.run_pipeline),
        "train-expert": (experts.ExpertConfig, experts.train_expert),
        "train-experts": (experts.ExpertsConfig, experts.train_experts),
        "fit-router": (router.RouterConfig, router.fit_router),
        "calibrate": (router.CalibrateConfig, router.calibrate),
        "generate": (router.GenerateConfig, router.generate),
        "train-judges": (judges_cli.TrainJudgesConfig, judges_cli.train_judges_cli),
        "evaluate": (evaluate.EvaluateConfig, evaluate.evaluate_cli),
        "compare": (evaluate.CompareConfig, evaluate.compare_cli),
        "report": (report.ReportConfig, report.report_cli),
        "serve": (serve.ServeConfig, serve.serve),
        "chat": (chat.ChatConfig, chat.chat),
        "export": (export.ExportConfig, export.export),
        "backbones": (backbones_cli.BackbonesConfig, backbones_cli.show_backbones),
        "bench train": (bench_train.BenchTrainConfig, bench_train.bench_train),
        "bench inference": (bench_inference.BenchInferenceConfig, bench_inference.bench_inference),
        "bench serve": (bench_serve.BenchServeConfig, bench_serve.bench_serve),
    }


USAGE = """usage: trinityx <command> [--config FILE] [flags]

commands:
  run             the whole pipeline: experts, baselines, router, calibration, evaluation, report
  train-expert    train one LoRA expert on one dimension (helpful, harmless, honest)
  train-experts   train the expert of every dimension on one loaded backbone
  fit-router      train the MoCaE router over the experts (LM loss + GL + RL)
  calibrate       fit the router's temperature on held-out prompts; ECE, Brier, NLL, reliability diagram
  generate        answer prompts with a MoCaE model and print its gates
  train-judges    train the offline judges and measure their validity on held-out data
  evaluate        score a system on helpful / harmless / honest with validated judges
  compare         paired comparison of evaluation files scored on the same items (each against the first)
  report          rebuild report.md and report.html of a run from its results.json
  serve           OpenAI-compatible HTTP server for a MoCaE folder (batched, gates in every answer)
  chat            terminal chat with streaming output and /weights, /reset commands
  export          export a MoCaE folder as a merged HF model or as PEFT adapters + router
  backbones       list the backbone presets; --load NAME measures a load
  bench           benchmarks: `trinityx bench train|inference|serve`

`trinityx <command> --help` lists a command's flags. A YAML --config file holds the same fields.
"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    from trinityx.config import parse

    commands = _commands()
    name, args = argv[0], argv[1:]
    if name == "bench":  # `trinityx bench train|inference|serve`, each with its own config; train by default
        benchmark = args[0] if args[:1] in (["train"], ["inference"], ["serve"]) else "train"
        name, args = f"bench {benchmark}", args[1:] if args[:1] == [benchmark] else args
    if name not in commands:
        print(f"trinityx: unknown command {name!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    cls, run = commands[name]
    try:
        cfg = parse(cls, args, prog=f"trinityx {name}")
        run(cfg)
    except TrinityXError as e:
        print(f"trinityx {name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
