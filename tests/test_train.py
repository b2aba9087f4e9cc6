"""LIMA fine-tuning: optimizer recipe, the sharded step, the CLI job, checkpoints and resume.

In-process tests use numpy-initialised tiny parameters (XLA's CPU compile of the random init is
slow); the job itself runs as `python -m lima_jax.train` subprocesses, sharing one persistent
compilation cache, so only the first run pays for compiling.
"""

import importlib.util
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import optax
import pytest

if not os.environ.get("JAX_PLATFORMS"):
  os.environ["JAX_PLATFORMS"] = "cpu"  # An installed libtpu would otherwise probe for TPUs.

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from lima_jax import checkpoint as ckpt_lib  # pylint: disable=wrong-import-position
from lima_jax import errors  # pylint: disable=wrong-import-position
from lima_jax import distributed  # pylint: disable=wrong-import-position
from lima_jax import flops  # pylint: disable=wrong-import-position
from lima_jax import model as model_lib  # pylint: disable=wrong-import-position
from lima_jax import optim  # pylint: disable=wrong-import-position
from lima_jax import sharding  # pylint: disable=wrong-import-position
from lima_jax import train  # pylint: disable=wrong-import-position
from lima_jax import train_step  # pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parent.parent


def lima_config(preset="tiny"):
  spec = importlib.util.spec_from_file_location("lima_config", ROOT / "configs" / "lima.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def small_setup(**model_overrides):
  """A 2-layer model on 32-token rows of a 61-token vocabulary, and its config."""
  config = lima_config()
  config.model.update({**dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, mlp_dim=64,
                              max_seq_len=32, residual_dropout=0.0), **model_overrides})
  config.data.max_len = 32
  config.train.batch_size = 8
  config.mesh.update(dict(data=1, fsdp=1, sequence=1, tensor=1))
  return config, model_lib.ModelConfig.from_dict(config.model)


def numpy_params(model_config, seed=0):
  """Random parameters drawn on the host (fast to make; the values are what matters here)."""
  rng = np.random.default_rng(seed)
  def draw(path, x):
    if model_lib.is_norm_scale(tuple(k.key for k in path)):
      return np.asarray(1.0 + 0.1 * rng.standard_normal(x.shape), x.dtype)
    return np.asarray(0.05 * rng.standard_normal(x.shape), x.dtype)
  return jax.tree_util.tree_map_with_path(draw, model_lib.abstract_params(model_config))


def random_batch(config, vocab_size, seed=0, rows=None):
  b, s = rows or config.train.batch_size, config.data.max_len
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab_size, (b, s + 1), dtype=np.int32)
  lengths = rng.integers(s // 2, s + 1, b)
  valid = np.arange(s)[None, :] < lengths[:, None]
  return {"inputs": np.where(valid, tokens[:, :-1], 0).astype(np.int32),
          "targets": np.where(valid, tokens[:, 1:], 0).astype(np.int32),
          "loss_mask": (valid & (np.arange(s)[None, :] >= 4)).astype(np.float32),
          "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
          "segment_ids": valid.astype(np.int32)}


def single_device_state(config, model_config, seed=0, total_steps=100):
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  params = jax.tree.map(jnp.asarray, numpy_params(model_config, seed))
  state = train_step.init_train_state(config, model_config, mesh, 0, params=params, total_steps=total_steps)
  return mesh, state


# -- The optimizer recipe ----------------------------------------------------------------------------


def test_learning_rate_is_linear_from_lr_to_end_lr_over_the_run():
  config = lima_config("7b")
  total = 240  # 15 epochs of 16 steps (LIMA: ~1,000 conversations, 64 a batch).
  schedule = optim.learning_rate_schedule(config.optimizer, total)
  for step in (0, 1, 17, 119, 200, total - 1):
    expected = 1e-5 + (1e-6 - 1e-5) * step / (total - 1)
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-6), step
  config.optimizer.warmup_steps = 10
  schedule = optim.learning_rate_schedule(config.optimizer, total)
  assert float(schedule(5)) == pytest.approx(0.5e-5, rel=1e-6)
  assert float(schedule(10)) == pytest.approx(1e-5, rel=1e-6)
  assert float(schedule(total - 1)) == pytest.approx(1e-6, rel=1e-5)


def test_paper_recipe_in_every_preset():
  for preset, batch, dropout in (("7b", 64, 0.2), ("13b", 64, 0.2), ("33b", 64, 0.2), ("65b", 32, 0.3)):
    config = lima_config(preset)
    opt = config.optimizer
    assert (opt.lr, opt.end_lr, opt.warmup_steps, opt.b1, opt.b2, opt.weight_decay,
            opt.grad_clip_norm) == (1e-5, 1e-6, 0, 0.9, 0.95, 0.1, 0.0)
    assert (config.train.epochs, config.train.batch_size, config.data.max_len) == (15, batch, 2048)
    assert config.model.residual_dropout == dropout


