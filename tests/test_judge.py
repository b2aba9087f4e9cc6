"""lima-judge against a real HTTP server playing an OpenAI-compatible judge (tests/judge_server.py).

The replies are scripted from what the judge is shown: an answer marked "(strong)" wins, one
marked "(rambling)" makes the judge forget its verdict line, "(first-biased)" makes it prefer
whichever answer it saw first, so both orders disagree.
"""

import datetime
import email.utils
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

import judge_server
from lima_jax.cli import compare
from lima_jax.cli import judge as judge_cli
from lima_jax.judge import client as client_lib
from lima_jax.judge import verdicts

ROOT = pathlib.Path(__file__).resolve().parent.parent

# -- Parsing recorded replies -----------------------------------------------------------------

PAIRWISE_REPLIES = [
    ("Answer A explains the cause and gives a working fix; Answer B only restates the question.\n\n"
     "Verdict: A", "a"),
    ("Both answers are accurate. B is more thorough, with an example for each step, but A covers the "
     "same ground concisely.\n\n**Verdict: neither**", "neither"),
    ("Let me compare them.\n1. Accuracy: B is correct about the date; A is off by a year.\n"
     "2. Helpfulness: B also links the primary source.\n\nVerdict: [[B]]", "b"),
    ("After weighing both, Answer B is significantly better: it answers the actual question.", "b"),
    ("I first thought Verdict: A, but on reflection A misses the constraint.\nVerdict: B", "b"),
    ("Both answers have merits and drawbacks; it depends on what the user values.", None),
    ("Answer A is significantly better in tone, though Answer B is significantly better in substance.", None),
]

ABSOLUTE_REPLIES = [
    ("The response follows every instruction and the code runs.\n\nLabel: pass", "pass"),
    ("It ignores the requested word limit and invents a citation.\nLabel: **Fail**", "fail"),
    ("Thorough, accurate and well organised, with a helpful caveat.\n\nexcellent", "excellent"),
    ("This could pass or fail depending on the reader.", None),
]

LIKERT_REPLIES = [
    ("Strengths: correct formula, worked example. Weaknesses: no units in step 3.\nScore: 5", 5),
    ("The answer is off-topic.\n\n**Score:** 1", 1),
    ("Reasoning: accurate but terse.\nRating: 4/6", 4),
    ("I would give it a 7 out of 10.", None),
    ("Score: 9", None),
]


@pytest.mark.parametrize("text,expected", PAIRWISE_REPLIES)
def test_parse_pairwise(text, expected):
  assert verdicts.parse_pairwise(text) == expected


@pytest.mark.parametrize("text,expected", ABSOLUTE_REPLIES)
def test_parse_absolute(text, expected):
  assert verdicts.parse_absolute(text) == expected


@pytest.mark.parametrize("text,expected", LIKERT_REPLIES)
def test_parse_likert(text, expected):
  assert verdicts.parse_likert(text) == expected


def test_order_swap_rule():
  # Shown second, "A is better" means the other system.
  assert verdicts.unswap("a", first_shown="b") == "b" and verdicts.unswap("neither", "b") == "neither"
  assert verdicts.combine_orders("a", "a") == "a" and verdicts.combine_orders("b", "b") == "b"
  for ab, ba in [("a", "b"), ("a", "neither"), ("neither", "b"), ("neither", "neither")]:
    assert verdicts.combine_orders(ab, ba) == "tie"


# -- The scripted judge -------------------------------------------------------------------------


def _section(text, name):
  match = re.search(rf"\[{name}\]\n(.*?)\n\[End of {name.lower()}\]", text, re.S | re.I)
  return match.group(1) if match else ""


def scripted_reply(body, n):
  user = body["messages"][-1]["content"]
  if "[Answer A]" in user:
    first, second = _section(user, "Answer A"), _section(user, "Answer B")
    if "(rambling)" in first + second:
      return "Both answers have merits; the choice depends on the reader."
    if "(first-biased)" in first + second:
      return "The first answer reads better.\n\nVerdict: A"
    a, b = "(strong)" in first, "(strong)" in second
    choice = "A" if a and not b else "B" if b and not a else "neither"
    return f"Comparing helpfulness and accuracy, I prefer the stronger answer.\n\nVerdict: {choice}"
  answer = _section(user, "Answer")
  if "helpful" in user and "Score:" in user:
    score = re.search(r"\(score (\d)\)", answer)
    return f"Strengths and weaknesses considered.\nScore: {score.group(1)}" if score else "Hard to say."
  label = re.search(r"\((fail|pass|excellent)\)", answer)
  return f"Checked against the request.\nLabel: {label.group(1)}" if label else "Unclear."


