"""The README's paper-run tables, printed as Markdown from a run's evaluation files.

    python scripts/paper_tables.py runs/paper            # every system evaluated so far, in the registry's order
    python scripts/paper_tables.py runs/paper_eval_tier1 # or a folder of result files (a copy of a run's eval/)

Five tables: each system's metrics with their 95% bootstrap intervals and the share of answers cut at the
token limit; `trinityx` against every other system; every system against `base`. The last two are paired
(`evaluate.paired_comparison`: a paired bootstrap of the per-item difference, a win or a loss only when the
interval excludes 0), the same numbers `trinityx compare` prints, on the items both systems were scored on
(their count is in the table: while a long run is re-evaluating its systems on more items, two systems may
share only the first tier's); and the paper's relative gains of `trinityx` over base and over the best baseline. Metrics whose judge does not beat its trivial
baseline are marked n/m (`metrics.JUDGES_OF_METRIC`), as the report marks them. The fifth asks whether the
safety score's differences are answer length in disguise (the harm judge flags long safe PKU-SafeRLHF responses
more often than short ones, docs/judges.md): with `--harm-length-bias B`, `trinityx`'s paired safety differences
with the judge's length bias B (measured on labelled data) taken out.
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np

from trinityx.eval.evaluate import item_values, paired_comparison, side_records, weak_judges
from trinityx.eval.metrics import paired_difference, paired_verdict, relative_gain
from trinityx.experiment.report import PAPER_GAINS
from trinityx.registry import BASE, BASELINES, OURS, SYSTEMS

COLUMNS = (("helpful", "win_rate", "win rate %"), ("helpful", "lc_win_rate", "LC win rate %"),
           ("harmless", "safety_score", "safety score %"), ("honest", "mc1", "MC1 %"), ("honest", "mc2", "MC2 %"),
           ("honest", "truthful_rate", "truthful %"), ("honest", "informative_rate", "informative %"),
           ("honest", "truthful_informative_rate", "truth x info %"))
AXES = ("helpful", "harmless", "honest")
PAIRED = ("safety_score", "mc1", "mc2", "truthful_rate", "informative_rate", "truthful_informative_rate")


def result_file(folder: Path, system: str) -> Path:
    """A system's result file in a run folder (its eval/) or in a folder of result files."""
    return (folder / "eval" if (folder / "eval").is_dir() else folder) / f"{system.replace(':', '__')}.json"


def measurable(axis_record: dict, metric: str) -> bool:
    """False when a judge behind `metric` does not beat its trivial baseline (its recorded validity says so)."""
    return not weak_judges(axis_record["judges"], metric)


def main_table(run: Path, systems: list[str]) -> list[str]:
    lines = ["| system | n (Alpaca / Beaver / TQA) | " + " | ".join(c[2] for c in COLUMNS)
             + " | cut at the token limit % (Alpaca / Beaver / TQA) |", "|---" * (len(COLUMNS) + 3) + "|"]
    for system in systems:
        axes = json.loads(result_file(run, system).read_text())["axes"]
        cells = []
        for axis, metric, _ in COLUMNS:
            record = axes[axis]["metrics"]
            value = record[metric]
            if not measurable(axes[axis], metric):
                cells.append(f"{value:.1f} (n/m)")
            else:
                low, high = record[f"{metric}_ci"]
                cells.append(f"{value:.1f} [{low:.1f}, {high:.1f}]")
        cut = " / ".join(f"{axes[a]['metrics']['cut_at_token_limit']:.0f}" for a in AXES)
        n = " / ".join(str(axes[a]["metrics"]["n"]) for a in AXES)
        name = f"**`{system}`**" if system == OURS else f"`{system}`"
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + f" | {cut} |")
    return lines


def paired_table(pairs: list[tuple[str, str]], values: dict) -> list[str]:
    lines = ["| comparison | shared items (Beaver / TQA) | " + " | ".join(PAIRED) + " |", "|---" * (len(PAIRED) + 2) + "|"]
    for a, b in pairs:
        compared = paired_comparison(values[a], values[b], 0, 1000)
        shared = f"{compared['safety_score']['n']} / {compared['mc1']['n']}"
        cells = []
        for metric in PAIRED:
            d = compared[metric]
            low, high = d["ci95"]
            text = f"{d['difference']:+.1f} [{low:+.1f}, {high:+.1f}] {d['verdict']}"
            cells.append(f"**{text}**" if d["verdict"] != "tie" else text)
        lines.append(f"| `{a}` − `{b}` | {shared} | " + " | ".join(cells) + " |")
    return lines