@pytest.mark.slow
def test_weight_decay_skips_exactly_the_norm_scales():
  config, model_config = small_setup()
  params = jax.tree.map(jnp.asarray, numpy_params(model_config))
  mask = optim.weight_decay_mask(params)
  flat = {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert {k for k, v in flat.items() if not v} == {
      "layers/attn_norm/scale", "layers/mlp_norm/scale", "final_norm/scale"}
  # With zero gradients, AdamW's whole update is the decay: -lr * wd * param, and 0 on the scales.
  tx = optim.make_optimizer(config.optimizer, total_steps=10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  lr, wd = config.optimizer.lr, config.optimizer.weight_decay
  for path, update in jax.tree_util.tree_leaves_with_path(updates):
    param = np.asarray(params_at(params, path))
    decayed = flat["/".join(k.key for k in path)]
    np.testing.assert_allclose(np.asarray(update), -lr * wd * param if decayed else 0 * param,
                               rtol=1e-5, atol=1e-12)


def params_at(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def test_gradient_clipping_is_off_by_default_and_bounds_the_gradient_when_on():
  config, model_config = small_setup()
  assert config.optimizer.grad_clip_norm == 0.0
  params = jax.tree.map(jnp.asarray, numpy_params(model_config))
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 3.0, p.dtype), params)
  grad_norm = math.sqrt(sum(9.0 * x.size for x in jax.tree.leaves(params)))
  clipped = dict(config.optimizer, grad_clip_norm=1.0)
  for opt_config, expected in ((config.optimizer, grad_norm), (clipped, 1.0)):
    tx = optim.make_optimizer(opt_config, total_steps=10)
    state = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[1])(grads, params)  # pylint: disable=cell-var-from-loop
    adam = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    # After one step nu = (1 - b2) g^2: it shows the gradient Adam saw.
    seen = math.sqrt(sum(float(jnp.sum(v)) for v in jax.tree.leaves(adam.nu)) / (1 - opt_config["b2"]))
    assert seen == pytest.approx(expected, rel=1e-4)


# -- The step --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dropout_is_active_in_training_and_off_in_eval():
  config, model_config = small_setup(residual_dropout=0.3)
  mesh, state = single_device_state(config, model_config)
  batch = {k: jnp.asarray(v) for k, v in random_batch(config, 61).items()}
  step_fn, shards, batch_shards = train_step.make_train_step(config, model_config, mesh, 100)
  eval_step = train_step.make_eval_step(model_config, mesh, shards.params, batch_shards)
  losses = jax.jit(lambda params, key: train_step.token_losses(model_config, params, batch, key))
  with_a, with_b = (np.asarray(losses(state.params, jax.random.key(i))) for i in (1, 2))
  assert not np.allclose(with_a, with_b)  # Another key, another mask...
  np.testing.assert_array_equal(with_a, np.asarray(losses(state.params, jax.random.key(1))))
  eval_sum, count = eval_step(state.params, batch)
  np.testing.assert_array_equal(np.asarray(eval_step(state.params, batch)[0]), np.asarray(eval_sum))
  eval_loss = float(eval_sum / count)
  assert abs(float(np.sum(with_a * batch["loss_mask"]) / count) - eval_loss) > 1e-3
  # ...and the training step draws one: its loss on these parameters is not the eval loss.
  _, metrics = step_fn(state, batch)
  assert abs(float(metrics["loss"]) - eval_loss) > 1e-3


@pytest.mark.slow
def test_a_handful_of_examples_is_overfit_and_accumulation_keeps_the_batch():
  config, model_config = small_setup()
  config.optimizer.update(dict(lr=1e-2, end_lr=1e-2, weight_decay=0.0))
  batch = {k: jnp.asarray(v) for k, v in random_batch(config, 61, seed=3).items()}
  mesh, initial = single_device_state(config, model_config, total_steps=60)
  step_fn, _, _ = train_step.make_train_step(config, model_config, mesh, total_steps=60)
  state, first = step_fn(jax.tree.map(jnp.copy, initial), batch)
  for _ in range(59):
    state, metrics = step_fn(state, batch)
  assert float(first["loss"]) > 3.5  # ~ln(61) at the start.
  assert float(metrics["loss"]) < 0.1 * float(first["loss"]), (first, metrics)
  # Two micro-batches of 4 make the same update as one batch of 8 (same global-token average).
  config.train.micro_batches = 2
  accumulate, _, _ = train_step.make_train_step(config, model_config, mesh, total_steps=60)
  state, metrics = accumulate(jax.tree.map(jnp.copy, initial), batch)
  state_1, metrics_1 = step_fn(initial, batch)
  for key in ("loss", "grad_norm", "loss_tokens"):
    assert float(metrics[key]) == pytest.approx(float(metrics_1[key]), rel=1e-5), key
  # Adam's first step is about lr * sign(gradient), so float noise in a near-zero gradient
  # component can move its parameter by a fraction of lr; allow 1% of lr.
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state_1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-2 * 1e-2)


