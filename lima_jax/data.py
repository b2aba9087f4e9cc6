"""LIMA data: JSONL (or TFDS) conversations -> EOT token layout -> Grain batches -> jax.Arrays.

The pipeline, one small function per step:

1. `load_conversations` reads a split (JSONL files or TFDS) in LIMA's published format, one
   conversation a line, validated line by line (`lima_jax.records`: a bad line names its file,
   line and field, or is skipped and counted with `skip_bad_lines`).
2. `tokenize_conversation` lays a conversation out exactly as LIMA does,
   `[BOS] + sp(turn_1) + [EOT] + sp(turn_2) + [EOT] + ...`, with the loss on assistant turns and
   their EOT, and truncates to `max_len`.
3. Rows: one conversation per row (padded mode: a batch is `batch_size` conversations, LIMA's
   unit) or several per row (`pack_best_fit`, packing mode: segment ids keep them apart).
4. Grain shards rows over processes, shuffles them per epoch from a seed, batches them, and gives
   the iterator a small checkpointable state (`TrainData.get_state` / `set_state`).
5. `to_global_batch` assembles the per-process batches into global `jax.Array`s.

Every process reads and tokenizes the whole file (LIMA has ~1,000 conversations: about a second)
and then batches only its share. That keeps two things identical on all processes without any
communication: the rows (packing is global) and the step count; and a bad line fails every
process at once, instead of leaving the others waiting in a collective.

Batch format (each a numpy array of shape [local_rows, max_len]):
  inputs       int32    token ids fed to the model.
  targets      int32    next token of the same conversation: targets[t] = inputs[t + 1].
  loss_mask    float32  1 where targets[t] is trained on; 0 on prompts (by default), on padding
                        and across conversation boundaries.
  positions    int32    position within its conversation, restarting at 0.
  segment_ids  int32    1, 2, ... for the conversations of a row; 0 for padding. Attention is
                        allowed only between equal nonzero segment ids (and causally).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import logging
import math
import pathlib
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from lima_jax import lima_tfds
from lima_jax import records
from lima_jax import tokenizer as tokenizer_lib

_log = logging.getLogger(__name__)

ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets"

# A batch is a few numpy copies of tokens already in memory, so a couple of batches read ahead on
# one thread keep up with any accelerator step; Grain's default (500 elements on 16 threads)
# would hold hundreds of [rows, max_len] batches and keep the host's cores busy.
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


def bundled_paths() -> dict[str, str]:
  """Paths of the bundled sample (train/dev/test JSONL and its SentencePiece tokenizer).

  Used whenever `data.train_path`, `dev_path`, `test_path` or `tokenizer_path` is empty, so the
  tiny preset runs from a fresh clone with no download.
  """
  sample = ASSETS_DIR / "lima_sample"
  return {"train": str(sample / "train.jsonl"), "dev": str(sample / "dev.jsonl"),
          "test": str(sample / "test.jsonl"),
          "tokenizer": str(ASSETS_DIR / "tokenizer" / "tokenizer.model")}


# -- Which files a run reads ----------------------------------------------------------------------


def load_conversations(data_config, split: str,
                       stats: records.DataStats | None = None) -> list[records.Conversation]:
  """The train, dev or test split named by a `config.data` section.

  `data.tfds_name` (when set) reads the split from TFDS; otherwise `data.<split>_path`, and an
  empty path means the bundled sample. The test split holds prompts (ending on a user turn).
  """
  if split not in records.SPLIT_KINDS:
    raise ValueError(f"unknown split {split!r}; expected one of {sorted(records.SPLIT_KINDS)}")
  kind = records.SPLIT_KINDS[split]
  if data_config.tfds_name:
    return lima_tfds.read_conversations(
        data_config.tfds_name, split, data_dir=data_config.tfds_data_dir or None,
        manual_dir=data_config.get("tfds_manual_dir") or None, kind=kind,
        skip_bad_lines=data_config.skip_bad_lines, stats=stats)
  return records.read_conversations(split_location(data_config, split), kind=kind,
                            skip_bad_lines=data_config.skip_bad_lines, stats=stats)


def split_location(data_config, split: str) -> str:
  """Where a split comes from: its path(s) (the bundled sample when empty) or `tfds:name/split`."""
  if data_config.tfds_name:
    return f"tfds:{data_config.tfds_name}/{split}"
  return data_config.get(f"{split}_path") or bundled_paths()[split]


def tokenizer_from_config(data_config) -> tokenizer_lib.Tokenizer:
  """The tokenizer `data.tokenizer_path` names (the bundled one when empty), with its EOT."""
  path = data_config.tokenizer_path or bundled_paths()["tokenizer"]
  try:
    return tokenizer_lib.load_tokenizer(path, eot=data_config.eot_token)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"data.tokenizer_path: {e}") from None


# -- Token layout ------------------------------------------------------------------------------------


def _layout(tokenizer, turns: Sequence[str], train_on_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
  """Untruncated `[BOS] + sp(t1) + [EOT] + sp(t2) + [EOT] + ...` and its loss mask.

  Each utterance is encoded on its own, with no role tags (as in LIMA). The loss covers assistant
  turns (odd indices) and their EOT; `train_on_prompt` covers every token but BOS.
  """
  tokens = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  mask = [False] * len(tokens)
  for i, turn in enumerate(turns):
    ids = tokenizer.encode(turn) + [tokenizer.eot_id]
    tokens += ids
    mask += [train_on_prompt or i % 2 == 1] * len(ids)
  return np.asarray(tokens, np.int32), np.asarray(mask, np.bool_)


def tokenize_conversation(tokenizer, turns: Sequence[str], max_len: int = 2048,
                          train_on_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """LIMA's layout of one conversation, truncated to `max_len`: (int32[n], bool[n])."""
  tokens, mask = _layout(tokenizer, turns, train_on_prompt)
  return tokens[:max_len], mask[:max_len]


