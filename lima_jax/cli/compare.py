"""Summarises human or model judgements of generated answers, as the LIMA paper reports them.

Pairwise (paper figure 1: "LIMA wins / tie / other wins"), one JSON object a line:

  {"id": "17", "winner": "a"}        # "a", "b" or "tie"
  {"id": "18", "preference": 2}      # alternative, AlpacaEval's annotation field:
                                     # 1 = a better, 2 = b better, 0 or 1.5 = tie

  python tools/compare.py pairwise judgements.jsonl --a_name LIMA --b_name GPT-4 [--prompts test.jsonl]

Absolute (paper figure 3: fail / pass / excellent), one JSON object a line:

  {"id": "17", "label": "pass"}

  python tools/compare.py absolute labels.jsonl [--prompts test.jsonl]

Likert (the ablations' 1-6 helpfulness, figures 5/6), `{"id": "17", "score": 4.6}` (lima-judge
writes a prompt's mean over its sampled answers): the mean with its bootstrap interval.

  python tools/compare.py likert 'quantity/likert-n*.jsonl' --plot figure6.png

JUDGEMENTS may be several files, separated by commas, each possibly a glob: each gets its table,
and `--plot FILE` draws them all in one PNG: pairwise as figure 1 (a bar a file, named by its
records' b_generator, else the file name), absolute as figure 3, likert as figure 6 (mean against
the number of training examples: the records' `examples` field, else the last number in the file
name) or, when a file has no such number, as figure 5 (a bar a file). Lines with
`"unparsed": true` (a judge reply lima-judge could not read) are counted apart, never as ties.

Each share comes with a 95% percentile-bootstrap interval: the judged prompts are resampled with
replacement `--resamples` times (seeded by `--seed`). Ids are compared as strings; with
`--prompts`, every judged id must be a prompt of that file (its `id` field, else its 1-based line
number, as tools/evaluate.py numbers them). A bad line (unknown id, duplicate id, unknown label,
invalid JSON) stops the run with its file and line and exit status 2.
"""

import json
import sys
from typing import Sequence

import numpy as np

from lima_jax import errors
from lima_jax import jsonl
from lima_jax import paths
from lima_jax.cli import common
from lima_jax.judge import summaries

PAIRWISE_LABELS = ("a", "tie", "b")
ABSOLUTE_LABELS = ("fail", "pass", "excellent")
_PREFERENCE = {1: "a", 1.0: "a", 2: "b", 2.0: "b", 0: "tie", 1.5: "tie"}


InputError = errors.InputError  # A problem in an input file; the message names file and line.


def _json_lines(path: str):
  """(line number, object) of a JSONL file, local or gs://."""
  return jsonl.read_objects(path)


def prompt_ids(path: str) -> set[str]:
  """Ids of a prompts file: each line's `id` field, or its 1-based line number."""
  ids = set()
  for number, record in _json_lines(path):
    pid = str(record.get("id", number))
    if pid in ids:
      raise InputError(f"{path}:{number}: duplicate prompt id {pid!r}")
    ids.add(pid)
  return ids


