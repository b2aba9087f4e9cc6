"""Two local processes joined by `jax.distributed` (CPU collectives over gloo) train like one.

Each process has 2 simulated CPU devices and reads only its share of every batch; the reference
is one process with 4 devices, same mesh shape. Both runs go through `python -m lima_jax.train`.

Global batch k holds the same rows for any process count (tests/test_data.py); here the batch
holds the whole sample (50 conversations in 52 rows) and dropout is off, so that the two runs
may differ only by float summation order. Dev loss and generations run on both too.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

if not os.environ.get("JAX_PLATFORMS"):
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # pylint: disable=wrong-import-position

from lima_jax import checkpoint as ckpt_lib  # pylint: disable=wrong-import-position

pytestmark = pytest.mark.slow  # Three training processes.

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARGS = ["--config=configs/lima.py:tiny", "--config.train.epochs=2", "--config.train.batch_size=52",
        "--config.data.max_len=128", "--config.model.max_seq_len=128",
        "--config.model.residual_dropout=0.0", "--config.train.peak_flops_per_device=1e11",
        "--config.train.dev_generations=1", "--config.train.dev_max_new_tokens=2"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir, devices, cache_dir, *extra_args, **env_extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env_extra)
  return subprocess.Popen([sys.executable, "-m", "lima_jax.train", f"--workdir={workdir}", *ARGS,
                           *extra_args],
                          env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=400):
  stdout, stderr = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, stderr[-4000:]
  return stdout


def test_two_processes_train_the_same_as_one(tmp_path):
  cache = tmp_path / "xla_cache"
  # A 3-epoch run stopped after epoch 2, so that its resume below keeps the run's recipe (a
  # workdir refuses another train.epochs: the lr schedule spans the run).
  first_two_epochs = ("--config.train.epochs=3", "--config.train.stop_at_step=2")
  one = _start(tmp_path / "one", 4, cache, *first_two_epochs, "--config.train.dev_generations=0")
  port = _free_port()
  procs = [_start(tmp_path / "two", 2, cache, *first_two_epochs,
                  JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                  JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)) for i in range(2)]
  outputs = [_finish(p) for p in procs]
  _finish(one)
  assert "### dev prompt 0:" in outputs[0] and "### dev prompt" not in outputs[1]  # Process 0 speaks.

  a, b = ckpt_lib.restore_params(tmp_path / "one"), ckpt_lib.restore_params(tmp_path / "two")
  # Adam divides by the gradient's magnitude, so float noise in a near-zero gradient component
  # can move its parameter by a fraction of lr (1e-3 here); allow 5% of lr.
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=5e-5)
  lines = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
  one_losses = [r["loss"] for r in lines(tmp_path / "one") if "loss" in r]
  two_losses = [r["loss"] for r in lines(tmp_path / "two") if "loss" in r]
  assert len(two_losses) == 2  # One line per step: only process 0 writes.
  np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
  assert two_losses[-1] < two_losses[0]
  one_dev = [r["dev_loss"] for r in lines(tmp_path / "one") if "dev_loss" in r]
  two_dev = [r["dev_loss"] for r in lines(tmp_path / "two") if "dev_loss" in r]
  assert len(two_dev) == 2
  np.testing.assert_allclose(two_dev, one_dev, rtol=1e-5)
  assert len((tmp_path / "two" / "dev_generations" / "epoch_2.jsonl").read_text().splitlines()) == 1
  meta = ckpt_lib.read_train_state(tmp_path / "two")
  assert meta["step"] == 2 and meta["mesh"]["fsdp"] == 4

  # Restarted on the other layout: the one-process run continues on two processes
  # (each restores process 0's data state) and the two-process run on one; both train step 3 on
  # the same global batch.
  port = _free_port()
  procs = [_start(tmp_path / "one", 2, cache, "--config.train.epochs=3",
                  "--config.train.dev_generations=0", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                  JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)) for i in range(2)]
  single = _start(tmp_path / "two", 4, cache, "--config.train.epochs=3",
                  "--config.train.dev_generations=0")
  for p in procs + [single]:
    _finish(p)
  for workdir in ("one", "two"):
    assert ckpt_lib.read_train_state(tmp_path / workdir)["step"] == 3
  a, b = ckpt_lib.restore_params(tmp_path / "one"), ckpt_lib.restore_params(tmp_path / "two")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=5e-5)


# Short steps saved at every step, so that a kill or SIGTERM always lands mid-run with a
# checkpoint behind it; 3 epochs of 7 steps.
FAULT_ARGS = ["--config.train.batch_size=8", "--config.train.checkpoint_every_steps=1",
              "--config.train.dev_generations=0", "--config.train.epochs=3"]
FAULT_STEPS = 21


def _start_pair(workdir, cache, **env):
  port = _free_port()
  return [_start(workdir, 2, cache, *FAULT_ARGS, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                 JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i), **env) for i in range(2)]


def _wait_for_step(workdir, procs, step, timeout=400):
  """Waits until a finished checkpoint of at least `step` exists; returns its step."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if any(p.poll() is not None for p in procs):
      pytest.fail("a process ended early:\n" + "\n---\n".join(
          f"status {p.wait()}: {p.communicate()[1][-3000:]}" for p in procs))
    steps = [int(d.name) for d in (workdir / "checkpoints").glob("*") if d.name.isdigit()
             and ckpt_lib.is_checkpoint(d)] if (workdir / "checkpoints").is_dir() else []
    if steps and max(steps) >= step:
      return max(steps)
    time.sleep(0.2)
  raise AssertionError(f"no checkpoint of step {step} within {timeout} s")


