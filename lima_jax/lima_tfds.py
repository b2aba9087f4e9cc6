"""TFDS dataset `lima`: LIMA's train/dev/test JSONL as TFDS splits, built and read without TensorFlow.

Usage from the training config: `--config.data.tfds_name=lima --config.data.tfds_data_dir=DIR`
(and `--config.data.tfds_manual_dir=M` holding train.jsonl, dev.jsonl, test.jsonl; by default
TFDS looks in DIR/downloads/manual). The first use prepares the dataset; on several hosts prepare
it once beforehand, so that hosts do not race to write it:

    python -m lima_jax.lima_tfds --manual_dir=M --data_dir=DIR

TensorFlow is not needed: the builder writes `array_record` files and they are read through
`as_data_source` (random access, as Grain consumes it); `as_dataset` would need TensorFlow.
Every line is validated when the dataset is built (`lima_jax.records.parse_record`), and each record
keeps its file and line, so later errors still name the original line. TFDS shuffles the record
order when it writes; records carry `index` (their order in the file) to restore it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import TYPE_CHECKING

from etils import epath
import numpy as np

from lima_jax import paths
from lima_jax import records

if TYPE_CHECKING:
  import tensorflow_datasets as tfds

SPLIT_FILES = {"train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl"}
FILE_FORMAT = "array_record"


def _tfds():
  import tensorflow_datasets  # pylint: disable=g-import-not-at-top  # Optional: data.tfds_name only.
  return tensorflow_datasets


@functools.cache
def builder_class() -> type:
  """The `lima` builder class, defined (which registers it with TFDS) on first use."""
  tfds = _tfds()

  class Lima(tfds.core.GeneratorBasedBuilder):
    """LIMA conversations (Zhou et al., 2023), from JSONL files in the manual directory."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "train/dev/test from LIMA-format JSONL."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put LIMA-format JSONL files in the manual directory: train.jsonl (required), dev.jsonl "
        "and test.jsonl (optional), one {\"conversations\": [user, assistant, ...], \"source\": "
        "...} a line; test lines end on a user turn. LIMA itself is on the Hugging Face hub as "
        "GAIR/lima.")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
      # TFDS finds a packaged builder's file through `importlib_resources`, which it does not
      # declare as a dependency (ModuleNotFoundError without it); the path itself is all it needs.
      return epath.Path(__file__)

    def __init__(self, *, skip_bad_lines: bool = False, **kwargs):
      """`skip_bad_lines`: build without the bad lines, recording them in the dataset's metadata."""
      self._skip_bad_lines = skip_bad_lines
      super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
      # A builder outside a TFDS dataset package declares its info directly; the
      # `dataset_info_from_configs` helper looks for package files that do not exist here.
      return tfds.core.DatasetInfo(
          builder=self,
          description="LIMA: 1,000 curated conversations for alignment fine-tuning.",
          features=tfds.features.FeaturesDict({
              "index": np.int64,  # Order within the split's file.
              "conversations": tfds.features.Sequence(tfds.features.Text()),
              "source": tfds.features.Text(),
              "file": tfds.features.Text(),  # The JSONL file and line the record came from.
              "line": np.int64,
              "extra_json": tfds.features.Text(),  # Unknown fields of the line, kept as JSON.
          }),
          homepage="https://arxiv.org/abs/2305.11206",
          # {"bad_lines": {split: [[file, line, reason], ...]}}: what a skip_bad_lines build
          # left out.
          metadata=tfds.core.MetadataDict(),
      )

    def _split_generators(self, dl_manager):
      manual_dir = paths.path(dl_manager.manual_dir)
      present = {split: manual_dir / name for split, name in SPLIT_FILES.items()
                 if (manual_dir / name).is_file()}
      if "train" not in present:
        raise FileNotFoundError(f"{manual_dir / SPLIT_FILES['train']}: not found; "
                                f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
      # Read and validate everything first: skipped lines go into the metadata, which TFDS writes
      # with the dataset, so that whoever reads it later still counts and names them.
      splits, bad_lines = {}, {}
      for split, path in present.items():
        stats = records.DataStats()
        splits[split] = records.read_jsonl(path, kind=records.SPLIT_KINDS[split],
                                            skip_bad_lines=self._skip_bad_lines, stats=stats)
        bad_lines[split] = [[b.path, b.line, b.reason] for b in stats.bad_lines]
      self.info.metadata["bad_lines"] = bad_lines
      return {split: self._generate_examples(conversations)
              for split, conversations in splits.items()}

    def _generate_examples(self, conversations):
      for index, conversation in enumerate(conversations):
        yield index, {
            "index": index,
            "conversations": list(conversation.turns),
            "source": conversation.source,
            "file": conversation.path,
            "line": conversation.line,
            "extra_json": json.dumps(dict(conversation.extra), ensure_ascii=False),
        }

  return Lima


def builder(name: str = "lima", data_dir: str | None = None,
            skip_bad_lines: bool = False) -> tfds.core.DatasetBuilder:
  """The registered builder `name` (e.g. "lima" or "lima:1.0.0") writing array_record files.

  `skip_bad_lines` reaches only the `lima` builder (another registered dataset with the same
  features is built however it builds).
  """
  tfds, lima = _tfds(), builder_class()  # Defining the class registers it.
  kwargs = {}
  if issubclass(tfds.builder_cls(name.split(":")[0]), lima):
    kwargs["skip_bad_lines"] = skip_bad_lines
  return tfds.builder(name, data_dir=data_dir, file_format=FILE_FORMAT, **kwargs)


def prepare(name: str = "lima", *, data_dir: str | None = None, manual_dir: str | None = None,
            skip_bad_lines: bool = False) -> tfds.core.DatasetBuilder:
  """Builds the dataset unless it is already prepared in `data_dir`; returns its builder."""
  b = builder(name, data_dir, skip_bad_lines)
  if not b.is_prepared():
    config = _tfds().download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    b.download_and_prepare(download_config=config)
  return b


def read_conversations(name: str, split: str, *, data_dir: str | None = None,
                       manual_dir: str | None = None, kind: str | None = None,
                       skip_bad_lines: bool = False,
                       stats: records.DataStats | None = None) -> list[records.Conversation]:
  """A split as `lima_jax.records.Conversation`s in file order, validated like the JSONL path.

  Lines that a `skip_bad_lines` build left out are added to `stats.bad_lines`, or, when this
  reader does not skip bad lines, the first of them raises DataError.
  """
  b = prepare(name, data_dir=data_dir, manual_dir=manual_dir, skip_bad_lines=skip_bad_lines)
  if split not in b.info.splits:
    raise records.DataError(f"tfds:{name}", 0, f"no split {split!r} (it has "
                            f"{sorted(b.info.splits)}); add {SPLIT_FILES.get(split, split)} to "
                            f"the manual directory and rebuild, or set data.{split}_path")
  metadata = b.info.metadata or {}
  bad = [records.BadLine(p, int(l), r) for p, l, r in metadata.get("bad_lines", {}).get(split, [])]
  if bad and not skip_bad_lines:
    raise records.DataError(bad[0].path, bad[0].line, f"{bad[0].reason} (left out of the TFDS "
                            f"build in {b.data_dir}, which skipped {len(bad)} bad lines)")
  source = b.as_data_source(split=split)
  rows = sorted((source[i] for i in range(len(source))), key=lambda r: int(r["index"]))
  kind = kind or records.SPLIT_KINDS[split]
  conversations = []
  for r in rows:
    path, line = _text(r["file"]), int(r["line"])
    record = {"conversations": [_text(t) for t in r["conversations"]],
              "source": _text(r["source"]), **json.loads(_text(r["extra_json"]))}
    try:  # Fails only when read as another kind than it was built as.
      turns, source_name, extra = records.parse_record(record, kind)
    except ValueError as e:
      raise records.DataError(path, line, str(e)) from None
    conversations.append(records.Conversation(turns, source_name, path, line, extra))
  if stats is not None:
    stats.conversations += len(conversations)
    stats.bad_lines.extend(bad)
  return conversations


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description="Prepare the `lima` TFDS dataset (no TensorFlow).")
  parser.add_argument("--manual_dir", required=True,
                      help="directory with train.jsonl (and dev.jsonl, test.jsonl)")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data directory (default ~/tensorflow_datasets)")
  parser.add_argument("--skip_bad_lines", action="store_true",
                      help="leave bad lines out (recorded in the metadata) instead of failing")
  args = parser.parse_args(argv)
  try:
    b = prepare(data_dir=args.data_dir, manual_dir=os.path.expanduser(args.manual_dir),
                skip_bad_lines=args.skip_bad_lines)
  except (records.DataError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"prepared {b.info.full_name} in {b.data_dir}: " +
        ", ".join(f"{s} {info.num_examples}" for s, info in sorted(b.info.splits.items())))
  return 0


if __name__ == "__main__":
  sys.exit(main())
