"""Serving speed in vLLM `bench serve` terms, and continuous vs static batching.

  python benchmarks/benchmark_serve.py             # writes benchmarks/results/serve.json
  python benchmarks/benchmark_serve.py --smoke     # a minimal run, seconds

Model: benchmark_decode.py's (the SmolLM-135M shape, random weights, fp32). Requests: the bundled
test prompts (cycled), laid out as training lays them out, each with an answer length drawn as
LIMA's are (`--lengths=lima`: the output lengths of packing_efficiency.py's model of LIMA's
Table 1, six sources from 92 to 1,811 tokens on average, log-normal within a source, cut at the
paper's 2,048 and scaled by `--max_new_tokens` / 2,048), or (`--lengths=bundled`) from the
bundled training answers' lengths scaled so that their 95th percentile is `--max_new_tokens`;
stop ids are off so an answer has exactly its length. Greedy decoding.

1. HTTP: lima-serve's app (uvicorn on 127.0.0.1) under streamed /v1/completions requests at each
   `--concurrency` (requests in flight); per run, request throughput, output tokens/s, TTFT, TPOT
   = (E2E - TTFT) / (tokens - 1) and ITL (time between streamed chunks; the engine emits
   `steps_per_call` tokens per chunk), each median and p99, and requests lost or errored; then RSS
   after the first tenth of `--memory_requests` short requests and after all of them. (Over HTTP
   the model is narrowed to the bundled tokenizer's 1,025 ids, so that every answer decodes.)
2. Continuous vs static, the same `8 * --slots` requests without HTTP, on each length mix: the
   engine at `--slots` slots against static batches of that size as `sampling.generate` runs
   them (each batch until its longest answer ends, its cache as long as its longest prompt plus
   the most new tokens): output tokens/s and their ratio, each the best of `--repeats` runs, the
   two taking turns.
3. Decode at `--slots` slots vs transformers `generate` at that batch (benchmark_decode.py's
   measurement: 128 new tokens after a 32-token prompt, prefill included), best of `--repeats`
   runs each, taking turns.
"""

import argparse
import asyncio
import json
import os
import platform
import sys
import threading
import time

import httpx

from lima_jax import process

process.default_to_cpu_without_tpu(log=True)  # Before jax loads: a CPU host with libtpu stays quiet.

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import psutil  # pylint: disable=wrong-import-position

import benchmark_decode  # The script's own folder is on sys.path when it runs.
import packing_efficiency

from lima_jax import data as data_lib  # pylint: disable=wrong-import-position
from lima_jax import inference  # pylint: disable=wrong-import-position
from lima_jax import model as model_lib  # pylint: disable=wrong-import-position
from lima_jax import paths  # pylint: disable=wrong-import-position
from lima_jax import records  # pylint: disable=wrong-import-position
from lima_jax import sampling  # pylint: disable=wrong-import-position
from lima_jax import tokenizer as tokenizer_lib  # pylint: disable=wrong-import-position
from lima_jax.serve import batcher as batcher_lib  # pylint: disable=wrong-import-position
from lima_jax.serve import engine as engine_lib  # pylint: disable=wrong-import-position
from lima_jax.serve import server  # pylint: disable=wrong-import-position

TINY = dict(vocab_size=1025, d_model=64, n_layers=2, n_heads=4, mlp_dim=128)


LIMA_CONTEXT = 2048  # The paper's cut, which its answer lengths are scaled from.


def answer_lengths(tok, max_new_tokens: int, lengths: str) -> np.ndarray:
  """The answer lengths requests draw from (`--lengths`), at most `max_new_tokens`."""
  if lengths == "lima":
    _, outputs = packing_efficiency.lima_like_parts()
    scaled = np.minimum(outputs, LIMA_CONTEXT) * max_new_tokens / LIMA_CONTEXT
  else:
    train = data_lib.bundled_paths()["train"]
    answers = np.array([len(tok.encode(c.turns[1])) for c in records.read_jsonl(train)], float)
    scaled = answers * max_new_tokens / np.quantile(answers, 0.95)
  return np.clip(np.ceil(scaled), 1, max_new_tokens).astype(int)


