r"""The paper's quantity ablation end to end (figure 6): train on 2^k examples, answer, judge, plot.

  python tools/quantity_ablation.py --output_dir runs/quantity --sizes 8,16,32 \
      --judge_url http://127.0.0.1:8000/v1 --judge_model JUDGE [--samples 5] [--preset tiny] \
      [--sources stackexchange] [--train_args="--config.train.epochs=3"] [--evaluate_args="--max_new_tokens=64"]

For each size N: `lima-train --config=PRESET --config.data.max_examples=N` (a seeded subset,
nested across sizes) into OUTPUT_DIR/runs/nN; `lima-evaluate --samples SAMPLES` on the dev
prompts (the dev split's conversations without their last turn: one model load, each sample its
own random stream) into OUTPUT_DIR/answers/nN.jsonl; `lima-judge likert` of those samples (their
mean a prompt) into OUTPUT_DIR/likert/likert-nN.jsonl. Then `lima-compare likert --plot
OUTPUT_DIR/figure6.png`. Every step is the installed command run as a subprocess, so a rerun
resumes: training resumes its workdir, finished answer files are kept, the judge asks nothing it
has judged. On the tiny preset (the bundled 50 conversations) it runs on a CPU; the judge is any
OpenAI-compatible endpoint. Exit status: that of the first step that fails.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys

from lima_jax import data
from lima_jax import jsonl
from lima_jax import paths
from lima_jax import selection


def _step(args: list[str]) -> None:
  print("+ " + shlex.join(args), flush=True)
  status = subprocess.run([sys.executable, *args], check=False).returncode
  if status:
    sys.exit(status)


def run_size(n: int, a, dev_prompts: str) -> str:
  """Trains, answers and judges one size; returns its Likert file."""
  workdir = os.path.join(a.output_dir, "runs", f"n{n}")
  train = ["-m", "lima_jax.train", f"--config={a.preset}", f"--config.data.max_examples={n}",
           f"--workdir={workdir}"]
  if a.sources:
    train.append(f"--config.data.sources={a.sources}")
  _step(train + shlex.split(a.train_args))
  answers = os.path.join(a.output_dir, "answers", f"n{n}.jsonl")
  if not paths.path(answers).exists():
    _step(["-m", "lima_jax.cli.evaluate", f"--checkpoint={workdir}", f"--prompts={dev_prompts}",
           f"--config={a.preset}", f"--samples={a.samples}", f"--output={answers}", *shlex.split(a.evaluate_args)])
  likert = os.path.join(a.output_dir, "likert", f"likert-n{n}.jsonl")
  key = ["--judge_api_key_env", a.judge_api_key_env] if a.judge_api_key_env else []
  _step(["-m", "lima_jax.cli.judge", "likert", answers, "--output", likert,
         "--judge_url", a.judge_url, "--judge_model", a.judge_model, *key, "--parallel", str(a.parallel)])
  return likert


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--sizes", default="8,16,32", help="training examples, comma-separated")
  parser.add_argument("--samples", type=int, default=5, help="sampled answers a dev prompt (lima-evaluate --samples)")
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--sources", default="", help="config.data.sources for every size")
  parser.add_argument("--dev", default=data.bundled_paths()["dev"], help="dev conversations (LIMA JSONL)")
  parser.add_argument("--judge_url", required=True)
  parser.add_argument("--judge_model", required=True)
  parser.add_argument("--judge_api_key_env", default=None, help="as lima-judge's (unset: none needed)")
  parser.add_argument("--parallel", type=int, default=4)
  parser.add_argument("--train_args", default="", help="more lima-train flags, one string (--train_args=\"...\")")
  parser.add_argument("--evaluate_args", default="", help="more lima-evaluate flags, one string")
  a = parser.parse_args(argv)
  try:
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
  except ValueError:
    parser.error(f"--sizes={a.sizes}: expected comma-separated integers")
  if not sizes or min(sizes) < 1 or a.samples < 1:
    parser.error("--sizes needs positive counts and --samples at least 1")
  for sub in ("answers", "likert"):
    os.makedirs(os.path.join(a.output_dir, sub), exist_ok=True)
  dev_prompts = os.path.join(a.output_dir, "dev_prompts.jsonl")
  paths.write_text_atomic(dev_prompts, jsonl.dumps(selection.dev_prompts(a.dev)))
  likert = [run_size(n, a, dev_prompts) for n in sizes]
  _step(["-m", "lima_jax.cli.compare", "likert", ",".join(likert), "--plot",
         os.path.join(a.output_dir, "figure6.png"), "--json"])
  print(json.dumps({"sizes": sizes, "likert": likert}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
