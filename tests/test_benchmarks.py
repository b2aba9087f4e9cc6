"""Every benchmark still runs: each script under benchmarks/ at its `--smoke` size, its JSON to a
temporary `--out` (never benchmarks/results/), so a README figure always has a command that works.

The convention every benchmark follows (a new one is picked up by the glob): `--smoke` runs the
smallest case that exercises every line (tiny shapes, one step, a tiny model), `--out PATH` says
where its JSON goes.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))


def test_the_glob_finds_the_benchmarks():
  assert {"benchmark_train.py", "benchmark_decode.py", "convert_speed.py"} <= {p.name for p in BENCHMARKS}


@pytest.mark.slow
@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_runs_at_its_smoke_size(script, tmp_path):
  out = tmp_path / f"{script.stem}.json"
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
  run = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, f"{script.name} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
  assert isinstance(json.loads(out.read_text()), dict)
