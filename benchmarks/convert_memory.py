"""Peak memory of `tools/convert_weights.py hf-to-orbax`, and forward throughput of a small model.

    python benchmarks/convert_memory.py [--models small,large] [--dtype bfloat16]
        [--max_shard_size 200MB] [--keep DIR]

Builds random LLaMA-shaped Hugging Face checkpoints in bfloat16 ("small": 8 layers of width
1024, 0.34 GB; "large": 16 layers of width 2048, 1.9 GB; sharded safetensors written tensor by
tensor so the builder itself stays small), converts each in a subprocess, and polls the
subprocess's resident set size (psutil, every 10 ms, plus the kernel's own high-water mark
`ru_maxrss`). The same is measured for converting a tiny model (same interpreter, imports and
code paths, ~no data): that is the baseline of Python + JAX + Orbax. Reports

  raw_ratio      = peak RSS / model bytes on disk
  marginal_ratio = (peak RSS - baseline peak RSS) / model bytes on disk

Whole-model converters score >= 1.0 on either. Then times a jitted forward pass of a small
config (tokens/s). Writes benchmarks/results/convert_memory.json and prints it.
"""

import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil

ROOT = pathlib.Path(__file__).resolve().parent.parent
from lima_jax import paths
from lima_jax import safetensors_io

TOOL = ROOT / "tools" / "convert_weights.py"
RESULTS = ROOT / "benchmarks" / "results" / "convert_memory.json"


def write_random_hf(directory: pathlib.Path, *, d_model, n_layers, mlp_dim, vocab, heads,
                    kv_heads, dtype, max_shard_bytes, seed=0) -> int:
  """A random LlamaForCausalLM directory; returns the bytes of its safetensors files."""
  from lima_jax import convert  # pylint: disable=g-import-not-at-top
  from lima_jax.model import ModelConfig  # pylint: disable=g-import-not-at-top
  config = ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=heads,
                       n_kv_heads=kv_heads, mlp_dim=mlp_dim)
  directory.mkdir(parents=True)
  maps = convert.param_maps(config)
  np_dtype = safetensors_io.FLOAT_DTYPES[{"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]]

  def blocks(shape, salt):
    rng = np.random.default_rng(seed + salt)
    rows = shape[0]
    row_elems = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    for start, stop in safetensors_io.iter_row_blocks(rows, row_elems * 4, 16 * 2**20):
      yield (0.02 * rng.standard_normal((stop - start,) + tuple(shape[1:]), np.float32)).astype(np_dtype)

  sources = [safetensors_io.TensorSource(name, np_dtype, m.hf_shape,
                                         lambda shape=m.hf_shape, salt=i: blocks(shape, salt))
             for i, (name, m, _) in enumerate(convert.hf_tensor_order(maps))]
  shards = safetensors_io.plan_shards(sources, max_shard_bytes)
  names = safetensors_io.shard_names(len(shards))
  for shard, name in zip(shards, names):
    safetensors_io.write_file(directory / name, shard)
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(s.nbytes for s in sources)},
             "weight_map": {s.name: n for shard, n in zip(shards, names) for s in shard}}
    (directory / convert.INDEX_FILE).write_text(json.dumps(index))
  hf_config = convert.model_config_to_hf_config(config, dtype=dtype)
  (directory / convert.CONFIG_FILE).write_text(json.dumps(hf_config))
  return sum((directory / n).stat().st_size for n in names)