def tokenize_prompt(tokenizer, turns: Sequence[str]) -> np.ndarray:
  """A generation prompt: the same layout, ending with the last user turn's EOT (int32[n]).

  The model continues with the assistant's reply and ends it with EOT.
  """
  if not turns or len(turns) % 2 == 0:
    raise ValueError(f"a prompt must end on a user turn (an odd number of turns), got "
                     f"{len(turns)} turns")
  return _layout(tokenizer, turns, train_on_prompt=False)[0]


@dataclasses.dataclass(frozen=True)
class Example:
  """A tokenized conversation; it fills `len(tokens) - 1` (input, target) positions of a row."""

  tokens: np.ndarray
  loss_mask: np.ndarray
  where: str

  @property
  def slots(self) -> int:
    return len(self.tokens) - 1


def tokenize_conversations(conversations: Sequence[records.Conversation], tokenizer, *, max_len: int,
                           train_on_prompt: bool = False,
                           stats: records.DataStats | None = None) -> list[Example]:
  """Tokenizes, truncates and counts; drops (and records) conversations with nothing to learn."""
  if max_len < 2:
    raise ValueError(f"data.max_len must be at least 2 (BOS and one target), got {max_len}")
  stats = stats if stats is not None else records.DataStats()
  examples = []
  for conversation in conversations:
    tokens, mask = _layout(tokenizer, conversation.turns, train_on_prompt)
    if len(tokens) > max_len:
      stats.truncated += 1
      tokens, mask = tokens[:max_len], mask[:max_len]
    if not mask[1:].any():  # Position 0 is never a target.
      stats.skipped.append(conversation.where)
      continue
    examples.append(Example(tokens, mask, conversation.where))
    stats.tokens += len(tokens)
    stats.loss_tokens += int(mask[1:].sum())
  stats.examples += len(examples)
  if stats.skipped:
    _log.warning("%d conversations have nothing to learn from after truncation to %d tokens "
                 "and are skipped: %s", len(stats.skipped), max_len,
                 ", ".join(stats.skipped[:records.MAX_LISTED]))
  return examples


