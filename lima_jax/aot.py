"""Ahead-of-time compilation of the training and evaluation programs for Cloud TPU topologies.

libtpu contains the TPU compiler; given a topology description it produces "compile-only"
devices, and `jax.jit(...).lower(...).compile()` over a mesh of those devices runs the full TPU
compiler on this (CPU) host: partitioning, fusion, rematerialisation, memory assignment. Its
`memory_analysis()` is therefore the memory the program needs on each chip, before anyone pays
for a slice. `tools/aot_compile.py` is the command line; `tools/make_tpu_table.py` the README table.

The programs compiled are the real ones: `lima_jax.train_step.make_train_step` (the jitted step
that training runs, with the preset's mesh, remat policy and micro-batching) and
one decode step of the serving engine (`lima_jax.serve.programs`, all slots).

Model FLOPs come from an analytic count (`lima_jax.flops`), not `cost_analysis()`: the compiler
counts a while-loop body once, so a step scanned over 80 layers reports about 1% of its work.
"""

import functools
import glob
import math
import os
import re
import time
from typing import Any

import jax
from jax.experimental import topologies

from lima_jax import chips
from lima_jax import flops as flops_lib
from lima_jax import fused_update
from lima_jax import lora as lora_lib
from lima_jax import memory_fit
from lima_jax import model as model_lib
from lima_jax import paths
from lima_jax import process
from lima_jax import sampling
from lima_jax import sharding
from lima_jax import train_step
from lima_jax.serve import programs as serve_programs

GiB = chips.GiB


@functools.lru_cache(maxsize=None)
def _topology_devices(topology_name: str, chip_config_name: str, bounds: tuple, num_slices: int,
                      wrap: tuple) -> tuple:
  process.prepare_libtpu_environment()
  topo = topologies.get_topology_desc(
      platform="tpu", topology_name=topology_name, chip_config_name=chip_config_name,
      chips_per_host_bounds=bounds, num_slices=num_slices, wrap=wrap)
  return tuple(topo.devices)


def slice_devices(tpu_slice: chips.Slice) -> list:
  """Compile-only TPU devices of the slice(s): one per chip."""
  if not process.libtpu_available():
    raise RuntimeError("libtpu is not installed: pip install -r requirements-tpu.txt")
  return list(_topology_devices(tpu_slice.topology_name, tpu_slice.chip.chip_config_name,
                                tpu_slice.chips_per_host_bounds, tpu_slice.num_slices,
                                tpu_slice.wrap))


# ---------------------------------------------------------------------------------------------
# Defaults per slice.


def apply_slice_defaults(config, tpu_slice: chips.Slice) -> list[str]:
  """Fills in what the preset leaves to the slice; returns the equivalent command-line flags.

  The mesh is chosen only when `config.mesh` is untouched (data=1, fsdp=-1, sequence=1,
  tensor=1), micro-batching only when `train.micro_batches` is 1 and the estimate says the
  step does not fit; an explicit override always wins.
  """
  flags = []
  batch, seq = int(config.train.batch_size), int(config.data.max_len)
  chosen = sharding.mesh_for(config.mesh, tpu_slice.num_devices, batch, seq, tpu_slice.num_slices)
  for axis, size in chosen.items():
    config.mesh[axis] = size
  flags += [f"--config.mesh.{axis}={int(config.mesh[axis])}" for axis in sharding.DEFAULT_MESH]
  if int(config.train.micro_batches) == 1:
    sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, tpu_slice.num_devices)))
    model_config = _tpu_model_config(config)
    fused = train_step.update_kind(config, model_config) == fused_update.FUSED
    micro = flops_lib.default_micro_batches(model_config, sizes, batch, seq,
                                           tpu_slice.usable_hbm_bytes(), fused)
    config.train.micro_batches = micro
  flags.append(f"--config.train.micro_batches={int(config.train.micro_batches)}")
  flags.append(f"--config.model.remat_policy={config.model.remat_policy}")
  return flags


# ---------------------------------------------------------------------------------------------
# Compilation and the report.


class DoesNotFit(Exception):
  """The program needs more HBM than the chip has; `.report` says how much and why."""

  def __init__(self, report: dict):
    super().__init__(report.get("message", "does not fit"))
    self.report = report


