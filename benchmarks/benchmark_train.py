"""Training-step throughput on this machine, beside MaxText's figure for the same model.

The config is the one MaxText was measured with: d_model 512, 8 layers, 8 heads of 64 (MHA), MLP
1408, vocab 32000, sequence 512, batch 4, float32, one CPU device, synthetic tokens, the LIMA AdamW
update. The
step is the one `python -m lima_jax.train` runs (`lima_jax.train_step.make_train_step`). Achieved
FLOP/s use the analytic count of `lima_jax.flops.train_flops` (as the training log's MFU) and are
set beside a jitted float32 2048^3 matmul timed in the same process, since a shared CPU's speed
drifts.

Both optimizer steps run, their timed steps alternating in this one process (the shared
machine's speed drifts): the fused step (`lima_jax.fused_update`, each layer's AdamW update in
the backward pass; what training runs) and the ordinary one (whole gradient, then the update).
Each reports the compiled step's memory analysis (peak live bytes, temporaries).

    python benchmarks/benchmark_train.py [--steps 5] [--out benchmarks/results/train.json]
    python benchmarks/benchmark_train.py --smoke      # a tiny model, in seconds
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
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


REFERENCE_SHAPE = dict(vocab_size=32000, d_model=512, n_layers=8, n_heads=8, head_dim=64, mlp_dim=1408)
SMOKE_SHAPE = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, head_dim=16, mlp_dim=128)
UPDATES = ("fused", "ordinary")


def reference_config(args):
  config = common.load_config(common.resolve_config_spec("tiny"))
  config.model.update(dict(
      **(SMOKE_SHAPE if args.smoke else REFERENCE_SHAPE),
      max_seq_len=args.seq_len, dtype="float32", param_dtype="float32",
      remat_policy=args.remat, scan_layers=not args.unroll, residual_dropout=args.dropout))
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


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=5, help="timed steps of each optimizer step")
  parser.add_argument("--warmup", type=int, default=3,
                      help="untimed steps first (the first one compiles)")
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--remat", default="none", help="model.remat_policy")
  parser.add_argument("--dropout", type=float, default=0.0, help="model.residual_dropout")
  parser.add_argument("--unroll", action="store_true", help="scan_layers=False")
  parser.add_argument("--smoke", action="store_true",
                      help="a tiny model (d_model 64, 2 layers, 32 tokens, 2 rows), 2 steps: seconds")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "train.json"))
  args = parser.parse_args()
  if args.smoke:
    args.steps, args.warmup, args.batch_size, args.seq_len = 2, 1, 2, 32
    if args.out == parser.get_default("out"):
      args.out = os.path.join(tempfile.mkdtemp(prefix="benchmark_train_"), "train.json")
  return args


def compiled_step(config, model_config, mesh, update: str, batch):
  """The jitted step of `update` ("fused" or "ordinary"), a fresh state, and its memory analysis."""
  config.train.fused_update = update == "fused"
  step_fn, _, batch_shardings = train_step.make_train_step(config, model_config, mesh, total_steps=1000)
  if train_step.update_kind(config, model_config) != update:
    raise SystemExit(f"the {update} step does not apply to this config")
  state = train_step.init_train_state(config, model_config, mesh, seed=0, total_steps=1000)
  batch = {k: jax.device_put(v, batch_shardings[k]) for k, v in batch.items()}
  mem = step_fn.lower(state, batch).compile().memory_analysis()
  # The outputs alias the donated arguments, so arguments + temporaries is what the step holds
  # at most (XLA:CPU's peak_memory_in_bytes counts only the arguments).
  memory = {"peak_bytes": int(getattr(mem, "peak_memory_in_bytes", 0)),
            "temporaries_bytes": int(mem.temp_size_in_bytes),
            "arguments_bytes": int(mem.argument_size_in_bytes),
            "live_bytes": int(mem.argument_size_in_bytes + mem.temp_size_in_bytes)}
  return step_fn, state, batch, memory


def timed_steps(args, steps: dict) -> dict:
  """Warms each step up, then times them alternately; per update: wall and CPU times, losses."""
  runs = {u: {"times": [], "cpu": [], "losses": []} for u in steps}
  compile_s = {}
  for update, step in steps.items():
    start = time.perf_counter()
    for _ in range(args.warmup):  # The first step compiles; the next map XLA's fresh buffers.
      step["state"], m = step["fn"](step["state"], step["batch"])
      jax.block_until_ready(m)
    compile_s[update] = time.perf_counter() - start
  faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(args.steps):
    for update, step in steps.items():
      wall, cpu = time.perf_counter(), time.process_time()
      step["state"], m = step["fn"](step["state"], step["batch"])
      runs[update]["losses"].append(float(m["loss"]))  # Fetching the loss waits for the step.
      runs[update]["times"].append(time.perf_counter() - wall)
      runs[update]["cpu"].append(time.process_time() - cpu)
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / (args.steps * len(steps))
  return {"runs": runs, "warmup_s": compile_s, "page_faults_per_step": faults}


def main():
  args = parse_args()
  config = reference_config(args)
  model_config = model_lib.ModelConfig.from_dict(config.model)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  matmul_n = 256 if args.smoke else 2048
  peak_before, per_cpu_before = matmul_flops(matmul_n)

  batch = synthetic_batch(config, model_config.vocab_size)
  steps, memory = {}, {}
  for update in UPDATES:
    fn, state, device_batch, memory[update] = compiled_step(config, model_config, mesh, update, batch)
    steps[update] = {"fn": fn, "state": state, "batch": device_batch}
  timing = timed_steps(args, steps)
  peak_after, per_cpu_after = matmul_flops(matmul_n)
  load = os.getloadavg()[0]

  tokens = config.train.batch_size * config.data.max_len
  step_flops = flops.train_flops(model_config, config.train.batch_size, config.data.max_len)["model"]
  matmul = max(peak_before, peak_after)
  per_update = {}
  for update in UPDATES:
    run = timing["runs"][update]
    per_update[update] = {
        "step_time_s": {"median": statistics.median(run["times"]), "min": min(run["times"]),
                        "max": max(run["times"]), "all": run["times"]},
        "cpu_seconds_per_step": min(run["cpu"]), "memory": memory[update],
        "losses": run["losses"], "warmup_s": timing["warmup_s"][update]}
  fused, ordinary = per_update["fused"], per_update["ordinary"]
  step_s = fused["step_time_s"]["median"]
  # Paired: step i of each ran back to back, so their ratio sees the same machine load.
  ratios = [f / o for f, o in zip(timing["runs"]["fused"]["times"], timing["runs"]["ordinary"]["times"])]
  result = {
      "config": {**{k: int(config.model[k]) for k in REFERENCE_SHAPE}, "seq_len": args.seq_len,
                 "batch_size": args.batch_size, "dtype": "float32", "remat_policy": args.remat,
                 "scan_layers": not args.unroll, "residual_dropout": args.dropout, "devices": 1,
                 "smoke": args.smoke, "params": model_config.num_params(),
                 "matmul_params": model_config.num_params(False)},
      "updates": per_update,
      "fused_over_ordinary": {
          "step_time_median_ratio": step_s / ordinary["step_time_s"]["median"],
          "step_time_paired_ratio_median": statistics.median(ratios),
          "cpu_time_ratio": fused["cpu_seconds_per_step"] / ordinary["cpu_seconds_per_step"],
          "live_bytes_saved": ordinary["memory"]["live_bytes"] - fused["memory"]["live_bytes"],
          "param_bytes": model_config.num_params() * 4,
          "layer_param_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
              model_lib.abstract_params(model_config)["layers"])),
          "target_step_time_ratio": 1.05},
      # The step training runs (the fused one), as before: throughput and the matmul comparison.
      "step_time_s": fused["step_time_s"],
      "tokens_per_s": tokens / step_s,
      "model_flops_per_step": step_flops,
      "achieved_flops_per_s": step_flops / step_s,
      f"matmul_{matmul_n}_flops_per_s": {"before": peak_before, "after": peak_after, "used": matmul},
      "fraction_of_matmul": step_flops / step_s / matmul,
      "warmup_steps": args.warmup,
      # The machine is shared: CPU time is less sensitive to other processes than wall time.
      "cpu_seconds_per_step": fused["cpu_seconds_per_step"],
      "matmul_flops_per_cpu_second": max(per_cpu_before, per_cpu_after),
      "fraction_of_matmul_per_cpu_second": step_flops / fused["cpu_seconds_per_step"] / max(
          per_cpu_before, per_cpu_after),
      "load_average_1min": load,
      "page_faults_per_step": timing["page_faults_per_step"],
      "malloc_env": {k: os.environ.get(k) for k in process.CPU_ALLOCATOR_ENV},
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
  ratio = result["fused_over_ordinary"]
  for update in UPDATES:
    u = per_update[update]
    print(f"{update:8s} step {u['step_time_s']['median']:.3f} s (min {u['step_time_s']['min']:.3f}), "
          f"live {u['memory']['live_bytes'] / 2**20:.0f} MiB (arguments "
          f"{u['memory']['arguments_bytes'] / 2**20:.0f} + temporaries "
          f"{u['memory']['temporaries_bytes'] / 2**20:.0f})")
  print(f"fused / ordinary: step time {ratio['step_time_paired_ratio_median']:.3f} (paired median), "
        f"CPU time {ratio['cpu_time_ratio']:.3f}; {ratio['live_bytes_saved'] / 2**20:.0f} MiB less live "
        f"(the layers' fp32 weights are {ratio['layer_param_bytes'] / 2**20:.0f} MiB, all weights "
        f"{ratio['param_bytes'] / 2**20:.0f} MiB)")
  print(f"fused: {tokens / step_s:.0f} tokens/s ({tokens / step_s / MAXTEXT_TOKENS_PER_S:.2f}x MaxText's "
        f"{MAXTEXT_TOKENS_PER_S:.0f}), {step_flops / step_s / 1e9:.1f} GFLOP/s = "
        f"{step_flops / step_s / matmul:.2f} of the {matmul / 1e9:.1f} GFLOP/s matmul; per CPU-second "
        f"{result['fraction_of_matmul_per_cpu_second']:.2f} of the matmul's; load average "
        f"{load:.1f} -> {args.out}")


if __name__ == "__main__":
  main()