def packed_batch(config):
  """A random batch with two conversations packed in row 0, and its real tokens and attended
  query-key pairs (each sequence attends only within itself)."""
  batch = random_batch(config, 61, seed=2)
  # Two conversations packed in row 0: positions restart, segment 2 of 10 tokens.
  batch["segment_ids"][0] = np.where(np.arange(32) < 20, 1, np.where(np.arange(32) < 30, 2, 0))
  batch["positions"][0] = np.where(np.arange(32) < 20, np.arange(32), np.arange(32) - 20)
  lengths = [np.bincount(row[row > 0]) for row in batch["segment_ids"]]
  tokens = sum(int(l.sum()) for l in lengths)
  attended = sum(int((l ** 2).sum()) for l in lengths)
  return batch, tokens, attended


def test_model_flops_count_real_tokens_and_attention_within_each_sequence():
  _, model_config = small_setup()
  _, tokens, attended = packed_batch(small_setup()[0])
  padded = flops.train_flops(model_config, 8, 32)
  real = flops.train_flops(model_config, 8, 32, tokens=tokens, attended=attended)
  n, width = padded["matmul_params"], 4 * 2 * 4 * 8
  assert real["model"] == 6 * n * tokens + 3 * width * attended
  assert padded["model"] == 6 * n * 8 * 32 + 3 * width * 8 * 32 ** 2
  assert real["hardware"] == padded["hardware"] > real["model"]  # The chips run the padding.


@pytest.mark.slow
def test_the_step_reports_the_real_tokens_and_attended_pairs_that_flops_count():
  config, model_config = small_setup()
  batch, tokens, attended = packed_batch(config)
  mesh, state = single_device_state(config, model_config)
  step_fn, _, _ = train_step.make_train_step(config, model_config, mesh, 100)
  _, metrics = step_fn(state, {k: jnp.asarray(v) for k, v in batch.items()})
  assert float(metrics["tokens"]) == tokens and float(metrics["attended"]) == attended


def test_one_process_stops_after_a_sigterm_and_a_lost_peer_is_told_from_a_slow_one():
  previous = signal.getsignal(signal.SIGTERM)
  stop = distributed.StopSignal()
  try:
    assert stop.enabled and not stop.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)  # The handler runs at the interpreter's next check.
    assert stop.should_stop(2)
  finally:
    stop.restore()
  assert signal.getsignal(signal.SIGTERM) is previous
  assert distributed.looks_like_lost_peer(RuntimeError("UNAVAILABLE: Connection reset by peer"))
  assert not distributed.looks_like_lost_peer(RuntimeError("DEADLINE_EXCEEDED: barrier timed out"))
  with pytest.raises(TypeError, match="workdr"):
    distributed.set_resume_hint(workdr="typo")


# -- One step on several meshes, and a checkpoint moved between them (8 simulated devices). --------

MESH_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    start = time.time()
    import jax, jax.numpy as jnp, numpy as np
    import test_train as t
    from lima_jax import checkpoint as ckpt_lib, sharding, train_step
    assert jax.device_count() == 8, jax.devices()
    config, model_config = t.small_setup(residual_dropout=0.2, **{family!r})
    # Tensor-split heads (4) and MLP (64) and a batch that splits over data x fsdp.
    batch_np = t.random_batch(config, 61, seed=5)
    host_params = t.numpy_params(model_config, seed=1)
    results = {{}}
    states = {{}}
    for name, axes, devices in (("1 device", (1, 1, 1, 1), jax.devices()[:1]),
                                ("data2 fsdp2 tensor2", (2, 2, 1, 2), jax.devices()),
                                ("fsdp8", (1, 8, 1, 1), jax.devices())):
      config.mesh.update(dict(zip(("data", "fsdp", "sequence", "tensor"), axes)))
      mesh = sharding.make_mesh(config.mesh, devices)
      step_fn, shards, batch_shards = train_step.make_train_step(config, model_config, mesh, 50)
      params = jax.device_put(host_params, shards.params)
      state = train_step.init_train_state(config, model_config, mesh, 7, params=params, total_steps=50)
      batch = {{k: jax.device_put(v, batch_shards[k]) for k, v in batch_np.items()}}
      state, metrics = step_fn(state, batch)
      state, metrics = step_fn(state, batch)
      states[name] = state
      print(name, time.time() - start, file=sys.stderr)
      q = state.params["layers"]["attn"]["q_proj"]
      bias = state.params["layers"]["attn"].get("q_bias")
      results[name] = {{"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                       "q_spec": tuple(q.sharding.spec), "q_shards": len(q.addressable_shards),
                       "bias_spec": None if bias is None else tuple(bias.sharding.spec),
                       "params": [np.asarray(x).tolist() for x in jax.tree.leaves(state.params)]}}
    # Save on the (2, 2, 1, 2) mesh, restore onto 8-way FSDP, and keep training there.
    workdir = sys.argv[1]
    manager = ckpt_lib.checkpoint_manager(workdir)
    saved = states["data2 fsdp2 tensor2"]
    ckpt_lib.save_training(manager, 2, params=saved.params, opt_state=saved.opt_state,
                           model_config=model_config, tokenizer_blob=None, train_state={{"step": 2}})
    manager.wait_until_finished()
    config.mesh.update(dict(data=1, fsdp=8, sequence=1, tensor=1))
    mesh = sharding.make_mesh(config.mesh)
    abstract = train_step.abstract_train_state(config, model_config, mesh, 50)
    params, opt_state, meta = ckpt_lib.restore_training(
        manager, 2, params_target=abstract.params, opt_state_target=abstract.opt_state)
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves((params, opt_state)), jax.tree.leaves((saved.params, saved.opt_state))))
    placed = all(a.sharding == b.sharding for a, b in
                 zip(jax.tree.leaves(params), jax.tree.leaves(abstract.params)))
    results["restore"] = {{"same": same, "placed": placed, "meta": meta,
                          "q_spec": tuple(params["layers"]["attn"]["q_proj"].sharding.spec)}}
    print("RESULT " + json.dumps(results))