def _pairwise_label(record: dict, where: str) -> str:
  if "winner" in record:
    label = str(record["winner"]).strip().lower()
    if label not in PAIRWISE_LABELS:
      raise InputError(f"{where}: winner {record['winner']!r} is not one of {', '.join(PAIRWISE_LABELS)}")
    return label
  if "preference" in record:
    value = record["preference"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in _PREFERENCE:
      raise InputError(f"{where}: preference {value!r} is not 1 (a), 2 (b), 0 or 1.5 (tie)")
    return _PREFERENCE[value]
  raise InputError(f"{where}: no 'winner' (a|b|tie) or 'preference' (1|2|0|1.5) field")


def _absolute_label(record: dict, where: str) -> str:
  if "label" not in record:
    raise InputError(f"{where}: no 'label' field ({'|'.join(ABSOLUTE_LABELS)})")
  label = str(record["label"]).strip().lower()
  if label not in ABSOLUTE_LABELS:
    raise InputError(f"{where}: label {record['label']!r} is not one of {', '.join(ABSOLUTE_LABELS)}")
  return label


def read_judgements(path: str, kind: str, known_ids: set[str] | None = None,
                    unparsed: list[str] | None = None) -> dict[str, str]:
  """id -> label for every line of `path`; `kind` is "pairwise" or "absolute" (unparsed lines
  have no label: their ids go to `unparsed`)."""
  parse = _pairwise_label if kind == "pairwise" else _absolute_label
  return summaries.read_judged(path, parse, known_ids, unparsed)


def shares_with_intervals(labels: Sequence[str], categories: Sequence[str], resamples: int = 10000,
                          seed: int = 0, level: float = 0.95) -> dict[str, dict[str, float]]:
  """Share of each category with a percentile bootstrap interval over the judged prompts."""
  codes = np.array([categories.index(label) for label in labels])
  n = len(codes)
  counts = np.bincount(codes, minlength=len(categories))
  rng = np.random.default_rng(seed)
  resampled = rng.integers(0, n, size=(resamples, n))
  per_draw = np.stack([np.mean(codes[resampled] == c, axis=1) for c in range(len(categories))], axis=1)
  tail = (1.0 - level) / 2.0
  low, high = np.quantile(per_draw, [tail, 1.0 - tail], axis=0)
  return {c: {"count": int(counts[i]), "share": float(counts[i] / n), "low": float(low[i]),
              "high": float(high[i])} for i, c in enumerate(categories)}


def _print_table(title: str, rows: dict[str, dict[str, float]], names: dict[str, str], n: int, level: float):
  print(f"{title} ({n} prompts; {level:.0%} bootstrap intervals)")
  width = max(len(names[c]) for c in rows)
  for c, r in rows.items():
    print(f"  {names[c]:<{width}}  {100 * r['share']:5.1f}%  [{100 * r['low']:5.1f}, {100 * r['high']:5.1f}]"
          f"  ({r['count']})")


MODES = ("pairwise", "absolute", "likert")


def judgement_files(spec: str) -> list[str]:
  """JUDGEMENTS: one file, or several separated by commas, each possibly a glob."""
  files = []
  for part in filter(None, spec.split(",")):
    matches = [str(p) for p in paths.expand_globs(part)]
    if not matches:
      raise InputError(f"JUDGEMENTS: no file matches {part!r}")
    files += matches
  if not files:
    raise InputError("JUDGEMENTS: no file given")
  return files


def define_flags(values) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("prompts", None, "prompts JSONL: judged ids must be among its ids", flag_values=values)
  flags.DEFINE_string("a_name", "A", "pairwise: name of system a", flag_values=values)
  flags.DEFINE_string("b_name", "B", "pairwise: name of system b (unset: the records' b_generator; with "
                      "several files, each file's b_generator or file name)",
                      flag_values=values)
  flags.DEFINE_integer("resamples", 10000, "bootstrap resamples", lower_bound=1, flag_values=values)
  flags.DEFINE_integer("seed", 0, "bootstrap seed", flag_values=values)
  flags.DEFINE_float("level", 0.95, "interval level, in (0, 1)", lower_bound=0.0, upper_bound=1.0,
                     flag_values=values)
  flags.DEFINE_bool("json", False, "also print the figures as one JSON line a file", flag_values=values)
  flags.DEFINE_string("plot", None, "also draw the paper's figure (1, 3 or 5/6) of all files into this PNG",
                      flag_values=values)


def _summarise_shares(path: str, mode: str, known, args, several: bool) -> dict:
  unparsed: list[str] = []
  labels = read_judgements(path, mode, known, unparsed)
  if mode == "pairwise":
    categories = PAIRWISE_LABELS
    b_name = args.b_name if args["b_name"].present and not several else summaries.system_name(
        path, "b_generator", None if several else args.b_name)
    names = {"a": f"{args.a_name} wins", "tie": "tie", "b": f"{b_name} wins"}
  else:
    categories, b_name = ABSOLUTE_LABELS, summaries.system_name(path, "generator")
    names = {c: c for c in categories}
  rows = shares_with_intervals(list(labels.values()), categories, args.resamples, args.seed, args.level)
  _print_table(f"{mode}: {path}", rows, names, len(labels), args.level)
  figures = {"n": len(labels), "unparsed": len(unparsed), "shares": {names[c]: r for c, r in rows.items()}}
  return {"name": b_name, "rows": rows, "figures": figures}


def _summarise_likert(path: str, known, args) -> dict:
  unparsed: list[str] = []
  scores = summaries.read_judged(path, summaries.likert_score, known, unparsed)
  mean = summaries.mean_with_interval(list(scores.values()), args.resamples, args.seed, args.level)
  examples = summaries.examples_of(path)
  print(f"likert: {path} ({mean['n']} prompts; {args.level:.0%} bootstrap interval)")
  print(f"  mean helpfulness  {mean['mean']:.2f}  [{mean['low']:.2f}, {mean['high']:.2f}]"
        + (f"  (training examples: {examples})" if examples is not None else ""))
  return {"name": summaries.system_name(path, "generator"), "examples": examples, "mean": mean,
          "figures": {**mean, "unparsed": len(unparsed), "examples": examples}}


def _plot(mode: str, summarised: Sequence[dict], args) -> None:
  from lima_jax import plots  # pylint: disable=g-import-not-at-top  # matplotlib only when drawing.
  if mode == "pairwise":
    plots.pairwise([(s["name"], s["rows"]) for s in summarised], args.a_name, args.plot)
  elif mode == "absolute":
    plots.absolute([(s["name"], s["rows"]) for s in summarised], args.plot)
  else:
    plots.likert([(s["name"], s["examples"], s["mean"]) for s in summarised], args.plot, args.level)
  print(f"wrote {args.plot}")


def main(argv: Sequence[str] | None = None) -> int:
  """`compare.py MODE JUDGEMENTS [flags]`; returns the exit status."""
  argv = sys.argv[1:] if argv is None else argv
  args, (mode, judgements) = common.parse_own_flags(argv, define_flags, __doc__,
                                                    positional=("MODE", "JUDGEMENTS"))
  if mode not in MODES:
    common.fail(f"MODE {mode!r}: expected one of {', '.join(MODES)}")
  if not 0.0 < args.level < 1.0:
    common.fail(f"--level={args.level}: expected a value in (0, 1)")
  try:
    known = prompt_ids(args.prompts) if args.prompts else None
    files = judgement_files(judgements)
    summarised = []
    for path in files:
      if mode == "likert":
        summarised.append(_summarise_likert(path, known, args))
      else:
        summarised.append(_summarise_shares(path, mode, known, args, len(files) > 1))
      figures = summarised[-1]["figures"]
      if figures["unparsed"]:
        print(f"  {figures['unparsed']} unparsed (the judge's reply could not be read; not counted)")
      if known is not None and figures["n"] + figures["unparsed"] < len(known):
        print(f"  note: {len(known) - figures['n'] - figures['unparsed']} of {len(known)} prompts in "
              f"{args.prompts} are not judged")
      if args.json:
        print(json.dumps({"mode": mode, "judgements": path, "resamples": args.resamples, "seed": args.seed,
                          "level": args.level, **figures}))
  except InputError as e:
    print(f"{common.prog_name()}: error: {e}", file=sys.stderr)
    return errors.EXIT_BAD_INPUT
  if args.plot:
    _plot(mode, summarised, args)
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
