"""tools/evaluate.py, tools/chat.py and tools/compare.py on a tiny checkpoint and hand-made files."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import pytest
import torch
import transformers

from lima_jax import checkpoint
from lima_jax import data as data_lib
from lima_jax import model as model_lib
from lima_jax import sampling
from lima_jax import tokenizer as tokenizer_lib
from lima_jax.cli import compare
from lima_jax.cli import evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOKENIZER = data_lib.bundled_paths()["tokenizer"]
SCFG = sampling.SamplingConfig(max_new_tokens=6, max_len=64, batch_size=2)
PROMPTS = [
    {"conversations": ["What is a process?"], "source": "stackexchange", "id": "p1"},
    {"prompt": "How do I iron a shirt?", "id": "p2"},
    {"conversations": ["Name a colour.", "Blue.", "And another one?"], "id": "p3"},
    {"conversations": ["Write a haiku about rain."], "id": "p4"},
    {"prompt": "Hello", "id": "p5"},
]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
INFO_LINE = re.compile(r"^I\d{4} ", re.M)  # absl's INFO prefix (Orbax, jax).


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def read_jsonl(path):
  return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A tiny lima_jax checkpoint with the bundled tokenizer (1024 pieces + EOT)."""
  tok = tokenizer_lib.load_tokenizer(TOKENIZER)
  cfg = model_lib.ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, mlp_dim=64)
  params = jax.tree.map(lambda x: x * 20.0, model_lib.init_params(cfg, jax.random.key(0)))
  path = tmp_path_factory.mktemp("ckpt") / "tiny"
  checkpoint.save_model(path, params, cfg, tok.to_blob())
  return str(path)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
  return write_jsonl(tmp_path_factory.mktemp("prompts") / "test.jsonl", PROMPTS)


@pytest.fixture(scope="module")
def reference(ckpt, prompts_file, tmp_path_factory):
  """One uninterrupted run: the records every resumed run must reproduce."""
  out = tmp_path_factory.mktemp("ref") / "responses.jsonl"
  alpaca = out.parent / "alpaca.json"
  records = evaluate.evaluate(ckpt, prompts_file, str(out), sampling_config=SCFG, alpaca_eval=str(alpaca),
                              generator="tiny", log=lambda _: None)
  return records, out, alpaca


def test_outputs(reference):
  records, out, alpaca = reference
  assert read_jsonl(out) == records
  assert [r["id"] for r in records] == ["p1", "p2", "p3", "p4", "p5"]
  assert not os.path.exists(str(out) + evaluate.PARTIAL_SUFFIX)
  third = records[2]
  assert third["conversation"] == ["Name a colour.", "Blue.", "And another one?"]
  assert third["generator"] == "tiny" and third["decoding"]["top_p"] == 0.9
  assert third["decoding"]["repetition_penalty"] == 1.2 and third["decoding"]["penalty_scope"] == "generated"
  tok = tokenizer_lib.load_tokenizer(TOKENIZER)
  assert third["prompt_tokens"] == len(data_lib.tokenize_prompt(tok, third["conversation"]))
  for r in records:
    assert 1 <= r["response_tokens"] <= 6 and r["finish_reason"] in ("stop", "length")
    assert isinstance(r["response"], str)
  assert records[0]["source"] == "stackexchange"
  listing = json.loads(alpaca.read_text())
  assert [a["instruction"] for a in listing][:2] == ["What is a process?", "How do I iron a shirt?"]
  assert listing[2]["instruction"] == "Name a colour.\n\nBlue.\n\nAnd another one?"
  assert {a["generator"] for a in listing} == {"tiny"}
  assert listing[0]["dataset"] == "stackexchange" and listing[1]["dataset"] == "lima"
  assert [a["output"] for a in listing] == [r["response"] for r in records]


def test_resume_from_half_written_partial(ckpt, prompts_file, reference, tmp_path):
  records, _, _ = reference
  out = tmp_path / "responses.jsonl"
  torn = json.dumps(records[3])[:25]  # The append of a third record stopped half way.
  partial = "".join(json.dumps(r) + "\n" for r in records[:2]) + torn
  (tmp_path / "responses.jsonl.partial").write_text(partial)
  logs = []
  resumed = evaluate.evaluate(ckpt, prompts_file, str(out), sampling_config=SCFG, generator="tiny",
                              log=logs.append)
  assert resumed == records
  assert any("torn last line" in line for line in logs)
  assert any("answered 3/3" in line for line in logs)  # Only the three missing prompts ran.
  assert read_jsonl(out) == records


