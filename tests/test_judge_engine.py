"""lima-judge with a real model as the judge: a checkpoint in-process on the engine
(--judge_checkpoint), and a `lima-serve` process on 127.0.0.1. A tiny random model's verdicts are
mostly unreadable, so the unparsed path runs for real and is counted apart."""

import json
import re
import signal

import pytest

import tiny_models
from lima_jax.cli import judge as judge_cli
from lima_jax.judge import prompts
from test_serve_api import start_server

SUMMARY = re.compile(r"wrote .*: (\d+) prompts \((\d+) judged now, (\d+) from earlier runs\) in [\d.]+ s; "
                     r"(\d+) requests \(\d+ retries\), (\d+) tokens .*unparsed: (\d+) prompts")


@pytest.fixture(scope="module")
def judge_ckpt(tmp_path_factory):
  """A tiny lima_jax checkpoint with the bundled tokenizer, as the judge."""
  return tiny_models.save_tiny_checkpoint(tmp_path_factory.mktemp("judge") / "tiny-judge", seed=1, max_seq_len=1024)


def _answers(path, texts, generator):
  lines = [{"id": f"p{i}", "conversation": [f"Question {i}: name a colour."], "response": text,
            "generator": generator} for i, text in enumerate(texts)]
  path.write_text("".join(json.dumps(r) + "\n" for r in lines))
  return str(path)


def _summary(out: str) -> dict:
  match = SUMMARY.search(out)
  assert match, out
  keys = ("prompts", "judged_now", "reused", "requests", "tokens", "unparsed")
  return dict(zip(keys, map(int, match.groups())))


def _check_records(path, kind, judge_model, n):
  records = [json.loads(line) for line in open(path, encoding="utf-8")]
  assert [r["id"] for r in records] == [f"p{i}" for i in range(n)]
  for r in records:
    assert (r["kind"], r["judge_model"], r["prompt_version"]) == (kind, judge_model, prompts.VERSIONS[kind])
    assert r["usage"]["prompt_tokens"] > 0 and r["usage"]["completion_tokens"] > 0
  return records


@pytest.mark.slow
def test_judge_checkpoint_in_process(judge_ckpt, tmp_path, capsys):
  answers = _answers(tmp_path / "r.jsonl", ["Blue.", "Red, or perhaps green."], "lima")
  out = tmp_path / "s.jsonl"
  argv = ["likert", answers, "--output", str(out), "--judge_checkpoint", judge_ckpt, "--judge_max_tokens", "6",
          "--parallel", "2", "--parse_retries", "1", "--judge_context", "1024"]
  assert judge_cli.main(argv) == 0
  first = _summary(capsys.readouterr().out)
  records = _check_records(out, prompts.LIKERT, "tiny-judge", 2)
  for r in records:
    sample = r["samples"][0]
    assert len(sample["raw"]) == sample["attempts"] and sample["attempts"] in (1, 2)
    assert (sample["score"] is None) == (sample["attempts"] == 2 and r["unparsed"])
  assert first["unparsed"] == sum(r["unparsed"] for r in records)
  assert first["requests"] == sum(s["attempts"] for r in records for s in r["samples"])
  assert first["tokens"] == sum(r["usage"]["total_tokens"] for r in records)
  # Greedy: the same question gets the same reply, so a retry of an unparsed one repeats it.
  assert all(len(set(s["raw"])) == 1 for r in records for s in r["samples"])
  assert judge_cli.main(argv) == 0
  again = _summary(capsys.readouterr().out)
  assert (again["judged_now"], again["reused"], again["requests"]) == (0, 2, 0)


@pytest.mark.slow
def test_judge_against_lima_serve(judge_ckpt, tmp_path, capsys):
  proc, url = start_server(judge_ckpt, "--config.sampling.max_len=1024", "--served_model_name", "tiny-judge")
  try:
    a = _answers(tmp_path / "a.jsonl", ["Blue.", "Green."], "lima")
    b = _answers(tmp_path / "b.jsonl", ["Red.", "I cannot say."], "baseline")
    out = tmp_path / "j.jsonl"
    argv = ["pairwise", "--a", a, "--b", b, "--output", str(out), "--judge_url", url + "/v1",
            "--judge_model", "tiny-judge", "--judge_max_tokens", "6", "--parse_retries", "1", "--parallel", "3", "--judge_system_in_user"]
    assert judge_cli.main(argv) == 0
    first = _summary(capsys.readouterr().out)
    assert judge_cli.main(argv) == 0
    again = _summary(capsys.readouterr().out)
  finally:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
  records = _check_records(out, prompts.PAIRWISE, "tiny-judge", 2)
  for r in records:
    assert [o["shown_first"] for o in r["orders"]] == ["a", "b"]
    assert r["unparsed"] == any(o["verdict"] is None for o in r["orders"])
    assert (r["winner"] is None) == r["unparsed"]
  assert first["unparsed"] == sum(r["unparsed"] for r in records)
  assert first["requests"] == sum(o["attempts"] for r in records for o in r["orders"])
  assert (again["judged_now"], again["reused"], again["requests"]) == (0, 2, 0)
