"""lima-evaluate for the other side of a study: --samples N, an instruct model's own chat template
(--chat_template=model, checked against transformers), and any OpenAI-compatible endpoint
(--endpoint, against a real HTTP server: retries, resume)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

import judge_server
import tiny_models
from lima_jax import chat_template
from lima_jax import sampling
from lima_jax.cli import evaluate
from lima_jax.judge import answers as answers_lib
from lima_jax.judge import client as client_lib
from test_evaluate import ENV, REPO, read_jsonl, write_jsonl

PROMPTS = [{"conversations": ["What is a process?"], "id": "p1"},
           {"conversations": ["Name a colour.", "Blue.", "And another one?"], "id": "p2"},
           {"prompt": "Write a haiku about rain.", "id": "p3"}]
SCFG = sampling.SamplingConfig(max_new_tokens=6, max_len=64, batch_size=2, temperature=1.5, top_p=1.0)

# A Llama-3-Instruct-like template: BOS text, headers, an optional system turn, the generation prompt.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return tiny_models.save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", scale=3.0)


@pytest.mark.slow
def test_samples_are_distinct_deterministic_and_read_by_likert(ckpt, tmp_path):
  prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
  out = tmp_path / "s.jsonl"
  records = evaluate.evaluate(ckpt, prompts, str(out), sampling_config=SCFG, samples=3, log=lambda _: None)
  assert [(r["id"], r["sample"]) for r in records] == [(p["id"], k) for p in PROMPTS for k in range(3)]
  assert all(r["samples"] == 3 for r in records)
  by_prompt = {}
  for r in records:
    by_prompt.setdefault(r["id"], []).append(r["response"])
  assert any(len(set(texts)) > 1 for texts in by_prompt.values())  # Each sample its own stream.
  # Sample 0 is the answer a one-sample run gives.
  single = evaluate.evaluate(ckpt, prompts, str(tmp_path / "one.jsonl"), sampling_config=SCFG, log=lambda _: None)
  assert [r["response"] for r in single] == [texts[0] for texts in by_prompt.values()]
  # A run cut short resumes to the same lines.
  partial = tmp_path / "again.jsonl.partial"
  write_jsonl(partial, records[:4])
  assert evaluate.evaluate(ckpt, prompts, str(tmp_path / "again.jsonl"), sampling_config=SCFG, samples=3,
                           log=lambda _: None) == records
  read = answers_lib.read_answers(str(out))  # lima-judge likert's reader: three samples a prompt.
  assert [[a.sample for a in samples] for samples in read.values()] == [[0, 1, 2]] * 3
  with pytest.raises(evaluate.InputError, match="--samples 2: --greedy"):
    evaluate.evaluate(ckpt, prompts, str(tmp_path / "g.jsonl"), sampling_config=SCFG.replace(greedy=True),
                      samples=2)


def _instruct_dir(directory):
  """A tiny Llama-3-Instruct-like Hugging Face directory: byte-level BPE, its own chat template,
  <|eot_id|> as EOS, generation_config listing <|end_of_text|> and <|eot_id|>."""
  tok = tiny_models.byte_level_bpe("what is a process? name a colour, blue, and another one",
                                   ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                    "<|end_header_id|>", "<|eot_id|>"])
  config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                                    bos_token_id=tok.token_to_id("<|begin_of_text|>"),
                                    eos_token_id=[tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")])
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config)
  with torch.no_grad():
    for p in model.parameters():
      p.mul_(8.0)
  model.save_pretrained(directory, safe_serialization=True)
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
       "model_max_length": 256, "chat_template": LLAMA3_TEMPLATE}))
  return directory, tok.token_to_id("<|eot_id|>")


@pytest.mark.slow
def test_chat_template_model_equals_transformers(tmp_path):
  hf_dir, eot_id = _instruct_dir(tmp_path / "instruct")
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  template = chat_template.ChatTemplate(hf_dir)
  conversations = [p.get("conversations") or [p["prompt"]] for p in PROMPTS]
  with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "blue?"}]
  for messages in [chat_template.messages_from_turns(t) for t in conversations] + [with_system]:
    expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert template.ids(messages) == expected
  assert template.eos_id == eot_id
  greedy = SCFG.replace(greedy=True, repetition_penalty=1.0, max_new_tokens=8, max_len=128)
  records = evaluate.evaluate(str(hf_dir), write_jsonl(tmp_path / "p.jsonl", PROMPTS), str(tmp_path / "o.jsonl"),
                              sampling_config=greedy, chat_template="model", log=lambda _: None)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir))
  for turns, record in zip(conversations, records):
    ids = template.ids(chat_template.messages_from_turns(turns))
    assert record["prompt_tokens"] == len(ids) and record["decoding"]["chat_template"] == "model"
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8, repetition_penalty=1.0,
                         pad_token_id=0)[0, len(ids):].tolist()
    stop = next((i for i, t in enumerate(out) if t in model.generation_config.eos_token_id), len(out))
    assert record["response"] == hf_tok.decode(out[:stop]), turns
    assert record["finish_reason"] == ("stop" if stop < len(out) else "length")


def test_chat_template_model_needs_a_template(tmp_path, ckpt):
  (tmp_path / "bare").mkdir()
  with pytest.raises(evaluate.InputError, match="no chat template"):
    chat_template.ChatTemplate(tmp_path / "bare")
  with pytest.raises(evaluate.InputError, match="is a lima_jax checkpoint"):
    evaluate.evaluate(ckpt, write_jsonl(tmp_path / "p.jsonl", PROMPTS), str(tmp_path / "o.jsonl"),
                      sampling_config=SCFG, chat_template="model", log=lambda _: None)


def test_endpoint_answers_retries_and_resumes(tmp_path):
  broken = {"on": True}

  def reply(body, n):
    question = body["messages"][-1]["content"]
    if n == 0:
      return judge_server.Response(status=429, headers={"Retry-After": "0"})
    if broken["on"] and "haiku" in question:
      return judge_server.Response(status=503)
    return f"An answer to: {question}"

  server = judge_server.ScriptedJudge(reply)
  prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
  out = str(tmp_path / "o.jsonl")
  endpoint = evaluate.Endpoint(server.url, "closed-1", parallel=2,
                               retry=client_lib.RetryPolicy(max_retries=2, backoff_seconds=0.01))
  try:
    with pytest.raises(client_lib.JudgeUnavailable):
      evaluate.evaluate(None, prompts, out, sampling_config=SCFG, endpoint=endpoint, log=lambda _: None)
    kept = read_jsonl(out + evaluate.PARTIAL_SUFFIX)
    assert sorted(r["id"] for r in kept) == ["p1", "p2"]  # What finished is kept.
    asked_before = len(server.answered)
    broken["on"] = False
    records = evaluate.evaluate(None, prompts, out, sampling_config=SCFG, endpoint=endpoint, log=lambda _: None)
  finally:
    server.stop()
  assert len(server.answered) == asked_before + 1  # The rerun asked only the missing prompt.
  assert read_jsonl(out) == records and [r["id"] for r in records] == ["p1", "p2", "p3"]
  for r, body in zip(records, sorted(server.answered, key=lambda b: b["messages"][-1]["content"])):
    assert r["response"] == "An answer to: " + r["conversation"][-1]
    assert (r["generator"], r["model"], r["prompt_tokens"], r["response_tokens"]) == ("closed-1", "closed-1", 100, 20)
    assert r["finish_reason"] == "stop" and r["decoding"]["endpoint"] == server.url + "/chat/completions"
  p2 = next(b for b in server.answered if len(b["messages"]) == 3)
  assert [m["role"] for m in p2["messages"]] == ["user", "assistant", "user"]
  assert len({b["seed"] for b in server.answered}) == 3 and {b["max_tokens"] for b in server.answered} == {6}
  assert {(b["temperature"], b["top_p"]) for b in server.answered} == {(1.5, 1.0)}


@pytest.mark.slow
def test_endpoint_command_line(tmp_path):
  server = judge_server.ScriptedJudge(lambda body, n: "Fine.")
  prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
  base = [sys.executable, os.path.join(REPO, "tools", "evaluate.py"), "--prompts", prompts, "--config=tiny",
          "--samples", "2", "--max_new_tokens", "5"]
  try:
    ok = subprocess.run(base + ["--output", str(tmp_path / "o.jsonl"), "--endpoint", server.url,
                                "--endpoint_model", "closed-1", "--parallel", "3"],
                        env=ENV, capture_output=True, text=True, timeout=300)
    unnamed = subprocess.run(base + ["--output", str(tmp_path / "x.jsonl"), "--endpoint", server.url],
                             env=ENV, capture_output=True, text=True, timeout=300)
  finally:
    server.stop()
  assert ok.returncode == 0, ok.stderr[-3000:]
  records = read_jsonl(tmp_path / "o.jsonl")
  assert [(r["id"], r["sample"], r["response"]) for r in records] == [
      (p["id"], k, "Fine.") for p in PROMPTS for k in range(2)]
  assert len(server.answered) == 6 and {b["max_tokens"] for b in server.answered} == {5}
  assert unnamed.returncode == 2 and "--endpoint needs --endpoint_model" in unnamed.stderr