def _tpu_model_config(config):
  """ModelConfig as compiled for TPU: `attention=auto` means the splash kernel there. With
  `config.lora.rank` > 0 the LoRA model, the preset's last token (EOT) being its trained row."""
  model_config = model_lib.ModelConfig.from_dict(config.model)
  if model_config.attention == "auto":
    model_config = model_config.replace(attention="splash")
  vocab = model_config.vocab_size
  lora = lora_lib.from_run_config(config.get("lora"), base_vocab_size=vocab - 1, vocab_size=vocab,
                                  eot_id=vocab - 1, base=config.model.init_from,
                                  base_seed=int(config.train.seed))
  if lora is not None:
    model_config = model_config.replace(lora=lora, param_dtype=str(config.lora.base_dtype))
  return model_config


def lower_train(config, mesh):
  """Lowers `train_step.make_train_step` for the mesh; returns (lowered, abstract state)."""
  model_config = _tpu_model_config(config)
  step_fn, _, _ = train_step.make_train_step(config, model_config, mesh)
  state = train_step.abstract_train_state(config, model_config, mesh)
  batch = train_step.abstract_batch(config, mesh)
  params = state.params if state.frozen is None else (state.frozen, state.params)
  return step_fn.lower(state, batch), params, model_config


def lower_decode(config, mesh):
  """Lowers one decode step of the serving engine (`lima_jax.serve`) over `config.serve.slots`
  slots of `sampling.max_len` tokens, as `lima-serve` / `lima-evaluate` run it.

  Weights are served in the compute dtype (`--dtype`) and in the layouts the compiler picks (as
  the engine stores them on TPU), and the layers unrolled so that the compiler's cost analysis
  counts every layer (a scanned layer is counted once). The mesh is `sharding.decode_mesh_config`'s.
  Returns (lowered, abstract params, model config, sampling config, slots, abstract state).
  """
  model_config = _tpu_model_config(config)
  model_config = model_config.replace(param_dtype=model_config.dtype, scan_layers=False)
  scfg = sampling.SamplingConfig.from_dict(config.sampling)
  slots = int(config.serve.slots) if "serve" in config else int(scfg.batch_size)
  programs = serve_programs.Programs(model_config, slots=slots, max_len=int(scfg.max_len), mesh=mesh, pad_id=0,
                                     steps_per_call=1, top_logprobs=0, per_layer=False)
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        model_lib.abstract_params(model_config), model_lib.param_shardings(model_config, mesh))
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       programs.abstract_state(), programs.state_shardings)
  return programs.lower_generate(params), params, model_config, scfg, slots, state


def bytes_accessed(compiled) -> int:
  """The compiler's count of bytes one device reads and writes in one run of the program."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return int(cost.get("bytes accessed", 0))


def bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_USED = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}
_BUFFER = re.compile(r"^\s*[\d.]+\w*\(\s*\d+%\);\s*([\d.]+)(\w*);.*?;\s*(\d+);\s*(.+)$")


def _to_bytes(value: str, unit: str) -> int:
  unit = unit[:1].upper() if unit else ""
  return int(float(value) * _UNITS.get(unit, 1))


def largest_buffers(log_dir: str, limit: int = 8) -> list[dict]:
  """The biggest HBM buffers of the newest out-of-memory report in libtpu's INFO log."""
  logs = sorted(glob.glob(os.path.join(log_dir, "*.INFO.*")), key=os.path.getmtime)
  for path in reversed(logs):
    with open(path, errors="replace") as f:
      text = f.read()
    start = text.rfind("Memory usage report")
    if start < 0:
      continue
    section = text[start:].split("Memory Space: vmem", 1)[0]
    buffers = []
    for line in section.splitlines():
      m = _BUFFER.match(line)
      if m:
        buffers.append({"bytes": _to_bytes(m.group(1), m.group(2).replace("iB", "")),
                        "values": int(m.group(3)), "shapes": m.group(4).strip()[:200]})
    seen, unique = set(), []
    for b in sorted(buffers, key=lambda b: -b["bytes"]):
      key = (b["bytes"], b["shapes"])
      if key not in seen:
        seen.add(key)
        unique.append(b)
    return unique[:limit]
  return []


