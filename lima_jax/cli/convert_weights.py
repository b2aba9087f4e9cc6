"""Converts LLaMA, Mistral and Qwen weights between Hugging Face and lima_jax (Orbax) checkpoints, streaming.

    python tools/convert_weights.py hf-to-orbax --hf_dir SRC --ckpt_dir DST \\
        [--dtype float32|bfloat16|float16] [--eot "<EOT>"] [--add_eot]
    python tools/convert_weights.py orbax-to-hf --ckpt_dir SRC --hf_dir DST \\
        [--max_shard_size 5GB] [--dtype float32|bfloat16|float16]
    python tools/convert_weights.py orbax-to-peft --ckpt_dir SRC --peft_dir DST

hf-to-orbax reads config.json and the safetensors shards (model.safetensors.index.json or a
single model.safetensors) one layer at a time, so peak memory stays a small fraction of the
model (see docs/model.md for the measured figure). Without --dtype each tensor keeps its dtype
and HF -> Orbax -> HF is bit-exact. The tokenizer, if the directory has one, goes into the
checkpoint; --add_eot also grows the embedding and LM head by LIMA's EOT token.

orbax-to-hf accepts a checkpoint directory or a training workdir (its newest step) and writes
sharded safetensors + index, config.json, generation_config.json (LIMA's sampling) and the
tokenizer files when the checkpoint carries a tokenizer. A LoRA checkpoint (`--config.lora.rank`)
is merged into the base it names, one layer at a time: the output is a plain full model.

orbax-to-peft writes a LoRA checkpoint as a Hugging Face PEFT adapter directory
(adapter_config.json + adapter_model.safetensors, the EOT rows as PEFT's trainable tokens) for
`peft.PeftModel.from_pretrained(base, DST)`; docs/training.md says how to prepare the base.

Either side may be a gs:// URI. Locally, either command writes into a temporary directory next to
the destination and renames it at the end; on gs://, which cannot rename, it writes in place and
the file readers require last (Orbax's commit_success.txt, the Hugging Face config.json). On bad
input it prints what is wrong (file, field, tensor) and exits with status 2, leaving no output
directory behind.
"""

import sys
import time

from lima_jax import errors
from lima_jax import libc
from lima_jax.cli import common

EXIT_BAD_INPUT = errors.EXIT_BAD_INPUT
COMMANDS = ("hf-to-orbax", "orbax-to-hf", "orbax-to-peft")
_ONLY = {"eot": "hf-to-orbax", "add_eot": "hf-to-orbax", "max_shard_size": "orbax-to-hf",
         "peft_dir": "orbax-to-peft", "hf_dir": ("hf-to-orbax", "orbax-to-hf"),
         "dtype": ("hf-to-orbax", "orbax-to-hf")}


def define_flags(values) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from lima_jax import convert  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("hf_dir", None, "hf-to-orbax: directory with config.json + safetensors; "
                      "orbax-to-hf: new Hugging Face directory (must not exist)", flag_values=values)
  flags.DEFINE_string("ckpt_dir", None, "hf-to-orbax: new checkpoint directory (must not exist); "
                      "orbax-to-hf: checkpoint directory or training workdir", flag_values=values)
  flags.DEFINE_enum("dtype", None, convert.DTYPES, "store/write tensors in this dtype (default: "
                    "keep the source's)", flag_values=values)
  flags.DEFINE_string("eot", None, 'hf-to-orbax: EOT token text for the stored tokenizer '
                      '(default "<EOT>")', flag_values=values)
  flags.DEFINE_bool("add_eot", False, "hf-to-orbax: grow embedding and LM head to the tokenizer's "
                    "vocabulary incl. EOT", flag_values=values)
  flags.DEFINE_string("max_shard_size", "5GB", "orbax-to-hf: largest safetensors shard",
                      flag_values=values)
  flags.DEFINE_string("peft_dir", None, "orbax-to-peft: new PEFT adapter directory (must not exist)",
                      flag_values=values)
  flags.mark_flags_as_required(["ckpt_dir"], flag_values=values)


def main(argv=None) -> int:
  """`convert_weights.py COMMAND --hf_dir ... --ckpt_dir ...`; returns the exit status."""
  from lima_jax import convert  # pylint: disable=g-import-not-at-top
  argv = sys.argv[1:] if argv is None else argv
  args, (command,) = common.parse_own_flags(argv, define_flags, __doc__, positional=("COMMAND",))
  if command not in COMMANDS:
    common.fail(f"COMMAND {command!r}: expected {' or '.join(COMMANDS)}")
  for name, owners in _ONLY.items():
    owners = (owners,) if isinstance(owners, str) else owners
    if args[name].present and command not in owners:
      common.fail(f"--{name} is a flag of {' and '.join(owners)}, not of {command}")
  needed = "peft_dir" if command == "orbax-to-peft" else "hf_dir"
  if not args[needed].present:
    common.fail(f"{command} needs --{needed}")
  start = time.perf_counter()
  try:
    if command == "hf-to-orbax":
      config = convert.hf_to_orbax(args.hf_dir, args.ckpt_dir, dtype=args.dtype, eot=args.eot,
                                   add_eot=args.add_eot)
      print(f"wrote {args.ckpt_dir}: {convert.describe(config)} "
            f"({time.perf_counter() - start:.1f} s)")
    elif command == "orbax-to-peft":
      from lima_jax import lora_io  # pylint: disable=g-import-not-at-top
      files = lora_io.save_peft(args.ckpt_dir, args.peft_dir)
      print(f"wrote {args.peft_dir}: {', '.join(files)} ({time.perf_counter() - start:.1f} s)")
    else:
      files = convert.orbax_to_hf(args.ckpt_dir, args.hf_dir, max_shard_size=args.max_shard_size,
                                  dtype=args.dtype)
      print(f"wrote {args.hf_dir}: {', '.join(files)} ({time.perf_counter() - start:.1f} s)")
  except (errors.InputError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  return 0


def run() -> None:
  libc.limit_malloc_arenas()  # Before convert's imports start TensorStore's and XLA's threads.
  common.setup_process()  # As every command: the CPU where libtpu is installed without a TPU.
  sys.exit(main())


if __name__ == "__main__":
  run()