def test_resume_refuses_other_settings(ckpt, prompts_file, reference, tmp_path):
  records, _, _ = reference
  write_jsonl(tmp_path / "responses.jsonl.partial", records[:2])
  with pytest.raises(evaluate.InputError, match=r"responses.jsonl.partial:1: written with decoding="):
    evaluate.evaluate(ckpt, prompts_file, str(tmp_path / "responses.jsonl"),
                      sampling_config=SCFG.replace(seed=5), generator="tiny", log=lambda _: None)


@pytest.mark.slow
def test_mt_bench(ckpt, tmp_path):
  questions = [{"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Make it shorter."]},
               {"question_id": 82, "category": "math", "turns": ["What is 2+2?", "And 3+3?"]}]
  qfile = write_jsonl(tmp_path / "question.jsonl", questions)
  answers = tmp_path / "answers.jsonl"
  records = evaluate.evaluate(ckpt, qfile, str(tmp_path / "out.jsonl"), sampling_config=SCFG,
                              mt_bench=str(answers), generator="tiny", log=lambda _: None)
  assert [r["id"] for r in records] == ["81:turn1", "81:turn2", "82:turn1", "82:turn2"]
  assert records[1]["conversation"] == ["Write a poem.", records[0]["response"], "Make it shorter."]
  lines = read_jsonl(answers)
  assert [a["question_id"] for a in lines] == [81, 82]
  assert lines[0]["model_id"] == "tiny" and isinstance(lines[0]["tstamp"], float)
  assert lines[0]["choices"] == [{"index": 0, "turns": [records[0]["response"], records[1]["response"]]}]
  assert len({a["answer_id"] for a in lines}) == 2


def test_hf_base_model_without_eot(tmp_path):
  """A Hugging Face base model (vocabulary = the tokenizer's, no EOT row) stops at EOS only and
  answers greedily as transformers does."""
  tok = tokenizer_lib.load_tokenizer(TOKENIZER)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=tok.base_vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)).eval()
  hf_dir = tmp_path / "hf"
  hf.save_pretrained(hf_dir, safe_serialization=True)
  shutil.copy(TOKENIZER, hf_dir / "tokenizer.model")
  prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
  logs = []
  records = evaluate.evaluate(str(hf_dir), prompts, str(tmp_path / "out.jsonl"),
                              sampling_config=SCFG.replace(greedy=True, repetition_penalty=1.0, max_len=256),
                              log=logs.append)
  assert any("no EOT row" in line and "EOS only" in line for line in logs)
  assert any(f"stop ids [{tok.eos_id}]" in line for line in logs)
  assert any("max_seq_len 128" in line for line in logs)
  for spec, record in zip(PROMPTS[:2], records):
    text = spec.get("prompt") or spec["conversations"][0]
    ids = [tok.bos_id] + tok.encode(text)
    assert record["prompt_tokens"] == len(ids)
    with torch.no_grad():
      out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=6, pad_token_id=0)
    want = out[0, len(ids):].tolist()
    if want and want[-1] == tok.eos_id:
      want = want[:-1]
    assert record["response"] == tok.decode(want)


@pytest.mark.slow
def test_embedding_padded_past_the_tokenizer_loads_and_never_samples_a_padding_id(tmp_path):
  """E.g. 32064 rows for a 32000-piece tokenizer: a lima_jax training checkpoint trained EOT at
  id 32000 (a padding row before); a Hugging Face base model did not."""
  from lima_jax import inference  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.load_tokenizer(TOKENIZER)
  rows = tok.base_vocab_size + 64  # 1088, as 32064 for 32000.
  cfg = model_lib.ModelConfig(vocab_size=rows, d_model=32, n_layers=1, n_heads=4, mlp_dim=64,
                              vocab_pad_multiple=64)
  params = model_lib.init_params(cfg, jax.random.key(0))
  manager = checkpoint.checkpoint_manager(tmp_path / "wd")
  checkpoint.save_training(manager, 1, params=params, opt_state={"count": 0}, model_config=cfg,
                           tokenizer_blob=tok.to_blob(), train_state={"step": 1})
  manager.close()
  greedy = SCFG.replace(greedy=True, max_new_tokens=4)
  loaded = inference.load_model(tmp_path / "wd")
  assert loaded.has_eot and set(loaded.stop_ids) == {tok.eot_id, tok.eos_id}
  assert loaded.model_config.vocab_size == tok.vocab_size  # Sampling masks the ids past it.
  assert any("1088 rows for 1025 tokenizer ids" in n for n in loaded.notes)
  results = loaded.generate([loaded.prompt_ids(["Hello"])], greedy)
  assert results[0].tokens and all(t < tok.vocab_size for t in results[0].tokens)
  # The same rows as a Hugging Face base model: no EOT row of its own, so no EOT in prompts.
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=rows, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=4, max_position_embeddings=128, bos_token_id=tok.bos_id,
      eos_token_id=tok.eos_id))
  hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
  shutil.copy(TOKENIZER, tmp_path / "hf" / "tokenizer.model")
  base = inference.load_model(tmp_path / "hf")
  assert not base.has_eot and base.stop_ids == (tok.eos_id,)
  assert base.model_config.vocab_size == tok.base_vocab_size
  results = base.generate([base.prompt_ids(["Hello"])], greedy)
  assert results[0].tokens and all(t < tok.base_vocab_size for t in results[0].tokens)