""")


def run_python(code_or_args, env_extra=None, timeout=300, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.update(env_extra or {})
  args = [sys.executable, "-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
  return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                        **kwargs)


# LLaMA, and Qwen2 with a sliding window on every layer (its q/k/v biases split with the heads).
MESH_FAMILIES = {"llama": {}, "qwen2": dict(model_type="qwen2", attention_bias=True, n_kv_heads=2,
                                            sliding_window=8)}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(MESH_FAMILIES))
def test_one_step_is_the_same_on_1_and_8_devices_and_checkpoints_move_between_meshes(tmp_path,
                                                                                     compile_cache,
                                                                                     family):
  script = MESH_SCRIPT.format(tests=str(ROOT / "tests"), family=MESH_FAMILIES[family])
  proc = run_python([sys.executable, "-c", script, str(tmp_path / "wd")],
                    env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
                               **compile_cache}, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.split("RESULT ", 1)[1])
  ref = results.pop("1 device")
  restore = results.pop("restore")
  assert results["data2 fsdp2 tensor2"]["q_spec"] == [None, "fsdp", "tensor", None]
  assert results["fsdp8"]["q_spec"] == [None, "fsdp", None, None]
  assert results["fsdp8"]["q_shards"] == 8
  if family == "qwen2":
    assert results["data2 fsdp2 tensor2"]["bias_spec"] == [None, "tensor", None]
  for name, got in results.items():
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), name
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), name
    # Adam's first steps move a parameter by about lr * sign(gradient), so float noise in a
    # near-zero gradient component can move it by a fraction of lr (1e-3). Such components are
    # rare: all but 0.1% of entries agree within 1% of lr, and none is off by 10% of lr (on
    # one AVX-512 host, one entry in 4096 of the qwen2 fsdp8 run is 1.5% of lr off).
    for a, b in zip(got["params"], ref["params"]):
      a, b = np.asarray(a), np.asarray(b)
      off = np.abs(a - b) > 1e-5 + 1e-4 * np.abs(b)
      assert off.mean() <= 1e-3, (name, int(off.sum()), off.size)
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)
  assert restore["same"] and restore["placed"], restore
  assert restore["meta"] == {"step": 2}
  assert restore["q_spec"] == [None, "fsdp", None, None]


# -- The job: python -m lima_jax.train ----------------------------------------------------------------

# The tiny preset on the bundled sample, cut to 2 short epochs (7 steps each).
TINY_ARGS = ["--config=configs/lima.py:tiny", "--config.train.epochs=2",
             "--config.data.max_len=128", "--config.model.max_seq_len=128",
             "--config.sampling.max_len=128", "--config.train.dev_generations=2",
             "--config.train.dev_max_new_tokens=4", "--config.train.peak_flops_per_device=1e11"]


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
  """Environment for subprocesses that share one XLA compilation cache."""
  return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def run_train(workdir, *extra, env=None, timeout=300):
  proc = run_python([sys.executable, "-m", "lima_jax.train", f"--workdir={workdir}", *TINY_ARGS,
                     *extra], env_extra=env, timeout=timeout)
  return proc


def read_metrics(workdir):
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def final_params(workdir):
  return ckpt_lib.restore_params(workdir)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, compile_cache):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  proc = run_train(workdir, env=compile_cache)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, proc


@pytest.mark.slow
def test_tiny_preset_trains_evaluates_and_writes_what_a_user_reads(uninterrupted):
  workdir, proc = uninterrupted
  records = read_metrics(workdir)
  steps = [r for r in records if "loss" in r]
  dev = [r for r in records if "dev_loss" in r]
  assert [r["step"] for r in steps] == list(range(1, 15))
  assert np.mean([r["loss"] for r in steps[-3:]]) < np.mean([r["loss"] for r in steps[:3]]) - 0.1
  assert [r["step"] for r in dev] == [7, 14] and dev[1]["dev_loss"] < dev[0]["dev_loss"]
  assert dev[1]["dev_perplexity"] == pytest.approx(math.exp(dev[1]["dev_loss"]), rel=1e-6)
  for r in steps:
    assert {"lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu", "epoch", "padding_share"} <= set(r)
    assert r["lr"] == pytest.approx(1e-3 + (1e-4 - 1e-3) * (r["step"] - 1) / 13, rel=1e-5)
    assert 0 < r["padding_share"] < 1 and r["mfu"] < r["hfu"]  # MFU leaves the padding out.
  assert 0 < steps[-1]["mfu"] < 1
  padding = [r["epoch_padding_share"] for r in records if "epoch_padding_share" in r]
  assert len(padding) == 2 and all(0 < p < 1 for p in padding)
  assert "of the batch positions were padding" in proc.stdout + proc.stderr
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  # Generations for the first dev prompts, each epoch, and printed at the end.
  for epoch in (1, 2):
    lines = (workdir / "dev_generations" / f"epoch_{epoch}.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["index"] for r in rows] == [0, 1] and all(r["epoch"] == epoch for r in rows)
    assert all(isinstance(r["response"], str) and r["conversation"] for r in rows)
  assert "### dev prompt 0:" in proc.stdout
  # A checkpoint per epoch, readable by the functions evaluation and export use.
  assert ckpt_lib.resolve(workdir).name == "14"
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["14", "7"]
  assert ckpt_lib.read_model_config(workdir).vocab_size == 1025  # 1024 pieces + EOT.
  assert ckpt_lib.read_tokenizer_blob(workdir) is not None
  meta = ckpt_lib.read_train_state(workdir)
  assert meta["step"] == 14 and meta["epoch"] == 2.0 and len(meta["rng"]) == 2
  assert meta["config"]["train"]["epochs"] == 2 and meta["data"]["step"] == meta["step"]


@pytest.mark.slow
def test_rerunning_a_finished_run_says_so_and_exits_at_once(uninterrupted):
  workdir, _ = uninterrupted
  before = (workdir / "metrics.jsonl").read_text()
  proc = run_train(workdir, env={"LIMA_JAX_CPU_ALLOCATOR": "0"})
  assert proc.returncode == 0, proc.stderr[-4000:]
  output = proc.stdout + proc.stderr
  assert "already finished" in output and "step 14 of 14" in output
  assert "peak FLOP/s" not in output and "compiled the train step" not in output
  assert (workdir / "metrics.jsonl").read_text() == before


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def dir_bytes(path) -> int:
  return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


@pytest.mark.slow
def test_every_epoch_keeps_its_parameters_and_only_the_newest_its_optimizer_state(uninterrupted):
  workdir, _ = uninterrupted
  checkpoints = workdir / "checkpoints"
  assert not (checkpoints / "7" / "opt_state").exists() and (checkpoints / "14" / "opt_state").is_dir()
  # Epoch 1 is still a checkpoint that evaluation, export and init_from select as before.
  assert ckpt_lib.resolve(checkpoints / "7") == checkpoints / "7"
  assert ckpt_lib.read_model_config(checkpoints / "7").vocab_size == 1025
  params_7 = ckpt_lib.restore_params(checkpoints / "7")
  assert ckpt_lib.read_train_state(checkpoints / "7")["step"] == 7
  # (epochs + 3.5) x the fp32 parameters: each epoch's parameters, one optimizer state (2x),
  # and the small items; every epoch kept the moments before (3x a checkpoint).
  param_bytes = tree_bytes(params_7)
  total = dir_bytes(checkpoints)
  assert total <= (2 + 3.5) * param_bytes, (total, param_bytes, total / param_bytes)


def test_pruning_keeps_one_resumable_step_and_steps_without_opt_state_restore(tmp_path):
  config = model_lib.ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, mlp_dim=32)
  params = numpy_params(config)
  manager = ckpt_lib.checkpoint_manager(tmp_path)
  ckpt_lib.save_training(manager, 1, params=params, opt_state={"mu": params}, model_config=config,
                         tokenizer_blob=None, train_state={"step": 1})
  assert ckpt_lib.prune_optimizer_state(manager) == []  # Step 1 may still be in flight.
  manager.wait_until_finished()
  assert ckpt_lib.prune_optimizer_state(manager) == []  # The only resumable step stays.
  ckpt_lib.save_training(manager, 2, params=params, opt_state={"mu": params}, model_config=config,
                         tokenizer_blob=None, train_state={"step": 2})
  manager.wait_until_finished()
  assert ckpt_lib.resumable_steps(manager) == [1, 2]
  assert ckpt_lib.prune_optimizer_state(manager) == [1]
  assert ckpt_lib.resumable_steps(manager) == [2] and ckpt_lib.finished_steps(manager) == [1, 2]
  step_1 = tmp_path / "checkpoints" / "1"
  assert ckpt_lib.is_checkpoint(step_1) and not ckpt_lib.has_optimizer_state(step_1)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  restored, opt_state, meta = ckpt_lib.restore_training(manager, 1, params_target=target)
  assert opt_state is None and meta == {"step": 1}
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), b)
  with pytest.raises(FileNotFoundError, match="no opt_state/ item"):
    ckpt_lib.restore_training(manager, 1, params_target=target, opt_state_target={"mu": target})
  manager.close()


@pytest.mark.slow
def test_stopped_and_resumed_run_ends_bit_identical(uninterrupted, tmp_path, compile_cache):
  reference, _ = uninterrupted
  workdir = tmp_path / "resumed"
  first = run_train(workdir, "--config.train.stop_at_step=9", env=compile_cache)
  assert first.returncode == 0, first.stderr[-4000:]
  assert ckpt_lib.read_train_state(workdir)["step"] == 9
  # Step 9's save pruned epoch 1's moments; the run resumes exactly from step 9.
  assert [s for s in (7, 9) if (workdir / "checkpoints" / str(s) / "opt_state").is_dir()] == [9]
  second = run_train(workdir, env=compile_cache)
  assert second.returncode == 0, second.stderr[-4000:]
  assert "resumed from" in second.stdout + second.stderr
  assert [s for s in (7, 9, 14) if (workdir / "checkpoints" / str(s) / "opt_state").is_dir()] == [14]
  a, b = final_params(reference), final_params(workdir)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  steps = [r["step"] for r in read_metrics(workdir) if "loss" in r]
  assert steps == list(range(1, 15))  # One line per step, as if never stopped.
  ref_losses = [r["loss"] for r in read_metrics(reference) if "loss" in r]
  assert [r["loss"] for r in read_metrics(workdir) if "loss" in r] == ref_losses


@pytest.mark.slow
def test_without_any_optimizer_state_the_run_continues_from_parameters_and_says_so(
    uninterrupted, tmp_path, compile_cache):
  import shutil  # pylint: disable=g-import-not-at-top
  reference, _ = uninterrupted
  workdir = tmp_path / "params_only"
  shutil.copytree(reference / "checkpoints" / "7", workdir / "checkpoints" / "7")  # Pruned.
  proc = run_train(workdir, "--config.train.keep_epochs=2", env=compile_cache)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "NOT an exact resume" in proc.stdout + proc.stderr
  # Epoch 1 is not in train.keep_epochs: deleted once epoch 2's checkpoint was committed.
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["14"]
  steps = [r for r in read_metrics(workdir) if "loss" in r]
  assert [r["step"] for r in steps] == list(range(8, 15))
  assert ckpt_lib.read_train_state(workdir)["step"] == 14
  # optax's step counters (the lr schedule's, Adam's bias correction's) continued from 7.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.PyTreeCheckpointer() as checkpointer:
    opt_state = checkpointer.restore(workdir / "checkpoints" / "14" / "opt_state")
  counts = [int(v) for p, v in jax.tree_util.tree_leaves_with_path(opt_state)
            if jax.tree_util.keystr(p).endswith("['count']")]
  assert counts and all(c == 14 for c in counts), counts


def test_keep_epochs_keeps_those_epoch_ends_and_always_the_newest_step():
  assert train.parse_epochs("") is None
  assert train.parse_epochs("5-10") == frozenset(range(5, 11))
  assert train.parse_epochs("1, 5-6,9") == frozenset({1, 5, 6, 9})
  for bad in ("0-3", "7-5", "five", "5-"):
    with pytest.raises(errors.InputError, match="train.keep_epochs"):
      train.parse_epochs(bad)
  keep = train.parse_epochs("2-3")
  # 7 steps an epoch: 7, 14, 21, 28 are epoch ends; 10 a periodic save; 30 the newest.
  assert train.superseded_steps([7, 10, 14, 21, 28, 30], keep, 7) == [7, 10, 28]
  assert train.superseded_steps([7, 10], keep, 7) == [7]
  assert train.superseded_steps([7, 10], None, 7) == []


# Qwen2 with its q/k/v biases and a sliding window shorter than the rows, one epoch (7 steps).
QWEN2_ARGS = ["--config.model.model_type=qwen2", "--config.model.attention_bias=True",
              "--config.model.n_kv_heads=2", "--config.model.sliding_window=16",
              "--config.train.epochs=1", "--config.train.dev_generations=0"]


@pytest.mark.slow
def test_a_qwen2_run_stopped_and_resumed_ends_bit_identical(tmp_path, compile_cache):
  reference = run_train(tmp_path / "reference", *QWEN2_ARGS, env=compile_cache)
  assert reference.returncode == 0, reference.stderr[-4000:]
  assert ckpt_lib.read_model_config(tmp_path / "reference").attention_bias
  first = run_train(tmp_path / "resumed", *QWEN2_ARGS, "--config.train.stop_at_step=3",
                    env=compile_cache)
  assert first.returncode == 0, first.stderr[-4000:]
  second = run_train(tmp_path / "resumed", *QWEN2_ARGS, env=compile_cache)
  assert second.returncode == 0, second.stderr[-4000:]
  assert "resumed from" in second.stdout + second.stderr
  a, b = final_params(tmp_path / "reference"), final_params(tmp_path / "resumed")
  assert "q_bias" in a["layers"]["attn"]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  losses = lambda w: [r["loss"] for r in read_metrics(w) if "loss" in r]
  assert losses(tmp_path / "resumed") == losses(tmp_path / "reference") and len(losses(tmp_path / "reference")) == 7


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_exits_cleanly(tmp_path, compile_cache):
  workdir = tmp_path / "preempted"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **compile_cache)
  # Many epochs, so the run is still going when the signal arrives.
  proc = subprocess.Popen([sys.executable, "-m", "lima_jax.train", f"--workdir={workdir}",
                           *TINY_ARGS, "--config.train.epochs=50",
                           "--config.train.dev_generations=0"],
                          env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics_file = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics_file.exists() and any("loss" in json.loads(l) for l in metrics_file.read_text().splitlines()):
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.communicate()[1][-3000:]
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  meta = ckpt_lib.read_train_state(workdir)
  assert 1 <= meta["step"] < 50 * 7
  assert ckpt_lib.resolve(workdir).name == str(meta["step"])


@pytest.mark.slow
def test_bad_data_fails_before_compiling_with_status_2(tmp_path):
  bad = tmp_path / "train.jsonl"
  bad.write_text('{"conversations": ["hi", "hello"]}\n{"conversations": "not a list"}\n')
  start = time.time()
  proc = run_train(tmp_path / "wd", f"--config.data.train_path={bad}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert f"{bad}:2" in proc.stderr
  assert not (tmp_path / "wd" / "checkpoints").exists()
  assert time.time() - start < 60


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    import jax.numpy as jnp
    from lima_jax import checkpoint as ckpt_lib, model as model_lib
    config = model_lib.ModelConfig(vocab_size=64, d_model=8, n_layers=1, n_heads=1, mlp_dim=8)
    manager = ckpt_lib.checkpoint_manager(sys.argv[1])
    big = {"w": jnp.ones((64, 1024, 1024), jnp.float32)}  # 256 MiB: still writing when we die.
    ckpt_lib.save_training(manager, 3, params=big, opt_state=big, model_config=config,
                           tokenizer_blob=None, train_state={"step": 3})
    os._exit(1)
""")