def gains_table(run: Path, systems: list[str], values: dict) -> list[str]:
    """The paper's relative gains, 100 (trinityx - reference) / reference, on its three headline metrics, against
    base and against the best baseline (expert:*, datamix, merge:*) on that metric, with the paired verdict."""
    lines = ["| metric | `trinityx` | `base` | gain vs base | best baseline | gain vs best baseline | paper's claim |",
             "|---" * 7 + "|"]
    records = {s: json.loads(result_file(run, s).read_text())["axes"] for s in systems}
    for axis, metric, label in ((a, m, lab) for a, m, lab in COLUMNS
                                if m in ("win_rate", "safety_score", "truthful_informative_rate")):
        value = {s: records[s][axis]["metrics"][metric] for s in systems}
        best = max((s for s in systems if s in BASELINES), key=lambda s: value[s], default=None)
        cells = []
        for reference in (BASE, best):
            if reference is None or reference not in systems:
                cells += ["-", "-"]
                continue
            gain = relative_gain(value[OURS], value[reference])
            verdict = ("n/m" if not measurable(records[OURS][axis], metric) else
                       paired_comparison(values[OURS], values[reference], 0, 1000).get(metric, {}).get("verdict", "-"))
            name = f"`{reference}` {value[reference]:.1f}" if reference != BASE else f"{value[reference]:.1f}"
            cells += [name, f"{gain:+.1f} % ({verdict})" if gain is not None else "-"]
        lines.append(f"| {label} | {value[OURS]:.1f} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | "
                     f"+{PAPER_GAINS[metric]} % |")
    return lines


def response_log_chars(run: Path, system: str) -> dict[int, float]:
    """{BeaverTails item: log(1 + characters of the system's answer)} of the items the harm judge scored."""
    path = result_file(run, system)
    side = side_records(path, json.loads(path.read_text())["axes"]["harmless"])
    return {r["index"]: math.log1p(len(r["response"])) for r in side["records"] if r["p_unsafe"] is not None}


def length_check_table(run: Path, pairs: list[tuple[str, str]], values: dict, bias: float) -> list[str]:
    """a - b on the safety score for each pair, raw and with the harm judge's length bias taken out.

    `bias` is the judge's flag rate's rise per unit of log characters with the truth held fixed, measured on
    labelled data (`benchmarks/judge_probes.py harm-lengths`, on PKU-SafeRLHF dev). The evaluation itself cannot
    measure it: within a prompt, a system's refusals are short and its compliant answers long, so length and true
    unsafety move together there. The adjusted difference is the mean over items of (safety_a - safety_b) +
    bias (loglen_a - loglen_b) (a longer answer loses `bias` points of safety to the judge alone), with a
    bootstrap interval over items (the bias held fixed)."""
    lengths = {s: response_log_chars(run, s) for pair in pairs for s in pair}
    lines = [f"The harm judge's length bias: {bias:+.2f} points of flags per unit of log answer characters, the label "
             "held fixed (measured on labelled data, not on these answers).", "",
             "| comparison | shared items | safety difference | mean log-length difference | bias-adjusted difference | verdict |",
             "|---|---|---|---|---|---|"]
    for a, b in pairs:
        items = sorted(set(values[a]["safety_score"]) & set(values[b]["safety_score"]) & set(lengths[a]) & set(lengths[b]))
        safe_a, safe_b = (np.array([values[s]["safety_score"][i] for i in items]) for s in (a, b))
        length_a, length_b = (np.array([lengths[s][i] for i in items]) for s in (a, b))
        d = paired_difference(safe_a + bias * length_a, safe_b + bias * length_b)  # each answer's length bias out
        low, high = d["ci95"]
        verdict = paired_verdict(d)
        lines.append(f"| `{a}` − `{b}` | {len(items)} | {(safe_a - safe_b).mean():+.1f} | "
                     f"{(length_a - length_b).mean():+.2f} | {d['difference']:+.1f} [{low:+.1f}, {high:+.1f}] | {verdict} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a run folder (its eval/ holds one result file per system) or such a folder")
    parser.add_argument("--harm-length-bias", type=float, default=None,
                        help="the harm judge's flag-rate rise per unit of log characters, label held fixed "
                             "(benchmarks/judge_probes.py harm-lengths): adds the bias-adjusted safety table")
    args = parser.parse_args()
    systems = [s for s in SYSTEMS if result_file(args.run, s).is_file()
               and "finished" in json.loads(result_file(args.run, s).read_text())]
    if not systems:
        raise SystemExit(f"{args.run}: no finished evaluation; run `trinityx run` or `trinityx evaluate` first")
    values = {s: item_values(result_file(args.run, s)) for s in systems}
    print("\n".join(main_table(args.run, systems)))
    if OURS in systems:
        print()
        print("\n".join(paired_table([(OURS, s) for s in systems if s != OURS], values)))
        print()
        print("\n".join(gains_table(args.run, systems, values)))
    if BASE in systems:
        print()
        print("\n".join(paired_table([(s, BASE) for s in systems if s != BASE], values)))
    if args.harm_length_bias is not None:
        pairs = [(OURS, s) for s in systems if OURS in systems and s != OURS]
        pairs += [(s, BASE) for s in systems if BASE in systems and s not in (BASE, OURS)]
        print()
        print("\n".join(length_check_table(args.run, pairs, values, args.harm_length_bias)))


if __name__ == "__main__":
    main()
