"""LIMA data pipeline: token layout, validation, truncation, Grain batches, shares and resume."""

import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lima_jax import data
from lima_jax import records
from lima_jax import tokenizer as tokenizer_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
EOT, BOS = 1024, 1  # The bundled tokenizer's ids (see test_tokenizer.py).


def _lima_config(**data_overrides):
  spec = importlib.util.spec_from_file_location("lima_config", ROOT / "configs" / "lima.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny").data
  config.update(data_overrides)
  return config


@pytest.fixture(scope="module")
def tok():
  return data.tokenizer_from_config(_lima_config())


def _write(path, lines):
  """Writes JSONL: dicts are dumped, strings written as they are (to write bad lines)."""
  path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
  return path


def _segments(batch):
  """Yields (row, start, end) of every conversation in a batch."""
  for r, seg in enumerate(batch["segment_ids"]):
    for s in range(1, seg.max() + 1):
      where = np.flatnonzero(seg == s)
      yield r, where[0], where[-1] + 1


def _conversation_keys(batch):
  """The inputs of every conversation in a batch, as hashable keys."""
  return [batch["inputs"][r, a:b].tobytes() for r, a, b in _segments(batch)]


# -- Token layout -----------------------------------------------------------------------------------

# Golden ids, checked by hand against the pieces in test_tokenizer.py and the layout rule
# [BOS] + sp(user) + [EOT] + sp(assistant) + [EOT].
WHAT_IS = [502, 295, 934, 965, 991, 1019, 302, 934, 1004, 963, 970]  # "What is 15% of 80?"
IT_IS = [625, 295, 934, 965, 978, 954]  # "It is 12."
WHY = [932, 295, 265, 263, 959, 950, 860, 545, 970]  # "Why is the sky blue?"
RAYLEIGH = [521, 320, 283, 365, 531, 272, 335, 285, 954]  # "Rayleigh scattering."
THANKS = [572, 287, 959, 941, 36]  # "Thanks!" ('!' is the byte piece <0x21>)
WELCOME = [707, 358, 270, 342, 947, 439, 954]  # "You are welcome."


def test_golden_single_turn(tok):
  tokens, mask = data.tokenize_conversation(tok, ["What is 15% of 80?", "It is 12."])
  assert tokens.dtype == np.int32 and mask.dtype == np.bool_
  assert tokens.tolist() == [BOS] + WHAT_IS + [EOT] + IT_IS + [EOT]
  # Loss on the assistant turn and its EOT only; never on BOS or the prompt.
  assert mask.tolist() == [False] * (1 + 11 + 1) + [True] * (6 + 1)


def test_golden_multi_turn(tok):
  turns = ["Why is the sky blue?", "Rayleigh scattering.", "Thanks!", "You are welcome."]
  tokens, mask = data.tokenize_conversation(tok, turns)
  assert tokens.tolist() == ([BOS] + WHY + [EOT] + RAYLEIGH + [EOT] + THANKS + [EOT] + WELCOME +
                             [EOT])
  assert mask.tolist() == ([False] * 11 + [True] * 10 + [False] * 6 + [True] * 8)
  _, all_mask = data.tokenize_conversation(tok, turns, train_on_prompt=True)
  assert all_mask.tolist() == [False] + [True] * 34  # Every token but BOS.


def test_prompt_layout_ends_with_the_user_turns_eot(tok):
  prompt = data.tokenize_prompt(tok, ["Why is the sky blue?", "Rayleigh scattering.", "Thanks!"])
  assert prompt.tolist() == [BOS] + WHY + [EOT] + RAYLEIGH + [EOT] + THANKS + [EOT]
  with pytest.raises(ValueError, match="must end on a user turn"):
    data.tokenize_prompt(tok, ["Why is the sky blue?", "Rayleigh scattering."])


