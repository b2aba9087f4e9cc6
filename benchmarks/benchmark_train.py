"""Training-step throughput on this machine, beside MaxText's figure for the same model.

The config is the one MaxText was measured with: d_model 512, 8 layers, 8 heads of 64 (MHA), MLP
1408, vocab 32000, sequence 512, batch 4, float32, one CPU device, synthetic tokens, the LIMA AdamW
update. The
step is the one `python -m lima_jax.train` runs (`lima_jax.train_step.make_train_step`). Achieved
FLOP/s use the analytic count of `lima_jax.flops.train_flops` (as the training log's MFU) and are
set beside a jitted float32 2048^3 matmul timed in the same process, since a shared CPU's speed
drifts.

    python benchmarks/benchmark_train.py [--steps 5] [--out benchmarks/results/train.json]
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

from lima_jax import process

process.default_to_cpu_without_tpu(log=True)
process.restart_with_cpu_allocator(log=True)  # Keeps XLA's per-step buffers mapped, as training does.

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from lima_jax import flops  # pylint: disable=wrong-import-position
from lima_jax import model as model_lib  # pylint: disable=wrong-import-position
from lima_jax import sharding  # pylint: disable=wrong-import-position
from lima_jax import train_step  # pylint: disable=wrong-import-position
from lima_jax.cli import common  # pylint: disable=wrong-import-position

# MaxText 0.2.5's train step on this config on the project's 2-core machine (2026-11-25, its logged
# step time, remat full): 5.55 s a step for 4 x 512 tokens = 368 tokens/s. It drifts with the
# machine (6.2-7.2 s a step on 2026-12-02), so the ratio is indicative, not a same-run figure.
MAXTEXT_TOKENS_PER_S = 368.0


def reference_config(args):
  config = common.load_config(common.resolve_config_spec("tiny"))
  config.model.update(dict(
      vocab_size=32000, d_model=512, n_layers=8, n_heads=8, head_dim=64, mlp_dim=1408,
      max_seq_len=args.seq_len, dtype="float32", param_dtype="float32",
      remat_policy=args.remat, scan_layers=not args.unroll, residual_dropout=args.dropout))
  if getattr(args, "smoke", False):  # The smallest run that exercises every line.
    config.model.update(dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, head_dim=16, mlp_dim=128))
  config.data.max_len = args.seq_len
  config.train.batch_size = args.batch_size
  config.train.micro_batches = 1
  config.optimizer.lr = 1e-5
  config.optimizer.end_lr = 1e-6
  config.mesh.update(dict(data=1, fsdp=1, sequence=1, tensor=1))
  return config


def synthetic_batch(config, vocab_size: int, seed: int = 0):
  b, s = config.train.batch_size, config.data.max_len
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab_size, (b, s + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": np.ones((b, s), np.float32),
          "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
          "segment_ids": np.ones((b, s), np.int32)}


def matmul_flops(n: int = 2048, repeats: int = 5) -> tuple[float, float]:
  """(FLOP/s, FLOP per CPU-second) of a jitted float32 n^3 matmul, best of `repeats`."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  fn = jax.jit(lambda x: x @ x)
  fn(a).block_until_ready()
  walls, cpus = [], []
  for _ in range(repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    fn(a).block_until_ready()
    walls.append(time.perf_counter() - wall)
    cpus.append(time.process_time() - cpu)
  return 2 * n ** 3 / min(walls), 2 * n ** 3 / min(cpus)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=5, help="timed steps")
  parser.add_argument("--warmup", type=int, default=3,
                      help="untimed steps first (the first one compiles)")
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--remat", default="none", help="model.remat_policy")
  parser.add_argument("--dropout", type=float, default=0.0, help="model.residual_dropout")
  parser.add_argument("--unroll", action="store_true", help="scan_layers=False")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "train.json"))
  parser.add_argument("--smoke", action="store_true", help="the smallest run that exercises every line (the test suite's smoke test)")
  args = parser.parse_args()
  if args.smoke:
    args.steps, args.warmup, args.batch_size, args.seq_len = 1, 1, 2, 32

  config = reference_config(args)
  model_config = model_lib.ModelConfig.from_dict(config.model)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  peak_before, per_cpu_before = matmul_flops()

  start = time.perf_counter()
  step_fn, _, batch_shardings = train_step.make_train_step(config, model_config, mesh, total_steps=1000)
  state = train_step.init_train_state(config, model_config, mesh, seed=0, total_steps=1000)
  batch = {k: jax.device_put(v, batch_shardings[k])
           for k, v in synthetic_batch(config, model_config.vocab_size).items()}
  state, m = step_fn(state, batch)
  jax.block_until_ready(m)
  compile_and_first_s = time.perf_counter() - start
  # More untimed steps: the first few runs may still map fresh memory for XLA's buffers (a few
  # seconds of page faults each) until the heap settles; then it is reused, as in a long run.
  for _ in range(args.warmup - 1):
    state, m = step_fn(state, batch)
    jax.block_until_ready(m)

  times, cpu_times, losses = [], [], []
  faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(args.steps):
    wall, cpu = time.perf_counter(), time.process_time()
    state, m = step_fn(state, batch)
    losses.append(float(m["loss"]))  # Fetching the loss waits for the step.
    times.append(time.perf_counter() - wall)
    cpu_times.append(time.process_time() - cpu)
  page_faults_per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / args.steps
  peak_after, per_cpu_after = matmul_flops()
  load = os.getloadavg()[0]

  step_s = statistics.median(times)
  tokens = config.train.batch_size * config.data.max_len
  step_flops = flops.train_flops(model_config, config.train.batch_size, config.data.max_len)["model"]
  matmul = max(peak_before, peak_after)
  result = {
      "config": {"d_model": 512, "n_layers": 8, "n_heads": 8, "head_dim": 64, "mlp_dim": 1408,
                 "vocab_size": 32000, "seq_len": args.seq_len, "batch_size": args.batch_size,
                 "dtype": "float32", "remat_policy": args.remat, "scan_layers": not args.unroll,
                 "residual_dropout": args.dropout, "devices": 1,
                 "params": model_config.num_params(), "matmul_params": model_config.num_params(False)},
      "step_time_s": {"median": step_s, "min": min(times), "max": max(times), "all": times},
      "tokens_per_s": tokens / step_s,
      "model_flops_per_step": step_flops,
      "achieved_flops_per_s": step_flops / step_s,
      "matmul_2048_flops_per_s": {"before": peak_before, "after": peak_after, "used": matmul},
      "fraction_of_matmul": step_flops / step_s / matmul,
      "compile_and_first_step_s": compile_and_first_s,
      "warmup_steps": args.warmup,
      # The machine is shared: CPU time is less sensitive to other processes than wall time.
      "cpu_seconds_per_step": min(cpu_times),
      "matmul_flops_per_cpu_second": max(per_cpu_before, per_cpu_after),
      "fraction_of_matmul_per_cpu_second": step_flops / min(cpu_times) / max(per_cpu_before, per_cpu_after),
      "load_average_1min": load,
      "page_faults_per_step": page_faults_per_step,
      "malloc_env": {k: os.environ.get(k) for k in process.CPU_ALLOCATOR_ENV},
      "losses": losses,
      "vs_maxtext": {"maxtext_tokens_per_s": MAXTEXT_TOKENS_PER_S,
                     "speedup": tokens / step_s / MAXTEXT_TOKENS_PER_S,
                     "target_speedup": 1.2, "target_fraction_of_matmul": 0.6},
      "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                  "jax": jax.__version__, "device": str(jax.devices()[0])},
      "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  tmp = args.out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, args.out)
  print(f"step {step_s:.3f} s (min {min(times):.3f}), {tokens / step_s:.0f} tokens/s "
        f"({tokens / step_s / MAXTEXT_TOKENS_PER_S:.2f}x MaxText's {MAXTEXT_TOKENS_PER_S:.0f}), "
        f"{step_flops / step_s / 1e9:.1f} GFLOP/s = {step_flops / step_s / matmul:.2f} of the "
        f"{matmul / 1e9:.1f} GFLOP/s matmul; per CPU-second "
        f"{result['fraction_of_matmul_per_cpu_second']:.2f} of the matmul's; load average "
        f"{load:.1f}; compile+first step {compile_and_first_s:.1f} s -> {args.out}")


if __name__ == "__main__":
  main()