def test_bad_inputs(ckpt, prompts_file, reference, tmp_path):
  _, out, _ = reference
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "ok"}\n{"conversations": ["a", "b"]}\n')
  with pytest.raises(evaluate.InputError, match=r"bad.jsonl:2: .*ends on an assistant turn"):
    evaluate.evaluate(ckpt, str(bad), str(tmp_path / "o.jsonl"), sampling_config=SCFG)
  dup = write_jsonl(tmp_path / "dup.jsonl", [{"prompt": "a", "id": 1}, {"prompt": "b", "id": 1}])
  with pytest.raises(evaluate.InputError, match=r"dup.jsonl:2: duplicate id 1"):
    evaluate.evaluate(ckpt, dup, str(tmp_path / "o.jsonl"), sampling_config=SCFG)
  with pytest.raises(evaluate.InputError, match="already exists"):
    evaluate.evaluate(ckpt, prompts_file, str(out), sampling_config=SCFG)
  with pytest.raises(evaluate.InputError, match="MT-Bench question file"):
    evaluate.evaluate(ckpt, prompts_file, str(tmp_path / "o.jsonl"), sampling_config=SCFG,
                      mt_bench=str(tmp_path / "a.jsonl"))
  with pytest.raises(evaluate.InputError, match="neither a Hugging Face directory") as raised:
    evaluate.evaluate(str(tmp_path), prompts_file, str(tmp_path / "o.jsonl"), sampling_config=SCFG)
  assert str(raised.value).count("--checkpoint") == 1, raised.value  # The flag is named once.


@pytest.mark.slow
def test_command_line(ckpt, prompts_file, tmp_path):
  out = tmp_path / "cli.jsonl"
  cmd = [sys.executable, os.path.join(REPO, "tools", "evaluate.py"), "--checkpoint", ckpt,
         "--prompts", prompts_file, "--output", str(out), "--greedy", "--max_new_tokens", "3",
         "--config.sampling.max_len=64", "--config.sampling.penalty_scope=all"]
  proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not INFO_LINE.search(proc.stderr), proc.stderr[-3000:]  # Quiet unless --verbosity.
  records = read_jsonl(out)
  assert len(records) == 5 and records[0]["generator"] == "tiny"
  assert records[0]["decoding"]["greedy"] and records[0]["decoding"]["max_new_tokens"] == 3
  assert records[0]["decoding"]["penalty_scope"] == "all"
  proc = subprocess.run(cmd[:-2] + ["--config.sampling.top_k=3"], env=ENV, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode != 0 and "top_k" in proc.stderr


@pytest.mark.slow
def test_chat_script(ckpt):
  script = "Hello there\nTell me more\n/reset\nHi\n/quit\nnever read\n"
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "chat.py"), "--checkpoint", ckpt,
                         "--max_new_tokens", "4", "--config.sampling.max_len=64"],
                        input=script, env=ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not INFO_LINE.search(proc.stderr), proc.stderr[-3000:]
  counts = [int(line.split()[0][1:]) for line in proc.stdout.splitlines() if line.startswith("[") and "prompt" in line]
  assert len(counts) == 3 and proc.stdout.count("assistant:") == 3
  assert counts[1] > counts[0] + 2  # The second turn sees the first exchange.
  assert counts[2] < counts[1] and "[new conversation]" in proc.stdout


@pytest.mark.slow
def test_verbosity_brings_the_info_logs_back(ckpt):
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "chat.py"), "--checkpoint", ckpt,
                         "--verbosity=0"], input="/quit\n", env=ENV, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert INFO_LINE.search(proc.stderr) and "Restoring checkpoint" in proc.stderr


# --- compare.py ------------------------------------------------------------------------------


