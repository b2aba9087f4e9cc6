r"""Compile lima_jax's training step (or evaluation decode) for a Cloud TPU slice, from any host.

  python tools/aot_compile.py --config=configs/lima.py:65b --topology=v5p-128
  python tools/aot_compile.py --config=configs/lima.py:7b --topology=v5e-256 --program=decode
  python tools/aot_compile.py --config=configs/lima.py:65b --topology=v5p-32 \
      --config.mesh.fsdp=16 --output=65b_v5p32.json

Needs libtpu (`pip install -r requirements-tpu.txt`) and no network, no TPU: libtpu's compiler
runs on this host for compile-only devices of the named topology. Prints the per-chip memory
(arguments, outputs, temporaries, peak) against the chip's usable HBM, the analytic FLOPs of a
step and the step time and tokens/s they imply at `--mfu`, and writes the same as JSON.

Exit status: 0 fits; 2 does not fit (with how much it is over, the largest buffers and what to
change); 1 any other error. Runs beside another libtpu process (e.g. a second compile).
"""

import json
import os
import sys

# Before jax loads: libtpu reads its environment once (see lima_jax.aot.prepare_environment).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lima_jax import aot  # pylint: disable=g-import-not-at-top,wrong-import-position

_LOG_DIR = aot.prepare_environment(os.environ.get("LIMA_AOT_LOG_DIR"))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from lima_jax import hardware  # pylint: disable=g-import-not-at-top,wrong-import-position
from lima_jax import paths  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "e.g. configs/lima.py:65b",
                                          lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", None, "Cloud TPU slice: v4-N, v5p-N, v5e-N "
                                "(v5litepod-N), v6e-N, or a shape such as v5p:4x4x12")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-center network")
_PROGRAM = flags.DEFINE_enum("program", "train", ["train", "decode"],
                             "train: the optimizer step; decode: the evaluation's prefill + "
                             "KV-cache sampling loop")
_MFU = flags.DEFINE_float("mfu", aot.DEFAULT_MFU, "Model FLOPs utilisation assumed for the "
                          "implied step time")
_OUTPUT = flags.DEFINE_string("output", "", "Write the report as JSON here (atomically)")
_DUMP_HLO = flags.DEFINE_string("dump_hlo", "", "Write the optimised HLO text here")
flags.mark_flags_as_required(["config", "topology"])


def write_json(path: str, data: dict) -> None:
  """Atomic (local or gs://, see lima_jax.paths): a reader sees the old file or the whole new one."""
  target = paths.path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  paths.write_text_atomic(target, json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not aot.libtpu_available():
    print("tools/aot_compile.py needs libtpu's compiler: pip install -r requirements-tpu.txt",
          file=sys.stderr)
    return 1
  try:
    tpu_slice = hardware.parse_slice(_TOPOLOGY.value, _NUM_SLICES.value)
  except ValueError as e:
    print(e, file=sys.stderr)
    return 1
  status = 0
  try:
    report = aot.compile_program(_CONFIG.value, tpu_slice, _PROGRAM.value, mfu=_MFU.value,
                                 log_dir=_LOG_DIR, hlo_path=_DUMP_HLO.value or None)
  except aot.DoesNotFit as e:
    report, status = e.report, 2
  report["compiler_log_dir"] = _LOG_DIR
  print(aot.format_report(report))
  if _OUTPUT.value:
    write_json(_OUTPUT.value, report)
    print(f"wrote {_OUTPUT.value}")
  return status


if __name__ == "__main__":
  app.run(main)