def _advice(config, program: str, needed: int, hbm: int, tpu_slice) -> list[str]:
  """What to change, in the order that usually helps most."""
  if program == "decode":
    return ["a larger slice (the weights and KV cache are split over more chips)",
            "a smaller --config.sampling.batch_size or --config.sampling.max_len (the KV cache)",
            "--config.model.param_dtype=bfloat16 for evaluation (halves the weights)"]
  sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, tpu_slice.num_devices)))
  tips = []
  if sizes["data"] > tpu_slice.num_slices:
    tips.append(f"move data-parallel devices to fsdp (--config.mesh.data={tpu_slice.num_slices} "
                f"--config.mesh.fsdp=-1): replicas each hold the whole optimizer state")
  tips.append(f"a slice with more chips: the weights and AdamW moments (12 bytes a parameter, "
              f"16 with a whole gradient) are split over fsdp x sequence x tensor = "
              f"{sizes['fsdp'] * sizes['sequence'] * sizes['tensor']} chips now; needing "
              f"{needed / GiB:.1f} of {hbm / GiB:.2f} GiB, about "
              f"{math.ceil(needed / hbm)}x the chips")
  if config.model.remat_policy != "full":
    tips.append("--config.model.remat_policy=full (recompute each layer in the backward pass)")
  rows = int(config.train.batch_size) // (sizes["data"] * sizes["fsdp"] * int(config.train.micro_batches))
  if rows >= 2:
    tips.append(f"--config.train.micro_batches={2 * int(config.train.micro_batches)} (fewer "
                f"activations; costs an fp32 gradient accumulator, so it helps only when "
                f"activations dominate)")
  return tips


def _lower_program(config, mesh, program: str, flags: list[str], report: dict):
  """(lowered program, abstract params, model config, FLOP counts); the program's own fields go
  into `report`."""
  if program == "train":
    lowered, params, model_config = lower_train(config, mesh)
    batch, seq = int(config.train.batch_size), int(config.data.max_len)
    flops = flops_lib.train_flops(model_config, batch, seq)
    report.update(
        remat_policy=model_config.remat_policy, micro_batches=int(config.train.micro_batches),
        update=train_step.update_kind(config, model_config),
        batch_size=batch, seq_len=seq, train_flags=flags, flops=flops,
        flops_formula="6*N*tokens + 12*L*(H*Dh)*seq^2*batch (model); +2*N*tokens + "
                      "4*L*(H*Dh)*seq^2*batch with full remat (hardware)")
  elif program == "decode":
    lowered, params, model_config, scfg, slots, state = lower_decode(config, mesh)
    flops = flops_lib.decode_flops(model_config, slots, 0, 1, scfg.max_len)
    report.update(batch_size=slots, slots=slots, cache_len=scfg.max_len, flops=flops,
                  kv_cache_bytes_per_device=bytes_per_device(state["cache"]),
                  flops_formula="each token step 2*N + 4*L*(H*Dh)*cache a slot")
  else:
    raise ValueError(f"--program={program!r}: expected train or decode")
  if model_config.lora is not None:
    report["lora"] = {"rank": model_config.lora.rank, "alpha": model_config.lora.alpha,
                      "targets": list(model_config.lora.targets),
                      "trainable_params": lora_lib.num_trainable(model_config)}
  return lowered, params, model_config, flops


def _does_not_fit(config, program: str, report: dict, tpu_slice: chips.Slice, needed: int,
                  what: str) -> "DoesNotFit":
  """The error for a program needing `needed` bytes a chip, its advice and message in the report."""
  hbm = tpu_slice.usable_hbm_bytes()
  report["advice"] = _advice(config, program, needed, hbm, tpu_slice)
  report["message"] = (f"{program} for {report['preset']} on {tpu_slice.name} does not fit: "
                       f"{what} {needed / GiB:.2f} GiB a chip, {hbm / GiB:.2f} GiB usable "
                       f"(over by {(needed - hbm) / GiB:.2f} GiB)")
  return DoesNotFit(report)


