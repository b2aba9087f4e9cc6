"""Regenerates the bundled sample tokenizer, `lima_jax/assets/tokenizer/tokenizer.model`.

A small SentencePiece BPE model trained on the bundled sample conversations (train, dev and
test), with LLaMA's conventions so the sample exercises the same code paths as a real LLaMA
tokenizer: unk=0, bos=1, eos=2, no pad piece, byte fallback (so no text is ever unknown), digits
split, identity normalisation and no whitespace collapsing. Training is single-threaded on the
lines in file order, which makes the output byte-for-byte reproducible:

    python tools/make_sample_tokenizer.py            # rewrite the bundled model
    python tools/make_sample_tokenizer.py --check    # exit 1 if the bundled model is stale
"""

import argparse
import io
import json
import pathlib
import sys

import sentencepiece as spm

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "lima_jax" / "assets"
SAMPLE_FILES = ("train.jsonl", "dev.jsonl", "test.jsonl")
VOCAB_SIZE = 1024


def sample_lines(sample_dir: pathlib.Path = ASSETS / "lima_sample"):
  """Yields every non-empty line of every turn of the sample, in file order.

  SentencePiece trains on "sentences"; feeding lines (not whole turns) keeps each under its
  4 KiB sentence limit, and newlines are then left to byte fallback, as in LLaMA.
  """
  for name in SAMPLE_FILES:
    with open(sample_dir / name, encoding="utf-8") as f:
      for record_line in f:
        if not record_line.strip():
          continue
        for turn in json.loads(record_line)["conversations"]:
          yield from (line for line in turn.split("\n") if line.strip())


def train_model(vocab_size: int = VOCAB_SIZE) -> bytes:
  """Trains the sample model and returns its serialised bytes."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=sample_lines(),
      model_writer=model,
      model_type="bpe",
      vocab_size=vocab_size,
      byte_fallback=True,
      unk_id=0,
      bos_id=1,
      eos_id=2,
      pad_id=-1,
      split_digits=True,
      normalization_rule_name="identity",
      add_dummy_prefix=True,
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      character_coverage=0.9995,
      num_threads=1,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      minloglevel=2,
  )
  return model.getvalue()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=ASSETS / "tokenizer" / "tokenizer.model")
  parser.add_argument("--check", action="store_true",
                      help="compare with --out instead of writing it; exit 1 when they differ")
  args = parser.parse_args(argv)
  model = train_model()
  if args.check:
    same = args.out.exists() and args.out.read_bytes() == model
    print(f"{args.out}: {'up to date' if same else 'STALE: rerun tools/make_sample_tokenizer.py'}")
    return 0 if same else 1
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_bytes(model)
  print(f"wrote {args.out} ({len(model)} bytes, {VOCAB_SIZE} pieces)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