def test_an_unfinished_save_is_not_a_checkpoint_even_with_all_its_items(tmp_path):
  """Orbax's finish mark decides (a temporary name here; commit_success.txt on GCS), not the
  presence of params/ and model_config/."""
  config = model_lib.ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, mlp_dim=32)
  done = tmp_path / "done"
  ckpt_lib.save_model(done, model_lib.init_params(config, jax.random.key(0)), config)
  assert ckpt_lib.resolve(done) == done
  unfinished = tmp_path / "7.orbax-checkpoint-tmp-1700000000"
  done.rename(unfinished)
  assert not ckpt_lib.is_checkpoint(unfinished)
  with pytest.raises(FileNotFoundError, match="an unfinished save"):
    ckpt_lib.resolve(unfinished)


def test_a_crash_mid_save_leaves_nothing_that_looks_complete(tmp_path):
  proc = run_python([sys.executable, "-c", CRASH_SCRIPT, str(tmp_path)])
  assert proc.returncode == 1, proc.stderr[-3000:]
  leftovers = list((tmp_path / "checkpoints").iterdir())
  assert leftovers and all(".orbax-checkpoint-tmp" in p.name for p in leftovers), leftovers
  with pytest.raises(FileNotFoundError):
    ckpt_lib.resolve(tmp_path)
  manager = ckpt_lib.checkpoint_manager(tmp_path)
  assert manager.latest_step() is None
  deadline = time.time() + 30  # The next run's manager deletes the stale directory (in the background).
  while list((tmp_path / "checkpoints").iterdir()) and time.time() < deadline:
    time.sleep(0.2)
  manager.close()
  assert not list((tmp_path / "checkpoints").iterdir())


