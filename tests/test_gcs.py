"""gs:// everywhere, against a real GCS-protocol server (fake-gcs-server on 127.0.0.1).

The path layer and each reader first (fast), then the Cloud TPU workflow end to end: train the
tiny preset from a Hugging Face directory and JSONL files on gs:// into a gs:// workdir, SIGKILL
it after its first checkpoint, resume (past a save cut short) to the same parameters as an
unbroken run, evaluate prompts from gs:// to gs://, and convert to a Hugging Face directory on
gs:// and back. Training runs as `python -m lima_jax.train` subprocesses sharing one XLA cache.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

if not os.environ.get("JAX_PLATFORMS"):
  os.environ["JAX_PLATFORMS"] = "cpu"  # An installed libtpu would otherwise probe for TPUs.

import jax  # pylint: disable=wrong-import-position

from lima_jax import checkpoint as ckpt_lib  # pylint: disable=wrong-import-position
from lima_jax import data as data_lib  # pylint: disable=wrong-import-position
from lima_jax import paths  # pylint: disable=wrong-import-position
from lima_jax import records  # pylint: disable=wrong-import-position
from lima_jax import safetensors_io  # pylint: disable=wrong-import-position
from lima_jax import tokenizer as tokenizer_lib  # pylint: disable=wrong-import-position

from lima_jax.cli import compare  # pylint: disable=wrong-import-position
from lima_jax.cli import convert_weights  # pylint: disable=wrong-import-position
from lima_jax.cli import evaluate  # pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parent.parent

BUNDLED = data_lib.bundled_paths()


def upload(local, uri) -> str:
  paths.path(uri).write_bytes(pathlib.Path(local).read_bytes())
  return uri


def listing(uri) -> list[str]:
  return sorted(p.name for p in paths.path(uri).iterdir())


# -- The path layer and the readers on gs:// ------------------------------------------------------


def test_paths_keep_uris_glob_and_write_atomically_on_gcs(gcs):
  base = gcs.uri("paths")
  assert os.fspath(paths.path(base + "/a.txt")) == base + "/a.txt"  # pathlib would say gs:/...
  assert os.fspath(paths.absolute(base)) == base and paths.is_remote(base)
  assert not paths.is_remote("/tmp/x") and os.fspath(paths.path("~/x")) == os.path.expanduser("~/x")
  for name in ("b-2.jsonl", "b-1.jsonl", "c.txt"):
    paths.write_text_atomic(f"{base}/sub/{name}", name)
  paths.write_text_atomic(f"{base}/sub/c.txt", "replaced")
  assert paths.path(f"{base}/sub/c.txt").read_text() == "replaced"
  assert [os.fspath(p) for p in paths.expand_globs(f"{base}/sub/b-*.jsonl")] == [
      f"{base}/sub/b-1.jsonl", f"{base}/sub/b-2.jsonl"]
  assert paths.expand_globs(f"{base}/sub/none-*.jsonl") == []
  assert listing(f"{base}/sub") == ["b-1.jsonl", "b-2.jsonl", "c.txt"]  # No temporaries.
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  storage.Client().bucket(gcs.bucket).blob("paths/sub/d.txt").upload_from_string("new")
  assert "d.txt" in listing(f"{base}/sub")  # Another writer's object: listings are not cached.


def test_staged_directory_on_gcs_cleans_up_a_failure_and_names_an_unfinished_one(gcs):
  dest = gcs.uri("staged", "out")
  with pytest.raises(RuntimeError):
    with paths.staged_directory(dest, complete_when="config.json") as out:
      (out / "model.safetensors").write_bytes(b"x")
      raise RuntimeError("conversion failed")
  assert not paths.path(dest).exists()
  (paths.path(dest) / "model.safetensors").write_bytes(b"x")  # As a killed writer leaves it.
  with pytest.raises(FileExistsError, match="without config.json: an unfinished write"):
    with paths.staged_directory(dest, complete_when="config.json"):
      pass
  done = gcs.uri("staged", "done")
  with paths.staged_directory(done, complete_when="config.json") as out:
    (out / "config.json").write_text("{}")
  assert listing(done) == ["config.json"]


def test_data_tokenizer_and_safetensors_read_from_gcs(gcs, tmp_path):
  base = gcs.uri("readers")
  for i in (1, 2):
    upload(BUNDLED["train"], f"{base}/lima/train-{i}.jsonl")
  upload(BUNDLED["tokenizer"], f"{base}/tok/tokenizer.model")
  local = records.read_conversations([BUNDLED["train"]] * 2)
  remote = records.read_conversations(f"{base}/lima/train-*.jsonl")
  assert [c.turns for c in remote] == [c.turns for c in local]
  assert remote[0].path == f"{base}/lima/train-1.jsonl"
  paths.path(f"{base}/bad.jsonl").write_text('{"conversations": ["hi", "hello"]}\n[1]\n')
  with pytest.raises(records.DataError, match=f"{base}/bad.jsonl:2:"):
    records.read_jsonl(f"{base}/bad.jsonl")
  with pytest.raises(FileNotFoundError, match="train-9"):
    records.read_jsonl(f"{base}/lima/train-9.jsonl")
  tok = tokenizer_lib.load_tokenizer(f"{base}/tok")
  local_tok = tokenizer_lib.load_tokenizer(BUNDLED["tokenizer"])
  assert tok.encode("Hello there") == local_tok.encode("Hello there")
  written = tok.save_files(f"{base}/tok_out")
  assert {p.name for p in written} <= set(listing(f"{base}/tok_out"))
  assert tokenizer_lib.load_tokenizer(f"{base}/tok_out").vocab_size == tok.vocab_size
  rng = np.random.default_rng(0)
  # 12.5 MiB: more than gcsfs's 5 MiB block, so the write is a multi-part (resumable) upload.
  arrays = {"a": rng.standard_normal((3200, 1024)).astype(np.float32),
            "b": rng.standard_normal((3,)).astype(np.float16)}
  sources = [safetensors_io.TensorSource(k, v.dtype, v.shape, lambda v=v: [v[:2000], v[2000:]])
             for k, v in arrays.items()]
  safetensors_io.write_file(f"{base}/w.safetensors", sources)
  st = safetensors_io.SafetensorsFile(f"{base}/w.safetensors")
  np.testing.assert_array_equal(st.read_rows("a", 1999, 2031), arrays["a"][1999:2031])
  np.testing.assert_array_equal(st.read("b"), arrays["b"])
  judged = f"{base}/judgements.jsonl"
  paths.path(judged).write_text('{"id": "1", "winner": "a"}\n{"id": "2", "winner": "tie"}\n')
  assert compare.read_judgements(judged, "pairwise") == {"1": "a", "2": "tie"}


# -- The workflow: train, kill, resume, evaluate, convert, all on gs:// ---------------------------


# The tiny preset, 3 epochs of 7 steps (a checkpoint at each epoch end: two epochs to SIGKILL in
# after the first), short rows; no dev generations (evaluation has its own test below).
TRAIN_ARGS = ["--config=configs/lima.py:tiny", "--config.train.epochs=3",
              "--config.data.max_len=128", "--config.model.max_seq_len=128",
              "--config.sampling.max_len=128", "--config.train.dev_generations=0",
              "--config.train.peak_flops_per_device=1e11"]


@pytest.fixture(scope="module")
def job(gcs, tmp_path_factory):
  """A tiny random LLaMA (bundled tokenizer) and the sample data, uploaded; the training flags."""
  import shutil  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=1024, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=128, tie_word_embeddings=False)
  local = tmp_path_factory.mktemp("hf")
  transformers.LlamaForCausalLM(hf_config).save_pretrained(local, safe_serialization=True)
  shutil.copy(BUNDLED["tokenizer"], local / "tokenizer.model")
  for f in local.iterdir():
    upload(f, gcs.uri("base", "llama-tiny", f.name))
  upload(BUNDLED["train"], gcs.uri("lima", "train-00000.jsonl"))
  for split in ("dev", "test"):
    upload(BUNDLED[split], gcs.uri("lima", f"{split}.jsonl"))
  flags = TRAIN_ARGS + [f"--config.model.init_from={gcs.uri('base', 'llama-tiny')}",
                        f"--config.data.train_path={gcs.uri('lima', 'train-*.jsonl')}",
                        f"--config.data.dev_path={gcs.uri('lima', 'dev.jsonl')}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **gcs.env,
             JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return flags, env


def train_command(workdir, flags):
  return [sys.executable, "-m", "lima_jax.train", f"--workdir={workdir}", *flags]


@pytest.fixture(scope="module")
def unbroken(gcs, job):
  flags, env = job
  workdir = gcs.uri("runs", "unbroken")
  proc = subprocess.run(train_command(workdir, flags), env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir


def _finished_step(workdir):
  try:
    return int(ckpt_lib.resolve(workdir).name)
  except FileNotFoundError:
    return None


def _cut_short_copy(step_dir, dest) -> None:
  """`dest`: a copy of a finished step with its params' data and Orbax's commit file gone, as a
  save killed part-way on GCS leaves it (every item's directory present)."""
  import fsspec  # pylint: disable=g-import-not-at-top
  fs = fsspec.filesystem("gs")
  fs.copy(step_dir, dest, recursive=True)
  gone = [obj for obj in fs.find(dest)
          if obj.endswith("/" + ckpt_lib.ORBAX_COMMIT_FILE) or ("/params/" in obj and "/d/" in obj)]
  fs.rm(gone)
  assert any("/params/" in obj for obj in gone) and len(gone) >= 2, gone


@pytest.mark.slow
def test_killed_run_on_gcs_resumes_past_a_cut_short_save_to_the_unbroken_parameters(gcs, job,
                                                                                   unbroken):
  flags, env = job
  workdir = gcs.uri("runs", "killed")
  proc = subprocess.Popen(train_command(workdir, flags), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  step = None
  while time.time() < deadline and proc.poll() is None and step is None:
    step = _finished_step(workdir)
    time.sleep(0.1)
  still_running = proc.poll() is None
  proc.send_signal(signal.SIGKILL)
  _, stderr = proc.communicate(timeout=60)
  assert step is not None and still_running, f"not killed after a checkpoint: {stderr[-3000:]}"
  latest = _finished_step(workdir)
  assert latest < 21, latest
  fake = f"{workdir}/checkpoints/{latest + 1}"
  _cut_short_copy(f"{workdir}/checkpoints/{latest}", fake)
  assert paths.path(f"{fake}/params").is_dir() and not ckpt_lib.is_checkpoint(fake)
  assert _finished_step(workdir) == latest

  resumed = subprocess.run(train_command(workdir, flags), env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  log = resumed.stdout + resumed.stderr
  assert f"checkpoints/{latest} at step {latest}" in log, log[-3000:]
  assert ckpt_lib.resolve(workdir).name == "21"
  a, b = ckpt_lib.restore_params(unbroken), ckpt_lib.restore_params(workdir)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  metrics = [json.loads(l) for l in paths.path(f"{workdir}/metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in metrics if "loss" in r] == list(range(1, 22))
  assert [r["step"] for r in metrics if "dev_loss" in r] == [7, 14, 21]
  assert any(n.startswith("events.out.tfevents.") for n in listing(f"{workdir}/tensorboard"))


@pytest.mark.slow
def test_evaluate_reads_and_writes_gcs_and_resumes_its_partial_object(gcs, unbroken):
  from lima_jax import sampling  # pylint: disable=g-import-not-at-top
  prompts = gcs.uri("eval", "prompts.jsonl")
  lines = paths.path(gcs.uri("lima", "test.jsonl")).read_text().splitlines()[:2]
  paths.path(prompts).write_text("".join(line + "\n" for line in lines))
  scfg = sampling.SamplingConfig(greedy=True, max_new_tokens=4, max_len=128, batch_size=1)
  out, alpaca = gcs.uri("eval", "responses.jsonl"), gcs.uri("eval", "alpaca.json")
  records = evaluate.evaluate(unbroken, prompts, out, sampling_config=scfg, alpaca_eval=alpaca,
                              generator="tiny", log=lambda _: None)
  assert len(records) == 2 and all(1 <= r["response_tokens"] <= 4 for r in records)
  assert [json.loads(l) for l in paths.path(out).read_text().splitlines()] == records
  assert not paths.path(out + evaluate.PARTIAL_SUFFIX).exists()
  outputs = [a["output"] for a in json.loads(paths.path(alpaca).read_text())]
  assert outputs == [r["response"] for r in records]
  # A run stopped after its first batch: the partial object holds one record; the rerun adds one.
  again = gcs.uri("eval", "again.jsonl")
  paths.path(again + evaluate.PARTIAL_SUFFIX).write_text(json.dumps(records[0]) + "\n")
  logs = []
  assert evaluate.evaluate(unbroken, prompts, again, sampling_config=scfg, generator="tiny",
                           log=logs.append) == records
  assert any("resuming: 1 responses" in line for line in logs), logs
  assert not paths.path(again + evaluate.PARTIAL_SUFFIX).exists()
  # MT-Bench: questions from gs://, answers to gs://.
  questions, answers = gcs.uri("eval", "question.jsonl"), gcs.uri("eval", "mt_bench.jsonl")
  question = {"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now another."]}
  paths.path(questions).write_text(json.dumps(question) + "\n")
  evaluate.evaluate(unbroken, questions, gcs.uri("eval", "mt.jsonl"), sampling_config=scfg,
                    mt_bench=answers, generator="tiny", log=lambda _: None)
  (answer,) = [json.loads(l) for l in paths.path(answers).read_text().splitlines()]
  assert answer["question_id"] == 81 and len(answer["choices"][0]["turns"]) == 2


@pytest.mark.slow
def test_convert_to_hf_on_gcs_and_back_is_exact(gcs, unbroken):
  hf_dir, back = gcs.uri("export", "hf"), gcs.uri("export", "back")
  assert convert_weights.main(["orbax-to-hf", "--ckpt_dir", unbroken, "--hf_dir", hf_dir]) == 0
  assert {"config.json", "generation_config.json", "model.safetensors",
          "tokenizer.model"} <= set(listing(hf_dir))
  assert convert_weights.main(["hf-to-orbax", "--hf_dir", hf_dir, "--ckpt_dir", back]) == 0
  assert ckpt_lib.is_checkpoint(back)
  a, b = ckpt_lib.restore_params(unbroken), ckpt_lib.restore_params(back)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert convert_weights.main(["orbax-to-hf", "--ckpt_dir", back, "--hf_dir", hf_dir]) == 2


KILL_MID_SAVE = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from lima_jax import checkpoint as ckpt_lib, model as model_lib
    config = model_lib.ModelConfig(vocab_size=64, d_model=8, n_layers=1, n_heads=1, mlp_dim=8)
    manager = ckpt_lib.checkpoint_manager(sys.argv[1])
    small = {"w": jnp.ones((4,), jnp.float32)}
    ckpt_lib.save_training(manager, 2, params=small, opt_state=small, model_config=config,
                           tokenizer_blob=None, train_state={"step": 2})
    manager.wait_until_finished()
    big = {"w": jnp.ones((32, 1024, 1024), jnp.float32)}  # 128 MiB each: still writing when killed.
    ckpt_lib.save_training(manager, 3, params=big, opt_state=big, model_config=config,
                           tokenizer_blob=None, train_state={"step": 3})
    print("saving", flush=True)
    time.sleep(600)
""")


@pytest.mark.slow
def test_a_kill_during_a_save_on_gcs_leaves_no_checkpoint_a_resume_restores(gcs, job):
  _, env = job
  workdir = gcs.uri("crash")
  proc = subprocess.Popen([sys.executable, "-c", KILL_MID_SAVE, workdir], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  step3 = paths.path(f"{workdir}/checkpoints/3")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None and not step3.exists():
    time.sleep(0.05)
  committed = (step3 / ckpt_lib.ORBAX_COMMIT_FILE).exists()
  proc.send_signal(signal.SIGKILL)
  _, stderr = proc.communicate(timeout=60)
  assert step3.exists() and not committed, f"the save was not caught in progress: {stderr[-3000:]}"
  assert not ckpt_lib.is_checkpoint(step3)
  assert ckpt_lib.resolve(workdir).name == "2"
  assert ckpt_lib.read_train_state(workdir) == {"step": 2}
  assert np.asarray(ckpt_lib.restore_params(workdir)["w"]).tolist() == [1.0] * 4
  manager = ckpt_lib.checkpoint_manager(workdir)  # What a resumed run opens.
  try:
    assert manager.latest_step() == 2 and manager.all_steps() == [2]
    deadline = time.time() + 30  # It deletes the unfinished step, so step 3 can be saved again.
    while step3.exists() and time.time() < deadline:
      time.sleep(0.2)
    assert not step3.exists()
  finally:
    manager.close()
