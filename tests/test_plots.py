"""lima-compare --plot: the paper's figures 1, 3 and 5/6 as PNG files, read back as pixels."""

import json

import numpy as np
import pytest
from matplotlib import image

from lima_jax import plots
from lima_jax.cli import compare
from lima_jax.judge import summaries


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _share_of_colour(png, hex_colour):
  pixels = image.imread(png)[..., :3]
  rgb = np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
  return float(np.mean(np.all(np.abs(pixels - rgb) < 0.02, axis=-1)))


def test_pairwise_figure_has_a_bar_a_baseline(tmp_path, capsys):
  strong = [{"id": str(i), "winner": "a" if i < 8 else "b", "b_generator": "weak"} for i in range(10)]
  weak = [{"id": str(i), "winner": "a" if i < 2 else "tie", "b_generator": "strong"} for i in range(10)]
  files = f"{_write(tmp_path / 'x.jsonl', strong)},{_write(tmp_path / 'y.jsonl', weak)}"
  png = tmp_path / "figure1.png"
  assert compare.main(["pairwise", files, "--a_name", "LIMA", "--plot", str(png)]) == 0
  out = capsys.readouterr().out
  assert "weak wins" in out and "strong wins" in out and f"wrote {png}" in out
  for colour in plots.PAIRWISE_COLOURS.values():
    assert _share_of_colour(png, colour) > 0.01
  # 10 a-wins of 20 judgements in all, 2 b: blue covers about five times the orange area.
  blue, orange = (_share_of_colour(png, plots.PAIRWISE_COLOURS[c]) for c in ("a", "b"))
  assert 3 < blue / orange < 7


def test_absolute_figure(tmp_path):
  labels = [{"id": str(i), "label": ["fail", "pass", "excellent", "pass"][i % 4]} for i in range(8)]
  png = tmp_path / "figure3.png"
  assert compare.main(["absolute", _write(tmp_path / "l.jsonl", labels), "--plot", str(png)]) == 0
  shares = {c: _share_of_colour(png, hex) for c, hex in plots.ABSOLUTE_COLOURS.items()}
  assert shares["pass"] == pytest.approx(2 * shares["fail"], rel=0.15)


@pytest.mark.parametrize("names,line", [(["likert-n16", "likert-n256", "likert-n64"], True),
                                        (["stack", "wikihow"], False)])
def test_likert_figure_against_examples_or_as_bars(tmp_path, names, line):
  files = [_write(tmp_path / f"{n}.jsonl", [{"id": str(i), "score": 2 + (i + k) % 4} for i in range(6)])
           for k, n in enumerate(names)]
  assert [summaries.examples_of(f) for f in files] == ([16, 256, 64] if line else [None, None])
  png = tmp_path / "figure6.png"
  assert compare.main(["likert", ",".join(files), "--plot", str(png)]) == 0
  bar_area = _share_of_colour(png, plots.PAIRWISE_COLOURS["a"])
  assert (bar_area < 0.02) if line else (bar_area > 0.05)  # A line with markers, or filled bars.


def test_examples_field_wins_over_the_file_name(tmp_path):
  path = _write(tmp_path / "run-7.jsonl", [{"id": "1", "score": 3, "examples": 2000}])
  assert summaries.examples_of(path) == 2000


def test_glob_that_matches_nothing_is_bad_input(tmp_path, capsys):
  assert compare.main(["likert", str(tmp_path / "none-*.jsonl")]) == 2
  assert "no file matches" in capsys.readouterr().err