def test_truncation_and_skipping_are_counted(tok):
  convs = [records.Conversation(("What is 15% of 80?", "It is 12."), path="f.jsonl", line=1),
           records.Conversation(("Why is the sky blue?", "Rayleigh scattering."), path="f.jsonl",
                             line=2)]
  tokens, mask = data.tokenize_conversation(tok, convs[0].turns, max_len=15)
  assert tokens.tolist() == ([BOS] + WHAT_IS + [EOT] + IT_IS)[:15]
  assert mask.tolist() == [False] * 13 + [True] * 2
  stats = records.DataStats()
  # At 12 tokens the first conversation keeps no assistant token; the second keeps one (index 11).
  examples = data.tokenize_conversations(convs, tok, max_len=12, stats=stats)
  assert [e.where for e in examples] == ["f.jsonl:2"]
  assert stats.truncated == 2 and stats.skipped == ["f.jsonl:1"] and stats.examples == 1
  assert stats.loss_tokens == 1 and stats.tokens == 12
  assert "1 skipped with nothing to learn" in stats.summary()
  assert "f.jsonl:1" in stats.summary()


def test_all_skipped_is_an_error(tmp_path, tok):
  path = _write(tmp_path / "train.jsonl", [{"conversations": ["What is 15% of 80?", "It is 12."]}])
  with pytest.raises(records.DataError, match=r"train\.jsonl: no conversation is left to learn "
                                           r"from after truncation to data\.max_len=5"):
    data.make_train_loader(_lima_config(train_path=str(path), max_len=5), tok,
                           global_batch_size=1, process_index=0, process_count=1)


# -- Reading and validation ---------------------------------------------------------------------------


def test_bundled_sample():
  paths = data.bundled_paths()
  train = records.read_jsonl(paths["train"])
  dev = records.read_jsonl(paths["dev"])
  test = records.read_jsonl(paths["test"], kind=records.PROMPTS)
  assert (len(train), len(dev), len(test)) == (50, 10, 20)
  assert sum(len(c.turns) > 2 for c in train) >= 3
  assert sum(len(c.turns) > 1 for c in test) >= 2
  assert {"stackexchange", "wikihow", "hand_written"} <= {c.source for c in train}
  assert dev[0].prompt_turns == dev[0].turns[:1] and test[0].prompt_turns == test[0].turns
  size = sum(p.stat().st_size for p in (data.ASSETS_DIR).rglob("*") if p.is_file())
  assert size < 1_000_000


def test_schema_variants(tmp_path):
  path = _write(tmp_path / "x.jsonl", [
      {"conversations": ["q", "a"], "source": "s", "id": 7},  # Extra fields are kept.
      "",  # Blank lines are fine.
      {"conversations": ["q", "a"]},  # source is optional.
      {"conversations": [{"role": "user", "content": "q"}, {"from": "gpt", "value": "a"}]},
  ])
  convs = records.read_jsonl(path)
  assert [c.line for c in convs] == [1, 3, 4]
  assert convs[0].extra == {"id": 7} and convs[0].source == "s" and convs[1].source == ""
  assert convs[2].turns == ("q", "a")
  prompts = _write(tmp_path / "p.jsonl", [{"prompt": "q"}, {"conversations": ["q", "a", "q2"]}])
  assert [c.turns for c in records.read_jsonl(prompts, kind=records.PROMPTS)] == [("q",),
                                                                            ("q", "a", "q2")]