@pytest.fixture
def server():
  s = judge_server.ScriptedJudge(scripted_reply)
  yield s
  s.stop()


def _answers(path, responses, generator, samples=None):
  lines = []
  for i, response in enumerate(responses):
    for s, text in enumerate(response if isinstance(response, list) else [response]):
      record = {"id": f"p{i}", "conversation": [f"Question {i}?"], "response": text, "generator": generator}
      if isinstance(response, list):
        record["sample"] = s
      lines.append(json.dumps(record))
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def _flags(server, output, *extra):
  return ["--output", str(output), "--judge_url", server.url, "--judge_model", "judge-1",
          "--parallel", "2", "--backoff_seconds", "0.01", *extra]


A_SIDE = ["(strong) a", "(strong) a", "plain a", "(first-biased) a", "(rambling) a", "plain a"]
B_SIDE = ["plain b", "(strong) b", "(strong) b", "plain b", "plain b", "plain b"]


def test_pairwise_both_orders_ties_and_unparsed(tmp_path, server, capsys):
  a = _answers(tmp_path / "a.jsonl", A_SIDE, "lima")
  b = _answers(tmp_path / "b.jsonl", B_SIDE, "baseline")
  out = tmp_path / "j.jsonl"
  assert judge_cli.main(["pairwise", "--a", a, "--b", b, *_flags(server, out, "--parse_retries", "1")]) == 0
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["winner"] for r in records] == ["a", "tie", "b", "tie", None, "tie"]
  biased = records[3]
  assert [o["verdict"] for o in biased["orders"]] == ["a", "b"]  # The orders disagree: a tie.
  assert [o["shown_first"] for o in biased["orders"]] == ["a", "b"]
  rambling = records[4]
  assert rambling["unparsed"] and [o["attempts"] for o in rambling["orders"]] == [2, 2]
  assert all(len(o["raw"]) == 2 for o in rambling["orders"])
  assert records[0]["judge_model"] == "judge-1" and records[0]["prompt_version"] == "lima-pairwise-1"
  assert records[0]["usage"]["total_tokens"] == 240 and records[0]["b_generator"] == "baseline"
  assert len(server.requests) == 5 * 2 + 4  # The unparsed prompt: both orders asked twice.
  summary = capsys.readouterr().out
  assert "14 requests (0 retries)" in summary and "unparsed: 1 prompts, 4 replies" in summary
  assert not (tmp_path / "j.jsonl.partial").exists()

  assert compare.main(["pairwise", str(out), "--a_name", "LIMA", "--b_name", "Base"]) == 0
  table = capsys.readouterr().out
  assert "5 prompts" in table and "1 unparsed" in table
  assert re.search(r"LIMA wins\s+20\.0%", table) and re.search(r"tie\s+60\.0%", table)


def test_rerun_asks_only_what_changed(tmp_path, server):
  a = _answers(tmp_path / "a.jsonl", A_SIDE[:3], "lima")
  b = _answers(tmp_path / "b.jsonl", B_SIDE[:3], "baseline")
  out = tmp_path / "j.jsonl"
  assert judge_cli.main(["pairwise", "--a", a, "--b", b, *_flags(server, out)]) == 0
  first = out.read_text()
  assert judge_cli.main(["pairwise", "--a", a, "--b", b, *_flags(server, out)]) == 0
  assert len(server.requests) == 6 and out.read_text() == first
  _answers(tmp_path / "b.jsonl", B_SIDE[:2] + ["plain b, rewritten"], "baseline")
  assert judge_cli.main(["pairwise", "--a", a, "--b", b, *_flags(server, out)]) == 0
  assert len(server.requests) == 8  # Only p2, in both orders.
  assert json.loads(out.read_text().splitlines()[2])["winner"] == "tie"


