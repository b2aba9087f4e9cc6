"""Hugging Face <-> lima_jax conversion: config reading, round trips, export, EOT growth, bad input."""

import json
import os
import pathlib
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

import llama_reference as ref
from lima_jax import checkpoint
from lima_jax import convert
from lima_jax import model as model_lib
from lima_jax import tokenizer as tokenizer_lib
from lima_jax.cli import convert_weights

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "convert_weights.py"
SAMPLE_TOKENIZER = ROOT / "lima_jax" / "assets" / "tokenizer" / "tokenizer.model"


def _tensors(directory: pathlib.Path) -> dict:
  out = {}
  for f in sorted(directory.glob("*.safetensors")):
    out.update(safetensors.torch.load_file(f))
  return out


def _leftovers(destination: pathlib.Path) -> list[str]:
  return sorted(p.name for p in destination.parent.iterdir()
                if p.name == destination.name or p.name.startswith(f".{destination.name}."))


@pytest.fixture(scope="module")
def llama2_dir(tmp_path_factory):
  model = ref.make_model("llama2")
  return model, ref.save_model(model, tmp_path_factory.mktemp("llama2") / "hf", keys="4.x")


# -- config.json ----------------------------------------------------------------------------------


def test_config_keys_of_transformers_4_and_5_read_alike():
  model = ref.make_model("llama3")
  config5 = json.loads(model.config.to_json_string())
  config4 = ref.as_transformers4_config(config5)
  assert "rope_parameters" in config5 and "rope_scaling" in config4 and "torch_dtype" in config4
  a, b = convert.hf_config_to_model_config(config5), convert.hf_config_to_model_config(config4)
  assert a == b
  assert (a.rope_theta, a.kv_heads, a.tie_embeddings) == (500000.0, 2, True)
  assert dict(a.rope_scaling)["rope_type"] == "llama3"
  llama1 = ref.as_transformers4_config(json.loads(ref.make_model("llama1").config.to_json_string()),
                                       llama1=True)
  assert "num_key_value_heads" not in llama1
  assert convert.hf_config_to_model_config(llama1).kv_heads == 4


@pytest.mark.parametrize("change, field", [
    ({"model_type": "gemma"}, "model_type"),
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_config_that_is_not_llama_is_rejected(tmp_path, change, field):
  config = json.loads(ref.make_model("llama2").config.to_json_string())
  config.update(change)
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(convert.ConversionError, match=rf"config\.json.*{field}"):
    convert.hf_config_to_model_config(tmp_path)


# -- Round trips and export ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype, style, shard", [
    (torch.float32, "llama2", None), (torch.bfloat16, "llama3", "40KB")])
def test_hf_orbax_hf_round_trip_is_bit_exact(tmp_path, dtype, style, shard):
  torch_model = ref.make_model(style)
  hf_dir = ref.save_model(torch_model, tmp_path / "hf", dtype=dtype, max_shard_size=shard)
  assert convert_weights.main(["hf-to-orbax", "--hf_dir", str(hf_dir),
                               "--ckpt_dir", str(tmp_path / "ckpt")]) == 0
  assert checkpoint.read_model_config(tmp_path / "ckpt").param_dtype == str(dtype).removeprefix("torch.")
  assert convert_weights.main(["orbax-to-hf", "--ckpt_dir", str(tmp_path / "ckpt"), "--hf_dir",
                               str(tmp_path / "back"), "--max_shard_size", "50KB"]) == 0
  original, back = _tensors(hf_dir), _tensors(tmp_path / "back")
  assert sorted(original) == sorted(back)
  for name, tensor in original.items():
    assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
  assert (tmp_path / "back" / convert.INDEX_FILE).is_file()
  # The checkpoint's own logits are the Hugging Face model's.
  tokens = ref.tokens()
  want = ref.torch_logits(ref.rounded(torch_model, dtype), tokens)
  got = np.asarray(convert.load_pretrained(tmp_path / "ckpt")(jnp.asarray(tokens)))
  assert ref.relative_error(got, want) < 1e-5


