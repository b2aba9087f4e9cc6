"""A workdir knows what it holds; a step that cannot fit stops before step 1; the recipe warnings;
the `cpu` preset fine-tunes a small pretrained (Hugging Face) LLaMA end to end."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from configs import lima
from lima_jax import errors
from lima_jax import memory_fit
from lima_jax import recipe_advice
from lima_jax import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SAMPLE_TOKENIZER = ROOT / "lima_jax" / "assets" / "tokenizer" / "tokenizer.model"
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), LIMA_JAX_CPU_ALLOCATOR="0")
# The tiny preset cut to 2 short steps, without dev generations.
QUICK = ["--config.train.max_steps=2", "--config.data.max_len=128", "--config.model.max_seq_len=128",
         "--config.train.dev_generations=0", "--config.train.peak_flops_per_device=1e11"]
GiB = 2 ** 30


def train(workdir, *flags, timeout=600):
  return subprocess.run([sys.executable, "-m", "lima_jax.train", f"--workdir={workdir}", *flags],
                        capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=timeout, check=False)


def error_line(proc) -> str:
  """The refusal: exit 2, no traceback, one `error:` line, the last on stderr."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert sum("error:" in line for line in lines) == 1 and "error:" in lines[-1], proc.stderr[-3000:]
  return lines[-1]


# -- What may differ between runs of one workdir (no training) -------------------------------------

def test_runtime_fields_may_change_and_the_model_source_shape_and_recipe_may_not():
  saved = workdir_lib.json_config(lima.get_config("tiny"))
  current = json.loads(json.dumps(saved))
  current["train"].update(log_every_steps=5, micro_batches=2, stop_at_step=3, keep_epochs="2")
  current["mesh"]["fsdp"] = 8
  current["sampling"]["temperature"] = 0.1
  current["model"]["remat_policy"] = "full"
  assert workdir_lib.incompatibilities(saved, current) == []
  current["model"]["init_from"] = "/models/smol"
  current["optimizer"]["lr"] = 1e-5
  current["data"]["max_len"] = 256
  assert [d[0] for d in workdir_lib.incompatibilities(saved, current)] == [
      "data.max_len", "model.init_from", "optimizer.lr"]


def test_the_refusal_names_the_fields_and_a_new_workdir_and_for_epochs_how_to_train_on():
  line = workdir_lib.refusal("runs/a", [("model.init_from", "", "/m"), ("model.d_model", 64, 576)],
                             "runs/a/checkpoints/2")
  assert "another model's run" in line and "model.init_from '' -> '/m'" in line
  assert "model.d_model 64 -> 576" in line and "give a new --workdir" in line
  assert "init_from=runs/a" not in line
  line = workdir_lib.refusal("runs/a", [("train.epochs", 15, 20)], "runs/a/checkpoints/240")
  assert "train.epochs 15 -> 20" in line and "--config.model.init_from=runs/a" in line
  assert "\n" not in line