def test_pretrained_hf_weights_load_into_shards_with_an_eot_row_at_the_mean(tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from lima_jax import data  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=1024, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=128, tie_word_embeddings=False)
  hf = transformers.LlamaForCausalLM(hf_config)
  hf.save_pretrained(tmp_path, safe_serialization=True)
  shutil.copy(data.bundled_paths()["tokenizer"], tmp_path / "tokenizer.model")
  config = lima_config()
  config.model.init_from = str(tmp_path)
  config.data.max_len = 128  # The model's max_position_embeddings.
  config.mesh.update(dict(data=1, fsdp=1, sequence=1, tensor=1))
  tokenizer = train.load_run_tokenizer(config)
  assert tokenizer.vocab_size == 1025 and tokenizer.eot_id == 1024
  model_config = train.build_model_config(config, tokenizer)
  assert (model_config.vocab_size, model_config.n_layers, model_config.d_model) == (1025, 2, 64)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  with warnings.catch_warnings():  # Growing the tables donates none it cannot reuse.
    warnings.filterwarnings("error", message="Some donated buffers were not usable")
    params = train.load_pretrained_params(config, model_config, mesh)
  state = hf.state_dict()
  embed = np.asarray(params["embed"]["embedding"])
  hf_embed = state["model.embed_tokens.weight"].numpy()
  np.testing.assert_array_equal(embed[:1024], hf_embed)
  np.testing.assert_allclose(embed[1024], hf_embed.mean(0), rtol=1e-5, atol=1e-7)
  assert not embed[1025:].any()  # Padding rows up to 1152.
  head = np.asarray(params["lm_head"])
  np.testing.assert_array_equal(head[:, :1024], state["lm_head.weight"].numpy().T)
  np.testing.assert_allclose(head[:, 1024], state["lm_head.weight"].numpy().mean(0), rtol=1e-5, atol=1e-7)
  q = np.asarray(params["layers"]["attn"]["q_proj"])[1].reshape(64, 64)
  np.testing.assert_array_equal(q, state["model.layers.1.self_attn.q_proj.weight"].numpy().T)
  # The optimizer state is then made around them, already in place.
  fresh = train_step.init_train_state(config, model_config, mesh, 0, params=params, total_steps=10)
  np.testing.assert_array_equal(np.asarray(fresh.params["embed"]["embedding"]), embed)