def test_another_judge_does_not_mix_into_a_file(tmp_path, server, capsys):
  a = _answers(tmp_path / "a.jsonl", A_SIDE[:2], "lima")
  out = tmp_path / "l.jsonl"
  assert judge_cli.main(["absolute", a, *_flags(server, out)]) == 0
  flags = _flags(server, out)
  flags[flags.index("judge-1")] = "judge-2"
  assert judge_cli.main(["absolute", a, *flags]) == 2
  assert f"{out}:1: judged with judge_model=\"judge-1\"" in capsys.readouterr().err


def test_absolute_labels(tmp_path, server, capsys):
  a = _answers(tmp_path / "r.jsonl", ["(pass) x", "(excellent) y", "(fail) z", "(pass) w"], "lima")
  out = tmp_path / "new" / "labels.jsonl"  # Its directory is made.
  assert judge_cli.main(["absolute", a, *_flags(server, out)]) == 0
  assert [json.loads(l)["label"] for l in out.read_text().splitlines()] == ["pass", "excellent", "fail", "pass"]
  assert compare.main(["absolute", str(out)]) == 0
  assert re.search(r"pass\s+50\.0%", capsys.readouterr().out)


def test_likert_averages_samples_per_prompt(tmp_path, server, capsys):
  responses = [["(score 6) a", "(score 4) b"], ["(score 2) c", "no score here", "(score 3) d"], ["none"]]
  r = _answers(tmp_path / "r.jsonl", responses, "lima")
  out = tmp_path / "scores-n64.jsonl"
  assert judge_cli.main(["likert", r, *_flags(server, out, "--parse_retries", "0")]) == 0
  records = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r["score"] for r in records] == [5.0, 2.5, None]
  assert [r["unparsed_samples"] for r in records] == [0, 1, 1] and records[2]["unparsed"]
  assert [s["sample"] for s in records[1]["samples"]] == [0, 1, 2]
  assert compare.main(["likert", str(out), "--json"]) == 0
  lines = capsys.readouterr().out.splitlines()
  figures = json.loads(lines[-1])
  assert figures["mean"] == pytest.approx(3.75) and figures["unparsed"] == 1 and figures["examples"] == 64


# -- Retries against the real server ----------------------------------------------------------------


def _one_prompt(tmp_path):
  return _answers(tmp_path / "r.jsonl", ["(pass) x"], "lima")


@pytest.mark.parametrize("first", [
    judge_server.Response(status=429, headers={"Retry-After": "1"}),
    judge_server.Response(status=503),
    judge_server.Response(delay=1.5, text="Label: fail"),  # Slower than --judge_timeout.
])
def test_transient_failures_are_retried(tmp_path, capsys, first):
  s = judge_server.ScriptedJudge(lambda body, n: first if n == 0 else scripted_reply(body, n))
  try:
    out = tmp_path / "l.jsonl"
    start = time.monotonic()
    assert judge_cli.main(["absolute", _one_prompt(tmp_path), *_flags(s, out, "--judge_timeout", "0.5")]) == 0
    took = time.monotonic() - start
  finally:
    s.stop()
  assert len(s.requests) == 2 and json.loads(out.read_text())["label"] == "pass"
  assert "2 requests (1 retries)" in capsys.readouterr().out
  if first.status == 429:
    assert took >= 1.0  # Retry-After was honoured, not the 0.01 s backoff.


def test_retries_are_bounded(tmp_path, capsys):
  s = judge_server.ScriptedJudge(lambda body, n: judge_server.Response(status=500))
  try:
    out = tmp_path / "l.jsonl"
    assert judge_cli.main(["absolute", _one_prompt(tmp_path), *_flags(s, out, "--max_retries", "2")]) == 1
  finally:
    s.stop()
  assert len(s.requests) == 3 and "no answer after 3 attempts (last: HTTP 500)" in capsys.readouterr().err
  assert not out.exists()


def test_refused_key_is_bad_input_and_key_is_sent(tmp_path, capsys, monkeypatch):
  s = judge_server.ScriptedJudge(lambda body, n: judge_server.Response(status=401))
  monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
  try:
    flags = _flags(s, tmp_path / "l.jsonl", "--judge_api_key_env", "MY_JUDGE_KEY")
    assert judge_cli.main(["absolute", _one_prompt(tmp_path), *flags]) == 2
  finally:
    s.stop()
  assert len(s.requests) == 1 and "check --judge_api_key_env" in capsys.readouterr().err
  monkeypatch.delenv("MY_JUDGE_KEY")
  assert judge_cli.main(["absolute", _one_prompt(tmp_path), *flags]) == 2
  assert "MY_JUDGE_KEY is not set" in capsys.readouterr().err


