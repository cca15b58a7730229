"""`trinityx report`: rebuild RUN/report.md, RUN/report.html and RUN/figures/*.png from RUN/results.json alone.

Every number is printed with its 95% interval and with where it comes from (data split, judge and the judge's
own validity, seed, n). Comparisons are honest: two systems on the same items are compared by the paired
bootstrap of results.json `paired` (a win or a loss only when the 95% interval of the per-item difference
excludes 0); a run without it falls back to "tie when either value lies inside the other's interval". A metric
whose judge does not beat its trivial baseline (`judges.*.measurable` false) is printed as not measurable. The HTML file is self-contained (inline CSS, figures as
base64 PNG data URIs), so it can be mailed or archived without the run folder.

Conventions of results.json read here: `systems.SYSTEM.AXIS` holds the metrics of `trinityx evaluate` under its
own names (RUN/eval/SYSTEM.json `axes.AXIS.metrics`): rates are percentages 0-100, each `<metric>` with its 95%
interval `<metric>_ci` (`helpful.win_rate_ci`, `harmless.unsafe_rate_ci`, `honest.truthful_informative_rate_ci`);
`n` counts the judged items (for honest: the generated answers) and `honest.n_mc` the MC1/MC2 questions. `paired`
uses the same metric names. Relative gains are computed here, from those numbers. Any system, axis or section
may be missing (a partial run): it renders as "—".
"""

import base64
import html
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from trinityx.errors import TrinityXError
from trinityx.eval.metrics import JUDGES_OF_METRIC as JUDGE_KINDS_OF_METRIC, relative_gain
from trinityx.io import atomic_dir, write_text
from trinityx.paths import check_writable
from trinityx.registry import ABLATIONS, BASE, BASELINES, EFFICIENCY_ONLY, MOE_BASELINES, ORACLE, OURS

DASH = "—"
DPI = 110
MAIN_SYSTEMS = (BASE, *BASELINES, OURS, ORACLE)
SYSTEM_ORDER = (*MAIN_SYSTEMS, *ABLATIONS, *EFFICIENCY_ONLY)
# The paper's relative gains over strong baselines (Kashyap et al. 2025, abstract), printed next to ours.
PAPER_GAINS = {"win_rate": 32.5, "safety_score": 33.9, "truthful_informative_rate": 28.4}


@dataclass(frozen=True)
class Column:
    """One metric of the main table: where it lives in `systems[NAME]` (its interval beside it, `<metric>_ci`)
    and which way is better."""

    label: str
    axis: str
    metric: str
    higher_is_better: bool = True


COLUMNS = (
    Column("Win rate", "helpful", "win_rate"),
    Column("LC win rate", "helpful", "lc_win_rate"),
    Column("Safety score", "harmless", "safety_score"),
    Column("Unsafe rate", "harmless", "unsafe_rate", higher_is_better=False),
    Column("MC1", "honest", "mc1"),
    Column("MC2", "honest", "mc2"),
    Column("Truthful", "honest", "truthful_rate"),
    Column("Informative", "honest", "informative_rate"),
    Column("Truth×info", "honest", "truthful_informative_rate"),
)
COLUMN = {c.metric: c for c in COLUMNS}
# The three headline axes (one per dimension): relative gains, scatter, radar.
HEADLINE = (COLUMN["win_rate"], COLUMN["safety_score"], COLUMN["truthful_informative_rate"])


@dataclass
class ReportConfig:
    """Rebuild the report (Markdown, self-contained HTML, figures) of a run from its results.json."""

    run: Path
    """Run folder holding results.json; report.md, report.html and figures/ are written there."""


# --------------------------------------------------------------------------------------------------
# Reading numbers


def entry(results: dict, system: str, axis: str) -> dict:
    """results["systems"][system][axis], or {} when the run has no such entry (a partial run)."""
    return ((results.get("systems") or {}).get(system) or {}).get(axis) or {}


def measure(results: dict, system: str, col: Column) -> tuple[float, tuple[float, float] | None] | None:
    """(value, 95% interval or None) of `system` on `col`, or None when the run has no such number."""
    axis = entry(results, system, col.axis)
    value = axis.get(col.metric)
    if value is None:
        return None
    ci = axis.get(f"{col.metric}_ci")
    return float(value), None if ci is None else (float(ci[0]), float(ci[1]))


# The judges behind each judged metric (results.json `judges` keys); MC1 and MC2 need none.
JUDGES_OF_METRIC = {metric: tuple("harmless" if k == "harm" else k for k in kinds)
                    for metric, kinds in JUDGE_KINDS_OF_METRIC.items()}
NOT_MEASURABLE = "n/m"


def unmeasurable_judges(results: dict, metric: str) -> list[str]:
    """The judges of `metric` that do not beat their trivial baseline (results.json `judges.*.measurable`)."""
    judges = results.get("judges") or {}
    return [k for k in JUDGES_OF_METRIC.get(metric, ()) if (judges.get(k) or {}).get("measurable") is False]


def paired(results: dict, a: str, b: str, metric: str) -> dict | None:
    """results.json `paired` difference a - b on `metric` (or b - a, negated), or None."""
    table = results.get("paired") or {}
    d = ((table.get(a) or {}).get(b) or {}).get(metric)
    if d is not None:
        return d
    d = ((table.get(b) or {}).get(a) or {}).get(metric)
    if d is None:
        return None
    flip = {"win": "loss", "loss": "win", "tie": "tie"}
    return {"difference": -d["difference"], "ci95": [-d["ci95"][1], -d["ci95"][0]], "n": d["n"],
            "verdict": flip[d["verdict"]]}


def verdict(results: dict, a: str, b: str, col: "Column") -> str | None:
    """'win', 'tie' or 'loss' of system a against b on `col`: the paired test when results.json has it, else the
    overlap of the marginal intervals; None when either number is missing."""
    d = paired(results, a, b, col.metric)
    if d is not None:
        return d["verdict"]
    ma, mb = measure(results, a, col), measure(results, b, col)
    return None if ma is None or mb is None else compare(ma, mb, col.higher_is_better)


def compare(ours, other, higher_is_better: bool = True) -> str:
    """'win', 'tie' or 'loss' of `ours` against `other`, each (value, (lo, hi) or None).

    A tie when either value lies inside the other's 95% interval: such a difference is within the noise of
    the evaluation, so we do not call it a win (nor a loss) whichever way it points.
    """
    (a, a_ci), (b, b_ci) = ours, other
    if a == b or (b_ci is not None and b_ci[0] <= a <= b_ci[1]) or (a_ci is not None and a_ci[0] <= b <= a_ci[1]):
        return "tie"
    return "win" if (a > b) == higher_is_better else "loss"


