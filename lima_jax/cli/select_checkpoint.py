r"""Chooses a training run's checkpoint among its epochs by judging dev answers, as LIMA's authors chose theirs.

  lima-select --workdir W --epochs 5-10 --judge_url URL --judge_model M [--prompts DEV.jsonl] \
      [--samples N] [--config=configs/lima.py:7b --greedy --max_new_tokens N --seed S] \
      [judge flags as lima-judge's: --judge_checkpoint, --parallel, --parse_retries, ...]

For each epoch in --epochs that W keeps (a finished checkpoint at the epoch's end): answers the
dev prompts with lima-evaluate's decoding (`--config`'s sampling section) into
W/select/answers-epochK-D.jsonl, D naming the decoding, samples and prompts, so a rerun with
the same decoding reuses them (and an interrupted one resumes); judges them on the 1-6 Likert
helpfulness scale into W/select/likert-epochK-D-J.jsonl (J naming the judge; resumed as
lima-judge's). The dev prompts are --prompts, or the run's dev split (its conversations without
their last turn). Prints a table (epoch, step, mean helpfulness with its 95% bootstrap interval,
unparsed judgements, dev loss from W/metrics.jsonl) and writes the epoch with the highest mean
(ties: the lower dev loss, then the earlier epoch) to W/selected_checkpoint.json, atomically;
`lima-evaluate --checkpoint W` then answers with that checkpoint.

Exit status: 0 done; 2 bad input (the message names the flag or file); 1 the judge stayed unavailable.
"""

import hashlib
import json
import sys
from typing import Sequence

from absl import flags

from lima_jax import data as data_lib
from lima_jax import errors
from lima_jax import jsonl
from lima_jax import paths
from lima_jax import sampling
from lima_jax import selection
from lima_jax import train
from lima_jax.cli import common
from lima_jax.cli import decoding as decoding_flags
from lima_jax.cli import evaluate
from lima_jax.cli import judge as judge_cli
from lima_jax.judge import answers as answers_lib
from lima_jax.judge import client as client_lib
from lima_jax.judge import prompts as judge_prompts
from lima_jax.judge import run as run_lib
from lima_jax.judge import summaries

DEFAULT_CONFIG = "7b"
SELECT_SUBDIR = "select"


