"""Multi-host plumbing of a training job: joining it, losing a peer, and preemption.

Every process runs the same program; what differs between one process and a pod slice lives
here, so the training loop (`lima_jax.train`) reads the same either way.
"""

import os
import signal
import subprocess
import sys

import jax
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils

from lima_jax import metrics as metrics_lib

# Exit status of a process whose peer was lost (killed, preempted, crashed): rerun all hosts.
EXIT_PEER_LOST = 3
_peer_loss_hint = {"workdir": None, "saved_step": None}


def set_resume_hint(**hint) -> None:
  """What the guidance after a lost peer names: `workdir=` and the last `saved_step=`."""
  unknown = set(hint) - set(_peer_loss_hint)
  if unknown:
    raise TypeError(f"unknown resume hints: {sorted(unknown)}")
  _peer_loss_hint.update(hint)


def peer_lost(reason: str) -> None:
  """Says that a peer process is gone and how to resume, then ends this process at once.

  Called from the training loop when a collective fails because its peer is gone (CPU's gloo
  says so at once). It exits without cleanup: waiting for saves or barriers that need the dead
  peer would hang, and every checkpoint on disk is either committed or never counted.
  """
  n, i = jax.process_count(), jax.process_index()
  workdir = _peer_loss_hint["workdir"] or "the same directory"
  saved = _peer_loss_hint["saved_step"]
  first_line = reason.strip().splitlines()[0][:400] if reason.strip() else "no detail"
  since = f" (the last save started was step {saved})" if saved is not None else ""
  sys.stdout.flush()
  sys.stderr.write(
      f"\nerror: process {i} of {n} lost a peer process: another host of this run was killed, "
      f"preempted or crashed ({first_line}).\n"
      f"To resume, rerun the same command on all {n} hosts with the same --workdir={workdir}: "
      f"the run continues from the newest finished checkpoint there{since}.\n")
  sys.stderr.flush()
  orderly_exit()
  os._exit(EXIT_PEER_LOST)  # pylint: disable=protected-access


def looks_like_lost_peer(error: Exception) -> bool:
  """True for the runtime errors a dead peer causes in a cross-process collective or RPC (not
  for timeouts: a slow peer is not a lost one)."""
  text = str(error).lower()
  return any(marker in text for marker in (
      "connection closed", "connection reset", "connection refused", "socket closed",
      "heartbeat", "unavailable:"))


def wait_for_all_processes(name: str, timeout_s: int = 3600) -> None:
  """A barrier of the coordination service (no device collective) across the job's processes.

  Processes finish compiling at different times (one hits the compilation cache, another not),
  and the first cross-process collective gives up early: CPU's gloo sets up its context then,
  and waits 30 s for the peers.
  """
  client = jax_distributed.global_state.client
  if jax.process_count() > 1 and client is not None:
    client.wait_at_barrier(f"lima_jax:{name}", timeout_in_ms=timeout_s * 1000)


# Run beside each process of a multi-process job: it reads its stdin until the training process
# ends, however it ends, and speaks where that process could not (an abort from C++).
_WATCHER = """
import os, sys
if b"ok" not in sys.stdin.buffer.read():
  os.write(2, sys.argv[1].encode())
"""


class _AbnormalEndReporter:
  """Says how to resume when this process of a multi-process job dies without a word.

  When a peer host is lost, JAX's distributed runtime ends the survivors from C++ (a missed
  heartbeat, 100 s by default, or the coordinator's socket closing; "Terminating process because
  the JAX distributed service detected fatal errors"), before any Python handler can run: its
  error callback cannot be given a Python function (jaxlib 0.10.2 fails to convert the status
  it passes). So a small watcher process holds a pipe from this one; if the pipe closes without
  the "ok" that every orderly exit sends, the watcher prints the guidance on the same stderr.
  """

  def __init__(self, workdir: str):
    n, i = jax.process_count(), jax.process_index()
    message = (
        f"\nerror: process {i} of {n} of this run ended abnormally. If a peer host was lost "
        f"(killed, preempted or crashed), JAX's distributed runtime ends the survivors this way "
        f"(see 'Terminating process because the JAX distributed service detected fatal errors' "
        f"above).\nTo resume, rerun the same command on all {n} hosts with the same "
        f"--workdir={workdir}: the run continues from the newest finished checkpoint there.\n")
    self._proc = subprocess.Popen([sys.executable, "-c", _WATCHER, message], stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, start_new_session=True)

  def orderly_exit(self) -> None:
    """Tells the watcher that this exit is explained (a normal end, or a message printed)."""
    try:
      self._proc.stdin.write(b"ok")
      self._proc.stdin.close()
    except (OSError, ValueError):
      pass


_reporter: _AbnormalEndReporter | None = None
_report_abnormal_end = False  # The command line asks for the watcher; library use does not.


def report_abnormal_ends() -> None:
  """Asks for the watcher of `_AbnormalEndReporter` once the job joins (command lines only)."""
  global _report_abnormal_end
  _report_abnormal_end = True


def orderly_exit() -> None:
  """Tells the watcher, if any, that this process ends in an explained way."""
  if _reporter is not None:
    _reporter.orderly_exit()


def maybe_initialize_distributed(config) -> None:
  """Joins the multi-host job when asked (`train.distributed`) or when the environment says so.

  On Cloud TPU (and SLURM, Open MPI), `jax.distributed.initialize()` finds the coordinator
  itself; elsewhere set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID. CPU processes (tests, a cluster of CPU hosts) exchange collectives via gloo.
  """
  env = os.environ
  if not (config.train.get("distributed", False) or env.get("JAX_COORDINATOR_ADDRESS")):
    return
  if jax.distributed.is_initialized():
    return
  # Only CPU arrays use this (TPU collectives go over ICI/DCN); without it CPU processes
  # cannot run cross-process collectives at all.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if env.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
  if env.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
  jax.distributed.initialize(**kwargs)
  global _reporter
  if _report_abnormal_end and jax.process_count() > 1 and _reporter is None:
    _reporter = _AbnormalEndReporter(_peer_loss_hint["workdir"] or "the same directory")


class StopSignal:
  """SIGTERM (TPU preemption) -> save at the next step boundary and exit cleanly.

  One process catches the signal itself. Several processes must agree on the step, so there
  JAX's preemption sync point (which also listens for SIGTERM) decides; where it is not set up
  (`jax_enable_preemption_service` off, or the job joined without `jax.distributed`), the log
  says so at start-up rather than handling preemption silently not at all.
  """

  def __init__(self):
    self.received = False
    self._previous = None
    self.enabled = True
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    elif not self.multihost_sync_available():
      self._disable("JAX's preemption sync manager is not set up (is jax_enable_preemption_service "
                    "off, or was jax.distributed initialised without it?)")

  @staticmethod
  def multihost_sync_available() -> bool:
    state = jax_distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None

  def _disable(self, why: str) -> None:
    self.enabled = False
    metrics_lib.warn("preemption handling is OFF: %s. A SIGTERM now ends the hosts without a final save; "
          "a rerun resumes from the newest finished checkpoint", why)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.received = True

  def should_stop(self, step: int) -> bool:
    if not self.enabled:
      return False
    if jax.process_count() > 1:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError as e:
        self._disable(f"reached_preemption_sync_point failed: {e}")
        return False
    return self.received

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
