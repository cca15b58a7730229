"""`trinityx report` rebuilds report.md / report.html from results.json alone (synthetic fixture, offline)."""

import json
import re
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trinityx.errors import TrinityXError
from trinityx.experiment.report import COLUMN, axis_label, axis_sentence, compare, relative_gain, render_report

FIXTURE = Path(__file__).parent / "fixtures" / "results_example.json"


def make_run(folder: Path, edit=None) -> Path:
    """A run folder holding the synthetic results.json (optionally edited) and the PNGs it references."""
    folder.mkdir(parents=True)
    results = json.loads(FIXTURE.read_text())
    assert results["profile"] == "synthetic-test-fixture"
    if edit is not None:
        edit(results)
    (folder / "results.json").write_text(json.dumps(results))
    for key in ("reliability_before_png", "reliability_after_png"):
        if key in results.get("router", {}):
            fig = Figure(figsize=(1, 1))
            FigureCanvasAgg(fig)
            (folder / results["router"][key]).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(folder / results["router"][key], format="png", dpi=20)
    return folder


def row(md: str, system: str) -> list[str]:
    """Cells of `system`'s row in the first Markdown table that has one."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in (f"`{system}`", f"**{system}** (ours)"):
            return cells[1:]
    raise AssertionError(f"no row for {system}")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("report") / "run")
    md_path, html_path = render_report(run)
    first = (md_path.read_text(), html_path.read_text())
    render_report(run)  # the rerun must give the same files
    return run, first


def test_writes_markdown_html_and_figures(rendered):
    run, _ = rendered
    assert (run / "report.md").is_file() and (run / "report.html").is_file()
    assert {p.name for p in (run / "figures").glob("*.png")} == {"hhh_scatter.png", "hhh_radar.png",
                                                                   "routing_heatmap.png"}


def test_html_is_self_contained(rendered):
    run, _ = rendered
    page = (run / "report.html").read_text()
    assert not re.search(r"https?://", page)  # no external requests: no links, scripts, fonts or images
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)
    assert "<style>" in page
    # 3 figures of the report + the 2 reliability diagrams, all inline
    assert page.count('src="data:image/png;base64,') == 5


def test_best_value_per_column_is_bold(rendered):
    _, (md, _) = rendered
    # Win rate: trinityx has the highest (62.0) and only it is bold in that column.
    assert row(md, "trinityx")[0] == "**62.0** [57.2, 66.8]"
    assert not row(md, "expert:helpful")[0].startswith("**")
    # Unsafe rate (4th column), lower is better: expert:harmless 6.4, which trinityx (8.6 [4.0, 13.2]) ties.
    assert row(md, "expert:harmless")[3] == "**6.4** [2.3, 10.5] (tie)"
    # MC2: expert:honest is best and outside trinityx's interval (and vice versa): no tie mark.
    assert row(md, "expert:honest")[5] == "**53.9** [50.5, 57.3]"


def test_rerun_gives_the_same_report(rendered):
    run, (md, page) = rendered
    assert (run / "report.md").read_text() == md
    assert (run / "report.html").read_text() == page


def test_missing_system_axis_and_sections_render_a_dash(tmp_path):
    def edit(results):
        del results["systems"]["merge:linear"]
        del results["systems"]["trinityx"]["honest"]
        del results["judges"]["truth"]
        for key in ("router", "routing", "stage_seconds"):
            del results[key]

    md_path, html_path = render_report(make_run(tmp_path / "run", edit))
    md = md_path.read_text()
    assert row(md, "merge:linear")[:9] == ["—"] * 9
    assert row(md, "trinityx")[4:9] == ["—"] * 5
    assert "**MC1** (higher is better): no `trinityx` result" in md
    assert "`truth-logreg`" not in md and "validity unknown, its scores are not results" in md
    assert "No router calibration in results.json." in md
    assert "No routing statistics in results.json." in md
    assert html_path.read_text().count("data:image/png;base64,") == 2  # scatter and radar still drawn


def test_compare_calls_differences_inside_the_intervals_ties():
    ours = (60.0, (55.0, 65.0))
    assert compare(ours, (58.0, (53.0, 63.0))) == "tie"
    assert compare(ours, (40.0, (35.0, 45.0))) == "win"
    assert compare(ours, (75.0, (70.0, 80.0))) == "loss"
    assert compare(ours, (75.0, (70.0, 80.0)), higher_is_better=False) == "win"  # e.g. unsafe rate
    assert compare((60.0, None), (58.0, None)) == "win"  # no intervals: the values decide
    assert compare((60.0, (50.0, 70.0)), (66.0, None)) == "tie"  # theirs inside ours


def test_axis_sentence_on_a_hand_built_case():
    def system(win, lo, hi):
        return {"helpful": {"win_rate": win, "win_rate_ci": [lo, hi]}}

    results = {"systems": {"trinityx": system(60, 55, 65), "base": system(58, 53, 63),
                           "merge:ties": system(40, 35, 45), "datamix": system(30, 25, 35)}}
    assert axis_sentence(results, COLUMN["win_rate"]) == (
        "**Win rate** (higher is better): `trinityx` 60.0 [55.0, 65.0] ties with `base` (58.0 [53.0, 63.0]) "
        "and wins against the best baseline, `merge:ties` (40.0 [35.0, 45.0]).")
    results["systems"]["datamix"] = system(80, 75, 85)
    assert "loses to the best baseline, `datamix` (80.0 [75.0, 85.0])" in axis_sentence(results, COLUMN["win_rate"])


def test_relative_gain_is_the_papers_definition():
    assert relative_gain(62.0, 40.0) == pytest.approx(55.0)
    assert relative_gain(30.0, 40.0) == pytest.approx(-25.0)
    assert relative_gain(5.0, 0.0) is None


def test_missing_results_json_is_a_clear_error(tmp_path):
    with pytest.raises(TrinityXError, match="no results.json"):
        render_report(tmp_path)


def test_fixture_is_small_and_marked_synthetic():
    assert FIXTURE.stat().st_size < 20_000
    assert "SYNTHETIC" in json.loads(FIXTURE.read_text())["_comment"]


def test_systems_whose_markers_coincide_share_one_label():
    from trinityx.experiment.report import coinciding

    points = [("a", 0, 0), ("b", 0, 0), ("c", 5, 0), ("d", 50, 50)]
    xy = [(0.0, 0.0), (3.0, 2.0), (20.0, 0.0), (100.0, 100.0)]  # pixels: b is 3 px from a, c 20 px
    assert coinciding(points, xy) == [[0, 1], [2], [3]]


def test_paired_verdicts_replace_interval_overlap_and_unmeasurable_judges_are_marked(tmp_path):
    def edit(results):
        ours = results["systems"]["trinityx"]["helpful"]["win_rate"]
        base = results["systems"]["base"]["helpful"]["win_rate"]
        # Marginal intervals would call this a tie or not; the paired interval excludes 0: a win.
        results["paired"] = {"trinityx": {"base": {
            "win_rate": {"difference": ours - base, "ci95": [0.5, 2.5], "n": 40, "verdict": "win"},
            "mc1": {"difference": -1.0, "ci95": [-3.0, -0.2], "n": 40, "verdict": "loss"}}},
            "expert:honest": {"base": {"mc1": {"difference": 4.0, "ci95": [1.0, 7.0], "n": 40, "verdict": "win"}}}}
        results["judges"]["harmless"].update({"accuracy": 0.6, "majority_baseline": 0.66, "measurable": False})
        results["routing_accuracy"] = {"alpaca_eval": {"dimension": "helpful", "n": 8, "accuracy": 0.75,
                                                       "argmax_counts": {"helpful": 6, "harmless": 1, "honest": 1}}}

    md, _ = render_report(make_run(tmp_path / "run", edit))
    md = md.read_text()
    assert "wins against `base`" in next(l for l in md.splitlines() if l.startswith("- **Win rate**"))
    assert "paired difference" in md
    assert "not measurable" in next(l for l in md.splitlines() if l.startswith("- **Safety score**"))
    assert row(md, "base")[2].startswith("n/m (")  # the safety score column of the main table
    assert "+4.0 [+1.0, +7.0] **win**" in md  # expert:honest beats base on MC1
    assert "does not beat its baseline" in md
    routed = next(l for l in md.splitlines() if l.startswith("| `alpaca_eval`") and "0.750" in l)
    assert "6 / 1 / 1" in routed


def test_figure_axes_of_an_unmeasurable_metric_say_so(tmp_path):
    def weak_helpful(results):
        results["judges"]["helpful"].update({"measurable": False})

    results = json.loads((make_run(tmp_path / "weak", weak_helpful) / "results.json").read_text())
    assert axis_label(results, COLUMN["win_rate"], "win rate (%)") == "win rate (%) (n/m: helpful judge at its trivial baseline)"
    assert axis_label(results, COLUMN["safety_score"], "safety (%)") == "safety (%)"
    render_report(tmp_path / "weak")  # both figures draw with the marked labels
    assert (tmp_path / "weak" / "figures").is_dir()
