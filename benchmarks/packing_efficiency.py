"""Non-pad share of batch tokens, padded vs packed rows, on a LIMA-like length mix.

The share is measured on the batches `lima_jax.data` really yields over one epoch: positions with
a nonzero segment id divided by all positions, empty rows that fill the last step included.

The length mix follows LIMA's Table 1 (Zhou et al., 2023): per source, the count and the mean
input / output length in tokens; each conversation's length is drawn from a log-normal around
those means (sigma 0.5, a fixed seed) and truncated to max_len, as the pipeline does:

  Stack Exchange (STEM) 200: 117 / 523     Stack Exchange (Other) 200: 119 / 530
  wikiHow 200: 12 / 1,811                  Pushshift r/WritingPrompts 150: 34 / 274
  Natural Instructions 50: 236 / 92        Paper authors (Group A) 200: 40 / 334

For comparison it also runs Grain's own streaming packer (`BestFitPackIterDataset`, MaxText's
choice) over the same shuffled stream, with as many open bins as rows per step.

    python benchmarks/packing_efficiency.py [--json benchmarks/results/packing.json]
        [--max_len 2048] [--batch 64 22 16]
"""

import argparse
import json
import math
import sys

import grain
import numpy as np

from lima_jax import data

# (source, conversations, mean input tokens, mean output tokens): LIMA, Table 1.
LIMA_MIX = (
    ("stackexchange_stem", 200, 117, 523),
    ("stackexchange_other", 200, 119, 530),
    ("wikihow", 200, 12, 1811),
    ("writing_prompts", 150, 34, 274),
    ("natural_instructions", 50, 236, 92),
    ("paper_authors", 200, 40, 334),
)


def lima_like_parts(seed: int = 0, sigma: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """Input and output token counts of 1,000 conversations drawn around LIMA's Table 1."""
  rng = np.random.default_rng(seed)
  mu = -sigma**2 / 2  # A log-normal factor with mean 1.
  inputs, outputs = [], []
  for _, count, mean_in, mean_out in LIMA_MIX:
    inputs.append(np.maximum(1, np.round(mean_in * rng.lognormal(mu, sigma, count))))
    outputs.append(np.maximum(1, np.round(mean_out * rng.lognormal(mu, sigma, count))))
  return np.concatenate(inputs).astype(np.int64), np.concatenate(outputs).astype(np.int64)


def lima_like_lengths(seed: int = 0, sigma: float = 0.5) -> np.ndarray:
  """Untruncated token counts ([BOS] + input + EOT + output + EOT) of 1,000 conversations."""
  inputs, outputs = lima_like_parts(seed, sigma)
  return 1 + inputs + 1 + outputs + 1


def synthetic_examples(lengths, max_len: int) -> list[data.Example]:
  """Examples with the given lengths, truncated to max_len (token values do not matter here)."""
  examples = []
  for i, n in enumerate(np.minimum(lengths, max_len)):
    mask = np.zeros(n, np.bool_)
    mask[n // 2:] = True  # Some target to learn, as after real tokenization.
    examples.append(data.Example(np.full(n, 7, np.int32), mask, f"synthetic:{i}"))
  return examples


def lima_pipeline_share(examples, max_len: int, packing: bool, batch_rows: int) -> dict:
  """Non-pad share over one epoch of lima_jax batches (one process)."""
  rows = data.make_rows(examples, max_len, packing)
  dataset, steps = data.batched_rows(
      rows, data.RowToArrays(examples, max_len, pad_id=0), local_rows=batch_rows,
      shard=grain.sharding.ShardOptions(0, 1), seed=0, num_epochs=1)
  real = total = 0
  for batch in dataset:
    real += int((batch["segment_ids"] > 0).sum())
    total += batch["segment_ids"].size
  filled = sum(ex.slots for ex in examples)
  assert filled == real, (filled, real)  # Every position of every example appears exactly once.
  return {"rows": len(rows), "steps_per_epoch": steps, "non_pad_share": real / total,
          "non_pad_share_of_nonempty_rows": real / (len(rows) * max_len)}


def grain_best_fit_share(examples, max_len: int, batch_rows: int, seed: int = 0) -> dict:
  """Grain's streaming best-fit packer over a shuffled epoch, batched like the pipeline."""
  stream = (grain.MapDataset.source([ex.slots for ex in examples]).shuffle(seed=seed)
            .map(lambda n: {"inputs": np.ones(n, np.int32)}).to_iter_dataset())
  packed = grain.experimental.BestFitPackIterDataset(
      stream, length_struct={"inputs": max_len}, num_packing_bins=batch_rows, seed=seed)
  rows = [row["inputs_segment_ids"] for row in packed]
  steps = math.ceil(len(rows) / batch_rows)
  real = sum(int((r > 0).sum()) for r in rows)
  return {"rows": len(rows), "steps_per_epoch": steps,
          "non_pad_share": real / (steps * batch_rows * max_len)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--max_len", type=int, default=2048)
  parser.add_argument("--batch", type=int, nargs="+", default=[64, 22, 16],
                      help="rows per step (padded mode: conversations, LIMA uses 64)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", "--json", dest="json", default="", help="also write the results to this file")
  parser.add_argument("--smoke", action="store_true", help="the smallest run that exercises every line (the test suite's smoke test)")
  args = parser.parse_args(argv)
  if args.smoke:
    args.max_len, args.batch = 512, [8]

  lengths = lima_like_lengths(args.seed)
  examples = synthetic_examples(lengths, args.max_len)
  result = {
      "command": "python benchmarks/packing_efficiency.py " + " ".join(argv or sys.argv[1:]),
      "max_len": args.max_len,
      "conversations": len(examples),
      "mean_tokens": float(np.mean([len(ex.tokens) for ex in examples])),
      "truncated": int((lengths > args.max_len).sum()),
      "by_batch_rows": {},
  }
  for batch_rows in args.batch:
    result["by_batch_rows"][str(batch_rows)] = {
        "padded": lima_pipeline_share(examples, args.max_len, False, batch_rows),
        "packed": lima_pipeline_share(examples, args.max_len, True, batch_rows),
        "grain_best_fit_stream": grain_best_fit_share(examples, args.max_len, batch_rows,
                                                      args.seed),
    }

  print(f"{result['conversations']} LIMA-like conversations, mean {result['mean_tokens']:.0f} "
        f"tokens, {result['truncated']} truncated to {args.max_len}")
  print(f"{'rows/step':>9}  {'mode':<22} {'rows':>5} {'steps':>5}  non-pad share")
  for batch_rows, modes in result["by_batch_rows"].items():
    for mode, r in modes.items():
      print(f"{batch_rows:>9}  {mode:<22} {r['rows']:>5} {r['steps_per_epoch']:>5}  "
            f"{r['non_pad_share']:.3f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