# -- Bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("b_lines,expected", [
    (['{"id": "p0", "conversation": ["Question 0?"], "response": "x"}'], "a.jsonl:2: id 'p1' has no answer in"),
    (['{"id": "p0", "conversation": ["Question 0?"], "response": "x"}',
      '{"id": "p0", "conversation": ["Question 0?"], "response": "y"}'], "b.jsonl:2: duplicate id 'p0' sample 0"),
    (['{"id": "p0", "conversation": ["Question 0?"]}'], "b.jsonl:1: no 'response' field"),
    (['{"id": "p0", "conversation": ["Question 0?"], "response": "x"}', '{"id": "p1",'], "b.jsonl:2: invalid JSON"),
    (['{"id": "p0", "conversation": ["Another?"], "response": "x"}',
      '{"id": "p1", "conversation": ["Question 1?"], "response": "x"}'], "b.jsonl:1: id 'p0' answers another"),
])
def test_bad_input_names_file_and_line(tmp_path, server, capsys, b_lines, expected):
  a = _answers(tmp_path / "a.jsonl", ["x", "y"], "lima")
  b = tmp_path / "b.jsonl"
  b.write_text("\n".join(b_lines) + "\n")
  assert judge_cli.main(["pairwise", "--a", a, "--b", str(b), *_flags(server, tmp_path / "j.jsonl")]) == 2
  assert expected in capsys.readouterr().err
  assert not server.requests


# -- Resume after a kill ------------------------------------------------------------------------------


def test_resume_after_kill_asks_nothing_twice(tmp_path):
  answered_before_kill = 6  # Three prompts, both orders; the 7th request hangs until the kill.
  hang = {"on": True}

  def reply(body, n):
    if hang["on"] and n >= answered_before_kill:
      return judge_server.Response(hang=True)
    return scripted_reply(body, n)

  s = judge_server.ScriptedJudge(reply)
  a = _answers(tmp_path / "a.jsonl", [f"(strong) a{i}" for i in range(5)], "lima")
  b = _answers(tmp_path / "b.jsonl", [f"plain b{i}" for i in range(5)], "baseline")
  out = tmp_path / "j.jsonl"
  command = [sys.executable, "-m", "lima_jax.cli.judge", "pairwise", "--a", a, "--b", b,
             *_flags(s, out, "--parallel", "1")]
  try:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    partial = tmp_path / "j.jsonl.partial"
    deadline = time.monotonic() + 60
    while len(s.requests) <= answered_before_kill or not partial.exists() or len(
        partial.read_text().splitlines()) < 3:
      assert time.monotonic() < deadline and process.poll() is None
      time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()
    hang["on"] = False
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=60)
  finally:
    s.stop()
  assert rerun.returncode == 0, rerun.stderr
  assert "resuming: 3 of 5 prompts" in rerun.stderr
  asked = [json.dumps(body["messages"]) for body in s.answered]
  assert len(asked) == 10 and len(set(asked)) == 10  # Every question answered exactly once.
  assert [json.loads(l)["winner"] for l in out.read_text().splitlines()] == ["a"] * 5


def test_a_prompt_that_gives_up_keeps_the_others(tmp_path, capsys):
  failing = {"on": True}

  def reply(body, n):
    if failing["on"] and "(broken)" in body["messages"][-1]["content"]:
      return judge_server.Response(status=502)
    return scripted_reply(body, n)

  s = judge_server.ScriptedJudge(reply)
  r = _answers(tmp_path / "r.jsonl", ["(pass) a", "(broken) (fail) b", "(pass) c", "(excellent) d"], "lima")
  out = tmp_path / "l.jsonl"
  try:
    assert judge_cli.main(["absolute", r, *_flags(s, out, "--max_retries", "1", "--parallel", "1")]) == 1
    kept = [json.loads(l)["id"] for l in (tmp_path / "l.jsonl.partial").read_text().splitlines()]
    assert "p0" in kept and "p1" not in kept and not out.exists()
    failing["on"] = False
    assert judge_cli.main(["absolute", r, *_flags(s, out)]) == 0
  finally:
    s.stop()
  assert f"resuming: {len(kept)} of 4" in capsys.readouterr().err
  asked = [json.dumps(b["messages"]) for b in s.answered]
  assert len(asked) == 4 and len(set(asked)) == 4
  assert [json.loads(l)["label"] for l in out.read_text().splitlines()] == ["pass", "fail", "pass", "excellent"]


