"""Converts LLaMA weights between Hugging Face and lima_jax (Orbax) checkpoints, streaming.

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

Either command writes into a temporary directory next to the destination and renames it at the
end; on bad input it prints what is wrong (file, field, tensor) and exits with status 2,
leaving no output directory behind.
"""

import argparse
import ctypes
import pathlib
import sys
import time


def _limit_malloc_arenas(arenas: int = 2) -> None:
  """Caps glibc's per-thread heap arenas before any thread starts.

  TensorStore and XLA run many threads; each gets its own arena, and the freed buffers of
  chunk after chunk linger in them (measured: +30% peak RSS converting a 336 MB model). Two
  arenas keep the peak near one chunk's worth. A no-op off glibc.
  """
  try:
    ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # -8 = M_ARENA_MAX.
  except (OSError, AttributeError):
    pass


_limit_malloc_arenas()
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from lima_jax import convert  # pylint: disable=g-import-not-at-top,wrong-import-position

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="convert_weights.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  to_orbax = commands.add_parser("hf-to-orbax", help="Hugging Face directory -> lima_jax checkpoint")
  to_orbax.add_argument("--hf_dir", required=True, help="directory with config.json + safetensors")
  to_orbax.add_argument("--ckpt_dir", required=True, help="new checkpoint directory (must not exist)")
  to_orbax.add_argument("--dtype", choices=convert.DTYPES, default=None,
                        help="store parameters in this dtype (default: keep the files')")
  to_orbax.add_argument("--eot", default=None, help='EOT token text for the stored tokenizer (default "<EOT>")')
  to_orbax.add_argument("--add_eot", action="store_true",
                        help="grow embedding and LM head to the tokenizer's vocabulary incl. EOT")
  to_hf = commands.add_parser("orbax-to-hf", help="lima_jax checkpoint -> Hugging Face directory")
  to_hf.add_argument("--ckpt_dir", required=True, help="checkpoint directory or training workdir")
  to_hf.add_argument("--hf_dir", required=True, help="new Hugging Face directory (must not exist)")
  to_hf.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard (default 5GB)")
  to_hf.add_argument("--dtype", choices=convert.DTYPES, default=None,
                     help="write tensors in this dtype (default: keep the checkpoint's)")
  to_peft = commands.add_parser("orbax-to-peft", help="lima_jax LoRA checkpoint -> PEFT adapter directory")
  to_peft.add_argument("--ckpt_dir", required=True, help="LoRA checkpoint directory or training workdir")
  to_peft.add_argument("--peft_dir", required=True, help="new adapter directory (must not exist)")
  return parser


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  start = time.perf_counter()
  try:
    if args.command == "hf-to-orbax":
      config = convert.hf_to_orbax(args.hf_dir, args.ckpt_dir, dtype=args.dtype, eot=args.eot,
                                   add_eot=args.add_eot)
      print(f"wrote {args.ckpt_dir}: {convert.describe(config)} "
            f"({time.perf_counter() - start:.1f} s)")
    elif args.command == "orbax-to-peft":
      from lima_jax import lora_io  # pylint: disable=g-import-not-at-top
      files = lora_io.save_peft(args.ckpt_dir, args.peft_dir)
      print(f"wrote {args.peft_dir}: {', '.join(files)} ({time.perf_counter() - start:.1f} s)")
    else:
      files = convert.orbax_to_hf(args.ckpt_dir, args.hf_dir, max_shard_size=args.max_shard_size,
                                  dtype=args.dtype)
      print(f"wrote {args.hf_dir}: {', '.join(files)} ({time.perf_counter() - start:.1f} s)")
  except (convert.ConversionError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  return 0


if __name__ == "__main__":
  sys.exit(main())
