"""LoRA: adapters start at the base, only they and the EOT rows train, small checkpoints that
resume bit-exactly, and exports (merged Hugging Face model, PEFT adapters) with equal logits."""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest

if not os.environ.get("JAX_PLATFORMS"):
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from lima_jax import checkpoint as ckpt_lib  # pylint: disable=wrong-import-position
from lima_jax import lora as lora_lib  # pylint: disable=wrong-import-position
from lima_jax import model as model_lib  # pylint: disable=wrong-import-position
from lima_jax import sharding  # pylint: disable=wrong-import-position
from lima_jax import train  # pylint: disable=wrong-import-position
from lima_jax import train_step  # pylint: disable=wrong-import-position
from test_train import (TINY_ARGS, compile_cache, lima_config, numpy_params,  # pylint: disable=unused-import
                        random_batch, run_python, small_setup)

ROOT = pathlib.Path(__file__).resolve().parent.parent
LORA_ARGS = ["--config.lora.rank=4", "--config.lora.alpha=8", "--config.lora.base_dtype=float32",
             "--config.train.dev_generations=1"]


def logits_fn(model_config):
  """Jitted logits of a parameter tree (eager would compile every op on its own)."""
  return jax.jit(lambda params, tokens: model_lib.bind(model_config, params)(tokens))


def lora_model(model_config, **kw):
  return model_config.replace(lora=lora_lib.LoraConfig(**{"rank": 4, "alpha": 8.0, **kw}))


@pytest.mark.slow
def test_fresh_adapters_compute_the_base_and_merging_keeps_the_logits():
  _, base_config = small_setup(n_kv_heads=2)
  config = lora_model(base_config, token_ids=(59, 60))
  base = jax.tree.map(jnp.asarray, numpy_params(base_config))
  trainable = lora_lib.init_trainable(config, base, jax.random.key(1))
  a = np.asarray(trainable["layers"]["attn"]["lora"]["q_proj"]["a"])
  assert a.shape == (2, 32, 4) and 0 < np.abs(a).max() <= 1 / np.sqrt(32)  # PEFT's kaiming bound.
  tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % 61
  base_logits = logits_fn(base_config)(base, tokens)
  lora_logits_of = logits_fn(config)
  fresh = lora_logits_of(lora_lib.join(config, base, trainable), tokens)
  np.testing.assert_array_equal(np.asarray(fresh), np.asarray(base_logits))
  moved = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), trainable)
  joined = lora_lib.join(config, base, moved)
  lora_logits = lora_logits_of(joined, tokens)
  merged, merged_config = jax.jit(lambda p: lora_lib.merge(config, p)[0])(joined), lora_lib.base_config(config)
  assert merged_config.lora is None and "lora" not in merged["layers"]["attn"]
  np.testing.assert_allclose(np.asarray(logits_fn(merged_config)(merged, tokens)),
                             np.asarray(lora_logits), atol=2e-5)
  assert np.abs(np.asarray(lora_logits) - np.asarray(base_logits)).max() > 1e-2


@pytest.mark.slow
def test_only_adapters_and_eot_rows_train_and_the_base_has_no_optimizer_state():
  config, base_config = small_setup(residual_dropout=0.1)
  config.optimizer.lr = 1e-2
  model_config = lora_model(base_config, token_ids=(60,), dropout=0.1)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  base = jax.tree.map(jnp.asarray, numpy_params(base_config))
  state = train_step.init_train_state(config, model_config, mesh, 0, base, total_steps=10)
  opt_leaves = jax.tree.leaves(state.opt_state)
  n_trainable = sum(x.size for x in jax.tree.leaves(state.params))
  assert n_trainable == lora_lib.num_trainable(model_config)
  assert sum(x.size for x in opt_leaves) <= 2 * n_trainable + 8  # Adam's two moments + counters.
  frozen_before = jax.tree.map(np.asarray, state.frozen)
  trainable_before = jax.tree.map(np.asarray, state.params)
  step, _, _ = train_step.make_train_step(config, model_config, mesh, total_steps=10)
  for i in range(2):
    state, metrics = step(state, random_batch(config, 61, seed=i))
    assert np.isfinite(float(metrics["loss"]))
  for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(before, np.asarray(after))
  for before, after in zip(jax.tree.leaves(trainable_before), jax.tree.leaves(state.params)):
    assert np.abs(before - np.asarray(after)).max() > 0  # Every adapter and row moved.
  full = train_step.full_params(model_config, state)
  embed = np.asarray(full["embed"]["embedding"])
  np.testing.assert_array_equal(embed[:60], frozen_before["embed"]["embedding"][:60])
  np.testing.assert_array_equal(embed[60], np.asarray(state.params["rows"]["embedding"][0]))