def test_compare_pairwise_figures(tmp_path, capsys):
  # 10 prompts: a wins 5, tie 3, b wins 2 (two lines use AlpacaEval's preference field).
  labels = ["a"] * 4 + ["tie"] * 3 + ["b"] * 1
  lines = [{"id": f"q{i}", "winner": w} for i, w in enumerate(labels)]
  lines += [{"id": "q8", "preference": 1}, {"id": "q9", "preference": 2}]
  path = write_jsonl(tmp_path / "pairs.jsonl", lines)
  assert compare.main(["pairwise", path, "--a_name", "LIMA", "--b_name", "GPT-4", "--json"]) == 0
  out = capsys.readouterr().out
  for text in (r"LIMA wins +50\.0% +\[", r"tie +30\.0% +\[", r"GPT-4 wins +20\.0% +\["):
    assert re.search(text, out), out
  figures = json.loads(out.strip().splitlines()[-1])
  assert figures["n"] == 10
  for name, share in (("LIMA wins", 0.5), ("tie", 0.3), ("GPT-4 wins", 0.2)):
    row = figures["shares"][name]
    assert row["share"] == share and row["low"] <= share <= row["high"]
  # Same seed, same intervals; bounds are multiples of 1/10 (a resample of 10 judgements).
  again = compare.shares_with_intervals(["a"] * 5 + ["tie"] * 3 + ["b"] * 2, compare.PAIRWISE_LABELS)
  assert again["a"]["low"] == figures["shares"]["LIMA wins"]["low"]
  assert all(abs(v * 10 - round(v * 10)) < 1e-9 for r in again.values() for v in (r["low"], r["high"]))


def test_compare_interval_width_matches_the_normal_approximation():
  # 100 judgements, half wins: the bootstrap 95% interval is about 0.5 +- 1.96 * sqrt(0.25 / 100).
  rows = compare.shares_with_intervals(["a", "b"] * 50, compare.PAIRWISE_LABELS, resamples=4000, seed=1)
  assert abs(rows["a"]["low"] - 0.402) < 0.025 and abs(rows["a"]["high"] - 0.598) < 0.025
  assert rows["tie"] == {"count": 0, "share": 0.0, "low": 0.0, "high": 0.0}
  unanimous = compare.shares_with_intervals(["a"] * 7, compare.PAIRWISE_LABELS)
  assert (unanimous["a"]["low"], unanimous["a"]["high"]) == (1.0, 1.0)


def test_compare_absolute_labels(tmp_path, capsys):
  labels = ["excellent"] * 2 + ["pass"] * 5 + ["fail"] * 1
  path = write_jsonl(tmp_path / "abs.jsonl", [{"id": i + 1, "label": l} for i, l in enumerate(labels)])
  prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}"} for i in range(10)])
  assert compare.main(["absolute", path, "--prompts", prompts]) == 0
  out = capsys.readouterr().out
  for text in (r"fail +12\.5% +\[", r"pass +62\.5% +\[", r"excellent +25\.0% +\["):
    assert re.search(text, out), out
  assert "2 of 10 prompts" in out


@pytest.mark.parametrize("lines,mode,message", [
    ([{"id": 1, "winner": "a"}, {"id": 1, "winner": "b"}], "pairwise", "pairs.jsonl:2: duplicate id '1'"),
    ([{"id": 1, "winner": "c"}], "pairwise", "pairs.jsonl:1: winner 'c' is not one of a, tie, b"),
    ([{"id": 1, "preference": 3}], "pairwise", "pairs.jsonl:1: preference 3"),
    ([{"id": 1, "label": "good"}], "absolute", "pairs.jsonl:1: label 'good' is not one of fail"),
    ([{"id": 1, "winner": "a"}, {"id": 99, "winner": "a"}], "pairwise", "pairs.jsonl:2: id '99' is not in"),
    ([{"winner": "a"}], "pairwise", "pairs.jsonl:1: no 'id' field"),
])
def test_compare_bad_inputs(tmp_path, capsys, lines, mode, message):
  path = write_jsonl(tmp_path / "pairs.jsonl", lines)
  prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "x"}, {"prompt": "y"}])
  assert compare.main([mode, path, "--prompts", prompts]) == 2
  assert message in capsys.readouterr().err


def test_compare_invalid_json(tmp_path, capsys):
  path = tmp_path / "j.jsonl"
  path.write_text('{"id": 1, "winner": "a"}\n{"id": 2, "winner": \n')
  assert compare.main(["pairwise", str(path)]) == 2
  assert "j.jsonl:2: invalid JSON" in capsys.readouterr().err