def test_exported_model_gives_lima_jax_logits_in_transformers(tmp_path):
  """A lima_jax checkpoint (EOT-sized vocab, GQA, llama3 rope) -> transformers, same logits."""
  tok = tokenizer_lib.load_tokenizer(SAMPLE_TOKENIZER)
  config = model_lib.ModelConfig(
      vocab_size=tok.vocab_size, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, mlp_dim=80,
      rope_theta=500000.0, max_seq_len=128,
      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
  params = ref.random_params(config)
  checkpoint.save_model(tmp_path / "ckpt", params, config, tok.to_blob())
  files = convert.orbax_to_hf(tmp_path / "ckpt", tmp_path / "hf", max_shard_size="100KB")
  assert {"config.json", "generation_config.json", "tokenizer.model", convert.INDEX_FILE} <= set(files)
  umask = os.umask(0o022)
  os.umask(umask)  # Readable by a server running as another user, as a plain mkdir/open makes it.
  assert stat.S_IMODE((tmp_path / "hf").stat().st_mode) == 0o777 & ~umask
  assert {stat.S_IMODE((tmp_path / "hf" / f).stat().st_mode) for f in files} == {0o666 & ~umask}
  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert hf_config["vocab_size"] == tok.vocab_size == tok.base_vocab_size + 1
  generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
  assert generation["eos_token_id"] == [tok.eos_id, tok.eot_id]
  assert (generation["top_p"], generation["temperature"], generation["repetition_penalty"]) == (0.9, 0.7, 1.2)
  assert tokenizer_lib.load_tokenizer(tmp_path / "hf").eot_id == tok.eot_id
  torch_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
  tokens = ref.tokens(vocab=tok.vocab_size)
  want = np.asarray(jax.jit(lambda p, t: model_lib.bind(config, p)(t))(params, tokens))
  assert ref.relative_error(ref.torch_logits(torch_model, tokens), want) < 1e-5


@pytest.mark.slow
def test_cli_round_trip_in_a_fresh_process(tmp_path, llama2_dir):
  """The command line as a user runs it, from another directory."""
  _, hf_dir = llama2_dir
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  run = subprocess.run([sys.executable, str(TOOL), "hf-to-orbax", "--hf_dir", str(hf_dir),
                        "--ckpt_dir", str(tmp_path / "ckpt"), "--dtype", "bfloat16"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
  assert run.returncode == 0, run.stderr
  assert "bfloat16" in run.stdout
  stores = convert.open_params(tmp_path / "ckpt")
  assert stores[("layers", "attn", "q_proj")].dtype.numpy_dtype == jnp.bfloat16


# -- EOT growth ------------------------------------------------------------------------------------


def test_add_eot_row_grows_with_mean_rows(llama2_dir):
  _, hf_dir = llama2_dir
  params, config = convert.load_hf_params(hf_dir)
  new_vocab = config.vocab_size + 1
  grown = jax.jit(lambda p: convert.add_eot_row(p, config, new_vocab)[0])(params)
  assert convert.add_eot_row(params, config, new_vocab)[1].vocab_size == new_vocab
  abstract = jax.eval_shape(lambda p: convert.add_eot_row(p, config, new_vocab)[0], params)
  assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, grown)
  embed, old = np.asarray(grown["embed"]["embedding"]), np.asarray(params["embed"]["embedding"])
  np.testing.assert_array_equal(embed[:config.vocab_size], old[:config.vocab_size])
  np.testing.assert_allclose(embed[config.vocab_size], old[:config.vocab_size].mean(0), rtol=1e-5,
                             atol=1e-8)
  assert not embed[new_vocab:].any()
  head = np.asarray(grown["lm_head"])
  np.testing.assert_allclose(head[:, config.vocab_size],
                             np.asarray(params["lm_head"])[:, :config.vocab_size].mean(1), rtol=1e-5,
                             atol=1e-8)
  assert not head[:, new_vocab:].any()


def test_hf_to_orbax_add_eot_matches_add_eot_row(tmp_path, llama2_dir):
  _, hf_dir = llama2_dir
  work = tmp_path / "hf"
  work.mkdir()
  for f in hf_dir.iterdir():
    (work / f.name).write_bytes(f.read_bytes())
  (work / "tokenizer.model").write_bytes(SAMPLE_TOKENIZER.read_bytes())
  tok = tokenizer_lib.load_tokenizer(work)
  # The sample tokenizer has more pieces than the tiny model's rows: growth goes to its size.
  assert convert_weights.main(["hf-to-orbax", "--hf_dir", str(work), "--ckpt_dir",
                               str(tmp_path / "ckpt"), "--add_eot", "--eot", "<EOT>"]) == 0
  config = checkpoint.read_model_config(tmp_path / "ckpt")
  assert config.vocab_size == tok.vocab_size
  assert tokenizer_lib.load_tokenizer_from_blob(checkpoint.read_tokenizer_blob(tmp_path / "ckpt")).eot_id == tok.eot_id
  stored = checkpoint.restore_params(tmp_path / "ckpt")
  params, hf_config = convert.load_hf_params(work)
  grown, _ = convert.add_eot_row(params, hf_config, tok.vocab_size)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), stored, grown)