BAD_LINES = [
    ('{"conversations": ["q", "a"]', records.TRAIN, "not valid JSON"),
    ('["q", "a"]', records.TRAIN, "must be a JSON object"),
    ({"turns": ["q", "a"]}, records.TRAIN, "conversations: missing"),
    ({"conversations": "q"}, records.TRAIN, "conversations: must be a list"),
    ({"conversations": []}, records.TRAIN, "conversations: the list is empty"),
    ({"conversations": ["q", 3]}, records.TRAIN, r"conversations\[1\]: a turn must be a string"),
    ({"conversations": ["q", "  "]}, records.TRAIN, r"conversations\[1\]: the turn is empty"),
    ({"conversations": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
     records.TRAIN, r"conversations\[0\]: .*does not start with a user turn"),
    ({"conversations": [{"role": "system", "content": "s"}]}, records.TRAIN, "role 'system'"),
    ({"conversations": ["q"]}, records.TRAIN, "no assistant turn"),
    ({"conversations": ["q", "a", "q2"]}, records.TRAIN, "ends on a user turn"),
    ({"conversations": ["q", "a"], "source": 1}, records.TRAIN, "source: must be a string"),
    ({"conversations": ["q", "a"]}, records.PROMPTS, "a prompt must end on a user turn"),
]


@pytest.mark.parametrize("line,kind,message", BAD_LINES)
def test_bad_line_names_file_line_and_field(tmp_path, line, kind, message):
  first = {"conversations": ["q", "a"] if kind == records.TRAIN else ["q"]}  # A valid line 1.
  path = _write(tmp_path / "bad.jsonl", [first, line])
  with pytest.raises(records.DataError, match=message) as e:
    records.read_jsonl(path, kind=kind)
  assert str(e.value).startswith(f"{path}:2: ")
  assert (e.value.path, e.value.line) == (str(path), 2)


def test_bad_utf8_and_empty_files(tmp_path):
  path = tmp_path / "latin1.jsonl"
  path.write_bytes('{"conversations": ["caf\u00e9", "a"]}\n'.encode("latin-1"))
  with pytest.raises(records.DataError, match=r"latin1\.jsonl:1: not UTF-8"):
    records.read_jsonl(path)
  for content in ("", "\n  \n"):
    (tmp_path / "empty.jsonl").write_text(content)
    with pytest.raises(records.DataError, match=r"empty\.jsonl: the file has no records"):
      records.read_jsonl(tmp_path / "empty.jsonl")
  with pytest.raises(FileNotFoundError, match=r"missing\.jsonl: data file not found"):
    records.read_jsonl(tmp_path / "missing.jsonl")
  with pytest.raises(FileNotFoundError, match="the pattern matches no file"):
    records.read_conversations(str(tmp_path / "nothing*.jsonl"))


def test_skip_bad_lines_counts_and_names_them(tmp_path, tok):
  good = {"conversations": ["What is 15% of 80?", "It is 12."]}
  path = _write(tmp_path / "mixed.jsonl", [good, "{oops", good, {"conversations": ["q"]}, good,
                                           {"conversations": ["q", ""]}])
  with pytest.raises(records.DataError, match=r"mixed\.jsonl:2: not valid JSON"):
    records.read_jsonl(path)
  config = _lima_config(train_path=str(path), skip_bad_lines=True)
  train = data.make_train_loader(config, tok, global_batch_size=2, process_index=0,
                                 process_count=1)
  stats = train.stats
  assert stats.conversations == 3 and train.rows == 3
  assert [(b.path, b.line) for b in stats.bad_lines] == [(str(path), 2), (str(path), 4),
                                                         (str(path), 6)]
  assert "3 bad lines skipped" in stats.summary() and f"{path}:4: conversations: no assistant" in (
      stats.summary())
  assert stats.to_dict()["bad_line_locations"] == [f"{path}:2", f"{path}:4", f"{path}:6"]
  all_bad = _write(tmp_path / "all_bad.jsonl", ["{oops", "[]"])
  with pytest.raises(records.DataError, match=r"all_bad\.jsonl: every line is bad \(2 skipped\)"):
    records.read_jsonl(all_bad, skip_bad_lines=True)


def test_paths_globs_and_lists(tmp_path):
  a = _write(tmp_path / "a.jsonl", [{"conversations": ["q", "a"]}])
  b = _write(tmp_path / "b.jsonl", [{"conversations": ["q2", "a2"]}] * 2)
  assert len(records.read_conversations(str(tmp_path / "*.jsonl"))) == 3
  assert [c.path for c in records.read_conversations(f"{b},{a}")] == [str(b), str(b), str(a)]


# -- Batches ------------------------------------------------------------------------------------------


def test_padded_batch_format(tmp_path, tok):
  path = _write(tmp_path / "t.jsonl", [{"conversations": ["What is 15% of 80?", "It is 12."]}])
  config = _lima_config(train_path=str(path), max_len=32)
  train = data.make_train_loader(config, tok, global_batch_size=2, process_index=0,
                                 process_count=1)
  assert train.steps_per_epoch == 1
  epoch, batch = next(train)
  assert epoch == 0 and set(batch) == {"inputs", "targets", "loss_mask", "positions",
                                       "segment_ids"}
  for key, dtype in (("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                     ("positions", np.int32), ("segment_ids", np.int32)):
    assert batch[key].shape == (2, 32) and batch[key].dtype == dtype
  full = [BOS] + WHAT_IS + [EOT] + IT_IS + [EOT]  # 20 tokens -> 19 (input, target) pairs.
  row = int(np.argmax(batch["segment_ids"].max(axis=1)))  # The other row is empty padding.
  assert batch["inputs"][row, :19].tolist() == full[:-1]
  assert batch["targets"][row, :19].tolist() == full[1:]
  assert batch["loss_mask"][row].tolist() == [0.0] * 12 + [1.0] * 7 + [0.0] * 13
  assert batch["positions"][row, :19].tolist() == list(range(19))
  assert batch["segment_ids"][row].tolist() == [1] * 19 + [0] * 13
  assert not batch["segment_ids"][1 - row].any() and not batch["loss_mask"][1 - row].any()
  assert (batch["inputs"][row, 19:] == tok.pad_id).all()


def _epoch_keys(train, steps):
  return [_conversation_keys(next(train)[1]) for _ in range(steps)]


def test_shuffle_is_deterministic_and_differs_per_epoch(tok):
  config = _lima_config()  # The bundled sample: 50 conversations, max_len 512.
  train = data.make_train_loader(config, tok, global_batch_size=8, seed=0, process_index=0,
                                 process_count=1, num_epochs=2)
  assert train.steps_per_epoch == math.ceil(50 / 8) and train.total_steps == 14
  epochs = [[k for b in _epoch_keys(train, 7) for k in b] for _ in range(2)]
  with pytest.raises(StopIteration):
    next(train)
  assert sorted(epochs[0]) == sorted(epochs[1]) and len(set(epochs[0])) == 50  # Each once.
  assert epochs[0] != epochs[1]
  same = data.make_train_loader(config, tok, global_batch_size=8, seed=0, process_index=0,
                                process_count=1)
  assert [k for b in _epoch_keys(same, 7) for k in b] == epochs[0]
  other = data.make_train_loader(config, tok, global_batch_size=8, seed=1, process_index=0,
                                 process_count=1)
  assert [k for b in _epoch_keys(other, 7) for k in b] != epochs[0]


@pytest.mark.parametrize("packing", [False, True])
def test_resume_mid_epoch_gives_identical_batches(tok, packing):
  config = _lima_config(packing=packing)
  kwargs = dict(global_batch_size=4, seed=3, process_index=0, process_count=1)
  train = data.make_train_loader(config, tok, **kwargs)
  steps = train.steps_per_epoch
  for _ in range(steps // 2):
    next(train)
  state = json.loads(json.dumps(train.get_state()))  # JSON-able: checkpoints store it.
  expected = [next(train) for _ in range(steps + 2)]  # Runs into the next epoch.
  resumed = data.make_train_loader(config, tok, **kwargs)
  resumed.set_state(state)
  assert resumed.step == steps // 2
  for (e1, b1), (e2, b2) in zip(expected, (next(resumed) for _ in range(steps + 2))):
    assert e1 == e2
    for key in b1:
      np.testing.assert_array_equal(b1[key], b2[key])
  assert expected[-1][0] == 1
  mismatched = data.make_train_loader(config, tok, **{**kwargs, "seed": 4})
  with pytest.raises(ValueError, match=r"seed: saved 3, now 4"):
    mismatched.set_state(state)


@pytest.mark.parametrize("packing", [False, True])
def test_host_shares_are_disjoint_and_complete(tok, packing):
  config = _lima_config(packing=packing)
  everything = data.make_train_loader(config, tok, global_batch_size=1, process_index=0,
                                      process_count=1)
  all_keys = [k for b in _epoch_keys(everything, everything.steps_per_epoch) for k in b]
  assert len(all_keys) == len(set(all_keys)) == 50
  for count in (2, 3, 4):
    shares, steps = [], set()
    for index in range(count):
      train = data.make_train_loader(config, tok, global_batch_size=count * 2, seed=5,
                                     process_index=index, process_count=count)
      assert train.local_rows == 2
      steps.add(train.steps_per_epoch)
      shares.append([k for b in _epoch_keys(train, train.steps_per_epoch) for k in b])
    assert len(steps) == 1  # Every process takes the same number of steps.
    flat = [k for share in shares for k in share]
    assert len(flat) == len(set(flat)) and set(flat) == set(all_keys)


@pytest.mark.parametrize("packing", [False, True])
def test_which_rows_share_a_step_does_not_depend_on_the_process_count(tok, packing):
  """A run may move to another number of hosts: global batch k holds the same rows for 1, 2 or
  4 processes, in every epoch."""
  config = _lima_config(packing=packing)

  def global_batches(count):
    per_process = []
    for index in range(count):
      train = data.make_train_loader(config, tok, global_batch_size=8, seed=11, num_epochs=2,
                                     process_index=index, process_count=count)
      per_process.append(_epoch_keys(train, 2 * train.steps_per_epoch))
    return [sorted(k for keys in step for k in keys) for step in zip(*per_process)]

  one = global_batches(1)
  assert len(one) > 2 and one[0] != one[len(one) // 2]  # Several steps, reshuffled per epoch.
  assert global_batches(2) == one
  assert global_batches(4) == one


def test_a_state_resumes_on_another_process_layout(tok):
  """A checkpoint holds process 0's loader state; every process of any count restores it and
  continues with the same global batches."""
  config = _lima_config()
  kwargs = dict(global_batch_size=8, seed=2, num_epochs=2)
  one = data.make_train_loader(config, tok, process_index=0, process_count=1, **kwargs)
  for _ in range(5):
    next(one)
  state = json.loads(json.dumps(one.get_state()))
  expected = [sorted(_conversation_keys(next(one)[1])) for _ in range(4)]
  for count in (1, 2, 4):
    resumed = []
    for index in range(count):
      train = data.make_train_loader(config, tok, process_index=index, process_count=count, **kwargs)
      train.set_state(state)
      assert train.step == 5
      resumed.append([_conversation_keys(next(train)[1]) for _ in range(4)])
    assert [sorted(k for keys in step for k in keys) for step in zip(*resumed)] == expected


def test_batch_size_must_split_over_processes(tok):
  with pytest.raises(ValueError, match=r"global batch size \(6\) must be a positive multiple of "
                                       r"the process count \(4\)"):
    data.make_train_loader(_lima_config(), tok, global_batch_size=6, process_index=0,
                           process_count=4)


def test_packing_keeps_conversations_apart(tok):
  config = _lima_config(packing=True)
  examples, _ = data.load_examples(config, tok, "train")
  by_inputs = {ex.tokens[:-1].tobytes(): ex for ex in examples}
  train = data.make_train_loader(config, tok, global_batch_size=4, process_index=0,
                                 process_count=1)
  assert train.rows < len(examples)  # Several conversations share rows.
  seen, max_per_row = 0, 0
  for _ in range(train.steps_per_epoch):
    _, batch = next(train)
    seg, pos = batch["segment_ids"], batch["positions"]
    for r in range(seg.shape[0]):
      used = seg[r] > 0
      # Segments are 1, 2, ... in order, contiguous, and padding only follows them.
      assert (np.diff(seg[r][used]) >= 0).all() and (seg[r][used.sum():] == 0).all()
      max_per_row = max(max_per_row, seg[r].max())
    for r, a, b in _segments(batch):
      ex = by_inputs[batch["inputs"][r, a:b].tobytes()]  # The segment is one whole conversation.
      np.testing.assert_array_equal(batch["targets"][r, a:b], ex.tokens[1:])
      np.testing.assert_array_equal(batch["loss_mask"][r, a:b], ex.loss_mask[1:])
      np.testing.assert_array_equal(pos[r, a:b], np.arange(b - a))  # Positions restart.
      seen += 1
    # The attention mask the model builds (same nonzero segment, causal) stays inside one
    # conversation: every allowed key has the query's segment and a position not after it.
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    causal = pos[:, None, :] <= pos[:, :, None]
    q_conv = np.cumsum(np.diff(seg, prepend=0, axis=1) != 0, axis=1)  # Conversation ordinal.
    allowed = same & causal
    assert (np.broadcast_to(q_conv[:, :, None], allowed.shape)[allowed] ==
            np.broadcast_to(q_conv[:, None, :], allowed.shape)[allowed]).all()
    assert (batch["loss_mask"][seg == 0] == 0).all()
  assert seen == len(examples) and max_per_row >= 2


def test_pack_best_fit():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 100, size=300).tolist()
  rows = data.pack_best_fit(lengths, 100)
  assert sorted(i for row in rows for i in row) == list(range(300))
  assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
  lower_bound = math.ceil(sum(lengths) / 100)
  assert len(rows) <= 1.05 * lower_bound  # Within 5% of the fewest rows possible.
  # Better than filling rows in input order (next fit), the baseline packing improves on.
  next_fit, room = 0, 0
  for n in lengths:
    if n > room:
      next_fit, room = next_fit + 1, 100
    room -= n
  assert len(rows) < 0.8 * next_fit
  with pytest.raises(ValueError, match="outside"):
    data.pack_best_fit([5, 101], 100)


def test_packed_share_on_lima_like_lengths():
  """The >= 0.95 target, on LIMA's per-source length means (benchmarks/packing_efficiency.py)."""
  spec = importlib.util.spec_from_file_location("packing_efficiency",
                                                ROOT / "benchmarks" / "packing_efficiency.py")
  packing_efficiency = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(packing_efficiency)
  examples = packing_efficiency.synthetic_examples(packing_efficiency.lima_like_lengths(), 2048)
  packed = packing_efficiency.lima_pipeline_share(examples, 2048, packing=True, batch_rows=16)
  padded = packing_efficiency.lima_pipeline_share(examples, 2048, packing=False, batch_rows=16)
  assert packed["non_pad_share"] >= 0.95
  assert padded["non_pad_share"] < 0.4


def test_eval_batches_cover_every_example_once_in_order(tok):
  config = _lima_config()
  examples, _ = data.load_examples(config, tok, "dev")
  expected = [ex.tokens[:-1].tobytes() for ex in examples]
  whole = data.make_eval_batches(config, tok, global_batch_size=4, process_index=0,
                                 process_count=1)
  assert whole.num_examples == 10 and len(whole.batches) == 3
  assert [k for b in whole.batches for k in _conversation_keys(b)] == expected  # File order.
  last = whole.batches[-1]
  assert last["inputs"].shape == (4, 512)
  assert not last["segment_ids"][2:].any() and not last["loss_mask"][2:].any()  # Empty rows.
  shares = [data.make_eval_batches(config, tok, global_batch_size=4, process_index=i,
                                   process_count=2) for i in range(2)]
  assert len(shares[0].batches) == len(shares[1].batches)
  keys = [k for s in shares for b in s.batches for k in _conversation_keys(b)]
  assert sorted(keys) == sorted(expected)


def test_default_config_uses_bundled_sample_and_reports(tok, caplog):
  config = _lima_config()
  assert not config.train_path and not config.tokenizer_path
  with caplog.at_level("INFO", logger="lima_jax.data"):
    train = data.make_train_loader(config, tok, global_batch_size=8, process_index=0,
                                   process_count=1)
  assert train.stats.conversations == 50 and train.stats.truncated > 0  # max_len 512.
  assert "truncated" in caplog.text
  assert tok.eot_id == 1024 and isinstance(tok, tokenizer_lib.Tokenizer)


@pytest.mark.slow
def test_grain_worker_processes_give_the_same_batches(tok):
  in_process = data.make_train_loader(_lima_config(), tok, global_batch_size=8, process_index=0,
                                      process_count=1)
  workers = data.make_train_loader(_lima_config(worker_count=1), tok, global_batch_size=8,
                                   process_index=0, process_count=1)
  for _ in range(3):
    (_, a), (_, b) = next(in_process), next(workers)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  state = json.loads(json.dumps(workers.get_state()))
  following = next(workers)[1]
  resumed = data.make_train_loader(_lima_config(worker_count=1), tok, global_batch_size=8,
                                   process_index=0, process_count=1)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)[1]["inputs"], following["inputs"])


def test_to_global_batch_on_four_devices():
  code = textwrap.dedent("""
      import jax, numpy as np
      from jax.sharding import Mesh, PartitionSpec as P
      from lima_jax import data
      mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))
      local = {"inputs": np.arange(8 * 6, dtype=np.int32).reshape(8, 6),
               "loss_mask": np.ones((8, 6), np.float32)}
      batch = data.to_global_batch(local, mesh, P(("data", "fsdp")))
      assert batch["inputs"].shape == (8, 6) and batch["loss_mask"].dtype == np.float32
      assert len(batch["inputs"].addressable_shards) == 4
      assert {s.data.shape for s in batch["inputs"].addressable_shards} == {(2, 6)}
      np.testing.assert_array_equal(np.asarray(batch["inputs"]), local["inputs"])
      default = data.to_global_batch(local, mesh)
      assert default["inputs"].sharding.spec == P(("data", "fsdp"))
      print("ok")
  """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# -- Ablation data selection (data.sources, data.max_examples) -----------------------------------


def _selected(**overrides):
  config = _lima_config(**overrides)
  conversations = data.load_conversations(config, "train")
  return data.select_training_conversations(conversations, config, "train.jsonl")


def test_sources_keep_only_the_listed_sources(tok):
  kept = _selected(sources="wikihow, writing_prompt")
  assert {c.source for c in kept} == {"wikihow", "writing_prompt"} and len(kept) == 10
  examples, stats = data.load_examples(_lima_config(sources="wikihow"), tok, "train")
  assert len(examples) == stats.examples == 9 and stats.conversations == 50
  dev, _ = data.load_examples(_lima_config(sources="wikihow"), tok, "dev")
  assert len(dev) == 10  # Selection is for training only: dev keeps every conversation.


def test_max_examples_is_a_seeded_nested_subset_in_file_order():
  everything = _selected()
  eight = _selected(max_examples=8)
  assert len(eight) == 8 and eight == _selected(max_examples=8)
  assert [c.line for c in eight] == sorted(c.line for c in eight)
  assert set(eight) <= set(_selected(max_examples=16))  # One permutation: sizes are nested.
  assert eight != _selected(max_examples=8, subset_seed=1)
  assert _selected(max_examples=50) == everything
  stack = _selected(sources="stackexchange", max_examples=4)
  assert len(stack) == 4 and {c.source for c in stack} == {"stackexchange"}


@pytest.mark.parametrize("overrides,message", [
    ({"sources": "stackexchange,reddit"}, "data.sources names reddit, which no training conversation has; "
                                          "sources there: hand_written, stackexchange, wikihow, writing_prompt"),
    ({"max_examples": 51}, "data.max_examples=51: only 50 training conversations"),
    ({"sources": "wikihow", "max_examples": 10}, "data.max_examples=10: only 9 training conversations of data.sources"),
    ({"max_examples": -1}, "data.max_examples=-1: expected 0 (all) or a positive count"),
])
def test_bad_selection_is_bad_input(overrides, message):
  with pytest.raises(records.DataError, match=re.escape(message)):
    _selected(**overrides)


def test_selection_changes_the_training_fingerprint(tok):
  loaders = [data.make_train_loader(_lima_config(**o), tok, global_batch_size=4, process_index=0, process_count=1)
             for o in ({}, {"max_examples": 8}, {"max_examples": 8, "subset_seed": 1})]
  assert [l.steps_per_epoch for l in loaders] == [13, 2, 2]
  assert len({json.dumps(l.get_state()["fingerprint"], sort_keys=True) for l in loaders}) == 3