def _compile(lowered, config, program: str, report: dict, tpu_slice: chips.Slice, log_dir: str):
  """The compiled program; a compiler out-of-memory error becomes DoesNotFit with its figures."""
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    m = _OOM.search(text) or _USED.search(text)
    if "RESOURCE_EXHAUSTED" not in text and not m:
      raise
    needed = _to_bytes(m.group(1), m.group(2)) if m else 0
    report.update(
        fits=False, compile_seconds=round(time.perf_counter() - start, 1),
        memory={"needed_bytes": needed, "over_by_bytes": max(0, needed - tpu_slice.usable_hbm_bytes())},
        largest_buffers=largest_buffers(log_dir),
        compiler_message=text.strip().splitlines()[0][:500])
    raise _does_not_fit(config, program, report, tpu_slice, needed, "needs") from e
  report["compile_seconds"] = round(time.perf_counter() - start, 1)
  return compiled


def memory_report(compiled, hbm: int) -> dict:
  """The compiled program's memory analysis, its peak held against the chip's usable HBM."""
  mem = memory_fit.StepMemory.of(compiled, "tpu")
  return {
      "arguments_bytes": mem.arguments,
      "outputs_bytes": mem.outputs,
      "aliased_bytes": mem.aliased,
      "temporaries_bytes": mem.temporaries,
      "peak_bytes": mem.peak,
      "usable_hbm_bytes": hbm,
      "headroom_bytes": hbm - mem.peak,
  }


def _speed_figures(compiled, program: str, flops: dict, report: dict, tpu_slice: chips.Slice,
                   mfu: float) -> dict:
  """Step time implied at `mfu`; for decode also the bytes a token step reads vs the weights + KV cache."""
  peak_flops = tpu_slice.chip.bf16_flops * tpu_slice.num_devices
  if program == "train":
    step = flops["model"] / (mfu * peak_flops)
    return dict(step_seconds=step, tokens_per_second=flops["tokens"] / step)
  step = flops["per_token_step"] / (mfu * peak_flops)
  accessed = bytes_accessed(compiled)
  live = report["param_bytes_per_device"] + report["kv_cache_bytes_per_device"]
  return dict(decode_step_seconds_compute_bound=step, bytes_accessed_per_step=accessed,
              bytes_accessed_vs_weights_and_kv_cache=accessed / live,
              weight_read_seconds_per_token=report["param_bytes_per_device"] / tpu_slice.chip.hbm_bandwidth)


def compile_program(config, tpu_slice: chips.Slice, program: str = "train",
                    mfu: float = chips.DEFAULT_MFU, log_dir: str | None = None,
                    hlo_path: str | None = None) -> dict:
  """Compiles `program` ("train" or "decode") for the slice; returns the report dict.

  Raises DoesNotFit (its `.report` filled in) when the compiler or the memory analysis says
  the program needs more than the chip's usable HBM. `hlo_path` saves the optimised HLO.
  """
  log_dir = process.prepare_libtpu_environment(log_dir)
  devices = slice_devices(tpu_slice)
  flags = apply_slice_defaults(config, tpu_slice) if program == "train" else []
  mesh_config = (config.mesh if program == "train"
                 else sharding.decode_mesh_config(dict(config.mesh), "tpu", len(devices)))
  mesh = sharding.make_mesh(mesh_config, devices, tpu_slice.num_slices)
  hbm = tpu_slice.usable_hbm_bytes()
  report: dict[str, Any] = {
      "program": program, "preset": config.get("preset", ""), "topology": tpu_slice.name,
      "topology_name": tpu_slice.topology_name, "num_slices": tpu_slice.num_slices,
      "chip": tpu_slice.chip.name, "devices": tpu_slice.num_devices, "hosts": tpu_slice.num_hosts,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "usable_hbm_bytes": hbm, "jax_version": jax.__version__,
  }
  start = time.perf_counter()
  lowered, params, model_config, flops = _lower_program(config, mesh, program, flags, report)
  report.update(
      attention=model_config.attention, param_dtype=model_config.param_dtype,
      compute_dtype=model_config.dtype, num_params=model_config.num_params(),
      param_bytes_per_device=bytes_per_device(params),
      lower_seconds=round(time.perf_counter() - start, 1))
  compiled = _compile(lowered, config, program, report, tpu_slice, log_dir)
  if hlo_path:
    paths.write_text_atomic(hlo_path, compiled.as_text())
  report["memory"] = memory_report(compiled, hbm)
  peak = report["memory"]["peak_bytes"]
  report["fits"] = peak <= hbm
  report["mfu_assumed"] = mfu
  report.update(_speed_figures(compiled, program, flops, report, tpu_slice, mfu))
  if not report["fits"]:
    report["largest_buffers"] = []
    raise _does_not_fit(config, program, report, tpu_slice, peak, "peak")
  return report