def best_of(results: dict, systems, col: Column) -> tuple[str, tuple] | None:
    """(name, measure) of the best of `systems` on `col` (first in order on equal values), or None."""
    found = [(s, m) for s in systems if (m := measure(results, s, col)) is not None]
    if not found:
        return None
    sign = 1.0 if col.higher_is_better else -1.0
    return max(found, key=lambda sm: sign * sm[1][0])


def baselines(results: dict) -> list[str]:
    """The baselines of the run: expert:*, datamix and merge:* (in SYSTEM_ORDER, then by name)."""
    return [s for s in ordered(results.get("systems") or {}) if s == "datamix" or s.startswith(("expert:", "merge:"))]


def ordered(names) -> list[str]:
    """Known systems in SYSTEM_ORDER, then any others by name."""
    names = set(names)
    return [s for s in SYSTEM_ORDER if s in names] + sorted(names - set(SYSTEM_ORDER))


def main_systems(results: dict) -> list[str]:
    """Rows of the main table: the canonical baselines and trinityx (even when missing), then other systems."""
    present = set(results.get("systems") or {})
    extra = [s for s in ordered(present - set(SYSTEM_ORDER)) if not s.startswith(OURS)]
    return [*MAIN_SYSTEMS, *extra]


def ablation_systems(results: dict) -> list[str]:
    present = set(results.get("systems") or {})
    extra = [s for s in ordered(present - set(SYSTEM_ORDER)) if s.startswith(OURS)]
    return [OURS, *ABLATIONS, *extra]


# --------------------------------------------------------------------------------------------------
# Formatting


def fmt_rate(v) -> str:
    return DASH if v is None else f"{v:.1f}"


def fmt_num(v) -> str:
    """A number of unknown scale: one decimal from 10 up, three below (0.934, 93.4, 0.081)."""
    if v is None:
        return DASH
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"


def fmt_measure(m, bold: bool = False) -> str:
    if m is None:
        return DASH
    value = f"**{m[0]:.1f}**" if bold else f"{m[0]:.1f}"
    return value if m[1] is None else f"{value} [{m[1][0]:.1f}, {m[1][1]:.1f}]"


def fmt_paired(d) -> str:
    """"; paired difference +1.2 [0.3, 2.0]" of a `paired` entry, or "" when there is none."""
    if d is None:
        return ""
    return f"; paired difference {d['difference']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]"


def fmt_gain(g) -> str:
    return DASH if g is None else f"{g:+.1f}%"


def fmt_seconds(s) -> str:
    if s is None:
        return DASH
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min {sec:02d} s" if h else f"{m} min {sec:02d} s"


def fmt_params(p) -> str:
    return DASH if p is None else f"{p / 1e6:,.2f} M"


def code(v) -> str:
    return DASH if v is None or v == "" else f"`{v}`"


def distinct(results: dict, systems, axis: str, key: str) -> str:
    """The values of `systems[*][axis][key]` over the systems: one value, a range, or "—"."""
    values = {entry(results, s, axis).get(key) for s in systems}
    values.discard(None)
    if not values:
        return DASH
    if all(isinstance(v, (int, float)) for v in values):
        lo, hi = min(values), max(values)
        return f"{lo}" if lo == hi else f"{lo}–{hi} (varies by system)"
    return ", ".join(f"`{v}`" for v in sorted(map(str, values)))


# --------------------------------------------------------------------------------------------------
# Sentences generated from the numbers

VERDICT = {"win": "wins against", "tie": "ties with", "loss": "loses to"}


def axis_sentence(results: dict, col: Column) -> str:
    """Where trinityx wins, ties and loses on `col` against base and against the best baseline."""
    head = f"**{col.label}** ({'higher' if col.higher_is_better else 'lower'} is better): "
    ours = measure(results, OURS, col)
    if ours is None:
        return head + "no `trinityx` result, so no comparison."
    clauses = []
    if unmeasurable_judges(results, col.metric):
        return head + (f"not measurable: its judge ({', '.join(unmeasurable_judges(results, col.metric))}) does not "
                       "beat its trivial baseline, so the numbers say nothing about the systems.")
    base = measure(results, BASE, col)
    if base is not None:
        clauses.append(f"{VERDICT[verdict(results, OURS, BASE, col)]} `base` ({fmt_measure(base)}"
                       f"{fmt_paired(paired(results, OURS, BASE, col.metric))})")
    best = best_of(results, baselines(results), col)
    if best is not None:
        name, m = best
        clauses.append(f"{VERDICT[verdict(results, OURS, name, col)]} the best baseline, `{name}` "
                       f"({fmt_measure(m)}{fmt_paired(paired(results, OURS, name, col.metric))})")
    text = head + f"`trinityx` {fmt_measure(ours)}"
    text += (" " + " and ".join(clauses) + ".") if clauses else "."
    missing = [what for what, m in (("`base`", base), ("any baseline", best)) if m is None]
    if missing:
        text += f" No result for {' or '.join(missing)}."
    return text


def efficiency_sentence(results: dict) -> str | None:
    """trinityx's peak memory and p50 latency relative to each MoE-style baseline that was measured."""
    eff = {s: entry(results, s, "efficiency") for s in (OURS, *EFFICIENCY_ONLY)}
    if not eff[OURS]:
        return None
    parts = []
    for other in MOE_BASELINES:
        for key, what, less, more in (("peak_memory_mb", "peak memory", "less", "more"),
                                      ("p50_ms", "p50 latency", "lower", "higher")):
            ours, theirs = eff[OURS].get(key), eff[other].get(key)
            if ours is None or not theirs:
                continue
            change = 100.0 * (ours - theirs) / theirs
            parts.append(f"{abs(change):.1f}% {less if change < 0 else more} {what} than `{other}`")
    if not parts:
        return None
    return ("`trinityx` uses " + ", ".join(parts) + " (one measurement each; the paper claims over 40% less "
            "memory and latency than earlier mixture-of-experts approaches).")


# --------------------------------------------------------------------------------------------------
# Figures (matplotlib Figure + Agg canvas: no pyplot global state)


def save_figure(fig: Figure, path: Path) -> None:
    # No metadata: the same results give the same bytes.
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})


def axis_label(results: dict, col: "Column", label: str) -> str:
    """A figure's axis label for `col`, marked n/m when its judge does not beat its trivial baseline (the figure
    still places the systems by the value, as the tables print it beside n/m)."""
    weak = unmeasurable_judges(results, col.metric)
    return f"{label} ({NOT_MEASURABLE}: {', '.join(weak)} judge at its trivial baseline)" if weak else label