def _digest(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


def _log(line: str) -> None:
  print(line, file=sys.stderr)


def _dev_prompts_file(workdir: str, kept: selection.EpochCheckpoint) -> str:
  """The run's dev split as a prompts file under W/select (its config's data.dev_path, else the bundled one)."""
  from lima_jax import checkpoint  # pylint: disable=g-import-not-at-top
  config = checkpoint.read_train_state(kept.path).get("config") or {}
  dev = (config.get("data") or {}).get("dev_path") or data_lib.bundled_paths()["dev"]
  path = str(paths.path(workdir) / SELECT_SUBDIR / "dev_prompts.jsonl")
  paths.write_text_atomic(path, jsonl.dumps(selection.dev_prompts(dev)))
  return path


def _judge_epoch(answers: str, output: str, judge, parse_retries: int, parallel: int) -> list[dict]:
  tally = run_lib.Tally()
  ask = run_lib.Asker(judge, judge_prompts.LIKERT, parse_retries, tally)
  tasks = run_lib.likert_tasks(answers_lib.read_answers(answers), ask)
  log = run_lib.JudgementLog(output, judge_prompts.LIKERT, judge.model)
  return run_lib.judge_all(tasks, log, tally, parallel, _log)


def _row(kept: selection.EpochCheckpoint, records: Sequence[dict], dev_loss: float | None, files: dict) -> dict:
  scores = [r["score"] for r in records if not r["unparsed"]]
  row = {"epoch": kept.epoch, "step": kept.step, "checkpoint": kept.path, "dev_loss": dev_loss,
         "unparsed": len(records) - len(scores), **files}
  if scores:
    row.update(summaries.mean_with_interval(scores))
  return row


def _choose(rows: Sequence[dict]) -> dict:
  judged = [r for r in rows if "mean" in r]
  if not judged:
    raise errors.InputError("every judgement was unparsed; the judge cannot read the question (see the "
                            "likert files' raw replies) - choose another judge")
  lowest_loss = lambda r: r["dev_loss"] if r["dev_loss"] is not None else float("inf")
  return max(judged, key=lambda r: (r["mean"], -lowest_loss(r), -r["epoch"]))


def _print_table(rows: Sequence[dict], chosen: dict) -> None:
  print(f"{'epoch':>5} {'step':>7} {'helpfulness (95% CI)':>24} {'unparsed':>8} {'dev loss':>9}")
  for r in rows:
    score = f"{r['mean']:.2f} [{r['low']:.2f}, {r['high']:.2f}]" if "mean" in r else "-"
    loss = f"{r['dev_loss']:.4f}" if r["dev_loss"] is not None else "-"
    mark = "  <- chosen" if r is chosen else ""
    print(f"{r['epoch']:>5} {r['step']:>7} {score:>24} {r['unparsed']:>8} {loss:>9}{mark}")


def select(f, scfg: sampling.SamplingConfig, mesh_config: dict, serve_config: dict) -> dict:
  """Answers, judges and chooses; returns the choice written to W/selected_checkpoint.json."""
  workdir = f.workdir
  wanted = train.parse_epochs(f.epochs, field="--epochs")
  every = selection.epoch_checkpoints(workdir)
  kept = [c for c in every if wanted is None or c.epoch in wanted]
  if not kept:
    raise errors.InputError(f"--epochs {f.epochs}: {workdir} keeps no checkpoint at the end of those epochs "
                            f"(it keeps epochs {[c.epoch for c in every]})")
  (paths.path(workdir) / SELECT_SUBDIR).mkdir(parents=True, exist_ok=True)
  prompts_path = f.prompts or _dev_prompts_file(workdir, kept[0])
  prompts_text = paths.path(prompts_path).read_text()
  answers_digest = _digest(scfg.to_dict(), f.samples, prompts_text)
  losses = selection.dev_losses(workdir)
  judge = judge_cli.make_judge(f, client_lib.RequestCounter())
  judge_digest = _digest(judge.model, judge_prompts.VERSIONS[judge_prompts.LIKERT])
  rows = []
  try:
    for c in kept:
      root = paths.path(workdir) / SELECT_SUBDIR
      answers = str(root / f"answers-epoch{c.epoch}-{answers_digest}.jsonl")
      likert = str(root / f"likert-epoch{c.epoch}-{answers_digest}-{judge_digest}.jsonl")
      if paths.path(answers).exists():
        _log(f"epoch {c.epoch}: reusing {answers} (the same decoding and prompts)")
      else:
        evaluate.evaluate(c.path, prompts_path, answers, sampling_config=scfg, mesh_config=mesh_config,
                          generator=f"epoch{c.epoch}", samples=f.samples, serve_config=serve_config, log=_log)
      records = _judge_epoch(answers, likert, judge, f.parse_retries, f.parallel)
      rows.append(_row(c, records, losses.get(c.step), {"answers": answers, "judgements": likert}))
  finally:
    judge.close()
  chosen = _choose(rows)
  _print_table(rows, chosen)
  choice = {**chosen, "judge_model": judge.model, "prompt_version": judge_prompts.VERSIONS[judge_prompts.LIKERT],
            "prompts": prompts_path, "decoding": scfg.to_dict(), "samples": f.samples, "epochs": rows}
  path = selection.write_selection(workdir, choice)
  print(f"chose epoch {chosen['epoch']} (step {chosen['step']}); wrote {path}")
  return choice


def main(argv):
  if len(argv) > 1:
    raise errors.InputError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  if not f.workdir:
    raise errors.InputError("--workdir is required (the training run to choose a checkpoint of)")
  try:
    scfg = decoding_flags.sampling_config_from_flags(f)
  except ValueError as e:
    raise errors.InputError(f"--config: {e}") from None
  try:
    select(f, scfg, dict(f.config.mesh), dict(f.config.get("serve", {})))
  except client_lib.JudgeUnavailable as e:
    print(f"{common.prog_name()}: error: {e}", file=sys.stderr)
    return 1
  return 0


def define_flags() -> None:
  common.define_config_flag(DEFAULT_CONFIG, "A preset (e.g. 7b) or configs/lima.py:PRESET; its sampling "
                            "and mesh sections decode the dev answers")
  decoding_flags.define_sampling_shortcuts()
  flags.DEFINE_string("workdir", None, "the training workdir whose epochs are compared")
  flags.DEFINE_string("epochs", "5-10", "epochs to compare, as train.keep_epochs (\"5-10\", \"5,8,10\"; \"\": all)")
  flags.DEFINE_string("prompts", None, "dev prompts (lima-evaluate's format; default: the run's dev split)")
  flags.DEFINE_integer("samples", 1, "sampled answers a prompt, averaged per prompt by the judge", lower_bound=1)
  judge_cli.define_judge_flags(flags.FLAGS)


def run() -> None:
  common.run(main, define_flags, default_config=DEFAULT_CONFIG)


if __name__ == "__main__":
  run()