def test_a_file_or_a_path_through_a_file_is_not_a_workdir(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(errors.InputError, match="is a file, not a directory"):
    workdir_lib.check_usable(tmp_path / "file")
  with pytest.raises(errors.InputError, match="a part of this path is a file"):
    workdir_lib.check_usable(tmp_path / "file" / "run")
  linux_pseudo = ("/sys/lima_jax_run", "/proc/lima_jax/run") if sys.platform == "linux" else ()
  for unusable in linux_pseudo:  # Refused even to root.
    with pytest.raises(errors.InputError, match=f"--workdir={unusable}: cannot use it"):
      workdir_lib.check_usable(unusable)
  workdir_lib.check_usable(tmp_path / "new" / "run")  # Created.
  assert (tmp_path / "new" / "run").is_dir()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes any directory")
def test_an_unwritable_workdir_is_one_line(tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    with pytest.raises(errors.InputError, match="cannot write run_config.json"):
      workdir_lib.prepare(locked, lima.get_config("tiny"))
  finally:
    locked.chmod(0o700)


def test_a_new_workdir_records_the_config_atomically(tmp_path):
  config = lima.get_config("cpu")
  assert workdir_lib.prepare(tmp_path / "run", config) is None
  saved = json.loads((tmp_path / "run" / workdir_lib.CONFIG_FILE).read_text())
  assert saved == workdir_lib.json_config(config) and saved["preset"] == "cpu"
  assert [p.name for p in (tmp_path / "run").iterdir()] == [workdir_lib.CONFIG_FILE]  # No temp file.


# -- Memory before a traceback, and the recipe warnings (no training) --------------------------------

class CpuMesh:
  """The two things `fit_problem` reads of a mesh: its devices and axis sizes."""

  def __init__(self, devices, **shape):
    import numpy as np  # pylint: disable=g-import-not-at-top
    self.devices = np.asarray(devices)
    self.shape = {"data": 1, "fsdp": len(devices), **shape}


def test_a_step_over_the_device_memory_is_refused_with_the_figures_and_what_to_change():
  import jax  # pylint: disable=g-import-not-at-top
  config = lima.get_config("tiny")
  config.train.batch_size = 64
  mesh = CpuMesh(jax.devices()[:1])
  step = memory_fit.StepMemory(arguments=2 * GiB, outputs=2 * GiB, aliased=2 * GiB,
                               temporaries=30 * GiB, peak=32 * GiB)
  assert memory_fit.fit_problem(config, mesh, step, 40 * GiB, "RAM") is None
  line = memory_fit.fit_problem(config, mesh, step, 16 * GiB, "this host's RAM")
  assert "needs 32.0 GiB but this host's RAM is 16.0 GiB" in line
  # 30 GiB of temporaries into 14 GiB of room: 3 pieces, rounded to a divisor of the 64 rows.
  assert "--config.train.micro_batches=4 (now 1" in line
  assert "--config.data.max_len (now 512)" in line and "check_memory=false" in line
  state_bound = memory_fit.StepMemory(20 * GiB, 20 * GiB, 20 * GiB, 1 * GiB, 21 * GiB)
  assert "LoRA (--config.lora.rank=8" in memory_fit.fit_problem(config, mesh, state_bound, 16 * GiB, "RAM")


def test_host_ram_is_the_cpu_figure():
  import jax  # pylint: disable=g-import-not-at-top
  import psutil  # pylint: disable=g-import-not-at-top
  limit, source = memory_fit.device_memory(jax.devices("cpu")[0])
  assert 0 < limit <= psutil.virtual_memory().total and "available RAM" in source


def test_a_random_init_lr_on_a_pretrained_model_and_a_batch_over_the_data_warn():
  tiny = lima.get_config("tiny")
  assert recipe_advice.warnings_for(tiny, train_rows=50, num_params=4e5) == []
  tiny.model.init_from = "/models/smol"
  (lr,) = recipe_advice.warnings_for(tiny, train_rows=50, num_params=135e6)
  assert "optimizer.lr=0.001 is a random-init lr (the tiny preset's)" in lr and "--config=cpu" in lr
  tiny.lora.rank = 8  # LoRA wants a larger lr.
  assert recipe_advice.warnings_for(tiny, train_rows=50, num_params=135e6) == []
  cpu = lima.get_config("cpu")
  cpu.model.init_from = "/models/smol"
  cpu.train.batch_size = 64
  (batch,) = recipe_advice.warnings_for(cpu, train_rows=50, num_params=135e6)
  assert "train.batch_size=64 is more than the 50 training conversations" in batch
  assert "one optimizer step, 22% of its rows empty" in batch
  (random,) = recipe_advice.warnings_for(lima.get_config("7b"), train_rows=1000, num_params=6.7e9)
  assert "training a 6.70B-parameter 7b model from random init" in random


def test_the_cpu_preset_has_the_papers_lr_and_a_batch_that_fits_a_laptop():
  config = lima.get_config("cpu")
  assert (config.optimizer.lr, config.optimizer.end_lr, config.train.epochs) == (1e-5, 1e-6, 15)
  rows = config.train.batch_size // config.train.micro_batches
  assert (rows, config.data.max_len, config.model.dtype) == (4, 1024, "float32")
  assert "cpu" in lima.PRESETS


# -- The command, end to end ------------------------------------------------------------------------

@pytest.mark.slow
def test_a_step_too_big_for_the_host_stops_in_one_line_before_loading_anything(tmp_path):
  # ~8.6B parameters: the abstract compile is cheap, the state would need ~100 GiB.
  big = ["--config.model.d_model=8192", "--config.model.n_heads=64", "--config.model.n_layers=8",
         "--config.model.mlp_dim=32768", "--config.train.batch_size=64"]
  start = time.perf_counter()
  proc = train(tmp_path / "big", *QUICK, *big)
  assert time.perf_counter() - start < 180  # ~25 s on the 2-core test machine: an abstract compile.
  line = error_line(proc)
  assert "the train step needs" in line and "this host's available RAM" in line
  assert "the parameters and AdamW moments alone take" in line and "LoRA" in line
  output = proc.stdout + proc.stderr
  assert "from random init" in output  # The 8.6B random-init warning came first.
  assert "train.batch_size=64 is more than the 50 training conversations" in output
  assert not (tmp_path / "big" / "checkpoints").exists()


@pytest.mark.slow
def test_a_workdir_refuses_another_model_or_epochs_and_takes_runtime_changes(tmp_path):
  workdir = tmp_path / "run"
  first = train(workdir, *QUICK)
  assert first.returncode == 0, first.stderr[-3000:]
  saved = json.loads((workdir / workdir_lib.CONFIG_FILE).read_text())
  assert saved["train"]["max_steps"] == 2 and saved["preset"] == "tiny"
  line = error_line(train(workdir, *QUICK, "--config.model.d_model=32"))
  assert "holds another model's run" in line and "model.d_model 64 -> 32" in line
  line = error_line(train(workdir, *QUICK, "--config.train.epochs=20"))
  assert "train.epochs 15 -> 20" in line and f"--config.model.init_from={workdir}" in line
  again = train(workdir, *QUICK, "--config.train.log_every_steps=2")  # A runtime field.
  assert again.returncode == 0 and "already finished" in again.stdout + again.stderr
  (tmp_path / "file").write_text("")
  assert "is a file, not a directory" in error_line(train(tmp_path / "file", *QUICK))


@pytest.fixture(scope="module")
def small_pretrained_llama(tmp_path_factory):
  """A Hugging Face LLaMA directory as transformers writes it, with the bundled tokenizer."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  directory = tmp_path_factory.mktemp("small_llama")
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
  model.save_pretrained(directory, safe_serialization=True)
  (directory / "tokenizer.model").write_bytes(SAMPLE_TOKENIZER.read_bytes())
  return directory


@pytest.mark.slow
def test_the_cpu_preset_fine_tunes_a_pretrained_llama_and_its_workdir_refuses_another_model(
    tmp_path, small_pretrained_llama):
  workdir = tmp_path / "smol"
  proc = train(workdir, "--config=cpu", f"--config.model.init_from={small_pretrained_llama}",
               "--config.train.max_steps=2", "--config.data.max_len=128",
               "--config.train.dev_generations=0", "--config.train.peak_flops_per_device=1e11")
  assert proc.returncode == 0, proc.stderr[-3000:]
  output = proc.stdout + proc.stderr
  assert "the train step needs" in output and "warning:" not in output
  steps = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["lr"] for r in steps if "loss" in r] == pytest.approx([1e-5, 1e-6], rel=1e-5)
  assert json.loads((workdir / workdir_lib.CONFIG_FILE).read_text())["preset"] == "cpu"
  line = error_line(train(workdir, *QUICK))  # The default preset, tiny, into the same workdir.
  assert "holds another model's run" in line and f"model.init_from '{small_pretrained_llama}' -> ''" in line


def test_a_gcs_workdir_is_prepared_and_records_its_config(gcs):
  workdir = gcs.uri("runs", "fresh")
  config = lima.get_config("tiny")
  assert workdir_lib.prepare(workdir, config) is None
  from lima_jax import paths  # pylint: disable=g-import-not-at-top
  assert json.loads(paths.path(f"{workdir}/{workdir_lib.CONFIG_FILE}").read_text())["preset"] == "tiny"
  assert workdir_lib.prepare(workdir, config) is None  # No checkpoint yet: nothing to compare.
