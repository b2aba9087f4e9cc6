"""lima-select on a real tiny run (the `tiny` preset trained three epochs): answers the dev prompts
with each kept epoch, Likert-judges them against a real HTTP judge, writes the choice, which
lima-evaluate --checkpoint WORKDIR then takes; a rerun reuses the answers and asks nothing."""

import json
import os
import re
import subprocess
import sys

import pytest

import judge_server
from lima_jax import selection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def _epoch_score(body, n):
  """A judge whose score follows the answer's length, so epochs that answer differently score differently."""
  del n
  text = body["messages"][-1]["content"]
  answer = re.search(r"\[Answer\]\n(.*?)\n\[End of answer\]", text, re.S).group(1)
  return f"Considered.\nScore: {2 + len(answer) % 4}"


def _run(args, timeout=900):
  proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=timeout,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.slow
def test_select_chooses_an_epoch_and_evaluate_takes_it(tmp_path):
  workdir = tmp_path / "run"
  _run(["-m", "lima_jax.train", "--config=tiny", "--config.train.epochs=3",
        "--config.data.max_examples=16", "--config.train.dev_generations=0", f"--workdir={workdir}"])
  assert [c.epoch for c in selection.epoch_checkpoints(str(workdir))] == [1, 2, 3]
  judge = judge_server.ScriptedJudge(_epoch_score)
  select = [os.path.join(ROOT, "tools", "select_checkpoint.py"), f"--workdir={workdir}", "--epochs=2-3",
            "--config=tiny", "--max_new_tokens=8", "--judge_url", judge.url, "--judge_model", "judge-1",
            "--parallel", "2"]
  try:
    first = _run(select)
    asked = len(judge.requests)
    again = _run(select)
  finally:
    judge.stop()
  dev_prompts = sum(1 for _ in open(workdir / "select" / "dev_prompts.jsonl"))
  assert asked == 2 * dev_prompts and len(judge.requests) == asked  # The rerun asked nothing.
  assert "reusing" in again.stderr and again.stdout == first.stdout
  choice = json.loads((workdir / selection.SELECTION_FILE).read_text())
  rows = {r["epoch"]: r for r in choice["epochs"]}
  assert sorted(rows) == [2, 3] and choice["judge_model"] == "judge-1"
  best = max(rows.values(), key=lambda r: (r["mean"], -r["dev_loss"], -r["epoch"]))
  assert (choice["epoch"], choice["step"]) == (best["epoch"], best["step"])
  for r in rows.values():
    assert r["low"] <= r["mean"] <= r["high"] and r["n"] == dev_prompts and r["dev_loss"] > 0
    assert re.search(rf"^\s+{r['epoch']}\s+{r['step']}\s+{r['mean']:.2f} ", first.stdout, re.M)
  assert f"chose epoch {choice['epoch']}" in first.stdout
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps({"prompt": "Hello", "id": "x"}) + "\n")
  evaluated = _run([os.path.join(ROOT, "tools", "evaluate.py"), f"--checkpoint={workdir}", f"--prompts={prompts}",
                    f"--output={tmp_path / 'o.jsonl'}", "--config=tiny", "--max_new_tokens=4"])
  assert f"using epoch {choice['epoch']} (step {choice['step']})" in evaluated.stdout + evaluated.stderr
  record = json.loads((tmp_path / "o.jsonl").read_text())
  assert record["model"].endswith(os.path.join("checkpoints", str(choice["step"])))