def test_likert_samples_from_several_runs(tmp_path, server, capsys):
  runs = [_answers(tmp_path / f"seed{k}.jsonl", [f"(score {2 + k}) x", f"(score {6 - k}) y"], "lima")
          for k in range(3)]
  out = tmp_path / "s.jsonl"
  assert judge_cli.main(["likert", ",".join(runs), *_flags(server, out)]) == 0
  records = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r["score"] for r in records] == [3.0, 5.0] and [s["sample"] for s in records[0]["samples"]] == [0, 1, 2]
  _answers(tmp_path / "seed2.jsonl", ["(score 4) x"], "lima")
  assert judge_cli.main(["likert", ",".join(runs), *_flags(server, tmp_path / "t.jsonl")]) == 2
  assert "id 'p1' is answered in 2 of the files" in capsys.readouterr().err


def test_retry_after_as_seconds_or_http_date():
  assert client_lib.parse_retry_after("2") == 2.0 and client_lib.parse_retry_after(None) is None
  soon = email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=30),
                                     usegmt=True)
  assert 25 < client_lib.parse_retry_after(soon) <= 30
  assert client_lib.parse_retry_after("soon") is None
  policy = client_lib.RetryPolicy(backoff_seconds=1.0, max_backoff_seconds=60.0)
  assert policy.wait(0, 300.0) == 60.0 and 4.0 <= policy.wait(3, None) <= 8.0


def test_answers_and_judgements_on_gcs(gcs, tmp_path, server, capsys):
  from lima_jax import paths  # pylint: disable=g-import-not-at-top
  local = _answers(tmp_path / "r.jsonl", ["(pass) x", "(fail) y"], "lima")
  answers = gcs.uri("judge", "r.jsonl")
  paths.write_text_atomic(answers, pathlib.Path(local).read_text())
  out = gcs.uri("judge", "labels.jsonl")
  assert judge_cli.main(["absolute", answers, *_flags(server, out)]) == 0
  assert judge_cli.main(["absolute", answers, *_flags(server, out)]) == 0  # Resumed from gs://.
  assert len(server.requests) == 2 and not paths.path(out + ".partial").exists()
  png = tmp_path / "figure3.png"
  assert compare.main(["absolute", gcs.uri("judge", "label*.jsonl"), "--plot", str(png)]) == 0
  assert re.search(r"fail\s+50\.0%", capsys.readouterr().out) and png.stat().st_size > 0


def _length_score(body, n):
  """A judge whose score follows the answer's length: any text gets a score."""
  answer = _section(body["messages"][-1]["content"], "Answer")
  return f"The answer has {len(answer)} characters.\nScore: {1 + len(answer) % 6}"


@pytest.mark.slow
def test_quantity_ablation_script_end_to_end(tmp_path):
  """tools/quantity_ablation.py on the tiny preset: trains twice, answers, judges, draws figure 6."""
  s = judge_server.ScriptedJudge(_length_score)
  out = tmp_path / "quantity"
  try:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "quantity_ablation.py"), "--output_dir", str(out), "--sizes",
         "8,16", "--samples", "2", "--judge_url", s.url, "--judge_model", "judge-1",
         "--train_args=--config.train.epochs=1", "--evaluate_args=--max_new_tokens=8"],
        capture_output=True, text=True, timeout=900, check=False)
  finally:
    s.stop()
  assert proc.returncode == 0, proc.stderr[-3000:]
  logs = proc.stdout + proc.stderr
  assert "8 kept" in logs and "16 kept" in logs  # data.max_examples reached training.
  figures = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith('{"mode"')]
  assert [f["examples"] for f in figures] == [8, 16] and all(f["n"] == 10 for f in figures)
  assert len(s.requests) == 2 * 2 * 10  # Two sizes, two samples, ten dev prompts.
  assert (out / "figure6.png").stat().st_size > 0