def workload(tok, count: int, max_new_tokens: int, seed: int = 0, lengths: str = "lima"):
  """(prompt ids, answer length) pairs: the bundled test prompts, lengths from `answer_lengths`."""
  test = data_lib.bundled_paths()["test"]
  prompts = [data_lib.tokenize_prompt(tok, c.turns).tolist()
             for c in records.read_jsonl(test, kind=records.PROMPTS)]
  choices = answer_lengths(tok, max_new_tokens, lengths)
  rng = np.random.default_rng(seed)
  return [(prompts[i % len(prompts)], int(rng.choice(choices))) for i in range(count)]


def percentiles(values) -> dict:
  if not len(values):
    return {"median": None, "p99": None}
  return {"median": float(np.median(values)) * 1000, "p99": float(np.quantile(values, 0.99)) * 1000}


async def one_request(client, url, prompt, length, out):
  start = time.perf_counter()
  stamps, usage = [], None
  body = {"prompt": prompt, "max_tokens": length, "temperature": 0, "stream": True,
          "stream_options": {"include_usage": True}}
  try:
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
      if r.status_code != 200:
        out.append({"error": r.status_code})
        return
      async for line in r.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
          continue
        chunk = json.loads(line[6:])
        if chunk["choices"] and chunk["choices"][0]["text"]:
          stamps.append(time.perf_counter())
        if chunk.get("usage"):
          usage = chunk["usage"]
  except httpx.HTTPError as e:
    out.append({"error": repr(e)})
    return
  end = time.perf_counter()
  tokens = usage["completion_tokens"] if usage else 0
  out.append({"e2e": end - start, "ttft": (stamps[0] - start) if stamps else end - start, "tokens": tokens,
              "itl": np.diff(stamps).tolist(), "wanted": length})


async def http_run(url, requests, concurrency):
  limit = asyncio.Semaphore(concurrency)
  out = []
  async with httpx.AsyncClient(timeout=600) as client:
    async def guarded(p, n):
      async with limit:
        await one_request(client, url, p, n, out)
    start = time.perf_counter()
    await asyncio.gather(*(guarded(p, n) for p, n in requests))
    seconds = time.perf_counter() - start
  ok = [r for r in out if "error" not in r]
  tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
  return {"concurrency": concurrency, "requests": len(requests), "completed": len(ok),
          "errored": len(out) - len(ok), "lost": len(requests) - len(out),
          "wrong_length": sum(r["tokens"] != r["wanted"] for r in ok), "seconds": seconds,
          "request_throughput": len(ok) / seconds, "output_tokens_per_s": sum(r["tokens"] for r in ok) / seconds,
          "ttft_ms": percentiles([r["ttft"] for r in ok]), "tpot_ms": percentiles(tpot),
          "itl_ms": percentiles([x for r in ok for x in r["itl"]])}


async def memory_run(url, requests, process, concurrency=32):
  """RSS after the first tenth of many short non-streamed requests and after all of them."""
  limit = asyncio.Semaphore(concurrency)
  done, errors, rss = [0], [0], {}
  async with httpx.AsyncClient(timeout=600) as client:
    async def one(prompt, length):
      async with limit:
        r = await client.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": length})
        errors[0] += r.status_code != 200
        done[0] += 1
        if done[0] == len(requests) // 10:
          rss["after_first_tenth_mb"] = process.memory_info().rss / 2**20
    await asyncio.gather(*(one(p, n) for p, n in requests))
  rss["after_all_mb"] = process.memory_info().rss / 2**20
  return {"requests": len(requests), "errored": errors[0], **rss}


def serve_in_thread(service):
  import uvicorn  # pylint: disable=g-import-not-at-top
  config = uvicorn.Config(server.create_app(service), host="127.0.0.1", port=0, log_level="warning")
  uv = uvicorn.Server(config)
  thread = threading.Thread(target=uv.run, daemon=True)
  thread.start()
  while not uv.started:
    time.sleep(0.05)
  port = uv.servers[0].sockets[0].getsockname()[1]
  return uv, thread, f"http://127.0.0.1:{port}"


