"""Decode speed: lima_jax's KV-cache sampler vs transformers `generate`, and vs recomputing the prefix.

  python benchmarks/benchmark_decode.py            # writes benchmarks/results/decode.json

Model: the SmolLM-135M shape (d_model 576, 30 layers, 9 heads, 3 KV heads, MLP 1536, vocabulary
49152, tied embeddings) with random weights, fp32, greedy. transformers gets the same weights, and
the two greedy answers are compared token for token as a sanity check of the figures.

* tokens/s = batch * new tokens / wall time of one whole `generate` call (prefill included), best
  of `--repeats` after a warm-up call (ours compiles there; transformers makes 4 tokens); both
  libraries get the same prompts.
* Cache vs recompute, batch 1, 512 new tokens: the cache figure is a real 512-token run. Recomputing
  the prefix means one forward over the whole prefix per new token (prefill of the prefix, then the
  last token, with a fresh cache each time; only the last position's logits are computed). Running
  that for all 512 steps takes many minutes on a small CPU, so the step is timed at exact prefix
  lengths every 64 tokens (best of `--repeats`) and the 512 steps are summed by interpolating.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time


from lima_jax import process

process.default_to_cpu_without_tpu(log=True)  # Before jax loads: a CPU host with libtpu stays quiet.

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from lima_jax import convert  # pylint: disable=g-import-not-at-top
from lima_jax import model as model_lib
from lima_jax import sampling

SMOL = dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, mlp_dim=1536,
            tie_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0)
# --smoke: the same architecture, a few rows of it.
SMOKE_MODEL = {**SMOL, "vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
               "mlp_dim": 128}


def hf_model(cfg: model_lib.ModelConfig, seed: int):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  hf_config = transformers.LlamaConfig(**convert.model_config_to_hf_config(
      cfg.replace(max_seq_len=2048), dtype="float32", special_tokens={"bos_token_id": 1, "pad_token_id": 0}))
  model = transformers.LlamaForCausalLM(hf_config).eval()
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model


def params_from_hf(model) -> dict:
  """Our parameters for a transformers model, through the project's converter (lima_jax.convert)."""
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp, safe_serialization=True)
    params, _ = convert.load_hf_params(tmp)
  return params


def best_time(fn, repeats: int) -> float:
  times = [float("inf")]
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def bench_ours(cfg, params, prompts, new_tokens, repeats):
  scfg = sampling.SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=new_tokens,
                                 max_len=2048, batch_size=len(prompts))
  run = lambda: sampling.generate(cfg, params, prompts, sampling_config=scfg, stop_ids=(), pad_id=0)
  start = time.perf_counter()
  results = run()
  first = time.perf_counter() - start
  seconds = best_time(run, repeats)
  return results, seconds, first


def hf_generate(model, prompts, new_tokens: int) -> list[list[int]]:
  """transformers `generate`, greedy, exactly `new_tokens` new tokens a prompt."""
  import torch  # pylint: disable=g-import-not-at-top
  ids = torch.tensor(prompts, dtype=torch.long)
  with torch.inference_mode():
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens)
  return out[:, ids.shape[1]:].tolist()


def bench_hf(model, prompts, new_tokens, repeats):
  run = lambda: hf_generate(model, prompts, new_tokens)
  hf_generate(model, prompts, 4)  # Warm-up: nothing to compile, a few tokens suffice.
  start = time.perf_counter()
  out = run()
  seconds = min(time.perf_counter() - start, best_time(run, repeats - 1))
  return out, seconds


def recompute_step_fn(cfg):
  """One new token's logits by running the whole prefix through the model, no cache reuse."""
  @jax.jit
  def step(params, prefix, length):
    width = prefix.shape[1]
    cache = model_lib.init_cache(cfg, 1, width)
    m = model_lib.bind(cfg, params)
    positions = jnp.arange(width, dtype=jnp.int32)[None]
    _, cache = m.decode(prefix, positions, cache)  # Logits unused: XLA skips the LM head here.
    last = jax.lax.dynamic_slice(prefix, (0, length - 1), (1, 1))
    logits, _ = m.decode(last, (length - 1)[None, None], cache)
    return jnp.argmax(logits[0, -1])
  return step