MESH_SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np
from test_train import numpy_params, random_batch, small_setup
from lima_jax import lora as lora_lib, model as model_lib, sharding, train_step
out = {{}}
for name, mesh_config, count in (("1 device", dict(data=1, fsdp=1, sequence=1, tensor=1), 1),
                                 ("data2 fsdp2 tensor2", dict(data=2, fsdp=2, sequence=1, tensor=2), 8)):
  config, base_config = small_setup(residual_dropout=0.1)
  config.mesh.update(mesh_config)
  model_config = base_config.replace(lora=lora_lib.LoraConfig(rank=4, token_ids=(60,), dropout=0.1))
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:count])
  base = jax.device_put(numpy_params(base_config), model_lib.param_shardings(base_config, mesh))
  state = train_step.init_train_state(config, model_config, mesh, 0, base, total_steps=10)
  step, _, _ = train_step.make_train_step(config, model_config, mesh, total_steps=10)
  state, m = step(state, random_batch(config, 61))
  b = state.params["layers"]["attn"]["lora"]["q_proj"]["b"]
  out[name] = {{"loss": float(m["loss"]), "spec": [list(s) if isinstance(s, tuple) else s
                                                  for s in b.sharding.spec],
               "params": [np.asarray(x).tolist() for x in jax.tree.leaves(state.params)]}}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_a_lora_step_is_the_same_on_1_and_8_devices_with_adapters_sharded_like_their_weight(
    compile_cache):
  proc = run_python(["python", "-c", MESH_SCRIPT.format(tests=str(ROOT / "tests"))],
                    env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
                               **compile_cache}, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.split("RESULT ", 1)[1])
  ref, got = results["1 device"], results["data2 fsdp2 tensor2"]
  assert got["spec"] == [None, None, "tensor", None]  # B [L, rank, heads, head_dim]: heads split.
  assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
  for a, b in zip(got["params"], ref["params"]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# -- The training job, from a Hugging Face base, and the exports. -------------------------------


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from lima_jax import data  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  directory = tmp_path_factory.mktemp("hf_base")
  hf_config = transformers.LlamaConfig(
      vocab_size=1024, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      tie_word_embeddings=False)
  transformers.LlamaForCausalLM(hf_config).save_pretrained(directory, safe_serialization=True)
  shutil.copy(data.bundled_paths()["tokenizer"], directory / "tokenizer.model")
  return directory


def run_lora(workdir, base, *extra, env=None):
  proc = run_python(["python", "-m", "lima_jax.train", f"--workdir={workdir}", *TINY_ARGS,
                     *LORA_ARGS, f"--config.model.init_from={base}", *extra],
                    env_extra=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.fixture(scope="module")
def lora_run(hf_base, tmp_path_factory, compile_cache):
  workdir = tmp_path_factory.mktemp("lora_run")
  proc = run_lora(workdir, hf_base, env=compile_cache)
  return workdir, proc


def nnx_params(model) -> dict:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx.to_pure_dict(nnx.state(model))


def dir_bytes(path) -> int:
  return sum(p.stat().st_size for p in pathlib.Path(path).rglob("*") if p.is_file())


@pytest.mark.slow
def test_checkpoints_hold_only_adapters_and_rows_and_name_their_base(lora_run, hf_base):
  workdir, proc = lora_run
  assert "LoRA rank 4" in proc.stdout + proc.stderr
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [7, 14]  # Each epoch's checkpoint (7 steps an epoch).
  config = ckpt_lib.read_model_config(workdir)
  assert config.lora.base == str(hf_base) and config.lora.token_ids == (1024,)
  params = ckpt_lib.restore_params(workdir)
  assert sorted(params) == ["layers", "rows"] and sorted(params["layers"]["attn"]) == ["lora"]
  assert params["rows"]["embedding"].shape == (1, 64)
  ckpt = ckpt_lib.resolve(workdir)
  base_bytes = dir_bytes(hf_base)
  assert dir_bytes(ckpt / "params") + dir_bytes(ckpt / "opt_state") < 0.25 * base_bytes


def lora_logits(workdir, tokens):
  """The LoRA model's logits as training computes them: base + unmerged adapters + rows."""
  config = lima_config()
  model_config = ckpt_lib.read_model_config(workdir)
  config.model.init_from = model_config.lora.base
  config.mesh.update(dict(data=1, fsdp=1, sequence=1, tensor=1))
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  base = train.load_pretrained_params(config, model_config, mesh)
  full = lora_lib.join(model_config, base, ckpt_lib.restore_params(workdir))
  return np.asarray(logits_fn(model_config.replace(dtype="float32"))(full, tokens))


TOKENS = np.array([[1, 5, 9, 300, 1024, 77, 2, 1024], [1, 1000, 1023, 42, 8, 1024, 3, 4]], np.int32)


@pytest.mark.slow
def test_stopped_and_resumed_lora_run_ends_bit_identical(lora_run, hf_base, tmp_path, compile_cache):
  reference, _ = lora_run
  workdir = tmp_path / "resumed"
  run_lora(workdir, hf_base, "--config.train.stop_at_step=4", env=compile_cache)
  second = run_lora(workdir, hf_base, env=compile_cache)
  assert "resumed from" in second.stdout + second.stderr
  a, b = ckpt_lib.restore_params(reference), ckpt_lib.restore_params(workdir)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_merged_exports_and_load_pretrained_equal_the_lora_logits(lora_run, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import lima_jax  # pylint: disable=g-import-not-at-top
  workdir, _ = lora_run
  expected = lora_logits(workdir, TOKENS)
  loaded = lima_jax.load_pretrained(workdir)
  assert loaded.config.lora is None
  np.testing.assert_allclose(np.asarray(logits_fn(loaded.config)(nnx_params(loaded), TOKENS)),
                             expected, atol=2e-5)
  from lima_jax import inference  # pylint: disable=g-import-not-at-top  # evaluate.py and chat.py's loader.
  served = inference.load_model(workdir, dtype="float32")
  assert served.tokenizer.eot_id == 1024 and any("merged rank-4 LoRA" in n for n in served.notes)
  np.testing.assert_allclose(
      np.asarray(logits_fn(served.model_config)(served.params, TOKENS)), expected, atol=2e-5)
  proc = run_python(["python", "tools/convert_weights.py", "orbax-to-hf", f"--ckpt_dir={workdir}",
                     f"--hf_dir={tmp_path / 'hf'}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
  with torch.no_grad():
    got = hf(torch.from_numpy(TOKENS).long()).logits.numpy()
  np.testing.assert_allclose(got, expected, atol=2e-5)


@pytest.mark.slow
def test_peft_loads_the_adapters_onto_the_base_with_equal_logits(lora_run, hf_base, tmp_path):
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  workdir, _ = lora_run
  peft_dir = tmp_path / "adapter"
  proc = run_python(["python", "tools/convert_weights.py", "orbax-to-peft", f"--ckpt_dir={workdir}",
                     f"--peft_dir={peft_dir}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  adapter_config = json.loads((peft_dir / "adapter_config.json").read_text())
  assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8
  assert adapter_config["trainable_token_indices"] == {"embed_tokens": [1024], "lm_head": [1024]}
  base = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
  base.resize_token_embeddings(1025)  # The EOT row; PEFT's trainable tokens set its values.
  model = peft.PeftModel.from_pretrained(base, peft_dir)
  model.eval()
  with torch.no_grad():
    got = model(torch.from_numpy(TOKENS).long()).logits.numpy()
  np.testing.assert_allclose(got, lora_logits(workdir, TOKENS), atol=2e-5)


def test_a_full_checkpoint_is_refused_by_orbax_to_peft(tmp_path):
  from lima_jax import convert  # pylint: disable=g-import-not-at-top
  from lima_jax import lora_io  # pylint: disable=g-import-not-at-top
  _, base_config = small_setup()
  ckpt_lib.save_model(tmp_path / "full", numpy_params(base_config), base_config)
  with pytest.raises(convert.ConversionError, match="not a LoRA checkpoint"):
    lora_io.save_peft(tmp_path / "full", tmp_path / "adapter")
  assert not (tmp_path / "adapter").exists()