def source_names(data_config) -> tuple[str, ...]:
  """`data.sources` ("stackexchange,wikihow") as names; () keeps every source."""
  return tuple(name.strip() for name in str(data_config.get("sources", "") or "").split(",") if name.strip())


def select_training_conversations(conversations: Sequence[records.Conversation], data_config,
                                  where: str) -> list[records.Conversation]:
  """The ablations' selection (paper section 5): the conversations of `data.sources`, then a
  seeded subset of `data.max_examples` of them (0 = all), kept in file order.

  The subset is the first `max_examples` of one seeded permutation (`data.subset_seed`), so with
  one seed the quantity ablation's sizes are nested: 2k examples hold the k of the smaller run.
  """
  wanted = source_names(data_config)
  if wanted:
    present = sorted({c.source for c in conversations})
    missing = [name for name in wanted if name not in present]
    if missing:
      raise records.DataError(where, 0, f"data.sources names {', '.join(missing)}, which no training "
                              f"conversation has; sources there: {', '.join(present) or 'none'}")
    conversations = [c for c in conversations if c.source in wanted]
  limit = int(data_config.get("max_examples", 0) or 0)
  if limit < 0:
    raise records.DataError(where, 0, f"data.max_examples={limit}: expected 0 (all) or a positive count")
  if limit and limit > len(conversations):
    raise records.DataError(where, 0, f"data.max_examples={limit}: only {len(conversations)} training "
                            "conversations" + (" of data.sources" if wanted else ""))
  if limit:
    rng = np.random.default_rng(int(data_config.get("subset_seed", 0)))
    keep = np.sort(rng.permutation(len(conversations))[:limit])
    conversations = [conversations[i] for i in keep]
  if wanted or limit:
    _log.info("training on %d conversations (data.sources=%r, data.max_examples=%d)", len(conversations),
              ",".join(wanted), limit)
  return list(conversations)


def load_examples(data_config, tokenizer, split: str) -> tuple[list[Example], records.DataStats]:
  """Reads, validates and tokenizes one split of a `config.data` section (for the train split,
  only the conversations `select_training_conversations` keeps)."""
  stats = records.DataStats()
  conversations = load_conversations(data_config, split, stats)
  if split == "train":
    conversations = select_training_conversations(conversations, data_config,
                                                  split_location(data_config, split))
  examples = tokenize_conversations(conversations, tokenizer, max_len=data_config.max_len,
                                    train_on_prompt=data_config.train_on_prompt, stats=stats)
  if not examples:
    raise records.DataError(split_location(data_config, split), 0,
                            f"no conversation is left to learn from after truncation to "
                            f"data.max_len={data_config.max_len}: {stats.summary()}")
  return examples, stats


# -- Rows: which conversations share a row ----------------------------------------------------------

Row = tuple[int, ...]  # Indices of the examples in one row; () is an empty (all padding) row.


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[Row]:
  """Packs items into rows of `capacity` positions: best-fit decreasing.

  Each item, longest first, goes into the fullest row that still has room for it. On LIMA-like
  length mixes this fills >95% of positions (see benchmarks/packing_efficiency.py), and it is
  deterministic, so every process computes the same rows. The rows are fixed for the run and
  Grain reshuffles them each epoch; which conversations share a row does not affect training,
  since attention and the loss never cross conversations.
  """
  rows: list[list[int]] = []
  free: list[tuple[int, int]] = []  # (room left, row index), sorted.
  for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    if not 0 < lengths[i] <= capacity:
      raise ValueError(f"item {i} has length {lengths[i]}, outside [1, {capacity}]")
    k = bisect.bisect_left(free, (lengths[i], -1))
    if k < len(free):
      room, r = free.pop(k)
    else:
      room, r = capacity, len(rows)
      rows.append([])
    rows[r].append(i)
    bisect.insort(free, (room - lengths[i], r))
  return [tuple(row) for row in rows]