def bench_recompute(cfg, params, prompt, new_tokens, repeats, grid_step=64):
  """Seconds to make `new_tokens` tokens by recomputing the prefix each time.

  The step is timed at exact prefix lengths every `grid_step` tokens (each length compiles once)
  and linearly interpolated in between; a step's cost is close to linear in its length.
  """
  step = recompute_step_fn(cfg)
  first, last = len(prompt), len(prompt) + new_tokens - 1  # Prefixes that yield new tokens.
  grid = sorted(set(range(first, last, grid_step)) | {last})
  measured = {}
  for length in grid:
    prefix = jnp.asarray(np.resize(np.asarray(prompt), length)[None].astype(np.int32))
    run = lambda prefix=prefix, length=length: step(params, prefix, jnp.int32(length)).block_until_ready()
    run()
    measured[length] = best_time(run, repeats)
  lengths = np.arange(first, last + 1)
  total = float(np.interp(lengths, grid, [measured[g] for g in grid]).sum())
  return total, measured


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--batch_sizes", default="8,1")
  parser.add_argument("--recompute_new_tokens", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=2, help="timed runs (best taken) per figure")
  parser.add_argument("--skip_hf", action="store_true")
  parser.add_argument("--smoke", action="store_true", help="the smallest run that exercises every line (the test suite's smoke test)")
  parser.add_argument("--out", "--output", dest="output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results", "decode.json"))
  args = parser.parse_args()
  if args.smoke:
    args.new_tokens, args.prompt_len, args.batch_sizes, args.recompute_new_tokens, args.repeats = 4, 8, "2", 4, 1

  cfg = model_lib.ModelConfig(**(SMOKE_MODEL if args.smoke else SMOL))
  rng = np.random.default_rng(0)
  report = {"command": "python " + " ".join(sys.argv), "model": cfg.to_dict(),
            "params": cfg.num_params(), "dtype": "float32", "decoding": "greedy",
            "jax": jax.__version__, "backend": jax.default_backend(), "host": platform.node(),
            "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_average_before": os.getloadavg(), "runs": []}
  hf = hf_model(cfg, seed=0) if not args.skip_hf else None
  if hf is not None:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    report.update(torch=torch.__version__, transformers=transformers.__version__,
                  torch_threads=torch.get_num_threads())
    params = params_from_hf(hf)
  else:
    params = model_lib.init_params(cfg, jax.random.key(0))

  for batch in (int(b) for b in args.batch_sizes.split(",")):
    prompts = rng.integers(2, cfg.vocab_size, size=(batch, args.prompt_len)).tolist()
    results, seconds, first = bench_ours(cfg, params, prompts, args.new_tokens, args.repeats)
    run = {"batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "lima_jax_seconds": seconds, "lima_jax_first_call_seconds": first,
           "lima_jax_tokens_per_s": batch * args.new_tokens / seconds}
    if hf is not None:
      hf_tokens, hf_seconds = bench_hf(hf, prompts, args.new_tokens, args.repeats)
      agree = [r.tokens == t for r, t in zip(results, hf_tokens)]
      run.update(transformers_seconds=hf_seconds,
                 transformers_tokens_per_s=batch * args.new_tokens / hf_seconds,
                 speedup_vs_transformers=hf_seconds / seconds,
                 greedy_answers_equal=f"{sum(agree)}/{len(agree)}")
    print(json.dumps(run), flush=True)
    report["runs"].append(run)

  if args.recompute_new_tokens:
    prompt = rng.integers(2, cfg.vocab_size, size=(args.prompt_len,)).tolist()
    _, cache_seconds, _ = bench_ours(cfg, params, [prompt], args.recompute_new_tokens, 1)
    recompute_seconds, per_length = bench_recompute(cfg, params, prompt, args.recompute_new_tokens,
                                                    args.repeats)
    report["cache_vs_recompute"] = {
        "batch": 1, "prompt_len": args.prompt_len, "new_tokens": args.recompute_new_tokens,
        "cache_seconds": cache_seconds, "recompute_seconds": recompute_seconds,
        "recompute_step_seconds_by_prefix_length": per_length,
        "speedup": recompute_seconds / cache_seconds}
    print(json.dumps(report["cache_vs_recompute"]), flush=True)
  report["load_average_after"] = os.getloadavg()

  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  tmp = args.output + ".tmp"
  with open(tmp, "w") as f:
    json.dump(report, f, indent=2)
  os.replace(tmp, args.output)
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
