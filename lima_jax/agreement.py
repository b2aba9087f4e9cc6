"""How often raters of pairwise judgements agree: the LIMA paper's tie-discounted accuracy, and Cohen's kappa.

Tie-discounted accuracy (LIMA, section 4.1): over the items two raters both judged, one point
when they give the same label (a, b or tie), half a point when exactly one of them says tie, none
when one says a and the other b; the mean over items. The paper reports 78-82% between people and
about as much between GPT-4 and people. (AlpacaFarm's human agreement differs: each annotator's
label against the majority of the other annotators of the item, ties not discounted.)
Cohen's kappa is the usual chance-corrected agreement on the three labels, (p_o - p_e) / (1 - p_e)
with p_e from each rater's own label shares; it is undefined (None) when both always give one and
the same label.

A rater is a human annotator (`annotator` field of a line, as lima-annotate writes) or a model
judge (`judge` or `judge_model` field, as lima-judge writes); a file without either is one rater, named by its path. Intervals are
percentile bootstraps over items: a resample draws items with replacement and keeps every rater
pair's judgements of each drawn item. Pooled rows (every pair of people; a judge against every
person) add up the pairs' tables of (label, label) counts.
"""

import dataclasses
import itertools
import math
from typing import Sequence

import numpy as np

from lima_jax import errors

LABELS = ("a", "tie", "b")
HUMAN, JUDGE = "human", "judge"
# Points a pair of labels earns: 1 the same, 1/2 when exactly one is a tie, 0 for a against b.
_POINTS = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.5], [0.0, 0.5, 1.0]])


def rater_of(record: dict):
  """Who made a judgement line: its `annotator` (a person), else its `judge` or `judge_model`
  (a model judge, as lima-judge writes); None when it names neither."""
  return record.get("annotator", record.get("judge", record.get("judge_model")))


@dataclasses.dataclass
class Ratings:
  """rater -> {item id: label}, each rater's kind, and where each judgement was read."""
  labels: dict = dataclasses.field(default_factory=dict)
  kinds: dict = dataclasses.field(default_factory=dict)
  where: dict = dataclasses.field(default_factory=dict)  # (rater, id) -> "file:line".

  def add(self, record: dict, label: str, where: str, default_rater: str) -> None:
    """One judgement line; a rater judging an item twice is an InputError naming both lines."""
    if label not in LABELS:
      raise errors.InputError(f"{where}: label {label!r} is not one of {', '.join(LABELS)}")
    rater = rater_of(record)
    kind = JUDGE if rater is not None and "annotator" not in record else HUMAN
    rater = str(default_rater if rater is None else rater)
    if self.kinds.setdefault(rater, kind) != kind:
      raise errors.InputError(f"{where}: {rater!r} is a {self.kinds[rater]} elsewhere and a {kind} here")
    item_id = str(record["id"])
    if (rater, item_id) in self.where:
      raise errors.InputError(f"{where}: {rater!r} judges id {item_id!r} again (first at "
                              f"{self.where[(rater, item_id)]})")
    self.where[(rater, item_id)] = where
    self.labels.setdefault(rater, {})[item_id] = label


def tie_discounted_accuracy(x: Sequence[str], y: Sequence[str]) -> float:
  """LIMA's agreement of two raters' labels of the same items, in [0, 1]."""
  return _accuracy(_table(x, y))


def cohens_kappa(x: Sequence[str], y: Sequence[str]) -> float | None:
  """Cohen's kappa of two raters' labels of the same items; None when it is undefined."""
  value = _kappa(_table(x, y))
  return None if math.isnan(value) else value


def _table(x: Sequence[str], y: Sequence[str]) -> np.ndarray:
  table = np.zeros((3, 3))
  for u, v in zip(x, y, strict=True):
    table[LABELS.index(u), LABELS.index(v)] += 1
  return table


def _accuracy(tables: np.ndarray) -> np.ndarray:
  """Tie-discounted accuracy of [..., 3, 3] tables of counts."""
  return np.sum(tables * _POINTS, axis=(-2, -1)) / np.sum(tables, axis=(-2, -1))