def make_rows(examples: Sequence[Example], max_len: int, packing: bool) -> list[Row]:
  """One conversation per row, or best-fit packed rows of `max_len` positions."""
  if not packing:
    return [(i,) for i in range(len(examples))]
  return pack_best_fit([ex.slots for ex in examples], max_len)


class RowToArrays(grain.transforms.Map):
  """Grain map: a row of example indices -> the per-row arrays of the batch format."""

  def __init__(self, examples: Sequence[Example], max_len: int, pad_id: int):
    self._examples = examples
    self._max_len = max_len
    self._pad_id = pad_id

  def map(self, element: Row) -> dict[str, np.ndarray]:
    n = self._max_len
    row = {"inputs": np.full(n, self._pad_id, np.int32),
           "targets": np.full(n, self._pad_id, np.int32),
           "loss_mask": np.zeros(n, np.float32),
           "positions": np.zeros(n, np.int32),
           "segment_ids": np.zeros(n, np.int32)}
    start = 0
    for segment, index in enumerate(element, start=1):
      example = self._examples[index]
      end = start + example.slots
      row["inputs"][start:end] = example.tokens[:-1]
      row["targets"][start:end] = example.tokens[1:]
      row["loss_mask"][start:end] = example.loss_mask[1:]
      row["positions"][start:end] = np.arange(example.slots)
      row["segment_ids"][start:end] = segment
      start = end
    if start > n:
      raise ValueError(f"row {element} holds {start} positions, more than max_len={n}")
    return row


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Grain batch_fn: per-row dicts -> one dict of [rows, max_len] arrays."""
  return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def resolve_shard(process_index: int | None,
                  process_count: int | None) -> grain.sharding.ShardOptions:
  """This process's share: given explicitly (both) or from JAX (neither)."""
  if process_index is None and process_count is None:
    return grain.sharding.ShardByJaxProcess()
  if process_index is None or process_count is None:
    raise ValueError("give both process_index and process_count, or neither (then JAX's)")
  return grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count)


def local_rows_per_batch(global_batch_size: int, shard: grain.sharding.ShardOptions) -> int:
  if global_batch_size <= 0 or global_batch_size % shard.shard_count:
    raise ValueError(f"the global batch size ({global_batch_size}) must be a positive multiple "
                     f"of the process count ({shard.shard_count})")
  return global_batch_size // shard.shard_count


# Names how `batched_rows` orders rows, so a loader state saved under another order is refused.
ROW_ORDER = "global-shuffle-strided"
# Fingerprint fields that say how rows are split, not which rows a step holds.
_LAYOUT_KEYS = ("process_index", "process_count", "worker_count")


def batched_rows(rows: Sequence[Row], row_to_arrays: RowToArrays, *, local_rows: int,
                 shard: grain.sharding.ShardOptions, seed: int | None,
                 num_epochs: int | None) -> tuple[grain.MapDataset, int]:
  """This process's batches over epochs, as a Grain MapDataset; returns it and steps per epoch.

  Every process shuffles all rows the same way (seed + epoch; without a seed, file order), after
  the rows are filled up with empty ones to `steps_per_epoch` global batches, and then takes the
  strided share `[i::n]` of that order (Grain's idiom for MapDataset sharding). Local batch k of
  every process then together hold global positions [k * global, (k + 1) * global): which rows
  share a step does not depend on the number of processes, an epoch is a whole number of steps,
  and every row is seen exactly once per epoch.
  """
  global_rows = local_rows * shard.shard_count
  steps_per_epoch = max(1, math.ceil(len(rows) / global_rows))
  padded = list(rows) + [()] * (steps_per_epoch * global_rows - len(rows))
  dataset = grain.MapDataset.source(padded)
  if seed is not None:
    dataset = dataset.shuffle(seed=seed)
  dataset = dataset[shard.shard_index::shard.shard_count]
  # Batching before repeating keeps each batch inside one epoch; Grain passes the epoch through
  # to the shuffle, which reseeds for each.
  dataset = dataset.map(row_to_arrays).batch(local_rows, batch_fn=stack_rows)
  return dataset.repeat(num_epochs), steps_per_epoch


