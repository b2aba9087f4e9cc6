"""Agreement between raters (lima_jax/agreement.py) and `lima-compare agreement`."""

import collections
import json
import random

import pytest

from lima_jax import agreement
from lima_jax.cli import compare


def write_jsonl(path, lines):
  path.write_text("".join(json.dumps(r) + "\n" for r in lines))
  return str(path)


def textbook_kappa(x, y):
  """Cohen (1960), written out: observed agreement against agreement expected from the marginals."""
  n = len(x)
  observed = sum(u == v for u, v in zip(x, y)) / n
  cx, cy = collections.Counter(x), collections.Counter(y)
  expected = sum(cx[label] * cy[label] for label in agreement.LABELS) / n**2
  return (observed - expected) / (1 - expected)


def test_tie_discounted_accuracy_counts_half_a_point_for_one_tie():
  x = ["a", "a", "tie", "b", "b"]
  y = ["a", "tie", "tie", "a", "b"]  # 1 + 1/2 + 1 + 0 + 1.
  assert agreement.tie_discounted_accuracy(x, y) == pytest.approx(3.5 / 5)
  assert agreement.tie_discounted_accuracy(["tie"], ["b"]) == 0.5


def test_cohens_kappa():
  assert agreement.cohens_kappa(["a", "a", "b", "b"], ["a", "b", "b", "b"]) == pytest.approx(0.5)
  rng = random.Random(0)
  x = [rng.choice(agreement.LABELS) for _ in range(200)]
  y = [u if rng.random() < 0.6 else rng.choice(agreement.LABELS) for u in x]
  assert agreement.cohens_kappa(x, y) == pytest.approx(textbook_kappa(x, y))
  assert agreement.cohens_kappa(["tie"] * 5, ["tie"] * 5) is None  # Undefined: one label only.


def study_files(tmp_path, n=40):
  """Two people and a judge on n items: bob agrees with alice on 3 of 4, the judge on 1 of 2."""
  rng = random.Random(1)
  alice = [rng.choice(agreement.LABELS) for _ in range(n)]
  bob = [u if i % 4 else rng.choice(("a", "b")) for i, u in enumerate(alice)]
  judge = [u if i % 2 else "b" for i, u in enumerate(alice)]
  people = [{"id": f"p{i}", "winner": w, "annotator": name} for name, labels in (("alice", alice), ("bob", bob))
            for i, w in enumerate(labels)]
  judged = [{"id": f"p{i}", "winner": w, "judge": "gpt-4"} for i, w in enumerate(judge)]
  return (write_jsonl(tmp_path / "people.jsonl", people), write_jsonl(tmp_path / "judge.jsonl", judged),
          alice, bob, judge)


def test_report_pairs_pooled_rows_and_intervals(tmp_path):
  people, judge_file, alice, bob, judge = study_files(tmp_path)
  carol = [{"id": f"p{i}", "winner": "tie", "annotator": "carol"} for i in range(0, 40, 2)]
  ratings = compare.read_ratings([people, judge_file, write_jsonl(tmp_path / "carol.jsonl", carol)])
  assert ratings.kinds == {"alice": "human", "bob": "human", "gpt-4": "judge", "carol": "human"}
  figures = agreement.report(ratings, resamples=2000, seed=3)
  pairs = {tuple(r["raters"]): r for r in figures["pairs"]}
  assert set(pairs) == {("gpt-4", "alice"), ("gpt-4", "bob"), ("gpt-4", "carol"), ("alice", "bob"),
                        ("alice", "carol"), ("bob", "carol")}
  ab = pairs[("alice", "bob")]
  assert ab["items"] == 40 and ab["accuracy"] == pytest.approx(agreement.tie_discounted_accuracy(alice, bob))
  assert ab["kappa"] == pytest.approx(agreement.cohens_kappa(alice, bob))
  assert pairs[("gpt-4", "carol")]["items"] == 20
  for row in figures["pairs"] + figures["pooled"]:
    low, high = row["accuracy_interval"]
    assert low <= row["accuracy"] <= high
    assert row["kappa_interval"][0] <= row["kappa"] <= row["kappa_interval"][1]
  pooled = {r["group"]: r for r in figures["pooled"]}
  assert set(pooled) == {"human - human", "gpt-4 - humans"}
  assert pooled["human - human"]["judgements"] == 40 + 20 + 20 and pooled["human - human"]["items"] == 40
  assert pooled["gpt-4 - humans"]["pairs"] == 3
  assert agreement.report(ratings, resamples=2000, seed=3) == figures  # Seeded.


def test_interval_narrows_with_more_items(tmp_path):
  widths = []
  for n in (20, 320):
    people, _, _, _, _ = study_files(tmp_path, n)
    (row,) = agreement.report(compare.read_ratings([people]), resamples=2000)["pairs"]
    widths.append(row["accuracy_interval"][1] - row["accuracy_interval"][0])
  assert widths[1] < widths[0] / 2.5  # About 1/sqrt(16) as wide.


def test_compare_agreement_command(tmp_path, capsys):
  people, judge_file, _, _, _ = study_files(tmp_path)
  assert compare.main(["agreement", people, judge_file, "--resamples", "500", "--json"]) == 0
  out = capsys.readouterr().out
  lines = out.splitlines()
  assert lines[0] == "agreement: 3 raters (95% bootstrap intervals over items)"
  assert any(line.lstrip().startswith("gpt-4 - humans (pooled, 2 pairs)") for line in lines), out
  figures = json.loads(lines[-1])
  assert figures["mode"] == "agreement" and figures["judgements"] == [people, judge_file]


def test_compare_agreement_bad_inputs(tmp_path, capsys):
  people, _, _, _, _ = study_files(tmp_path)
  again = write_jsonl(tmp_path / "again.jsonl", [{"id": "p3", "winner": "a", "annotator": "bob"}])
  assert compare.main(["agreement", people, again]) == 2
  assert f"again.jsonl:1: 'bob' judges id 'p3' again (first at {people}:44)" in capsys.readouterr().err
  prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "p0", "prompt": "x"}])
  assert compare.main(["agreement", people, "--prompts", prompts]) == 2
  assert "people.jsonl:2: id 'p1' is not in the prompts file" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:
    compare.main(["agreemnt", people])
  assert exit_info.value.code == 2 and "expected one of pairwise, absolute, likert, agreement" in capsys.readouterr().err


def test_a_lima_judge_file_is_one_model_judge_and_its_unparsed_lines_are_left_out(tmp_path, capsys):
  people = write_jsonl(tmp_path / "people.jsonl", [
      {"id": "p1", "winner": "a", "annotator": "ann"}, {"id": "p2", "winner": "b", "annotator": "ann"},
      {"id": "p3", "winner": "tie", "annotator": "ann"}])
  judged = write_jsonl(tmp_path / "judged.jsonl", [  # As lima-judge pairwise writes them.
      {"id": "p1", "judge_model": "gpt-4", "winner": "a", "unparsed": False},
      {"id": "p2", "judge_model": "gpt-4", "winner": "a", "unparsed": False},
      {"id": "p3", "judge_model": "gpt-4", "winner": None, "unparsed": True}])
  assert compare.main(["agreement", people, judged, "--json"]) == 0
  figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert figures["raters"]["gpt-4"] == {"kind": "judge", "items": 2}
  (pair,) = figures["pairs"]
  assert pair["items"] == 2 and pair["accuracy"] == pytest.approx(0.5)
