"""Untrusted safetensors files: refused with a message naming file and tensor, never misread."""

import json
import pathlib
import re
import shutil
import struct

import numpy as np
import pytest
import safetensors
import safetensors.numpy

import llama_reference as ref
from lima_jax import convert
from lima_jax import safetensors_io
from lima_jax.cli import convert_weights


A = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
B = {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]}


def _file(path, header=None, body=b"", *, raw_header=None, header_len=None, whole=None) -> pathlib.Path:
  if whole is not None:
    path.write_bytes(whole)
    return path
  raw = json.dumps(header).encode() if raw_header is None else raw_header
  path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + body)
  return path


# name -> (header, body, extra _file kwargs, message the error must contain).
BAD = {
    "shorter_than_length": (None, b"", {"whole": b"\x01\x00\x00"},
                            r"fewer than the 8-byte header length"),
    "header_length_past_end": ({"a": A}, bytes(16), {"header_len": 10**6},
                               r"header length 1000000 runs past the end of the file"),
    "header_length_huge": ({"a": A}, bytes(16), {"header_len": 2**62}, r"exceeds the format's limit"),
    "not_utf8": (None, b"", {"raw_header": b'{"\xff": 1}'}, r"not UTF-8"),
    "not_json": (None, b"", {"raw_header": b'{"a": '}, r"not valid JSON"),
    "not_an_object": (None, b"", {"raw_header": b"[]"}, r"a JSON list, not an object"),
    "metadata_not_strings": ({"__metadata__": {"format": 1}, "a": A}, bytes(16), {},
                             r"__metadata__ must map strings to strings"),
    "unknown_dtype": ({"a": {**A, "dtype": "F33"}}, bytes(16), {}, r"tensor a: unknown dtype 'F33'"),
    "negative_shape": ({"a": {**A, "shape": [-2, -2]}}, bytes(16), {},
                       r"tensor a: shape \[-2, -2\] is not a list of non-negative integers"),
    "float_shape": ({"a": {**A, "shape": [2.0, 2]}}, bytes(16), {}, r"tensor a: shape"),
    "three_offsets": ({"a": {**A, "data_offsets": [0, 16, 3]}}, bytes(16), {},
                      r"tensor a: data_offsets \[0, 16, 3\] is not two"),
    "size_mismatch": ({"a": {**A, "shape": [2, 3]}}, bytes(16), {},
                      r"tensor a: data_offsets \[0, 16\] hold 16 bytes, but shape \[2, 3\] of F32 needs 24"),
    "end_before_begin": ({"a": {**A, "data_offsets": [16, 0]}}, bytes(16), {}, r"tensor a: data_offsets \[16, 0\]"),
    "overlap": ({"a": A, "b": {**B, "data_offsets": [8, 16]}}, bytes(16), {},
                r"tensor a .* overlaps tensor b|tensor b .* overlaps tensor a"),
    "same_bytes": ({"a": A, "b": dict(A)}, bytes(16), {}, r"overlaps tensor"),
    "gap": ({"a": A, "b": {**B, "data_offsets": [20, 28]}}, bytes(28), {},
            r"data bytes \[16, 20\) before tensor b belong to no tensor"),
    "truncated_body": ({"a": A, "b": B}, bytes(20), {},
                       r"tensor b ends at data byte 24, but the file holds 20 bytes of data: truncated"),
    "trailing_bytes": ({"a": A, "b": B}, bytes(32), {}, r"8 bytes after the last tensor belong to no tensor"),
    "sub_byte": ({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, bytes(2), {},
                 r"tensor a: 3 elements of F4 do not fill whole bytes"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_file_is_refused_as_the_library_refuses_it(tmp_path, case):
  header, body, kwargs, message = BAD[case]
  path = _file(tmp_path / "bad.safetensors", header, body, **kwargs)
  with pytest.raises(ValueError, match=re.escape(str(path)) + r": not a valid safetensors file: .*" + message):
    safetensors_io.SafetensorsFile(path)
  with pytest.raises(safetensors.SafetensorError):  # We refuse nothing the reference accepts.
    safetensors.safe_open(str(path), framework="numpy")


def test_a_name_given_twice_is_refused(tmp_path):
  entry = json.dumps(A)
  raw = ('{"a": %s, "a": %s}' % (entry, entry)).encode()
  path = _file(tmp_path / "twice.safetensors", raw_header=raw, body=bytes(16))
  with pytest.raises(ValueError, match=r"the header names 'a' twice"):
    safetensors_io.SafetensorsFile(path)


def test_valid_files_are_read(tmp_path):
  # Entries out of offset order, an empty tensor, unknown extra fields and padding: all valid.
  header = {"b": B, "a": {**A, "note": "x"}, "e": {"dtype": "BF16", "shape": [0], "data_offsets": [24, 24]},
            "__metadata__": {"format": "pt"}}
  values = np.arange(4, dtype=np.float32).reshape(2, 2).tobytes() + np.ones(4, np.float16).tobytes()
  raw = json.dumps(header).encode() + b"   "
  path = _file(tmp_path / "ok.safetensors", raw_header=raw, body=values)
  f = safetensors_io.SafetensorsFile(path)
  assert f.metadata == {"format": "pt"}
  np.testing.assert_array_equal(f.read("a"), np.arange(4, dtype=np.float32).reshape(2, 2))
  np.testing.assert_array_equal(f.read_rows("b", 1, 3), np.ones(2, np.float16))
  assert f.read("e").shape == (0,)
  # The reference writer's files, every dtype the converter reads.
  tensors = {n: np.arange(6, dtype=d).reshape(3, 2) for n, d in
             (("f64", np.float64), ("f32", np.float32), ("f16", np.float16), ("i8", np.int8))}
  safetensors.numpy.save_file(tensors, tmp_path / "ref.safetensors")
  f = safetensors_io.SafetensorsFile(tmp_path / "ref.safetensors")
  for name in ("f64", "f32", "f16"):
    np.testing.assert_array_equal(f.read(name), tensors[name])
  assert f.tensors["i8"].dtype == "I8" and f.tensors["i8"].numpy_dtype is None


def _rewrite_header(path: pathlib.Path, edit) -> None:
  data = path.read_bytes()
  (n,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + n])
  body = data[8 + n:]
  body = edit(header, body)
  raw = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _overlap(header, body):
  q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
  header[k]["data_offsets"] = list(header[q]["data_offsets"])
  return body


def _truncate(header, body):
  return body[:-100]


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
  return ref.save_model(ref.make_model("llama1"), tmp_path_factory.mktemp("src") / "hf")


@pytest.mark.parametrize("edit, message", [
    (_overlap, r"tensor model\.layers\.0\.self_attn\.[qk]_proj\.weight .* overlaps tensor "
               r"model\.layers\.0\.self_attn\.[qk]_proj\.weight"),
    (_truncate, r"tensor \S+ ends at data byte \d+, but the file holds \d+ bytes of data: truncated"),
])
def test_corrupt_model_exits_2_writes_nothing_and_load_pretrained_refuses(tmp_path, capsys, hf_source,
                                                                        edit, message):
  hf_dir = tmp_path / "hf"
  shutil.copytree(hf_source, hf_dir)
  _rewrite_header(hf_dir / "model.safetensors", edit)
  destination = tmp_path / "out" / "ckpt"
  status = convert_weights.main(["hf-to-orbax", "--hf_dir", str(hf_dir), "--ckpt_dir", str(destination)])
  err = capsys.readouterr().err
  assert status == 2, err
  assert re.search(re.escape(str(hf_dir / "model.safetensors")) + r": not a valid safetensors file: " + message, err)
  assert not (tmp_path / "out").exists()
  with pytest.raises(convert.ConversionError, match=message):
    convert.load_pretrained(hf_dir)


def test_writer_reads_ahead_and_reports_bad_sources(tmp_path):
  """The writer's read-ahead thread: output equal to the reference reader's; errors surface."""
  def rows(n, cols, dtype):
    return lambda: (np.full((1, cols), i, dtype) for i in range(n))
  sources = [safetensors_io.TensorSource("a", np.float16, (37, 5), rows(37, 5, np.float16)),
             safetensors_io.TensorSource("b", np.float32, (3, 2), rows(3, 2, np.float32)),
             safetensors_io.TensorSource("e", np.float32, (0,), lambda: iter(()))]
  for ahead in (0, 2):
    path = tmp_path / f"ok{ahead}.safetensors"
    safetensors_io.write_file(path, sources, read_ahead=ahead)
    loaded = safetensors.numpy.load_file(path)
    np.testing.assert_array_equal(loaded["a"], np.repeat(np.arange(37, dtype=np.float16)[:, None], 5, 1))
    np.testing.assert_array_equal(loaded["b"], np.repeat(np.arange(3, dtype=np.float32)[:, None], 2, 1))

  def failing():
    yield np.zeros((1, 5), np.float16)
    raise ValueError("tensor a: values overflow float16")
  with pytest.raises(ValueError, match="values overflow float16"):
    safetensors_io.write_file(tmp_path / "fail.safetensors",
                              [safetensors_io.TensorSource("a", np.float16, (2, 5), failing)])
  short = safetensors_io.TensorSource("a", np.float16, (37, 5), rows(36, 5, np.float16))
  with pytest.raises(ValueError, match="tensor a produced 360 bytes, expected 370"):
    safetensors_io.write_file(tmp_path / "short.safetensors", [short, sources[1]])


def test_transpose_2d_matches_numpy():
  for shape in ((37, 5), (16, 16), (1, 7), (100, 33)):
    x = np.arange(np.prod(shape), dtype=np.float16).reshape(shape)
    np.testing.assert_array_equal(convert.transpose_2d(x), x.T)
    assert convert.transpose_2d(x).flags.c_contiguous
