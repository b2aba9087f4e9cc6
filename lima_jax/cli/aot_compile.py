r"""Compile lima_jax's training step (or the serving engine's decode step) for a Cloud TPU slice, from any host.

  python tools/aot_compile.py --config=configs/lima.py:65b --topology=v5p-128
  python tools/aot_compile.py --config=configs/lima.py:7b --topology=v5e-256 --program=decode
  python tools/aot_compile.py --config=configs/lima.py:65b --topology=v5p-32 \
      --config.mesh.fsdp=16 --output=65b_v5p32.json

Needs libtpu (`pip install -r requirements-tpu.txt`) and no network, no TPU: libtpu's compiler
runs on this host for compile-only devices of the named topology. Prints the per-chip memory
(arguments, outputs, temporaries, peak) against the chip's usable HBM, the analytic FLOPs of a
step and the step time and tokens/s they imply at `--mfu`, and writes the same as JSON.

Exit status: 0 fits; 2 does not fit (with how much it is over, the largest buffers and what to
change) or bad input (the flag or config field is named); 1 any other error. Runs beside another
libtpu process (e.g. a second compile).
"""

import json
import os
import sys

from absl import flags

from lima_jax import errors
from lima_jax import chips
from lima_jax import process
from lima_jax import paths
from lima_jax.cli import common


def define_flags() -> None:
  common.define_config_flag(None, "A preset (e.g. 65b) or configs/lima.py:65b")
  flags.DEFINE_string("topology", None, "Cloud TPU slice: v4-N, v5p-N, v5e-N (v5litepod-N), v6e-N, "
                      "or a shape such as v5p:4x4x12")
  flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-center network")
  flags.DEFINE_enum("program", "train", ["train", "decode"],
                    "train: the optimizer step; decode: one decode step of the serving engine (all slots)")
  flags.DEFINE_float("mfu", chips.DEFAULT_MFU, "Model FLOPs utilisation assumed for the implied step time")
  flags.DEFINE_string("output", "", "Write the report as JSON here (atomically)")
  flags.DEFINE_string("dump_hlo", "", "Write the optimised HLO text here")
  flags.mark_flags_as_required(["config", "topology"])


def write_json(path: str, data: dict) -> None:
  """Atomic (local or gs://, see lima_jax.paths): a reader sees the old file or the whole new one."""
  target = paths.path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  paths.write_text_atomic(target, json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv, log_dir: str):
  from lima_jax import aot  # pylint: disable=g-import-not-at-top  # jax: after libtpu's environment.
  f = flags.FLAGS
  if len(argv) > 1:
    raise errors.InputError(f"unexpected arguments: {argv[1:]}")
  if not process.libtpu_available():
    print("tools/aot_compile.py needs libtpu's compiler: pip install -r requirements-tpu.txt",
          file=sys.stderr)
    return 1
  try:
    tpu_slice = chips.parse_slice(f.topology, f.num_slices)
  except ValueError as e:
    raise errors.InputError(str(e)) from None
  status = 0
  try:
    report = aot.compile_program(f.config, tpu_slice, f.program, mfu=f.mfu, log_dir=log_dir,
                                 hlo_path=f.dump_hlo or None)
  except aot.DoesNotFit as e:
    report, status = e.report, 2
  report["compiler_log_dir"] = log_dir
  print(aot.format_report(report))
  if f.output:
    write_json(f.output, report)
    print(f"wrote {f.output}")
  return status


def run() -> None:
  # Before jax loads (the config file imports it): libtpu reads its environment once.
  log_dir = process.prepare_libtpu_environment(os.environ.get("LIMA_AOT_LOG_DIR"))
  common.run(lambda argv: main(argv, log_dir), define_flags)


if __name__ == "__main__":
  run()