# -- Sharded loading --------------------------------------------------------------------------------


def test_sharded_loading_from_hf_and_checkpoint(tmp_path, llama2_dir):
  """On 8 simulated devices: each shard read from the files equals the unsharded load."""
  _, hf_dir = llama2_dir
  assert convert_weights.main(["hf-to-orbax", "--hf_dir", str(hf_dir), "--ckpt_dir",
                               str(tmp_path / "ckpt")]) == 0
  script = f"""
import jax, numpy as np
from lima_jax import checkpoint, convert, model, sharding
config = convert.hf_config_to_model_config({str(hf_dir)!r})
mesh = sharding.make_mesh({{"data": 1, "fsdp": 4, "sequence": 1, "tensor": 2}})
abstract = model.abstract_params(config)
shardings = sharding.tree_shardings(model.param_logical_axes(abstract), abstract, mesh)
sharded, _ = convert.load_hf_params({str(hf_dir)!r}, shardings)
single, _ = convert.load_hf_params({str(hf_dir)!r})
target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
restored = checkpoint.restore_params({str(tmp_path / "ckpt")!r}, target)
q = sharded["layers"]["attn"]["q_proj"]
assert len(q.sharding.device_set) == 8 and q.sharding == shardings["layers"]["attn"]["q_proj"], q.sharding
assert not q.sharding.is_fully_replicated
for a, b, c in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), jax.tree.leaves(restored)):
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(c), np.asarray(b))
print("ok")
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=str(ROOT))
  run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       check=False)
  assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


def test_chunks_keep_the_hf_byte_order_and_any_orbax_layout_exports(tmp_path, llama2_dir):
  """hf-to-orbax stores each chunk as a plain file holding a piece of a safetensors file byte for
  byte (zarr3, a transpose codec, raw bytes), which plain Orbax restores in lima_jax's layout;
  orbax-to-hf also exports a checkpoint that `checkpoint.save_model` wrote (OCDBT, C order,
  compressed) bit-exactly."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  _, hf_dir = llama2_dir
  convert.hf_to_orbax(hf_dir, tmp_path / "ckpt")
  q_dir = tmp_path / "ckpt" / checkpoint.PARAMS / "layers.attn.q_proj"
  assert json.loads((q_dir / "zarr.json").read_text())["codecs"] == [
      {"name": "transpose", "configuration": {"order": [0, 2, 3, 1]}},
      {"name": "bytes", "configuration": {"endian": "little"}}]
  source = _tensors(hf_dir)
  for layer in (0, 1):
    chunk = (q_dir / "c" / str(layer) / "0" / "0" / "0").read_bytes()
    assert chunk == source[f"model.layers.{layer}.self_attn.q_proj.weight"].numpy().tobytes()
  expected, config = convert.load_hf_params(hf_dir, dtype=None)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(tmp_path / "ckpt" / checkpoint.PARAMS)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  checkpoint.save_model(tmp_path / "plain", expected, config)
  convert.orbax_to_hf(tmp_path / "plain", tmp_path / "out")
  out = _tensors(tmp_path / "out")
  assert set(out) <= set(source) and len(out) >= len(source) - 1  # A tied head is not re-saved.
  for name, tensor in out.items():
    assert torch.equal(tensor, source[name]), name


# -- Bad input: exit status 2, a message naming the culprit, no output left behind. ----------------