def _kill_and_check_the_survivor(workdir, procs, victim):
  """SIGKILLs process `victim`; the other must exit within 2 minutes saying how to resume."""
  from lima_jax import distributed  # pylint: disable=g-import-not-at-top
  survivor = procs[1 - victim]
  procs[victim].send_signal(signal.SIGKILL)
  killed = time.time()
  _, stderr = survivor.communicate(timeout=180)
  assert time.time() - killed < 120, time.time() - killed
  procs[victim].communicate()
  assert survivor.returncode != 0, stderr[-3000:]
  # Either the step's collective failed (gloo says so at once: a message of ours, status 3), or
  # the distributed runtime aborted the survivor and the watcher explains it.
  if survivor.returncode == distributed.EXIT_PEER_LOST:
    assert f"process {1 - victim} of 2 lost a peer process" in stderr, stderr[-3000:]
  else:
    assert f"process {1 - victim} of 2 of this run ended abnormally" in stderr, stderr[-3000:]
  assert f"rerun the same command on all 2 hosts with the same --workdir={workdir}" in stderr


@pytest.mark.slow
def test_a_killed_peer_ends_the_survivor_with_how_to_resume_and_sigterm_saves_on_all(tmp_path):
  cache, workdir = tmp_path / "xla_cache", tmp_path / "wd"
  procs = _start_pair(workdir, cache)
  _wait_for_step(workdir, procs, 2)
  _kill_and_check_the_survivor(workdir, procs, victim=1)
  # Rerun both: they resume; now the coordinator (process 0) dies.
  procs = _start_pair(workdir, cache)
  resumed = _wait_for_step(workdir, procs, 2)
  _wait_for_step(workdir, procs, resumed + 1)
  _kill_and_check_the_survivor(workdir, procs, victim=0)

  # Rerun both again: SIGTERM to every host then saves at one step agreed by all.
  procs = _start_pair(workdir, cache)
  resumed = _wait_for_step(workdir, procs, 2)
  _wait_for_step(workdir, procs, resumed + 1)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=180) for p in procs]
  for p, (_, stderr) in zip(procs, outputs):
    assert p.returncode == 0, stderr[-3000:]
  assert "resumed from" in outputs[0][0] + outputs[0][1]
  stopped = ckpt_lib.read_train_state(workdir)["step"]
  assert stopped < FAULT_STEPS, "the run ended before SIGTERM arrived"
  assert (ckpt_lib.resolve(workdir) / "opt_state").is_dir()

  # And once more to the run's normal end, without the preemption service: the log says so.
  procs = _start_pair(workdir, cache, JAX_ENABLE_PREEMPTION_SERVICE="false")
  outputs = [p.communicate(timeout=400) for p in procs]
  for p, (_, stderr) in zip(procs, outputs):
    assert p.returncode == 0, stderr[-4000:]
  assert "preemption handling is OFF" in outputs[0][1]  # A warning: on stderr.
  assert ckpt_lib.read_train_state(workdir)["step"] == FAULT_STEPS
