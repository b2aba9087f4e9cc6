"""The LIMA paper's figures from judgement summaries, as PNG files.

matplotlib's `Figure` is used directly, never pyplot: it renders with Agg, needs no display and
leaves matplotlib's global state (backend, open figures) as the importer had it.

pairwise  figure 1: one stacked horizontal bar a baseline, "A wins / tie / baseline wins", with
          the bootstrap interval of each win share drawn at its end of the bar.
absolute  figure 3: one stacked bar a system, fail / pass / excellent, with the intervals of the
          fail and excellent shares.
likert    figures 5 and 6: the mean helpfulness (1-6) with its interval, against the number of
          training examples (log scale) when every file has one, else one bar a file.

Inputs are plain: (name, {category: {"share", "low", "high"}}) rows, or (name, examples,
{"mean", "low", "high"}) for likert, as `lima-compare` computes them.
"""

import io
from typing import Sequence

from matplotlib import figure as figure_lib

from lima_jax import paths

PAIRWISE_COLOURS = {"a": "#2b6cb0", "tie": "#bfc5cc", "b": "#d9822b"}
BAR_HEIGHT = 0.6
ABSOLUTE_COLOURS = {"fail": "#c0392b", "pass": "#e0b341", "excellent": "#2e8b57"}


def _save(figure, output: str) -> None:
  """Rendered in memory, then written atomically (output may be gs://)."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
  paths.write_bytes_atomic(output, buffer.getvalue())


def _stacked_bars(rows, categories: Sequence[str], names: dict[str, str], colours: dict[str, str],
                  title: str, output: str) -> None:
  figure = figure_lib.Figure(figsize=(8, 0.7 * len(rows) + 1.4))
  axes = figure.subplots()
  labels = [name for name, _ in rows]
  for y, (_, shares) in enumerate(rows):
    left = 0.0
    for c in categories:
      width = 100 * shares[c]["share"]
      axes.barh(y, width, left=left, height=BAR_HEIGHT, color=colours[c], label=names[c] if y == 0 else None,
                edgecolor="white")
      if width >= 6:
        axes.text(left + width / 2, y - BAR_HEIGHT / 8, f"{width:.0f}%", ha="center", va="center", fontsize=9)
      left += width
    _interval_marks(axes, y + BAR_HEIGHT / 4, shares, categories)
  axes.set_yticks(range(len(rows)), labels)
  axes.set_ylim(len(rows) - 0.5, -0.5)  # The first row on top.
  axes.set_xlim(0, 100)
  axes.set_xlabel("share of prompts (%)")
  axes.set_title(title)
  axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
  _save(figure, output)


def _interval_marks(axes, y: float, shares: dict, categories: Sequence[str]) -> None:
  """The first category's interval at its right end, the last one's at its left end."""
  first, last = shares[categories[0]], shares[categories[-1]]
  end = 100 * first["share"]
  axes.errorbar(end, y, xerr=[[end - 100 * first["low"]], [100 * first["high"] - end]], fmt="none",
                ecolor="black", capsize=3, lw=1)
  start = 100 * (1 - last["share"])
  axes.errorbar(start, y, xerr=[[100 * (last["high"] - last["share"])], [100 * (last["share"] - last["low"])]],
                fmt="none", ecolor="black", capsize=3, lw=1)


def pairwise(rows, a_name: str, output: str) -> None:
  """Figure 1: rows are (baseline name, shares of "a", "tie", "b")."""
  names = {"a": f"{a_name} wins", "tie": "tie", "b": "baseline wins"}
  _stacked_bars(rows, ("a", "tie", "b"), names, PAIRWISE_COLOURS, f"{a_name} against each baseline", output)


def absolute(rows, output: str) -> None:
  """Figure 3: rows are (system name, shares of "fail", "pass", "excellent")."""
  names = {c: c.capitalize() for c in ABSOLUTE_COLOURS}
  _stacked_bars(rows, ("fail", "pass", "excellent"), names, ABSOLUTE_COLOURS, "Absolute labels", output)


def likert(rows, output: str, level: float = 0.95) -> None:
  """Figures 5/6: rows are (name, examples or None, {"mean", "low", "high"})."""
  figure = figure_lib.Figure(figsize=(6.5, 4))
  axes = figure.subplots()
  means = [r[2]["mean"] for r in rows]
  errors = [[r[2]["mean"] - r[2]["low"] for r in rows], [r[2]["high"] - r[2]["mean"] for r in rows]]
  if all(r[1] is not None for r in rows):
    order = sorted(range(len(rows)), key=lambda i: rows[i][1])
    xs = [rows[i][1] for i in order]
    axes.errorbar(xs, [means[i] for i in order], yerr=[[errors[0][i] for i in order], [errors[1][i] for i in order]],
                  fmt="o-", capsize=4, color=PAIRWISE_COLOURS["a"])
    axes.set_xscale("log", base=2)
    axes.set_xticks(xs, [f"{x:,}" for x in xs])
    axes.set_xlabel("training examples")
  else:
    axes.bar(range(len(rows)), means, yerr=errors, capsize=4, color=PAIRWISE_COLOURS["a"])
    axes.set_xticks(range(len(rows)), [r[0] for r in rows], rotation=20, ha="right")
  axes.set_ylim(1, 6)
  axes.set_ylabel("helpfulness (1-6)")
  axes.set_title(f"Mean helpfulness, {level:.0%} intervals")
  axes.grid(axis="y", alpha=0.3)
  _save(figure, output)