def format_report(report: dict) -> str:
  """Human-readable summary of a report (the JSON holds everything)."""
  slices = f"{report['num_slices']} x " if report["num_slices"] > 1 else ""
  lines = [f"{report['program']} | preset {report['preset']} | {slices}{report['topology']} "
           f"({report['topology_name']}; {report['devices']} chips, {report['hosts']} hosts) | "
           f"mesh {report['mesh']}"]
  if report["program"] == "train":
    lines.append(f"  batch {report['batch_size']} x {report['seq_len']}, micro-batches "
                 f"{report['micro_batches']}, remat {report['remat_policy']}, attention "
                 f"{report['attention']}, params {report['param_dtype']} / compute "
                 f"{report['compute_dtype']}")
  else:
    lines.append(f"  {report['slots']} slots, cache {report['cache_len']} tokens a slot, params "
                 f"{report['param_dtype']}, attention {report['attention']}")
  mem = report["memory"]
  if "peak_bytes" in mem:
    lines.append("  per chip: arguments {:.2f} GiB, outputs {:.2f} GiB (aliased {:.2f}), "
                 "temporaries {:.2f} GiB, peak {:.2f} GiB of {:.2f} GiB usable".format(
                     mem["arguments_bytes"] / GiB, mem["outputs_bytes"] / GiB,
                     mem["aliased_bytes"] / GiB, mem["temporaries_bytes"] / GiB,
                     mem["peak_bytes"] / GiB, mem["usable_hbm_bytes"] / GiB))
  lines.append(f"  parameters {report['num_params'] / 1e9:.2f} B, "
               f"{report['param_bytes_per_device'] / GiB:.3f} GiB a chip")
  if report["program"] == "train" and "step_seconds" in report:
    f = report["flops"]
    lines.append(f"  model FLOPs a step {f['model']:.3e} (hardware, with remat {f['hardware']:.3e}); "
                 f"at {report['mfu_assumed']:.0%} MFU: {report['step_seconds']:.2f} s a step, "
                 f"{report['tokens_per_second']:,.0f} tokens/s")
  if report["program"] == "decode" and "bytes_accessed_per_step" in report:
    lines.append(f"  decode step, {report['slots']} slots x {report['cache_len']} tokens: the compiler "
                 f"counts {report['bytes_accessed_per_step'] / GiB:.2f} GiB accessed a chip, "
                 f"{report['bytes_accessed_vs_weights_and_kv_cache']:.2f} x the weights "
                 f"({report['param_bytes_per_device'] / GiB:.2f} GiB) + KV cache "
                 f"({report['kv_cache_bytes_per_device'] / GiB:.2f} GiB) it holds")
  if report["program"] == "decode" and "weight_read_seconds_per_token" in report:
    lines.append(f"  decode step: >= {report['weight_read_seconds_per_token'] * 1e3:.2f} ms "
                 f"(reading each chip's weights once), compute "
                 f"{report['decode_step_seconds_compute_bound'] * 1e3:.3f} ms at "
                 f"{report['mfu_assumed']:.0%} MFU")
  if report.get("train_flags"):
    lines.append("  train with: " + " ".join(report["train_flags"]))
  lines.append(f"  compiled in {report.get('compile_seconds', 0):.1f} s (lowered in "
               f"{report.get('lower_seconds', 0):.1f} s); fits: {report['fits']}")
  if not report["fits"]:
    lines.append("  " + report["message"])
    for b in report.get("largest_buffers", []):
      lines.append(f"    {b['bytes'] / GiB:8.2f} GiB  {b['shapes']}")
    lines.append("  to fit, try:")
    lines += [f"    - {tip}" for tip in report.get("advice", [])]
  return "\n".join(lines)