def static_batches(cfg, params, requests, slots, max_len):
  """A run of static batches as `sampling.generate` runs them (each batch of `slots` until its
  longest answer ends, its cache as long as its longest prompt plus the most new tokens, rounded
  up to a power of two); returns run() -> output tokens, compiled by a first untimed run."""
  max_new = max(n for _, n in requests)
  scfg = sampling.SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=max_new,
                                 max_len=max_len, batch_size=slots)
  programs = {}  # Cache length -> decode fns.
  def run():
    total = 0
    for start in range(0, len(requests), slots):
      batch = requests[start:start + slots]
      longest = max(len(p) for p, _ in batch)
      width, cache_len = sampling.bucket(longest, max_len), sampling.bucket(longest + max_new, max_len)
      if cache_len not in programs:
        programs[cache_len] = sampling.make_decode_fns(cfg, scfg, None, slots, cache_len)
      tokens = np.zeros((slots, width), np.int32)
      lens, budgets = np.ones(slots, np.int32), np.zeros(slots, np.int32)
      for row, (p, n) in enumerate(batch):
        tokens[row, :len(p)], lens[row], budgets[row] = p, len(p), n
      _, counts, _ = programs[cache_len].generate(params, tokens, lens, budgets, np.zeros(slots, np.int32),
                                                  np.int32(0))
      total += int(np.asarray(counts).sum())
    return total
  run()
  return run


def continuous(engine, requests):
  """The same requests through the engine's slots; returns run() -> output tokens, warmed up."""
  settings = [engine_lib.SlotSettings(max_tokens=n, greedy=True, repetition_penalty=1.0) for _, n in requests]
  prompts = [p for p, _ in requests]
  engine.warm_up()
  return lambda: sum(h.generated for h in batcher_lib.generate_all(engine, prompts, settings))


