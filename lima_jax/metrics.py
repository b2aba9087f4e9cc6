"""What a user watches during training: `metrics.jsonl`, TensorBoard, a progress bar, log lines,
and the peak FLOP/s behind MFU.

Only process 0 writes (every writer here is a no-op elsewhere), so a pod slice produces one
log. `metrics.jsonl` is rewritten whole and atomically (`paths.write_text_atomic`: temporary
file + rename locally, one object upload on GCS) rather than appended, because object stores
(`gs://`) cannot append; on a resume, lines past the restored step are dropped, so the file reads
as one uninterrupted run. TensorBoard event files on gs:// go through google-cloud-storage.
"""

import functools
import json
import math
import sys
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import tqdm
from absl import logging

from lima_jax import chips
from lima_jax import paths

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


@functools.lru_cache(maxsize=None)
def _measured_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a jitted float32 n^3 matmul on the default device: the CPU's practical peak."""
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


def peak_flops_per_device(device=None, measure_cpu: bool = True) -> float:
  """Peak FLOP/s of one JAX device, the denominator of MFU.

  TPU: the chip table's bf16 peak. Elsewhere there is no spec sheet to trust, so (with
  `measure_cpu`) a jitted float32 2048^3 matmul is timed once per process and its rate used;
  returns 0.0 when unknown.
  """
  device = device or jax.devices()[0]
  if device.platform == "tpu":
    chip = chips.chip_for_device_kind(device.device_kind)
    return 0.0 if chip is None else chip.bf16_flops
  if device.platform == "cpu" and measure_cpu:
    return _measured_matmul_flops()
  return 0.0


def peak_flops(config_peak: float) -> tuple[float, str]:
  """(peak FLOP/s per device, where it came from): the config, the chip table, or a measurement."""
  if config_peak and config_peak > 0:
    return float(config_peak), "config.train.peak_flops_per_device"
  device = jax.devices()[0]
  peak = peak_flops_per_device(device)
  if device.platform == "tpu":
    return peak, f"chip table ({device.device_kind}, bf16)"
  if device.platform == "cpu":
    return peak, "measured: jitted float32 2048^3 matmul on this CPU"
  return peak, "unknown (set config.train.peak_flops_per_device)"


# The library's one way to say something (training, data, conversion, loading): `log` for a line
# the user sees, `warn` for one that needs their attention, `info` for the log file only. Each
# goes to absl's log (so --verbosity and --log_dir work, as for Orbax) and, on process 0, to the
# terminal above any progress bar. What a command prints as its result stays the command's.


def log(message: str, *args) -> None:
  """A line for the user on process 0 (above the progress bar), also in the absl log."""
  logging.info(message, *args)
  if jax.process_index() == 0:
    tqdm.tqdm.write(f"{time.strftime('%H:%M:%S')} {message % args if args else message}")


def info(message: str, *args) -> None:
  """A detail for the log file only (absl INFO; shown with --verbosity=0), not for the terminal."""
  logging.info(message, *args)


def warn(message: str, *args) -> None:
  """A warning every process logs, and process 0 also prints."""
  logging.warning(message, *args)
  if jax.process_index() == 0:
    tqdm.tqdm.write(f"{time.strftime('%H:%M:%S')} warning: {message % args if args else message}",
                    file=sys.stderr)


class MetricWriter:
  """metrics.jsonl + TensorBoard scalars under `workdir`, written by process 0 only."""

  def __init__(self, workdir, *, resume_step: int = 0, flush_every_s: float = 10.0):
    self.active = jax.process_index() == 0
    self._path = paths.path(workdir) / METRICS_FILE
    self._flush_every_s = flush_every_s
    self._last_flush = 0.0
    self._lines: list[str] = []
    self._dirty = False
    self._tb = None
    if not self.active:
      return
    if self._path.exists():
      for line in self._path.read_text().splitlines():
        try:
          if json.loads(line).get("step", 0) <= resume_step:
            self._lines.append(line)
        except json.JSONDecodeError:
          continue
      self._dirty = True
    import tensorboardX  # pylint: disable=g-import-not-at-top
    try:
      self._tb = tensorboardX.SummaryWriter(logdir=str(paths.path(workdir) / TENSORBOARD_DIR),
                                            purge_step=resume_step + 1 if resume_step else None)
    except ImportError as e:  # gs:// event files need google-cloud-storage.
      warn("TensorBoard events are off (%s); metrics still go to %s", e, self._path)

  def write(self, step: int, scalars: Mapping[str, Any], *, flush: bool = False) -> None:
    """Records scalars for `step` (the number of optimizer steps done)."""
    if not self.active:
      return
    record = {"step": int(step)}
    for key, value in scalars.items():
      value = float(value)
      record[key] = value if math.isfinite(value) else str(value)
      if self._tb is not None:
        self._tb.add_scalar(key, value, int(step))
    self._lines.append(json.dumps(record))
    self._dirty = True
    if flush or time.monotonic() - self._last_flush > self._flush_every_s:
      self.flush()

  def flush(self) -> None:
    if not self.active or not self._dirty:
      return
    self._path.parent.mkdir(parents=True, exist_ok=True)
    paths.write_text_atomic(self._path, "".join(line + "\n" for line in self._lines))
    if self._tb is not None:
      self._tb.flush()
    self._dirty = False
    self._last_flush = time.monotonic()

  def close(self) -> None:
    if not self.active:
      return
    self.flush()
    if self._tb is not None:
      self._tb.close()


class ProgressBar:
  """Progress over optimizer steps with an ETA, on process 0 only: a tqdm bar when stderr is a
  terminal; otherwise (a redirected log) one plain line every `every` steps and at the last."""

  def __init__(self, total_steps: int, initial_step: int, every: int = 1):
    self._bar = None
    self._total, self._step, self._every = total_steps, initial_step, max(int(every), 1)
    self._active = jax.process_index() == 0
    self._start, self._start_step = time.monotonic(), initial_step
    if self._active and sys.stderr.isatty():
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step",
                            dynamic_ncols=True, smoothing=0.1)

  def update(self, postfix: Mapping[str, str]) -> None:
    self._step += 1
    if self._bar is not None:
      self._bar.set_postfix(postfix, refresh=False)
      self._bar.update(1)
    elif self._active and (self._step % self._every == 0 or self._step == self._total):
      elapsed = time.monotonic() - self._start
      per_step = elapsed / max(self._step - self._start_step, 1)
      eta = per_step * (self._total - self._step)
      fields = ", ".join(f"{k} {v}" for k, v in postfix.items())
      print(f"{time.strftime('%H:%M:%S')} step {self._step}/{self._total}: {fields}; "
            f"{per_step:.2f} s/step, ETA {_duration(eta)}", file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
