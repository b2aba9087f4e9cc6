"""LoRA's training step beside full fine-tuning, on benchmark_train.py's 58M CPU config.

Both steps are `lima_jax.train_step.make_train_step` on the same synthetic batch (d_model 512, 8
layers, vocab 32000, sequence 512, batch 4, float32 compute, one CPU device), timed alternately
so that a shared CPU's drift hits both alike. Memory is the compiled step's own account
(`memory_analysis()`: arguments = the train state, temporaries = activations and gradients) and
the state's bytes by part (weights, optimizer moments, frozen base).

    python benchmarks/benchmark_lora.py [--rank 16] [--steps 5] [--out benchmarks/results/lora.json]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

from lima_jax import process

process.default_to_cpu_without_tpu()
process.restart_with_cpu_allocator()

import jax  # pylint: disable=wrong-import-position

from benchmarks import benchmark_train  # pylint: disable=wrong-import-position
from lima_jax import flops  # pylint: disable=wrong-import-position
from lima_jax import lora as lora_lib  # pylint: disable=wrong-import-position
from lima_jax import model as model_lib  # pylint: disable=wrong-import-position
from lima_jax import sharding  # pylint: disable=wrong-import-position
from lima_jax import train_step  # pylint: disable=wrong-import-position


def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def build(config, model_config, mesh, batch_host):
  step_fn, _, batch_shardings = train_step.make_train_step(config, model_config, mesh, total_steps=1000)
  state = train_step.init_train_state(config, model_config, mesh, seed=0, total_steps=1000)
  batch = {k: jax.device_put(v, batch_shardings[k]) for k, v in batch_host.items()}
  compiled = step_fn.lower(state, batch).compile()
  mem = compiled.memory_analysis()
  memory = {"arguments_bytes": int(mem.argument_size_in_bytes),
            "temporaries_bytes": int(mem.temp_size_in_bytes),
            "trainable_bytes": tree_bytes(state.params),
            "optimizer_state_bytes": tree_bytes(state.opt_state),
            "frozen_base_bytes": tree_bytes(state.frozen) if state.frozen is not None else 0}
  return compiled, state, batch, memory


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--alpha", type=float, default=16.0)
  parser.add_argument("--base_dtype", default="bfloat16")
  parser.add_argument("--steps", type=int, default=5, help="timed steps of each")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each first")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "lora.json"))
  parser.add_argument("--smoke", action="store_true", help="the smallest run that exercises every line (the test suite's smoke test)")
  args = parser.parse_args()
  bench_args = argparse.Namespace(seq_len=512, batch_size=4, remat="none", unroll=False, dropout=0.0,
                                  smoke=args.smoke)
  if args.smoke:
    args.rank, args.steps, args.warmup = 2, 1, 1
    bench_args.seq_len, bench_args.batch_size = 32, 2
  config = benchmark_train.reference_config(bench_args)
  full_config = model_lib.ModelConfig.from_dict(config.model)
  lora_config = full_config.replace(
      param_dtype=args.base_dtype,
      lora=lora_lib.LoraConfig(rank=args.rank, alpha=args.alpha,
                               token_ids=(full_config.vocab_size - 1,)))
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  batch_host = benchmark_train.synthetic_batch(config, full_config.vocab_size)

  runs = {}
  for name, model_config in (("full", full_config), ("lora", lora_config)):
    start = time.perf_counter()
    compiled, state, batch, memory = build(config, model_config, mesh, batch_host)
    for _ in range(args.warmup):
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
    runs[name] = {"compiled": compiled, "state": state, "batch": batch, "memory": memory,
                  "times": [], "losses": [], "compile_and_warmup_s": time.perf_counter() - start,
                  "model_config": model_config}
  for _ in range(args.steps):  # Alternate, so drift in the CPU's speed hits both alike.
    for run in runs.values():
      wall = time.perf_counter()
      run["state"], m = run["compiled"](run["state"], run["batch"])
      run["losses"].append(float(m["loss"]))
      run["times"].append(time.perf_counter() - wall)

  tokens = config.train.batch_size * config.data.max_len
  result = {"config": {"d_model": 512, "n_layers": 8, "n_heads": 8, "mlp_dim": 1408,
                       "vocab_size": 32000, "seq_len": 512, "batch_size": 4, "dtype": "float32",
                       "remat_policy": "none", "devices": 1, "params": full_config.num_params(),
                       "lora_rank": args.rank, "lora_alpha": args.alpha,
                       "lora_targets": list(lora_lib.TARGETS), "lora_base_dtype": args.base_dtype,
                       "lora_trainable_params": lora_lib.num_trainable(lora_config)},
            "command": "python benchmarks/benchmark_lora.py " + " ".join(sys.argv[1:]),
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "jax": jax.__version__},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  for name, run in runs.items():
    median = statistics.median(run["times"])
    step_flops = flops.train_flops(run["model_config"], config.train.batch_size, config.data.max_len)
    result[name] = {"step_time_s": {"median": median, "all": run["times"]},
                    "tokens_per_s": tokens / median, "model_flops_per_step": step_flops["model"],
                    "memory": run["memory"], "losses": run["losses"],
                    "compile_and_warmup_s": run["compile_and_warmup_s"]}
  full, lora = result["full"], result["lora"]
  result["lora_vs_full"] = {
      "step_time": lora["step_time_s"]["median"] / full["step_time_s"]["median"],
      "arguments_bytes": lora["memory"]["arguments_bytes"] / full["memory"]["arguments_bytes"],
      "temporaries_bytes": lora["memory"]["temporaries_bytes"] / full["memory"]["temporaries_bytes"]}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  tmp = f"{args.out}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
  os.replace(tmp, args.out)
  for name in ("full", "lora"):
    r = result[name]
    print(f"{name:4s}: {r['step_time_s']['median']:.2f} s a step ({r['tokens_per_s']:.0f} tokens/s); "
          f"state {r['memory']['arguments_bytes'] / 2**20:.0f} MiB, temporaries "
          f"{r['memory']['temporaries_bytes'] / 2**20:.0f} MiB")
  print(f"LoRA / full: step time {result['lora_vs_full']['step_time']:.2f}, state "
        f"{result['lora_vs_full']['arguments_bytes']:.2f}, temporaries "
        f"{result['lora_vs_full']['temporaries_bytes']:.2f}; wrote {args.out}")


if __name__ == "__main__":
  main()