def test_an_embedding_padded_past_the_tokenizer_gives_eot_a_fresh_mean_row_in_place(tmp_path):
  """As 32064 rows for a 32000-piece tokenizer: EOT's id (the tokenizer's size) is a padding row
  of the pretrained model; it becomes the mean of the tokenizer's rows, the size stays."""
  import shutil  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from lima_jax import data  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=1088, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=4, max_position_embeddings=128, tie_word_embeddings=False))
  hf.save_pretrained(tmp_path, safe_serialization=True)
  shutil.copy(data.bundled_paths()["tokenizer"], tmp_path / "tokenizer.model")
  config = lima_config()
  config.model.init_from = str(tmp_path)
  config.data.max_len = 128
  config.mesh.update(dict(data=1, fsdp=1, sequence=1, tensor=1))
  tokenizer = train.load_run_tokenizer(config)
  assert (tokenizer.base_vocab_size, tokenizer.eot_id) == (1024, 1024)
  model_config = train.build_model_config(config, tokenizer)
  assert model_config.vocab_size == 1088
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  params = train.load_pretrained_params(config, model_config, mesh, tokenizer)
  state = hf.state_dict()
  for got, want in ((np.asarray(params["embed"]["embedding"]), state["model.embed_tokens.weight"].numpy()),
                    (np.asarray(params["lm_head"]).T, state["lm_head.weight"].numpy())):
    np.testing.assert_allclose(got[1024], want[:1024].mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.delete(got[:1088], 1024, axis=0), np.delete(want, 1024, axis=0))
  # A context longer than the checkpoint's is refused before anything compiles.
  config.data.max_len = 256
  with pytest.raises(errors.InputError, match="max_position_embeddings=128.*data.max_len=128"):
    train.build_model_config(config, tokenizer)


@pytest.mark.slow
def test_max_len_past_max_seq_len_fails_before_compiling_with_status_2(tmp_path):
  proc = run_train(tmp_path / "wd", "--config.data.max_len=256")  # model.max_seq_len=128.
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "data.max_len=256 is longer than model.max_seq_len=128" in proc.stderr
  assert "--config.model.max_seq_len=256" in proc.stderr
  assert "compiled the train step" not in proc.stdout + proc.stderr
  assert not (tmp_path / "wd" / "checkpoints").exists()


def test_progress_is_a_plain_line_every_n_steps_when_stderr_is_not_a_terminal(capsys):
  """A redirected log gets readable lines, not tqdm's carriage returns."""
  from lima_jax import metrics  # pylint: disable=g-import-not-at-top
  bar = metrics.ProgressBar(7, 0, every=3)
  for step in range(7):
    bar.update({"loss": f"{1.0 / (step + 1):.4f}"})
  bar.close()
  lines = capsys.readouterr().err.splitlines()
  assert [line.split(" ", 2)[2].split(":")[0] for line in lines] == ["3/7", "6/7", "7/7"]
  assert "\r" not in "".join(lines) and all("loss" in line and "ETA" in line for line in lines)