def _digest(examples: Sequence[Example], rows: Sequence[Row]) -> str:
  """Identifies the data a loader state belongs to (tokens, masks and rows)."""
  h = hashlib.sha256()
  for example in examples:
    h.update(example.tokens.tobytes())
    h.update(np.packbits(example.loss_mask).tobytes())
    h.update(b"|")
  h.update(repr(list(rows)).encode())
  return h.hexdigest()[:16]


# -- Loaders -----------------------------------------------------------------------------------------


class TrainData:
  """Training batches over epochs: `for epoch, batch in train_data: ...`.

  Iteration continues from the current position (step); `get_state()` is a small JSON-able dict
  that `set_state()` restores exactly, after which the same batches follow. It holds the step
  and a fingerprint of the data and settings; restoring a state from different data, seed or
  global batch size raises ValueError rather than silently producing a different order. The
  process layout may differ: every process can restore process 0's state, on any process count.

  Attributes:
    steps_per_epoch: optimizer steps per epoch (identical on every process).
    num_epochs: epochs to iterate, or None for no end.
    local_rows, global_rows: rows per batch on this process / over all processes.
    stats: records.DataStats of reading and tokenizing (global: every process reads everything).
    rows: number of rows over all processes (conversations, or packed rows).
  """

  def __init__(self, dataset: grain.MapDataset, *, steps_per_epoch: int, num_epochs: int | None,
               local_rows: int, global_rows: int, rows: int, stats: records.DataStats,
               fingerprint: dict[str, Any], worker_count: int = 0):
    self.steps_per_epoch = steps_per_epoch
    self.num_epochs = num_epochs
    self.local_rows = local_rows
    self.global_rows = global_rows
    self.rows = rows
    self.stats = stats
    self._fingerprint = fingerprint
    self._dataset = dataset
    self._worker_count = worker_count
    self._iterator = self._iterate_from(0)
    self._step = 0

  def _iterate_from(self, step: int):
    """An iterator from local batch `step` on: the MapDataset is indexed by step, so no reader
    state needs saving, and any process layout can continue a run at the same global batch."""
    dataset = self._dataset[step:] if step else self._dataset
    iter_dataset = dataset.to_iter_dataset(read_options=READ_OPTIONS)
    if self._worker_count > 0:
      _allow_grain_multiprocessing()
      iter_dataset = iter_dataset.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self._worker_count))
    return iter(iter_dataset)

  @property
  def step(self) -> int:
    """The step the next batch is for (0-based, counted over epochs)."""
    return self._step

  @property
  def total_steps(self) -> int | None:
    return None if self.num_epochs is None else self.num_epochs * self.steps_per_epoch

  def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    return self

  def __next__(self) -> tuple[int, dict[str, np.ndarray]]:
    batch = next(self._iterator)  # StopIteration after num_epochs.
    epoch = self._step // self.steps_per_epoch
    self._step += 1
    return epoch, batch

  def get_state(self) -> dict[str, Any]:
    return {"step": self._step, "fingerprint": dict(self._fingerprint)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues at the saved step. Any process (a checkpoint holds process 0's state) and any
    process count may restore it: global batch k is the same rows in every layout."""
    if not {"step", "fingerprint"} <= set(state):
      raise ValueError(f"not a TrainData state (keys {sorted(state)}); expected step and "
                       f"fingerprint as TrainData.get_state returns")
    saved = state["fingerprint"]
    differ = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in self._fingerprint.items()
              if k not in _LAYOUT_KEYS and saved.get(k) != v]
    if differ:
      raise ValueError("the data state was saved for other data or settings, so resuming would "
                       "not continue the same order (" + "; ".join(differ) + "); resume with the "
                       "original data and config, or start the data from scratch")
    self._step = int(state["step"])
    self._iterator = self._iterate_from(self._step)


def _allow_grain_multiprocessing() -> None:
  """Grain's worker processes read an absl flag; a program not started by absl.app never parsed
  flags, so mark them parsed (every flag keeps its default) instead of failing in a worker."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_loader(data_config, tokenizer, *, global_batch_size: int, seed: int | None = None,
                      process_index: int | None = None, process_count: int | None = None,
                      num_epochs: int | None = None) -> TrainData:
  """Training batches for this process from a `config.data` section.

  Args:
    data_config: `config.data` (train_path or tfds_name, max_len, packing, train_on_prompt,
      skip_bad_lines, shuffle_seed, worker_count).
    tokenizer: a `lima_jax.tokenizer.Tokenizer` (e.g. `tokenizer_from_config(data_config)`).
    global_batch_size: rows per step over all processes: conversations (padded mode, LIMA's
      `batch_size`) or packed rows of `max_len` tokens (packing mode).
    seed: shuffle seed; defaults to `data_config.shuffle_seed`.
    process_index, process_count: this process's share; both None means JAX's.
    num_epochs: epochs to iterate; None never stops.

  Raises:
    records.DataError / FileNotFoundError: bad or missing data, before any batch is made.
  """
  examples, stats = load_examples(data_config, tokenizer, "train")
  shard = resolve_shard(process_index, process_count)
  local_rows = local_rows_per_batch(global_batch_size, shard)
  seed = data_config.shuffle_seed if seed is None else seed
  rows = make_rows(examples, data_config.max_len, data_config.packing)
  dataset, steps_per_epoch = batched_rows(
      rows, RowToArrays(examples, data_config.max_len, tokenizer.pad_id), local_rows=local_rows,
      shard=shard, seed=seed, num_epochs=num_epochs)
  worker_count = int(data_config.get("worker_count", 0) or 0)
  fingerprint = {"data": _digest(examples, rows), "seed": seed, "global_rows": global_batch_size,
                 "process_index": shard.shard_index, "process_count": shard.shard_count,
                 "worker_count": worker_count, "order": ROW_ORDER}
  _log.info("train data: %s; %d rows, %d steps per epoch", stats.summary(), len(rows),
            steps_per_epoch)
  return TrainData(dataset, steps_per_epoch=steps_per_epoch, num_epochs=num_epochs,
                   local_rows=local_rows, global_rows=global_batch_size, rows=len(rows),
                   stats=stats, fingerprint=fingerprint, worker_count=worker_count)


@dataclasses.dataclass
class EvalData:
  """Evaluation batches in file order: every example exactly once over all processes.

  The last batches are filled with empty rows (loss_mask 0), so a loss summed over `loss_mask`
  and divided by its sum is the exact per-token loss of the split.
  """

  batches: list[dict[str, np.ndarray]]
  stats: records.DataStats
  num_examples: int


def make_eval_batches(data_config, tokenizer, *, global_batch_size: int, split: str = "dev",
                      process_index: int | None = None,
                      process_count: int | None = None) -> EvalData:
  """Dev-loss batches for this process (same row mode as training, no shuffle, one epoch)."""
  examples, stats = load_examples(data_config, tokenizer, split)
  shard = resolve_shard(process_index, process_count)
  rows = make_rows(examples, data_config.max_len, data_config.packing)
  dataset, _ = batched_rows(
      rows, RowToArrays(examples, data_config.max_len, tokenizer.pad_id),
      local_rows=local_rows_per_batch(global_batch_size, shard), shard=shard, seed=None,
      num_epochs=1)
  return EvalData(batches=[dataset[i] for i in range(len(dataset))], stats=stats,
                  num_examples=len(examples))


def to_global_batch(local_batch: Mapping[str, np.ndarray], mesh, partition_spec=None):
  """Per-process batch -> dict of global `jax.Array`s sharded by `partition_spec` on `mesh`.

  Each process passes its own rows; `jax.make_array_from_process_local_data` places them on its
  devices, and the global batch has `process_count` times the local rows. The default spec
  shards the batch dimension over every mesh axis.
  """
  import jax  # pylint: disable=g-import-not-at-top

  if partition_spec is None:
    partition_spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
  sharding = jax.sharding.NamedSharding(mesh, partition_spec)
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for key, value in local_batch.items()}