def _kappa(tables: np.ndarray) -> np.ndarray:
  """Cohen's kappa of [..., 3, 3] tables of counts (NaN where p_e is 1)."""
  n = np.sum(tables, axis=(-2, -1))
  observed = np.trace(tables, axis1=-2, axis2=-1) / n
  expected = np.sum(tables.sum(axis=-1) * tables.sum(axis=-2), axis=-1) / n**2
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(expected < 1.0, (observed - expected) / (1.0 - expected), np.nan)


def _item_tables(pairs: Sequence[tuple[str, str]], ratings: Ratings) -> dict[str, np.ndarray]:
  """item id -> the 3x3 table of the pairs' labels of that item (items some pair shares)."""
  tables: dict[str, np.ndarray] = {}
  for x, y in pairs:
    for item_id in sorted(ratings.labels[x].keys() & ratings.labels[y].keys()):
      table = tables.setdefault(item_id, np.zeros((3, 3)))
      table[LABELS.index(ratings.labels[x][item_id]), LABELS.index(ratings.labels[y][item_id])] += 1
  return tables


def _interval(values: np.ndarray, level: float) -> list[float | None]:
  tail = (1.0 - level) / 2.0
  values = values[~np.isnan(values)]
  if not values.size:
    return [None, None]
  return [float(v) for v in np.quantile(values, [tail, 1.0 - tail])]


def _figures(item_tables: dict[str, np.ndarray], resamples: int, seed: int, level: float) -> dict:
  """Accuracy and kappa of the summed tables, with percentile-bootstrap intervals over items."""
  tables = np.stack(list(item_tables.values()))
  total = tables.sum(axis=0)
  n = len(tables)
  rng = np.random.default_rng(seed)
  draws = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
  resampled = np.einsum("ri,ijk->rjk", draws, tables)
  kappa = float(_kappa(total))
  return {"items": n, "judgements": int(total.sum()),
          "accuracy": float(_accuracy(total)), "accuracy_interval": _interval(_accuracy(resampled), level),
          "kappa": None if math.isnan(kappa) else kappa, "kappa_interval": _interval(_kappa(resampled), level)}


def _groups(ratings: Ratings) -> dict[str, list[tuple[str, str]]]:
  """The pooled rows: every pair of people, and each judge against every person."""
  humans = sorted(r for r, kind in ratings.kinds.items() if kind == HUMAN)
  judges = sorted(r for r, kind in ratings.kinds.items() if kind == JUDGE)
  groups = {}
  if len(humans) > 2:
    groups["human - human"] = list(itertools.combinations(humans, 2))
  for judge in judges:
    if len(humans) > 1:
      groups[f"{judge} - humans"] = [(judge, h) for h in humans]
  return groups


def report(ratings: Ratings, *, resamples: int = 10000, seed: int = 0, level: float = 0.95) -> dict:
  """Agreement of every pair of raters that share items, and pooled over people and per judge."""
  raters = sorted(ratings.labels, key=lambda r: (ratings.kinds[r] != JUDGE, r))
  rows, unshared = [], []
  for x, y in itertools.combinations(raters, 2):
    tables = _item_tables([(x, y)], ratings)
    if tables:
      rows.append({"raters": [x, y], "kinds": [ratings.kinds[x], ratings.kinds[y]],
                   **_figures(tables, resamples, seed, level)})
    else:
      unshared.append([x, y])
  pooled = []
  for name, pairs in _groups(ratings).items():
    tables = _item_tables(pairs, ratings)
    if tables:
      pooled.append({"group": name, "pairs": len(pairs), **_figures(tables, resamples, seed, level)})
  return {"raters": {r: {"kind": ratings.kinds[r], "items": len(ratings.labels[r])} for r in raters},
          "pairs": rows, "pooled": pooled, "unshared": unshared,
          "resamples": resamples, "seed": seed, "level": level}
