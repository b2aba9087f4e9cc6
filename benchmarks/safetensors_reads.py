"""Resident memory of reading a safetensors shard block by block: the library's mapping vs positioned reads.

    python benchmarks/safetensors_reads.py [--gib 1]

Writes one shard of 128 MiB float16 tensors (`--gib` in all), then reads every tensor in blocks
of 512 rows three ways, each in a fresh process, polling RSS after every block:

  library_one_handle  `safetensors.safe_open(path, "numpy")` once, `get_slice(name)[a:b]`,
  library_per_tensor  a new `safe_open` for each tensor,
  library_per_block   a new `safe_open` for each block,
  positioned_reads    `lima_jax.safetensors_io.SafetensorsFile.read_rows` (`readinto` at an offset).

Reports the peak RSS above the process's RSS before reading and the seconds taken (the shard is
in the page cache), and whether the library's NumPy path returns bfloat16 once ml_dtypes (which
lima_jax imports) has registered it. Writes benchmarks/results/safetensors_reads.json.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from lima_jax import paths

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "safetensors_reads.json"
ROWS, COLS, BLOCK = 8192, 8192, 512


def _write(path: pathlib.Path, n_tensors: int) -> None:
  from lima_jax import safetensors_io  # pylint: disable=g-import-not-at-top
  block = np.random.default_rng(0).standard_normal((1024, COLS)).astype(np.float16)
  sources = [safetensors_io.TensorSource(f"t{i}", np.float16, (ROWS, COLS),
                                         lambda: (block for _ in range(ROWS // 1024)))
             for i in range(n_tensors)]
  safetensors_io.write_file(path, sources)


def _measure(mode: str, path: str, n_tensors: int) -> None:
  """Runs in a child process: prints peak RSS growth in bytes."""
  import psutil  # pylint: disable=g-import-not-at-top
  import safetensors  # pylint: disable=g-import-not-at-top
  from lima_jax import safetensors_io  # pylint: disable=g-import-not-at-top
  proc = psutil.Process()
  base = peak = proc.memory_info().rss
  start_time = time.perf_counter()
  names = [f"t{i}" for i in range(n_tensors)]
  if mode == "library_one_handle":
    with safetensors.safe_open(path, framework="numpy") as f:
      for name in names:
        view = f.get_slice(name)
        for start in range(0, ROWS, BLOCK):
          block = view[start:start + BLOCK]
          del block
          peak = max(peak, proc.memory_info().rss)
  elif mode == "library_per_block":
    for name in names:
      for start in range(0, ROWS, BLOCK):
        with safetensors.safe_open(path, framework="numpy") as f:
          block = f.get_slice(name)[start:start + BLOCK]
        del block
        peak = max(peak, proc.memory_info().rss)
  elif mode == "library_per_tensor":
    for name in names:
      with safetensors.safe_open(path, framework="numpy") as f:
        view = f.get_slice(name)
        for start in range(0, ROWS, BLOCK):
          block = view[start:start + BLOCK]
          del block
          peak = max(peak, proc.memory_info().rss)
  else:
    f = safetensors_io.SafetensorsFile(path)
    for name in names:
      for start in range(0, ROWS, BLOCK):
        block = f.read_rows(name, start, start + BLOCK)
        del block
        peak = max(peak, proc.memory_info().rss)
  print(peak - base, time.perf_counter() - start_time)


def _bfloat16_through_numpy(directory: pathlib.Path) -> str:
  import safetensors  # pylint: disable=g-import-not-at-top
  from lima_jax import safetensors_io  # pylint: disable=g-import-not-at-top
  path = directory / "bf16.safetensors"
  dtype = safetensors_io.FLOAT_DTYPES["BF16"]
  safetensors_io.write_file(path, [safetensors_io.TensorSource("x", dtype, (4,), lambda: [np.ones(4, dtype)])])
  try:
    with safetensors.safe_open(str(path), framework="numpy") as f:
      f.get_slice("x")[0:2]
    return "ok"
  except TypeError as e:
    return f"TypeError: {e}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--gib", type=int, default=1, help="shard size in GiB (128 MiB tensors)")
  parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
  parser.add_argument("--smoke", action="store_true", help="the smallest run that exercises every line (the test suite's smoke test)")
  parser.add_argument("--out", default=str(RESULTS), help="the JSON file to write")
  args = parser.parse_args()
  if args.child:
    _measure(args.child[0], args.child[1], int(args.child[2]))
    return
  n_tensors = 1 if args.smoke else 8 * args.gib
  with tempfile.TemporaryDirectory(prefix="safetensors_reads-") as tmp:
    path = pathlib.Path(tmp) / "shard.safetensors"
    _write(path, n_tensors)
    result = {"command": "python benchmarks/safetensors_reads.py " + " ".join(sys.argv[1:]),
              "shard_bytes": path.stat().st_size, "block_rows": BLOCK,
              "tensor_bytes": ROWS * COLS * 2, "peak_rss_growth_bytes": {}, "seconds": {}}
    for mode in ("library_one_handle", "library_per_tensor", "library_per_block", "positioned_reads"):
      out = subprocess.run([sys.executable, __file__, "--child", mode, str(path), str(n_tensors)],
                           check=True, capture_output=True, text=True).stdout
      growth, seconds = out.split()[-2:]
      result["peak_rss_growth_bytes"][mode] = int(growth)
      result["seconds"][mode] = round(float(seconds), 3)
    result["library_numpy_bfloat16"] = _bfloat16_through_numpy(pathlib.Path(tmp))
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  paths.write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
