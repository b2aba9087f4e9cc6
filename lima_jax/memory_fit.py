"""Does the train step fit? The compiled step's memory held against the device's, before step 1.

XLA:CPU allocates a step's buffers when it runs, so a step too big for the host ends its first
step in a RESOURCE_EXHAUSTED traceback (or the kernel's OOM killer), after the weights have
loaded; on TPU the compile itself fails. The compiled program's memory analysis says what a step
needs, so `check_train_step` stops the run in one line before any weight is read, with the
figures and what to change. Its compile is the one the run then uses: jax caches the executable
of the same program for the same shapes and shardings.
"""

import dataclasses
import math

import jax
import psutil

from lima_jax import chips
from lima_jax import errors
from lima_jax import metrics as metrics_lib

GiB = chips.GiB
LORA_RANK_HINT = 8


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """One device's bytes for a compiled step (XLA's memory analysis)."""
  arguments: int  # The state (parameters, optimizer moments) and the batch.
  outputs: int
  aliased: int  # Outputs written over donated arguments (the new state over the old).
  temporaries: int  # Gradients, activations, the logits.
  peak: int  # The compiler's own peak on an accelerator, else the sum of the above.

  @classmethod
  def of(cls, compiled, platform: str) -> "StepMemory":
    mem = compiled.memory_analysis()
    arguments, outputs = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    aliased, temporaries = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    # XLA:CPU's peak_memory_in_bytes counts the arguments only; the TPU compiler's is the peak.
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0) if platform != "cpu" else 0
    return cls(arguments, outputs, aliased, temporaries,
               peak or arguments + outputs - aliased + temporaries)


def device_memory(device) -> tuple[int, str]:
  """(bytes a program may use on `device`, what the figure is): the runtime's limit (TPU, GPU),
  else the chip table's HBM, else for the CPU this host's available RAM; (0, "") if unknown."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.device_kind}'s memory"
  if device.platform == "cpu":
    ram = psutil.virtual_memory()
    return int(ram.available), f"this host's available RAM ({ram.total / GiB:.1f} GiB in all)"
  chip = chips.chip_for_device_kind(device.device_kind)
  if chip is not None:
    return int(chip.hbm_bytes), f"{chip.name}'s HBM (chip table)"
  return 0, ""


def micro_batches_to_fit(config, memory: StepMemory, limit: int, rows_per_device: int) -> int | None:
  """The fewest micro-batches (a divisor of the device's rows) whose temporaries fit beside the
  state, assuming they shrink with the rows of a micro-batch; None if even one row is too many."""
  room = limit - (memory.peak - memory.temporaries)
  if room <= 0:
    return None
  micro = int(config.train.micro_batches)
  rows = rows_per_device * micro  # The device's rows of one optimizer step.
  wanted = micro * math.ceil(memory.temporaries / room)
  return next((m for m in range(wanted, rows + 1) if rows % m == 0), None)


def advice(config, memory: StepMemory | None = None, limit: int = 0, rows_per_device: int = 1) -> list[str]:
  """What to change, the change that usually helps most first (figures where `memory` is known)."""
  if memory is not None and memory.arguments >= limit:
    return [f"LoRA (--config.lora.rank={LORA_RANK_HINT}: the base frozen in bfloat16, only adapters "
            f"train), a smaller model, or a larger slice (fsdp splits the state over more devices): "
            f"the parameters and AdamW moments alone take {memory.arguments / GiB:.1f} GiB"]
  micro = int(config.train.micro_batches)
  fitting = micro_batches_to_fit(config, memory, limit, rows_per_device) if memory else 2 * micro
  tips = []
  if fitting and fitting > micro:
    tips.append(f"--config.train.micro_batches={fitting} (now {micro}: the same batch in smaller pieces)")
  tips.append(f"a smaller --config.train.batch_size (now {int(config.train.batch_size)}) or "
              f"--config.data.max_len (now {int(config.data.max_len)})")
  if config.model.get("remat_policy", "full") != "full":
    tips.append("--config.model.remat_policy=full (recompute each layer's activations)")
  tips.append(f"LoRA (--config.lora.rank={LORA_RANK_HINT}) or a larger slice")
  return tips


def _local_devices(mesh) -> list:
  return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def _rows_per_device(config, mesh) -> int:
  split = int(mesh.shape.get("data", 1)) * int(mesh.shape.get("fsdp", 1))
  return max(1, int(config.train.batch_size) // (split * int(config.train.micro_batches)))


def fit_problem(config, mesh, memory: StepMemory, limit: int, source: str) -> str | None:
  """The one line that stops a step too big for its device, or None where it fits."""
  devices = _local_devices(mesh)
  # CPU devices of one process all live in the host's RAM; each TPU chip has its own HBM.
  sharing = len(devices) if devices and devices[0].platform == "cpu" else 1
  need = memory.peak * sharing
  if not limit or need <= limit:
    return None
  per = f" ({sharing} CPU devices x {memory.peak / GiB:.2f} GiB)" if sharing > 1 else ""
  tips = advice(config, memory, limit // sharing, _rows_per_device(config, mesh))
  return (f"the train step needs {need / GiB:.1f} GiB{per} but {source} is {limit / GiB:.1f} GiB "
          f"(state and batch {memory.arguments / GiB:.1f} GiB, temporaries: gradients, activations "
          f"{memory.temporaries / GiB:.1f} GiB); to fit: {'; or '.join(tips)} "
          f"(--config.train.check_memory=false runs it anyway)")


def check_train_step(step_fn, state, batch, config, mesh) -> None:
  """Compiles `step_fn` for the (abstract) state and batch and raises InputError where the step
  cannot fit the device's memory; logs the figures where it does. `train.check_memory=false` skips."""
  if not config.train.get("check_memory", True):
    return
  device = _local_devices(mesh)[0]
  limit, source = device_memory(device)
  try:
    compiled = step_fn.lower(state, batch).compile()
  except jax.errors.JaxRuntimeError as e:  # The TPU compiler's own out-of-memory verdict.
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    first = str(e).strip().splitlines()[0][:300]
    raise errors.InputError(f"the train step does not fit {source or device.device_kind}: {first}; "
                            f"to fit: {'; or '.join(advice(config))}") from None
  memory = StepMemory.of(compiled, device.platform)
  problem = fit_problem(config, mesh, memory, limit, source)
  if problem:
    raise errors.InputError(problem)
  if limit:
    metrics_lib.log("the train step needs %.2f GiB a device; %s: %.1f GiB", memory.peak / GiB,
                    source, limit / GiB)