def peak_rss_of(cmd: list[str]) -> dict:
  """Runs `cmd`, polling its RSS; returns peak bytes (polled and the kernel's ru_maxrss), time."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  start = time.perf_counter()
  before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  ps = psutil.Process(proc.pid)
  polled = 0
  while proc.poll() is None:
    try:
      polled = max(polled, ps.memory_info().rss)
    except psutil.Error:
      break
    time.sleep(0.01)
  out, err = proc.communicate()
  seconds = time.perf_counter() - start
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
  kernel = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
  # ru_maxrss of children is the max over all children so far; only trust it if it grew.
  kernel = kernel if kernel > before * 1024 else None
  return {"peak_rss_polled": polled, "peak_rss_kernel": kernel, "seconds": seconds,
          "stdout": out.decode().strip()}


def convert_cmd(hf_dir, ckpt_dir):
  return [sys.executable, str(TOOL), "hf-to-orbax", "--hf_dir", str(hf_dir), "--ckpt_dir", str(ckpt_dir)]


def forward_throughput(batch=4, seq=256, repeats=5) -> dict:
  """Tokens/s of a jitted forward pass of a small (~20M) LLaMA config, fp32, on this host's CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  from lima_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  config = model_lib.ModelConfig(vocab_size=32000, d_model=256, n_layers=4, n_heads=4,
                                 mlp_dim=704, max_seq_len=seq)
  params = model_lib.init_params(config, jax.random.key(0))
  forward = jax.jit(lambda p, t: model_lib.bind(config, p)(t))
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq), dtype=np.int32)
  forward(params, tokens).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    forward(params, tokens).block_until_ready()
    times.append(time.perf_counter() - start)
  best = min(times)
  return {"config": {k: getattr(config, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_dim")},
          "params_m": config.num_params() / 1e6, "batch": batch, "seq": seq,
          "best_seconds": best, "tokens_per_s": batch * seq / best, "device": str(jax.devices()[0])}


# LLaMA-shaped models (bf16, 32000 vocab): a few hundred MB, and one large enough that the
# interpreter's own ~0.25 GB stops dominating the raw ratio.
MODELS = {
    "small": dict(d_model=1024, n_layers=8, mlp_dim=2816, vocab=32000, heads=16, kv_heads=0),
    "large": dict(d_model=2048, n_layers=16, mlp_dim=5632, vocab=32000, heads=16, kv_heads=0),
}
SMOKE_MODEL = dict(d_model=128, n_layers=2, mlp_dim=256, vocab=1024, heads=4, kv_heads=0)


def measure(work: pathlib.Path, name: str, shape: dict, baseline_peak: int) -> dict:
  model_bytes = write_random_hf(work / f"hf_{name}", **shape)
  run = peak_rss_of(convert_cmd(work / f"hf_{name}", work / f"ckpt_{name}"))
  ckpt_bytes = sum(p.stat().st_size for p in (work / f"ckpt_{name}").rglob("*") if p.is_file())
  peak = max(run["peak_rss_polled"], run["peak_rss_kernel"] or 0)
  return {
      "model": {k: v for k, v in shape.items() if k != "max_shard_bytes"},
      "model_bytes_on_disk": model_bytes,
      "checkpoint_bytes": ckpt_bytes,
      "convert_seconds": round(run["seconds"], 2),
      "peak_rss_bytes": peak,
      "raw_ratio": round(peak / model_bytes, 3),
      "marginal_ratio": round((peak - baseline_peak) / model_bytes, 3),
      "peak_rss_sources": {"polled": run["peak_rss_polled"], "kernel_ru_maxrss": run["peak_rss_kernel"]},
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="small,large", help=f"comma list of {sorted(MODELS)}")
  parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
  parser.add_argument("--max_shard_size", default="200MB")
  parser.add_argument("--keep", default="", help="work here instead of a deleted temp dir")
  parser.add_argument("--smoke", action="store_true", help="the smallest run that exercises every line (the test suite's smoke test)")
  parser.add_argument("--out", default=str(RESULTS), help="the JSON file to write")
  args = parser.parse_args()
  models = {"smoke": SMOKE_MODEL} if args.smoke else MODELS
  names = ["smoke"] if args.smoke else [n for n in args.models.split(",") if n]
  unknown = set(names) - set(models)
  if unknown:
    parser.error(f"--models: unknown {sorted(unknown)}; choose from {sorted(MODELS)}")
  common = dict(dtype=args.dtype, max_shard_bytes=safetensors_io.parse_size(args.max_shard_size))

  with tempfile.TemporaryDirectory(prefix="convert_memory-") as tmp:
    work = pathlib.Path(args.keep or tmp)
    work.mkdir(parents=True, exist_ok=True)
    # Baseline first: ru_maxrss of children only grows, so bigger runs must come after it.
    tiny = dict(common, d_model=64, n_layers=2, mlp_dim=128, vocab=512, heads=4, kv_heads=0)
    write_random_hf(work / "hf_tiny", **tiny)
    baseline = peak_rss_of(convert_cmd(work / "hf_tiny", work / "ckpt_tiny"))
    base = max(baseline["peak_rss_polled"], baseline["peak_rss_kernel"] or 0)
    runs = {}
    for name in sorted(names, key=lambda n: list(models).index(n)):
      runs[name] = measure(work, name, dict(common, **models[name]), base)
      print(f"{name}: {json.dumps(runs[name])}", file=sys.stderr)

  result = {
      "command": "python benchmarks/convert_memory.py " + " ".join(sys.argv[1:]),
      "host": {"cpus": os.cpu_count(), "machine": platform.machine(),
               "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
               "load_average_1m": round(os.getloadavg()[0], 1)},
      "baseline": {"what": "hf-to-orbax of a 2-layer 64-wide model (interpreter + JAX + Orbax)",
                   "peak_rss_bytes": base,
                   "peak_rss_sources": {"polled": baseline["peak_rss_polled"],
                                        "kernel_ru_maxrss": baseline["peak_rss_kernel"]}},
      "runs": runs,
      "forward": forward_throughput(batch=1, seq=32, repeats=1) if args.smoke else forward_throughput(),
  }
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  paths.write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