def best_in_turns(runs: dict, repeats: int) -> dict:
  """Each run's shortest time over `repeats` rounds, the runs taking turns within a round (so a
  shared host's slow spells fall on both) -> {name: (result, seconds)}."""
  best = {name: (None, float("inf")) for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      result = run()
      seconds = time.perf_counter() - start
      if seconds < best[name][1]:
        best[name] = (result, seconds)
  return best


def continuous_vs_static(cfg, params, requests, slots, max_len, steps_per_call, repeats):
  engine = engine_lib.Engine(cfg, params, slots=slots, max_len=max_len, stop_ids=(),
                             steps_per_call=steps_per_call, top_logprobs=0)
  best = best_in_turns({"static": static_batches(cfg, params, requests, slots, max_len),
                        "continuous": continuous(engine, requests)}, repeats)
  rate = {name: tokens / seconds for name, (tokens, seconds) in best.items()}
  return {"requests": len(requests), "answer_tokens": sum(n for _, n in requests),
          "static_output_tokens_per_s": rate["static"], "continuous_output_tokens_per_s": rate["continuous"],
          "ratio": rate["continuous"] / rate["static"]}


def decode_vs_transformers(cfg, params, hf, slots, new_tokens, prompt_len, repeats, steps_per_call):
  """benchmark_decode's measurement with the engine in place of sampling.generate."""
  rng = np.random.default_rng(0)
  prompts = rng.integers(2, cfg.vocab_size, size=(slots, prompt_len)).tolist()
  engine = engine_lib.Engine(cfg, params, slots=slots, max_len=prompt_len + new_tokens + 1, stop_ids=(),
                             steps_per_call=steps_per_call, top_logprobs=0)
  settings = [engine_lib.SlotSettings(max_tokens=new_tokens, greedy=True, repetition_penalty=1.0)] * slots
  runs = {"engine": lambda: [h.tokens for h in batcher_lib.generate_all(engine, prompts, settings)]}
  runs["engine"]()  # Compiles.
  if hf is not None:
    benchmark_decode.hf_generate(hf, prompts, 4)  # Warm-up: nothing to compile.
    runs["transformers"] = lambda: benchmark_decode.hf_generate(hf, prompts, new_tokens)
  best = best_in_turns(runs, repeats)
  tokens, seconds = best["engine"]
  result = {"slots": slots, "new_tokens": new_tokens, "engine_tokens_per_s": slots * new_tokens / seconds}
  if hf is not None:
    hf_tokens, hf_seconds = best["transformers"]
    result.update(transformers_tokens_per_s=slots * new_tokens / hf_seconds, speedup=hf_seconds / seconds,
                  greedy_answers_equal=f"{sum(a == b for a, b in zip(tokens, hf_tokens))}/{slots}")
  return result


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="a tiny model and a few requests (seconds)")
  parser.add_argument("--concurrency", default="1,8,32")
  parser.add_argument("--requests_per_run", type=int, default=32, help="requests at each concurrency (>= it)")
  parser.add_argument("--max_new_tokens", type=int, default=128)
  parser.add_argument("--lengths", choices=("lima", "bundled"), default="lima",
                      help="the answer-length mix of the HTTP runs (both are compared without HTTP)")
  parser.add_argument("--slots", type=int, default=8)
  parser.add_argument("--steps_per_call", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side, taking turns")
  parser.add_argument("--memory_requests", type=int, default=1000, help="short requests for the RSS check")
  parser.add_argument("--skip_hf", action="store_true")
  parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results", "serve.json"))
  args = parser.parse_args()
  if args.smoke:
    args.concurrency, args.requests_per_run, args.max_new_tokens, args.repeats = "1,4", 4, 8, 1
    args.memory_requests = 20
  return args


def main():
  args = parse_args()
  cfg = model_lib.ModelConfig(**(TINY if args.smoke else benchmark_decode.SMOL))
  tok = tokenizer_lib.load_tokenizer(data_lib.bundled_paths()["tokenizer"])
  hf = None if args.skip_hf or args.smoke else benchmark_decode.hf_model(cfg, seed=0)
  params = benchmark_decode.params_from_hf(hf) if hf is not None else model_lib.init_params(cfg, jax.random.key(0))
  max_len = 512
  report = {"command": "python " + " ".join(sys.argv), "model": cfg.to_dict(), "params": cfg.num_params(),
            "jax": jax.__version__, "host": platform.node(), "cpus": os.cpu_count(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "slots": args.slots, "steps_per_call": args.steps_per_call,
            "load_average_before": os.getloadavg(), "http": []}
  # Over HTTP answers are text: the model narrowed to the bundled tokenizer's ids (its LM head
  # then has 1,152 rows, not 49,152), so that every sampled id decodes.
  http_cfg, http_params = sampling.without_padding_rows(cfg, params, tok.vocab_size)
  report["http_model_vocab"] = http_cfg.vocab_size
  engine = engine_lib.Engine(http_cfg, http_params, slots=args.slots, max_len=max_len, stop_ids=(),
                             steps_per_call=args.steps_per_call, top_logprobs=0)
  engine.warm_up()
  loaded = inference.LoadedModel(http_cfg, http_params, tok, "checkpoint", "benchmark", (), True, [])
  service = server.Service(loaded, batcher_lib.Batcher(engine, max_queue=1024),
                           sampling.SamplingConfig(greedy=True, repetition_penalty=1.0, max_len=max_len),
                           "benchmark")
  service.batcher.start()
  uv, thread, url = serve_in_thread(service)
  process = psutil.Process()
  report["rss_mb_start"] = process.memory_info().rss / 2**20
  for concurrency in (int(c) for c in args.concurrency.split(",")):
    requests = workload(tok, max(args.requests_per_run, concurrency), args.max_new_tokens, seed=concurrency,
                        lengths=args.lengths)
    run = asyncio.run(http_run(url, requests, concurrency))
    print(json.dumps(run), flush=True)
    report["http"].append(run)
  report["rss_mb_end"] = process.memory_info().rss / 2**20
  report["memory"] = asyncio.run(memory_run(url, workload(tok, args.memory_requests, 4, seed=2), process))
  print(json.dumps(report["memory"]), flush=True)
  uv.should_exit = True
  thread.join(30)
  service.batcher.shutdown(10)

  report["continuous_vs_static"] = {}
  for lengths in ("lima", "bundled"):
    requests = workload(tok, 8 * args.slots, args.max_new_tokens, seed=1, lengths=lengths)
    report["continuous_vs_static"][lengths] = continuous_vs_static(
        cfg, params, requests, args.slots, max_len, args.steps_per_call, args.repeats)
    print(json.dumps({lengths: report["continuous_vs_static"][lengths]}), flush=True)
  report["decode"] = decode_vs_transformers(cfg, params, hf, args.slots, args.max_new_tokens, 32, args.repeats,
                                            args.steps_per_call)
  print(json.dumps(report["decode"]), flush=True)
  report["load_average_after"] = os.getloadavg()
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  paths.write_text_atomic(args.output, json.dumps(report, indent=2) + "\n")
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