def draw_hhh_scatter(results: dict, path: Path) -> list[str] | None:
    """Win rate vs safety score of every system, coloured by truth×info, with 95% error bars.

    Returns the systems left out (no win rate or safety score), or None when no system can be drawn."""
    systems = ordered(results.get("systems") or {})
    points, left_out = [], []
    for s in systems:
        x, y = measure(results, s, COLUMN["win_rate"]), measure(results, s, COLUMN["safety_score"])
        if x is None or y is None:
            if any(entry(results, s, a) for a in ("helpful", "harmless", "honest")):
                left_out.append(s)
            continue
        points.append((s, x, y, measure(results, s, COLUMN["truthful_informative_rate"])))
    if not points:
        return None
    fig = Figure(figsize=(8.2, 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = [p[3][0] for p in points if p[3] is not None]
    norm = Normalize(min(colours), max(colours) if max(colours) > min(colours) else min(colours) + 1) \
        if colours else Normalize(0, 100)
    for s, (xv, xci), (yv, yci), z in points:
        xerr = None if xci is None else [[xv - xci[0]], [xci[1] - xv]]
        yerr = None if yci is None else [[yv - yci[0]], [yci[1] - yv]]
        ax.errorbar(xv, yv, xerr=xerr, yerr=yerr, fmt="none", ecolor="0.7", elinewidth=0.9, capsize=2, zorder=1)
        ours, ablation = s == OURS, s.startswith(OURS) and s != OURS
        style = dict(marker="*" if ours else ("D" if ablation else "o"), s=260 if ours else (45 if ablation else 80),
                     edgecolors="black", linewidths=1.2 if ours else 0.6, zorder=3)
        if z is None:
            ax.scatter([xv], [yv], facecolors="white", **style)
        else:
            ax.scatter([xv], [yv], c=[z[0]], cmap="viridis", norm=norm, **style)
    fig.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=ax,
                 label="truth×info (%)" + ("" if colours else " — no system has it"))
    ax.set_xlabel(axis_label(results, COLUMN["win_rate"], "helpfulness: win rate vs reference (%)"))
    ax.set_ylabel(axis_label(results, COLUMN["safety_score"], "harmlessness: safety score (%)"))
    ax.set_title("Every system on the three HHH axes (bars: 95% intervals; white: no truth×info)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.set_xlim(ax.get_xlim())  # freeze the limits: labels are placed in display coordinates
    ax.set_ylim(ax.get_ylim())
    place_labels(fig, ax, [(s, x[0], y[0]) for s, x, y, _ in points])
    save_figure(fig, path)
    return left_out


# Label offsets (points) tried in order: beside the marker first, then further out with a leader line.
LABEL_OFFSETS = [(7, 4), (7, -9), (-7, 4), (-7, -9), (0, 12), (0, -16)] + [
    (dx * r, dy * r) for r in (1, 2) for dx, dy in ((18, 14), (18, -18), (-18, 14), (-18, -18), (28, 0), (-28, 0),
                                                     (0, 22), (0, -26))]


def coinciding(points: list[tuple[str, float, float]], xy, pixels: float = 10.0) -> list[list[int]]:
    """Indices of points grouped by markers that overlap on screen (within `pixels` of the group's first)."""
    groups: list[list[int]] = []
    for i, (px, py) in enumerate(xy):
        for g in groups:
            if abs(xy[g[0]][0] - px) <= pixels and abs(xy[g[0]][1] - py) <= pixels:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def place_labels(fig: Figure, ax, points: list[tuple[str, float, float]]) -> None:
    """Annotate each point with its name where the label overlaps no marker and no earlier label (greedy)."""
    fig.canvas.draw()  # settle the layout so display coordinates are final
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    xy = ax.transData.transform([(x, y) for _, x, y in points])  # [N, 2] pixels
    taken = [Bbox.from_bounds(px - 6, py - 6, 12, 12) for px, py in xy]
    # trinityx first: it gets the best place.
    for group in sorted(coinciding(points, xy), key=lambda g: OURS not in [points[i][0] for i in g]):
        names = [points[i][0] for i in group]
        _, x, y = points[group[0]]
        # Systems whose markers coincide share one label, two names per line.
        name = "\n".join(", ".join(names[k:k + 2]) for k in range(0, len(names), 2))
        best = None  # (overlap, annotation, box): the least crowded place so far; the first free one ends the search
        for dx, dy in LABEL_OFFSETS:
            far = abs(dx) + abs(dy) > 20
            ann = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8,
                              ha="left" if dx > 0 else ("right" if dx < 0 else "center"), va="center",
                              fontweight="bold" if OURS in names else "normal", zorder=4,
                              arrowprops=dict(arrowstyle="-", color="0.45", lw=0.6, shrinkA=0, shrinkB=4) if far else None)
            ann.set_in_layout(False)
            box = ann.get_window_extent(renderer).expanded(1.04, 1.15)
            inside = frame.containsx(box.x0) and frame.containsx(box.x1) and frame.containsy(box.y0) \
                and frame.containsy(box.y1)
            overlap = sum(_area(Bbox.intersection(box, t)) for t in taken) + (0.0 if inside else _area(box))
            if best is None or overlap < best[0]:
                if best is not None:
                    best[1].remove()
                best = (overlap, ann, box)
            else:
                ann.remove()
            if overlap == 0:
                break
        taken.append(best[2])


def _area(box: Bbox | None) -> float:
    return 0.0 if box is None else box.width * box.height


def draw_radar(results: dict, path: Path) -> list[str] | None:
    """Radar of the headline axes for base, trinityx and the best baseline of each axis; None if none has all."""
    chosen = [BASE]
    for col in HEADLINE:
        best = best_of(results, baselines(results), col)
        if best is not None and best[0] not in chosen:
            chosen.append(best[0])
    chosen.append(OURS)
    rows = [(s, [measure(results, s, c) for c in HEADLINE]) for s in chosen]
    rows = [(s, [m[0] for m in ms]) for s, ms in rows if all(m is not None for m in ms)]
    if not rows:
        return None
    angles = np.linspace(0, 2 * np.pi, len(HEADLINE), endpoint=False).tolist()
    # Each axis spans its own lowest to highest value among the plotted systems (win rates near 1% and safety
    # scores near 60% would otherwise leave one axis a dot); the labels give the range.
    ranges = [(min(v[k] for _, v in rows), max(v[k] for _, v in rows)) for k in range(len(HEADLINE))]
    fig = Figure(figsize=(4.8, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(projection="polar")
    for s, values in rows:
        ours = s == OURS
        radii = [0.2 + 0.8 * (v - lo) / (hi - lo) if hi > lo else 0.6 for v, (lo, hi) in zip(values, ranges)]
        ax.plot(angles + angles[:1], radii + radii[:1], linewidth=2.4 if ours else 1.2,
                linestyle="-" if ours else "--", marker="o", markersize=3, label=s)
        if ours:
            ax.fill(angles + angles[:1], radii + radii[:1], alpha=0.15)
    ax.set_xticks(angles)
    ax.set_xticklabels([f"{c.label}{f' ({NOT_MEASURABLE})' if unmeasurable_judges(results, c.metric) else ''}\n"
                        f"{lo:.1f}–{hi:.1f}" for c, (lo, hi) in zip(HEADLINE, ranges)], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_yticklabels([])
    ax.legend(loc="upper left", bbox_to_anchor=(0.92, 1.1), fontsize=7)
    save_figure(fig, path)
    return [s for s, _ in rows]


def routing_dimensions(results: dict) -> list[str]:
    routing = results.get("routing") or {}
    found = {d for gates in routing.values() for d in gates or {}}
    declared = [d for d in (results.get("router") or {}).get("dimensions") or [] if d in found]
    return declared + sorted(found - set(declared))


def draw_routing_heatmap(results: dict, path: Path) -> bool:
    """Mean gate of trinityx per evaluation dataset (rows) and dimension (columns), values annotated."""
    routing = results.get("routing") or {}
    datasets, dims = list(routing), routing_dimensions(results)
    if not datasets or not dims:
        return False
    grid = np.array([[np.nan if (routing[d] or {}).get(k) is None else routing[d][k] for k in dims]
                     for d in datasets])  # [datasets, dimensions]
    fig = Figure(figsize=(1.6 + 1.5 * len(dims), 1.2 + 0.7 * len(datasets)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i in range(len(datasets)):
        for j in range(len(dims)):
            v = grid[i, j]
            ax.text(j, i, DASH if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=10,
                    color="white" if not np.isnan(v) and v > 0.6 else "black")
    ax.set_xticks(range(len(dims)), dims)
    ax.set_yticks(range(len(datasets)), datasets)
    ax.set_xlabel("expert (dimension)")
    ax.set_ylabel("evaluation dataset")
    ax.set_title("trinityx: mean gate per dataset")
    fig.colorbar(image, ax=ax, label="mean gate")
    save_figure(fig, path)
    return True


def draw_figures(results: dict, folder: Path) -> dict:
    """Draw every figure into `folder`; returns {figure: file name, or None when there was nothing to draw}."""
    out = {}
    scatter = draw_hhh_scatter(results, folder / "hhh_scatter.png")
    out["hhh_scatter"] = None if scatter is None else "hhh_scatter.png"
    out["hhh_scatter_left_out"] = scatter or []
    radar = draw_radar(results, folder / "hhh_radar.png")
    out["hhh_radar"] = None if radar is None else "hhh_radar.png"
    out["hhh_radar_systems"] = radar or []
    out["routing_heatmap"] = "routing_heatmap.png" if draw_routing_heatmap(results, folder / "routing_heatmap.png") \
        else None
    return out


# --------------------------------------------------------------------------------------------------
# The document: a list of blocks, rendered once to Markdown and once to HTML.
#   ("h", level, text) ("p", text) ("note", text) ("ul", [text]) ("table", header, rows)
#   ("figures", [(path relative to the run, caption)])
# Texts use two inline marks only: **bold** and `code`.


def table_block(header, rows, note: str | None = None, align: str | None = None) -> list:
    """A table (`align`: one letter per column, l or r; default: first left, others right) and its footnote."""
    align = align or "l" + "r" * (len(header) - 1)
    blocks = [("table", list(header), [list(r) for r in rows], align)]
    return blocks + ([("note", note)] if note else [])


def judge_validity(judges: dict, kind: str) -> str:
    """"name (agreement 71.2%, n=200, split `x`)" of a judge, or a warning that its validity is unknown."""
    j = judges.get(kind) or {}
    if not j:
        return "not recorded — **validity unknown, its scores are not results**"
    score = [f"{k} {fmt_num(j[k])}" for k in ("agreement", "accuracy", "auroc") if j.get(k) is not None]
    if not score:
        return f"{code(j.get('name'))} — **validity unknown, its scores are not results**"
    return f"{code(j.get('name'))} ({', '.join(score)}; n={fmt_num(j.get('n'))}, split {code(j.get('split'))})"


def axis_source(results: dict, systems, axis: str) -> str:
    judges = results.get("judges") or {}
    if axis == "helpful":
        return (f"split {distinct(results, systems, 'helpful', 'split')}, reference "
                f"{distinct(results, systems, 'helpful', 'reference')}, n {distinct(results, systems, 'helpful', 'n')}, "
                f"judge {judge_validity(judges, 'helpful')}")
    if axis == "harmless":
        return (f"split {distinct(results, systems, 'harmless', 'split')}, "
                f"n {distinct(results, systems, 'harmless', 'n')}, judge {judge_validity(judges, 'harmless')}")
    if axis == "honest":
        return (f"split {distinct(results, systems, 'honest', 'split')}, MC1/MC2 by log-likelihood "
                f"(no judge) on n {distinct(results, systems, 'honest', 'n_mc')}, truthful/informative on "
                f"n {distinct(results, systems, 'honest', 'n')} generated answers, truth judge "
                f"{judge_validity(judges, 'truth')}, info judge {judge_validity(judges, 'info')}")
    raise ValueError(axis)


def source_note(results: dict, systems, axes) -> str:
    parts = [f"{a}: {axis_source(results, systems, a)}" for a in axes]
    return f"Source: results.json, seed {fmt_num(results.get('seed'))}. " + "; ".join(parts) + "."


def header_blocks(results: dict) -> list:
    blocks = [("h", 1, f"TrinityX results: {results.get('backbone') or DASH}")]
    wall = None
    if results.get("started") and results.get("finished"):
        wall = (datetime.fromisoformat(results["finished"]) - datetime.fromisoformat(results["started"])).total_seconds()
    stages = results.get("stage_seconds") or {}
    total = sum(v for v in stages.values() if v is not None) if stages else None
    rows = [("Backbone", code(results.get("backbone"))), ("Profile", code(results.get("profile"))),
            ("Seed", fmt_num(results.get("seed"))), ("Started", results.get("started") or DASH),
            ("Finished", results.get("finished") or DASH), ("Wall time", fmt_seconds(wall)),
            ("Total stage time", fmt_seconds(total)), ("Machine", code(results.get("machine"))),
            ("Command", code(results.get("command")))]
    run_table = table_block(("Run", ""), rows, align="ll")
    if stages:
        stage_rows = [(code(name), fmt_seconds(s), DASH if s is None or not total else f"{100 * s / total:.1f}%")
                      for name, s in stages.items()]
        stage_rows.append(("**total**", f"**{fmt_seconds(total)}**", "100.0%"))
        stage_table = table_block(("Stage", "Time", "Share"), stage_rows, "Source: results.json `stage_seconds`.")
    else:
        stage_table = [("p", "No per-stage times in results.json.")]
    return blocks + [("side", [run_table, stage_table])]


def metric_table(results: dict, systems: list[str], columns, reference: str, verdict_words: dict) -> list[list[str]]:
    """Rows of systems × columns: best value per column in bold, and each cell's verdict against `reference`."""
    best = {}
    for col in columns:
        b = best_of(results, systems, col)
        best[col.metric] = None if b is None else b[1][0]
    ref = {col.metric: measure(results, reference, col) for col in columns}
    rows = []
    for s in systems:
        cells = [f"**{s}** (ours)" if s == OURS else code(s)]
        for col in columns:
            m = measure(results, s, col)
            if m is not None and unmeasurable_judges(results, col.metric):
                cells.append(f"{NOT_MEASURABLE} ({m[0]:.1f})")
                continue
            cell = fmt_measure(m, bold=m is not None and m[0] == best[col.metric])
            if m is not None and s != reference and ref[col.metric] is not None:
                word = verdict_words.get(verdict(results, reference, s, col))
                cell += f" ({word})" if word else ""
            cells.append(cell)
        rows.append(cells)
    return rows


def main_blocks(results: dict) -> list:
    systems = main_systems(results)
    rows = metric_table(results, systems, COLUMNS, OURS, {"tie": "tie"})
    for row, s in zip(rows, systems):
        ns = [fmt_num(entry(results, s, a).get(k)) for a, k in
              (("helpful", "n"), ("harmless", "n"), ("honest", "n_mc"), ("honest", "n"))]
        row.append(" / ".join(ns))
    header = ["System", *[c.label + (" ↓" if not c.higher_is_better else "") for c in COLUMNS],
              "n (help / harm / MC / gen)"]
    note = ("**Bold**: best in the column. (tie): the paired bootstrap 95% interval of `trinityx` minus this "
            "system on the same items contains 0, so the difference is not called a win or a loss. "
            f"{NOT_MEASURABLE} (value): the metric's judge does not beat its trivial baseline (see Judge validity), "
            "so the value is shown only for the record. `trinityx:oracle` routes every item to its evaluation set's "
            "own expert: the ceiling a perfect router reaches with these experts. "
            "↓: lower is better. —: not in results.json. " + source_note(results, systems, ("helpful", "harmless", "honest")))
    blocks = [("h", 2, "Main results"),
              ("p", "Percentages with 95% intervals in brackets.")]
    blocks += table_block(header, rows, note)
    blocks.append(("h", 3, "Where TrinityX wins, ties and loses"))
    blocks.append(("ul", [axis_sentence(results, c) for c in COLUMNS if c.metric != "unsafe_rate"]))
    return blocks


def gains_blocks(results: dict) -> list:
    """trinityx's relative gains over base and the best baseline on the headline axes: computed here, from the
    systems' numbers (results.json holds no gains of its own)."""
    rows = []
    for col in HEADLINE:
        ours, base = measure(results, OURS, col), measure(results, BASE, col)
        best = best_of(results, baselines(results), col)
        vs_base = None if ours is None or base is None else relative_gain(ours[0], base[0])
        vs_best = None if ours is None or best is None else relative_gain(ours[0], best[1][0])
        verdict_base = "" if vs_base is None else f" ({verdict(results, OURS, BASE, col)})"
        verdict_best = "" if vs_best is None else f" ({verdict(results, OURS, best[0], col)})"
        if unmeasurable_judges(results, col.metric):
            verdict_base = verdict_best = f" ({NOT_MEASURABLE})"
        rows.append([col.label, fmt_measure(ours), fmt_measure(base), fmt_gain(vs_base) + verdict_base,
                     DASH if best is None else f"{code(best[0])} {fmt_measure(best[1])}",
                     fmt_gain(vs_best) + verdict_best, f"+{PAPER_GAINS[col.metric]}%"])
    header = ["Axis", "trinityx", "base", "gain vs base", "best baseline", "gain vs best baseline", "paper's claim"]
    note = ("Relative gain = 100 (trinityx − reference) / reference, as in the paper; in brackets the verdict "
            "of the paired test (a tie is a gain inside the noise). The best baseline is the best of expert:*, "
            "datamix and merge:* on that axis. The paper's claims are relative gains over strong baselines "
            "(Kashyap et al. 2025), not numbers from this run.")
    return [("h", 2, "Relative gains")] + table_block(header, rows, note)


PAIRED_COLUMNS = ("win_rate", "lc_win_rate", "safety_score", "mc1", "mc2", "truthful_informative_rate")
OWN_AXIS = {"expert:helpful": ("win_rate", "lc_win_rate"), "expert:harmless": ("safety_score",),
            "expert:honest": ("mc1", "mc2", "truthful_informative_rate")}


def paired_cell(results: dict, a: str, b: str, metric: str) -> str:
    d = paired(results, a, b, metric)
    if d is None:
        return DASH
    if unmeasurable_judges(results, metric):
        return NOT_MEASURABLE
    return f"{d['difference']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}] **{d['verdict']}**"


def paired_blocks(results: dict) -> list:
    """trinityx against every system, and each expert against base on its own axis, by the paired test."""
    blocks = [("h", 2, "Paired verdicts")]
    if not results.get("paired"):
        return blocks + [("p", "No paired comparisons in results.json.")]
    others = [s for s in ordered(results.get("systems") or {}) if s != OURS and (results.get("paired") or {}).get(OURS, {}).get(s)]
    columns = [COLUMN[m] for m in PAIRED_COLUMNS]
    rows = [[code(s), *[paired_cell(results, OURS, s, c.metric) for c in columns]] for s in others]
    tally = []
    for c in columns:
        words = [paired(results, OURS, s, c.metric) for s in others]
        words = [d["verdict"] for d in words if d is not None]
        tally.append(NOT_MEASURABLE if unmeasurable_judges(results, c.metric) else
                     f"{words.count('win')} / {words.count('tie')} / {words.count('loss')}")
    rows.append(["**wins / ties / losses**", *tally])
    note = ("Each cell: `trinityx` minus the row's system on the same items (percentage points), the paired "
            "bootstrap 95% interval of that difference, and the verdict (win or loss only when the interval "
            f"excludes 0; for every column higher is better). {NOT_MEASURABLE}: the judge does not beat its "
            "trivial baseline. Source: results.json `paired`.")
    blocks += table_block(["trinityx vs", *[c.label for c in columns]], rows, note)
    expert_rows = []
    for expert, metrics in OWN_AXIS.items():
        for metric in metrics:
            if paired(results, expert, BASE, metric) is not None:
                expert_rows.append([code(expert), COLUMN[metric].label, paired_cell(results, expert, BASE, metric)])
    if expert_rows:
        blocks.append(("h", 3, "Is each expert a specialist?"))
        blocks += table_block(["Expert", "Own-axis metric", "expert − base (paired 95% interval, verdict)"],
                              expert_rows, "An expert is a specialist when it beats `base` on its own axis.",
                              align="llr")
    return blocks


def ablation_blocks(results: dict) -> list:
    systems = ablation_systems(results)
    columns = [COLUMN[k] for k in ("win_rate", "lc_win_rate", "safety_score", "mc1", "mc2",
                                    "truthful_informative_rate")]
    rows = metric_table(results, systems, columns, OURS, {"tie": "tie", "win": "worse", "loss": "better"})
    note = ("**Bold**: best in the column. In brackets each ablation against `trinityx` by the paired test: "
            "worse, tie or better. no-calibration: temperature T = 1; no-rl: regularisation loss weight 0; "
            "uniform: gates fixed at 1/K; top1: only the highest gate; lm-router: the sequence router trained "
            "through the mixture with the LM loss (the paper's objective) instead of on cached prompt states; "
            "no-gl: the lm-router without the gating loss (as the paper ablates it: on cached states there would "
            "be no signal left); trinityx-token: a gate per token. " + source_note(results, systems, ("helpful", "harmless", "honest")))
    return [("h", 2, "Ablations")] + table_block(["System", *[c.label for c in columns]], rows, note)


def efficiency_blocks(results: dict) -> list:
    present = [s for s in results.get("systems") or {} if entry(results, s, "efficiency")]
    systems = ordered({BASE, OURS, *MOE_BASELINES, *present})
    rows = []
    for s in systems:
        e = entry(results, s, "efficiency")
        rows.append([f"**{s}** (ours)" if s == OURS else code(s), fmt_params(e.get("params")),
                     fmt_rate(e.get("peak_memory_mb")), fmt_rate(e.get("prefill_ms")),
                     fmt_rate(e.get("decode_tokens_per_s")), fmt_rate(e.get("p50_ms")), fmt_rate(e.get("p95_ms"))])
    header = ["System", "Params", "Peak memory (MB)", "Prefill (ms)", "Decode (tokens/s)", "p50 (ms)", "p95 (ms)"]
    note = (f"Source: results.json `systems.*.efficiency`, measured on {code(results.get('machine'))} with fixed "
            "prompts and lengths after a warm-up; one measurement per system, so no intervals. "
            "dense-moe, xlora and peft-multi are efficiency baselines only.")
    blocks = [("h", 2, "Efficiency")] + table_block(header, rows, note)
    sentence = efficiency_sentence(results)
    return blocks + ([("p", sentence)] if sentence else [])


def router_blocks(results: dict, run: Path) -> list:
    r = results.get("router") or {}
    blocks = [("h", 2, "Router calibration")]
    if not r:
        return blocks + [("p", "No router calibration in results.json.")]
    rows = [[name, fmt_num(r.get(f"{key}_before")), fmt_num(r.get(f"{key}_after"))]
            for name, key in (("ECE", "ece"), ("Brier", "brier"), ("NLL", "nll"))]
    rows += [["Temperature T", DASH, fmt_num(r.get("temperature"))], ["Accuracy", fmt_num(r.get("accuracy")), DASH],
             ["n (held-out prompts)", fmt_num(r.get("n")), DASH]]
    note = ("Temperature scaling (Guo et al. 2017): T minimises the NLL on held-out labelled prompts; ECE with "
            "equal-width bins (Naeini et al. 2015); measured on held-out prompts the router never trained on. "
            f"Source: results.json `router`, seed {fmt_num(results.get('seed'))}; no judge (labels are the prompts' "
            "source datasets).")
    tables = [table_block(["Metric", "before (T = 1)", "after"], rows, note)]
    cm, dims = r.get("confusion_matrix"), r.get("dimensions") or []
    if cm:
        names = dims if len(dims) == len(cm) else [f"#{i}" for i in range(len(cm))]
        cm_rows = [[f"**{names[i]}**", *[fmt_num(int(v)) for v in row], fmt_num(int(sum(row)))]
                   for i, row in enumerate(cm)]
        tables.append(table_block(["true \\ routed", *names, "total"], cm_rows,
                                  "Confusion matrix of the same held-out prompts: rows are the true dimension, "
                                  "columns the argmax gate; the diagonal is correct routing."))
    blocks.append(("side", tables))
    figures = [(r[key], caption) for key, caption in (("reliability_before_png", "Reliability before calibration"),
                                                      ("reliability_after_png", "Reliability after calibration"))
               if r.get(key)]
    if figures:
        blocks.append(("figures", figures))
    missing = [path for path, _ in figures if not (run / path).is_file()]
    if missing:
        blocks.append(("note", "Not found in the run folder: " + ", ".join(code(p) for p in missing) + "."))
    return blocks


def routing_blocks(results: dict, figures: dict) -> list:
    routing = results.get("routing") or {}
    blocks = [("h", 2, "Routing: where the gates go")]
    if not routing:
        return blocks + [("p", "No routing statistics in results.json.")]
    dims = routing_dimensions(results)
    accuracy = results.get("routing_accuracy") or {}
    rows = []
    for d in routing:
        a = accuracy.get(d) or {}
        counts = a.get("argmax_counts") or {}
        rows.append([code(d), code(a.get("dimension")), fmt_num(a.get("accuracy")),
                     " / ".join(fmt_num(counts.get(k)) for k in dims),
                     *[DASH if (routing[d] or {}).get(k) is None else f"{routing[d][k]:.2f}" for k in dims]])
    table = table_block(["Dataset", "Its dimension", "Routing accuracy", f"Routed to ({' / '.join(dims)})",
                         *[f"mean gate {k}" for k in dims]], rows,
                        "Source: results.json `routing` and `routing_accuracy`: how `trinityx` routed each evaluation "
                        "set's items, each from its request (the instruction, prompt or question as a user writes "
                        "it; never TruthfulQA's QA primer). Routing accuracy: the share whose highest gate is the "
                        "set's own dimension; routed to: the argmax counts (the set's row of the confusion matrix).",
                        align="llrrrrr"[:2] + "r" * (3 + len(dims)))
    every = (results.get("router") or {}).get("evaluation_sets") or {}
    if every:
        rows = [[code(name), code(r.get("dimension")), fmt_num(r.get("n")), fmt_num(r.get("accuracy")),
                 " / ".join(fmt_num((r.get("argmax_counts") or {}).get(k)) for k in dims),
                 *[fmt_num((r.get("mean_gates") or {}).get(k)) for k in dims]] for name, r in every.items()]
        table += table_block(["Every item of", "Its dimension", "n", "Routing accuracy", f"Routed to ({' / '.join(dims)})",
                              *[f"mean gate {k}" for k in dims]], rows,
                             "Source: results.json `router.evaluation_sets`: the calibrated `trinityx` router on every "
                             "item of each evaluation set (all 400 / 140 / 299, whatever the run's item limit), each "
                             "routed from its request, at the fitted temperature; none of them is routing data.")
    if figures["routing_heatmap"] is None:
        return blocks + table
    figure = [("figures", [(f"figures/{figures['routing_heatmap']}",
                            "Mean gate of trinityx per evaluation dataset and dimension")])]
    return blocks + [("side", [figure, table])]


def figure_blocks(figures: dict) -> list:
    blocks = [("h", 2, "The three axes at once")]
    if figures["hhh_scatter"] is None:
        return blocks + [("p", "No system has both a win rate and a safety score.")]
    items = [(f"figures/{figures['hhh_scatter']}", "Helpfulness vs harmlessness, coloured by truth×info")]
    if figures["hhh_radar"]:
        items.append((f"figures/{figures['hhh_radar']}", "Headline axes, each scaled from its lowest to its "
                      "highest value among these systems (range under the label), of " +
                      ", ".join(figures["hhh_radar_systems"])))
    blocks.append(("figures", items))
    if figures["hhh_scatter_left_out"]:
        blocks.append(("note", "Not in the scatter (no win rate or no safety score): " +
                       ", ".join(code(s) for s in figures["hhh_scatter_left_out"]) + "."))
    return blocks


def cut_blocks(results: dict) -> list:
    """The share of each system's answers that ran out of tokens: a high one means answers end mid-sentence."""
    systems = [s for s in ordered(results.get("systems") or {})
               if any(entry(results, s, a).get("cut_at_token_limit") is not None for a in ("helpful", "harmless", "honest"))]
    if not systems:
        return []
    rows = [[code(s), *[fmt_rate(entry(results, s, a).get("cut_at_token_limit")) for a in ("helpful", "harmless", "honest")]]
            for s in systems]
    note = ("% of each system's generated answers that used every new token without an end of sequence (or, for "
            "TruthfulQA, a stop string): they may end mid-sentence, and a judge sees them cut. " +
            str((results.get("provenance") or {}).get("generation", "")) + ".")
    return [("h", 2, "Answers cut at the token limit")] + table_block(
        ["System", "AlpacaEval", "BeaverTails", "TruthfulQA"], rows, note, align="lrrr")


def judge_blocks(results: dict) -> list:
    judges = results.get("judges") or {}
    rows = []
    for kind in ("helpful", "harmless", "truth", "info"):
        j = judges.get(kind) or {}
        valid = any(j.get(k) is not None for k in ("agreement", "accuracy", "auroc"))
        baseline = j.get("length_rule_agreement") if kind == "helpful" else j.get("majority_baseline")
        status = ("**unknown: not a result**" if not valid else
                  "**no: does not beat its baseline, its metrics are not measurable**" if j.get("measurable") is False
                  else "yes" if j.get("measurable") else "baseline not recorded")
        rows.append([kind, code(j.get("name")), fmt_num(j.get("agreement")), fmt_num(j.get("accuracy")),
                     fmt_num(j.get("balanced_accuracy")), fmt_num(j.get("auroc")), fmt_num(j.get("threshold")),
                     fmt_num(baseline), fmt_num(j.get("n")), code(j.get("split")), status])
    header = ["Judge", "Name", "Agreement", "Accuracy", "Balanced accuracy", "AUROC", "Threshold",
              "Trivial baseline", "n", "Split", "Beats its baseline"]
    note = ("Each judge's validity on held-out labelled data it never trained on, beside its trivial baseline: "
            "the majority class for harm, truth and info, the length rule (prefer the longer answer) for the "
            "pairwise helpful judge. Source: results.json `judges`.")
    return [("h", 2, "Judge validity")] + table_block(header, rows, note, align="llrrrrrrrll")


def provenance_blocks(results: dict) -> list:
    systems = ordered(results.get("systems") or {})
    judges = results.get("judges") or {}
    seed = fmt_num(results.get("seed"))
    items = [
        "**Win rate, LC win rate** — " + axis_source(results, systems, "helpful") + f"; seed {seed}.",
        "**Safety score, unsafe rate** — " + axis_source(results, systems, "harmless") + f"; seed {seed}.",
        f"**MC1, MC2** — split {distinct(results, systems, 'honest', 'split')}, log-likelihood of the answer "
        f"choices, no judge; n {distinct(results, systems, 'honest', 'n_mc')}; seed {seed}.",
        f"**Truthful, informative, truth×info** — generated answers, n "
        f"{distinct(results, systems, 'honest', 'n')}; truth judge {judge_validity(judges, 'truth')}; "
        f"info judge {judge_validity(judges, 'info')}; seed {seed}.",
        f"**Efficiency** — machine {code(results.get('machine'))}; fixed prompts and lengths; no judge.",
        f"**Router calibration** — n {fmt_num((results.get('router') or {}).get('n'))} held-out labelled prompts; "
        f"no judge; seed {seed}.",
        "**Routing** — mean gate of `trinityx` over each evaluation dataset's prompts (the same prompts as above).",
        "**95% intervals** — as recorded in results.json: bootstrap over items (`trinityx evaluate`).",
    ]
    return [("h", 2, "Provenance"), ("ul", items),
            ("note", f"Rebuilt from results.json alone by `trinityx report`; run command: {code(results.get('command'))}.")]


def build_document(results: dict, run: Path, figures: dict) -> list:
    return [*header_blocks(results), *main_blocks(results), *gains_blocks(results), *figure_blocks(figures),
            *paired_blocks(results), *ablation_blocks(results), *efficiency_blocks(results),
            *router_blocks(results, run),
            *routing_blocks(results, figures), *cut_blocks(results), *judge_blocks(results), *provenance_blocks(results)]


# --------------------------------------------------------------------------------------------------
# Rendering


def to_markdown(blocks: list) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "side":
            out += [to_markdown(column).rstrip("\n") for column in block[1]]
        elif kind == "h":
            out.append("#" * block[1] + " " + block[2])
        elif kind == "p":
            out.append(block[1])
        elif kind == "note":
            out.append(f"<sub>{block[1]}</sub>")
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "table":
            header, rows, align = block[1:]
            cell = lambda c: c.replace("|", "\\|")  # noqa: E731
            lines = ["| " + " | ".join(map(cell, header)) + " |",
                     "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
            lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "figures":
            out.append("\n\n".join(f"![{caption}]({path})" for path, caption in block[1]))
    return "\n\n".join(out) + "\n"


def inline_html(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def cell_html(text: str) -> str:
    """A table cell: a verdict as a tag beside the value, the interval on its own smaller line (narrow tables)."""
    text = inline_html(text)
    tag = re.search(r" \((tie|win|loss|worse|better)\)$", text)
    if tag:
        text = text[:tag.start()]
    ci = re.search(r" (\[-?[\d.]+, -?[\d.]+\])$", text)
    if ci:
        text = text[:ci.start()]
    return (text + (f' <span class="tag {tag[1]}">{tag[1]}</span>' if tag else "")
            + (f'<span class="ci">{ci[1]}</span>' if ci else ""))


CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; color: #1d1d1f;
       max-width: 1240px; margin: 2em auto; padding: 0 1.2em; line-height: 1.45; font-size: 15px; }
h1 { border-bottom: 2px solid #334; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccd; padding-bottom: .2em; }
.scroll { overflow-x: auto; margin: .6em 0 .2em; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d5d8de; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #eef1f6; }
th.l, td.l { text-align: left; }
tr:nth-child(even) td { background: #f8f9fb; }
tr.ours td { background: #fff6d6; }
code { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 92%; background: #f1f2f4;
       padding: 0 3px; border-radius: 3px; overflow-wrap: anywhere; }
td code { white-space: nowrap; word-break: normal; }
.ci { display: block; font-size: 11px; color: #666; }
.tag { font-size: 10px; padding: 0 4px; border-radius: 3px; vertical-align: 1px; }
.tag.tie { background: #e3ecfa; color: #1d4f91; }
.tag.win, .tag.better { background: #dff3e3; color: #1e6b34; }
.tag.loss, .tag.worse { background: #fbe3e1; color: #9b2c20; }
.side { display: flex; flex-wrap: wrap; gap: 2.5em; align-items: flex-start; }
.side > .narrow { width: min-content; min-width: 300px; }
.note { font-size: 12px; color: #555; margin: .2em 0 1em; max-width: 1100px; }
.figures { display: flex; flex-wrap: wrap; gap: 1.2em; align-items: flex-start; }
figure { margin: .6em 0; }
figure img { max-width: 100%; border: 1px solid #e3e5e8; }
figcaption { font-size: 12px; color: #555; text-align: center; }
li { margin: .3em 0; }
"""


def to_html(blocks: list, run: Path, title: str) -> str:
    return "\n".join(["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                      f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style></head><body>",
                      html_body(blocks, run), "</body></html>"]) + "\n"


def html_body(blocks: list, run: Path) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "side":
            # A column of tables is as wide as its widest table; its footnotes wrap to that width.
            columns = [(' class="narrow"' if all(b[0] != "figures" for b in column) else "", html_body(column, run))
                       for column in block[1]]
            out.append('<div class="side">' + "".join(f"<div{cls}>{body}</div>" for cls, body in columns) + "</div>")
        elif kind == "h":
            out.append(f"<h{block[1]}>{inline_html(block[2])}</h{block[1]}>")
        elif kind == "p":
            out.append(f"<p>{inline_html(block[1])}</p>")
        elif kind == "note":
            out.append(f'<p class="note">{inline_html(block[1])}</p>')
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            header, rows, align = block[1:]
            style = ['' if a == "r" else ' class="l"' for a in align]
            lines = ['<div class="scroll"><table>',
                     "<tr>" + "".join(f"<th{st}>{inline_html(h)}</th>" for st, h in zip(style, header)) + "</tr>"]
            for row in rows:
                ours = ' class="ours"' if row[0].startswith(f"**{OURS}**") else ""
                lines.append(f"<tr{ours}>" + "".join(f"<td{st}>{cell_html(c)}</td>" for st, c in zip(style, row))
                             + "</tr>")
            out.append("\n".join(lines) + "</table></div>")
        elif kind == "figures":
            items = []
            for path, caption in block[1]:
                file = run / path
                if file.is_file():
                    data = base64.b64encode(file.read_bytes()).decode("ascii")
                    body = f'<img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                else:
                    body = f"<p>{inline_html(f'({DASH} `{path}` not found)')}</p>"
                items.append(f"<figure>{body}<figcaption>{inline_html(caption)}</figcaption></figure>")
            out.append('<div class="figures">' + "".join(items) + "</div>")
    return "\n".join(out)


def load_results(run: Path) -> dict:
    path = run / "results.json"
    if not path.is_file():
        raise TrinityXError(f"--run {run}: no results.json there; run `trinityx run --out {run}` first "
                            "(or point --run at a run folder)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrinityXError(f"{path} is not valid JSON ({e}); rerun the pipeline's evaluate stage") from None
    if not isinstance(results, dict):
        raise TrinityXError(f"{path}: expected a JSON object, got {type(results).__name__}")
    return results


def render_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write RUN/report.md, RUN/report.html and RUN/figures/*.png from RUN/results.json; returns (md, html)."""
    run = Path(run_dir)
    results = load_results(run)
    with atomic_dir(run / "figures") as folder:
        figures = draw_figures(results, folder)
    blocks = build_document(results, run, figures)
    md_path, html_path = run / "report.md", run / "report.html"
    write_text(md_path, to_markdown(blocks))
    write_text(html_path, to_html(blocks, run, f"TrinityX results: {results.get('backbone') or DASH}"))
    return md_path, html_path


def report_cli(cfg: ReportConfig) -> None:
    """`trinityx report --run DIR`."""
    check_writable(cfg.run, "--run")
    md_path, html_path = render_report(cfg.run)
    print(f"wrote {md_path} and {html_path}")