def _write_hf(tmp_path, edit=None) -> pathlib.Path:
  directory = ref.save_model(ref.make_model("llama1"), tmp_path / "hf")
  if edit:
    edit(directory)
  return directory


def _edit_config(**changes):
  def edit(directory):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
  return edit


def _edit_tensors(fn):
  def edit(directory):
    path = directory / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    fn(tensors)
    safetensors.numpy.save_file(tensors, path)
  return edit


def _int8_q(tensors):
  tensors["model.layers.1.self_attn.q_proj.weight"] = np.zeros((64, 64), np.int8)


def _huge_value(tensors):
  tensors["model.layers.2.mlp.down_proj.weight"][3, 5] = 1e6


def _drop_tensor(tensors):
  del tensors["model.layers.2.mlp.up_proj.weight"]


def _extra_tensor(tensors):
  tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros((64,), np.float32)


BAD_HF = {
    "missing_dir": (lambda d: __import__("shutil").rmtree(d), [], r"no such directory"),
    "missing_config": (lambda d: (d / "config.json").unlink(), [], r"config\.json: file not found"),
    "not_llama": (_edit_config(model_type="gpt2"), [], r"config\.json: model_type='gpt2'"),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), [], r"no model\.safetensors"),
    "shape_mismatch": (_edit_config(intermediate_size=100), [],
                       r"model\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape"),
    "int8": (_edit_tensors(_int8_q), [], r"q_proj\.weight has dtype I8"),
    "missing_tensor": (_edit_tensors(_drop_tensor), [], r"tensor model\.layers\.2\.mlp\.up_proj\.weight is missing"),
    "unexpected_tensor": (_edit_tensors(_extra_tensor), [], r"unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias"),
    # Fails only while writing (after other tensors are on disk): the cleanup path.
    "float16_overflow": (_edit_tensors(_huge_value), ["--dtype", "float16"],
                         r"down_proj\.weight: values up to 1e\+06 overflow float16"),
}


@pytest.mark.parametrize("case", sorted(BAD_HF))
def test_bad_hf_input_exits_2_and_leaves_nothing(tmp_path, capsys, case):
  edit, extra, message = BAD_HF[case]
  hf_dir = _write_hf(tmp_path, edit)
  destination = tmp_path / "out" / "ckpt"
  status = convert_weights.main(["hf-to-orbax", "--hf_dir", str(hf_dir), "--ckpt_dir",
                                 str(destination)] + extra)
  assert status == 2
  assert __import__("re").search(message, capsys.readouterr().err)
  assert not (tmp_path / "out").exists()


def test_bad_orbax_input_exits_2_and_leaves_nothing(tmp_path, capsys, llama2_dir):
  _, hf_dir = llama2_dir
  status = convert_weights.main(["orbax-to-hf", "--ckpt_dir", str(tmp_path / "nothing"),
                                 "--hf_dir", str(tmp_path / "hf")])
  assert status == 2 and "not a lima_jax checkpoint" in capsys.readouterr().err
  assert not (tmp_path / "hf").exists()
  # A chunk file cut short: named, and nothing exported.
  convert.hf_to_orbax(hf_dir, tmp_path / "ckpt")
  chunk = tmp_path / "ckpt" / checkpoint.PARAMS / "layers.mlp.up_proj" / "c" / "0" / "0" / "0"
  chunk.write_bytes(chunk.read_bytes()[:100])
  status = convert_weights.main(["orbax-to-hf", "--ckpt_dir", str(tmp_path / "ckpt"),
                                 "--hf_dir", str(tmp_path / "hf")])
  err = capsys.readouterr().err
  assert status == 2 and "layers/mlp/up_proj" in err and str(chunk) in err, err
  assert not (tmp_path / "hf").exists() and _leftovers(tmp_path / "hf") == []
  # An existing destination is refused, and left as it was.
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "keep.txt").write_text("mine")
  status = convert_weights.main(["hf-to-orbax", "--hf_dir", str(hf_dir), "--ckpt_dir",
                                 str(tmp_path / "taken")])
  assert status == 2 and "already exists" in capsys.readouterr().err
  assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
  assert _leftovers(tmp_path / "taken") == ["taken"]
