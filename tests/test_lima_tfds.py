"""The `lima` TFDS builder: built and read without TensorFlow, same data as the JSONL path."""

import json
import pathlib
import shutil
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from lima_jax import data  # pylint: disable=g-import-not-at-top
from lima_jax import lima_tfds  # pylint: disable=g-import-not-at-top
from lima_jax import records  # pylint: disable=g-import-not-at-top
from tests.test_data import _lima_config, _write  # pylint: disable=g-import-not-at-top

tfds.disable_progress_bar()


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
  """The bundled sample as LIMA ships it, plus one line with an extra field."""
  directory = tmp_path_factory.mktemp("manual")
  for split, path in data.bundled_paths().items():
    if split != "tokenizer":
      shutil.copy(path, directory / f"{split}.jsonl")
  with open(directory / "train.jsonl", "a") as f:
    f.write(json.dumps({"conversations": ["Is this kept?", "Yes."], "source": "x", "id": 9}) + "\n")
  return directory


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, manual_dir):
  directory = tmp_path_factory.mktemp("tfds")
  lima_tfds.prepare(data_dir=str(directory), manual_dir=str(manual_dir))
  return directory


def test_round_trip_matches_jsonl(manual_dir, data_dir):
  built = lima_tfds.builder(data_dir=str(data_dir))
  assert built.is_prepared() and built.info.file_format.value == "array_record"
  assert {s: built.info.splits[s].num_examples for s in ("train", "dev", "test")} == {
      "train": 51, "dev": 10, "test": 20}
  for split in ("train", "dev", "test"):
    kind = records.SPLIT_KINDS[split]
    from_tfds = lima_tfds.read_conversations("lima", split, data_dir=str(data_dir), kind=kind)
    from_jsonl = records.read_jsonl(manual_dir / f"{split}.jsonl", kind=kind)
    assert from_tfds == from_jsonl  # Same turns, sources, files and lines, in file order.
  last = lima_tfds.read_conversations("lima", "train", data_dir=str(data_dir))[-1]
  assert last.extra == {"id": 9} and last.line == 51
  assert "tensorflow" not in sys.modules  # Built and read with no TensorFlow.


def test_config_dispatch_gives_the_jsonl_batches(manual_dir, data_dir):
  tok = data.tokenizer_from_config(_lima_config())
  via_tfds = _lima_config(tfds_name="lima", tfds_data_dir=str(data_dir))
  via_jsonl = _lima_config(train_path=str(manual_dir / "train.jsonl"))
  loaders = [data.make_train_loader(c, tok, global_batch_size=4, seed=2, process_index=0,
                                    process_count=1) for c in (via_tfds, via_jsonl)]
  assert loaders[0].get_state()["fingerprint"] == loaders[1].get_state()["fingerprint"]
  for _ in range(loaders[0].steps_per_epoch + 1):
    (e1, b1), (e2, b2) = next(loaders[0]), next(loaders[1])
    assert e1 == e2
    np.testing.assert_array_equal(b1["inputs"], b2["inputs"])
  prompts = data.load_conversations(via_tfds, "test")
  assert len(prompts) == 20 and all(len(p.turns) % 2 == 1 for p in prompts)


def test_bad_line_stops_the_build_with_file_and_line(tmp_path, manual_dir):
  bad_manual = tmp_path / "manual"
  shutil.copytree(manual_dir, bad_manual)
  with open(bad_manual / "dev.jsonl", "a") as f:
    f.write('{"conversations": ["a question with no answer"]}\n')
  with pytest.raises(records.DataError, match=r"dev\.jsonl:11: conversations: no assistant turn"):
    lima_tfds.prepare(data_dir=str(tmp_path / "tfds"), manual_dir=str(bad_manual))
  assert not lima_tfds.builder(data_dir=str(tmp_path / "tfds")).is_prepared()  # Nothing half-built.
  assert lima_tfds.main(["--manual_dir", str(bad_manual), "--data_dir",
                         str(tmp_path / "tfds")]) == 2

  # With skip_bad_lines the build leaves the line out and records it; readers count it, or
  # raise with its file and line when they do not skip.
  config = _lima_config(tfds_name="lima", tfds_data_dir=str(tmp_path / "tfds"),
                        tfds_manual_dir=str(bad_manual), skip_bad_lines=True)
  stats = records.DataStats()
  dev = data.load_conversations(config, "dev", stats)
  assert len(dev) == 10
  assert [(pathlib.Path(b.path).name, b.line) for b in stats.bad_lines] == [("dev.jsonl", 11)]
  config.skip_bad_lines = False
  with pytest.raises(records.DataError, match=r"dev\.jsonl:11: conversations: no assistant turn.*"
                                           r"skipped 1 bad lines"):
    data.load_conversations(config, "dev")


def test_missing_files_and_splits(tmp_path):
  (tmp_path / "manual").mkdir()
  _write(tmp_path / "manual" / "train.jsonl", [{"conversations": ["q", "a"]}])
  config = _lima_config(tfds_name="lima", tfds_data_dir=str(tmp_path / "tfds"),
                        tfds_manual_dir=str(tmp_path / "manual"))
  assert len(data.load_conversations(config, "train")) == 1
  with pytest.raises(records.DataError, match=r"tfds:lima: no split 'dev' \(it has \['train'\]\); "
                                           r"add dev\.jsonl"):
    data.load_conversations(config, "dev")
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "dev.jsonl").write_text('{"conversations": ["q", "a"]}\n')
  with pytest.raises(FileNotFoundError, match=r"other/train\.jsonl: not found"):
    lima_tfds.prepare(data_dir=str(tmp_path / "tfds2"), manual_dir=str(tmp_path / "other"))
