"""The fused optimizer step (lima_jax.fused_update) is the ordinary step's update without its
whole-model gradient: equal parameters and AdamW moments after 3 steps, on 1 and 8 devices, for
the LLaMA, Mistral and Qwen2 shapes with residual dropout on; the ordinary step wherever the
fused one does not apply, and the log says which runs.

Equal means to float rounding: each parameter and moment tensor of the fused run is within
1e-6 of the ordinary run's, relative to the tensor's norm. (An element-wise bound would test
float noise: Qwen2's k bias has an exactly-zero true gradient, since softmax ignores a shift of
every key score, so Adam moves it by lr times the sign of rounding noise in either step.)
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

if not os.environ.get("JAX_PLATFORMS"):
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # pylint: disable=wrong-import-position

from lima_jax import fused_update  # pylint: disable=wrong-import-position
from lima_jax import lora as lora_lib  # pylint: disable=wrong-import-position
from lima_jax import model as model_lib  # pylint: disable=wrong-import-position
from lima_jax import sharding  # pylint: disable=wrong-import-position
from lima_jax import train_step  # pylint: disable=wrong-import-position

import test_train  # pylint: disable=wrong-import-position  # tests/ is on the path (pyproject), or the script's folder.

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The families' shapes, each under a different remat policy (the fused step keeps the model's).
FAMILIES = {
    "llama": dict(remat_policy="full"),
    "mistral": dict(model_type="mistral", n_kv_heads=2, sliding_window=8, remat_policy="save_dots"),
    "qwen2": dict(model_type="qwen2", attention_bias=True, tie_embeddings=True, remat_policy="none"),
}
STEPS = 3


def run_steps(family: str, fused: bool, devices: int) -> tuple[dict, list[dict]]:
  """(final params and optimizer state on the host, each step's metrics) of 3 steps."""
  config, model_config = test_train.small_setup(residual_dropout=0.1, **FAMILIES[family])
  config.train.fused_update = fused
  if devices > 1:
    config.mesh.update(dict(data=2, fsdp=devices // 2))
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:devices])
  step, shards, batch_shards = train_step.make_train_step(config, model_config, mesh, 10)
  assert train_step.update_kind(config, model_config) == ("fused" if fused else "ordinary")
  params = jax.device_put(test_train.numpy_params(model_config), shards.params)
  state = train_step.init_train_state(config, model_config, mesh, 0, params, 10)
  metrics = []
  for i in range(STEPS):
    batch = {k: jax.device_put(v, batch_shards[k])
             for k, v in test_train.random_batch(config, model_config.vocab_size, seed=i).items()}
    state, m = step(state, batch)
    metrics.append({k: float(v) for k, v in m.items()})
  return jax.device_get({"params": state.params, "opt_state": state.opt_state}), metrics


def relative_differences(family: str, devices: int) -> dict:
  """Per state tensor, |fused - ordinary| / |ordinary| (norms); and both runs' metrics."""
  fused, fused_metrics = run_steps(family, True, devices)
  ordinary, ordinary_metrics = run_steps(family, False, devices)
  diffs = {}
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(fused), jax.tree.leaves(ordinary)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diffs[jax.tree_util.keystr(path)] = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
  return {"diffs": diffs, "fused": fused_metrics, "ordinary": ordinary_metrics}


def check_equal(result: dict) -> None:
  worst = max(result["diffs"], key=result["diffs"].get)
  assert result["diffs"][worst] <= 1e-6, (worst, result["diffs"][worst])
  assert len(result["diffs"]) > 20  # Parameters and both moments of every tensor were compared.
  for fused, ordinary in zip(result["fused"], result["ordinary"]):
    for key in ("loss", "grad_norm", "lr", "loss_tokens"):
      assert fused[key] == pytest.approx(ordinary[key], rel=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_three_fused_steps_equal_the_ordinary_steps_on_one_device(family):
  check_equal(relative_differences(family, 1))


@pytest.mark.slow
def test_three_fused_steps_equal_the_ordinary_steps_on_8_devices(compile_cache):
  proc = subprocess.run(
      [sys.executable, __file__, *sorted(FAMILIES)], capture_output=True, text=True, timeout=900,
      env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           **compile_cache}, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.split("RESULT ", 1)[1])
  assert sorted(results) == sorted(FAMILIES)
  for result in results.values():
    check_equal(result)


@pytest.mark.slow
def test_the_fused_step_holds_no_stacked_layer_gradient():
  """The compiled step's temporaries shrink by the layers' fp32 gradient less one layer's
  working set (its gradient and new slices; 16 layers make that small), by XLA:CPU's memory
  analysis (the TPU figures are docs/tpu_table.md's). Copies of the stacked weights or moments
  in the layer loop, the failure this guards against, would add to them instead."""
  config, model_config = test_train.small_setup(d_model=128, n_layers=16, n_heads=4, mlp_dim=512,
                                                vocab_size=256, remat_policy="full")
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  temporaries = {}
  for fused in (True, False):
    config.train.fused_update = fused
    step, _, _ = train_step.make_train_step(config, model_config, mesh, 10)
    compiled = step.lower(train_step.abstract_train_state(config, model_config, mesh, 10),
                          train_step.abstract_batch(config, mesh)).compile()
    temporaries[fused] = compiled.memory_analysis().temp_size_in_bytes
  layer_gradient = sum(x.size * 4 for x in jax.tree.leaves(
      model_lib.abstract_params(model_config)["layers"]))
  assert temporaries[False] - temporaries[True] >= 0.6 * layer_gradient, (temporaries, layer_gradient)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@pytest.mark.parametrize("override, reason", [
    ({}, None),
    ({"optimizer.grad_clip_norm": 1.0}, "clipping"),
    ({"train.micro_batches": 2}, "micro_batches"),
    ({"lora": 4}, "LoRA"),
    ({"model.scan_layers": False}, "scan_layers"),
    ({"train.fused_update": False}, "fused_update=False"),
])
def test_the_fused_step_runs_only_where_it_applies_and_the_log_says_which(override, reason, capsys):
  config, _ = test_train.small_setup()
  for key, value in override.items():
    if "." in key:
      section, field = key.split(".")
      config[section][field] = value
  model_config = model_lib.ModelConfig.from_dict(config.model)
  if "lora" in override:
    model_config = model_config.replace(lora=lora_lib.LoraConfig(rank=override["lora"], alpha=8.0))
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  train_step.make_train_step(config, model_config, mesh, 10)
  logged = capsys.readouterr().out
  if reason is None:
    assert train_step.update_kind(config, model_config) == fused_update.FUSED
    assert "fused optimizer step" in logged
  else:
    assert train_step.update_kind(config, model_config) == fused_update.ORDINARY
    assert "ordinary optimizer step" in logged and reason in logged


if __name__ == "__main__":
  # The 8-device comparison, in a process whose XLA_FLAGS made 8 host devices.
  print("RESULT " + json.dumps({family: relative_differences(family, 8) for family in sys.argv[1:]}))
