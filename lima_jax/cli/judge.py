"""Judges generated answers with a model behind any OpenAI-compatible endpoint, as the LIMA paper did.

  lima-judge pairwise --a A.jsonl --b B.jsonl --output J.jsonl --judge_url URL --judge_model M
  lima-judge absolute R.jsonl --output L.jsonl --judge_url URL --judge_model M
  lima-judge likert R.jsonl --output S.jsonl --judge_url URL --judge_model M
  lima-judge likert R.jsonl --output S.jsonl --judge_checkpoint JUDGE_CKPT_OR_HF_DIR

Answer files are `lima-evaluate`'s (`id`, `conversation`, `response`; for likert, several lines
with the same id and distinct `sample` fields are several sampled answers, averaged per prompt).
pairwise asks the paper's question (which answer better satisfies the need: A significantly
better / B significantly better / neither) in both orders; when the orders disagree the verdict
is a tie (FastChat's rule). absolute labels fail / pass / excellent; likert scores helpfulness
1-6, the reasoning first. The output has one line a prompt in the format `lima-compare` reads
(`winner`, `label` or `score`), with the judge model, prompt version, every raw reply and token
usage; a reply that cannot be read after --parse_retries more tries is recorded as unparsed and
counted apart. `--judge_url` is the endpoint's base URL (as the openai package's base_url, e.g.
https://api.openai.com/v1 or http://127.0.0.1:8000/v1); the key is read from the environment
variable --judge_api_key_env names (none is sent when it is unset and the flag is not given).
`--judge_checkpoint C` instead runs a judge checkpoint in-process on the decoding engine (no
server; `--parallel` questions share its slots; temperature 0 is greedy).
429, 5xx and timeouts are retried with backoff (honouring Retry-After). A rerun asks nothing
already judged with the same judge model, prompt version and answers (OUTPUT.partial holds a
run's progress; OUTPUT appears when every prompt is judged).

Exit status: 0 done; 2 bad input (the message names the file:line or flag); 1 the judge stayed
unavailable (rerun to resume).
"""

import os
import sys
import time
from typing import Sequence

from lima_jax import chat_template as chat_template_lib
from lima_jax import errors
from lima_jax.cli import common
from lima_jax.judge import answers
from lima_jax.judge import client as client_lib
from lima_jax.judge import prompts
from lima_jax.judge import run as run_lib

DEFAULT_KEY_ENV = "OPENAI_API_KEY"


def define_flags(values) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("a", None, "pairwise: answers of system a (JSONL)", flag_values=values)
  flags.DEFINE_string("b", None, "pairwise: answers of system b (JSONL)", flag_values=values)
  flags.DEFINE_string("output", None, "judgements JSONL, written when every prompt is judged", flag_values=values)
  define_judge_flags(values)


def define_judge_flags(values) -> None:
  """The flags that choose and drive the judge (lima-judge's, and lima-select's)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("judge_url", None, "base URL of an OpenAI-compatible API (.../v1)", flag_values=values)
  flags.DEFINE_string("judge_checkpoint", None, "instead of --judge_url: a judge checkpoint (lima_jax or "
                      "Hugging Face) run in-process on the decoding engine", flag_values=values)
  flags.DEFINE_enum("judge_chat_template", chat_template_lib.LIMA, chat_template_lib.CHOICES,
                    "--judge_checkpoint's prompt: LIMA's layout, or the model's own chat template "
                    "(a Hugging Face instruct model)", flag_values=values)
  flags.DEFINE_bool("judge_system_in_user", False, "--judge_url: send the judge's instructions in the user "
                    "message, not as a system message (for judges trained without one, as lima-serve's "
                    "LIMA models)", flag_values=values)
  flags.DEFINE_integer("judge_context", 4096, "--judge_checkpoint: tokens of context a question and its "
                       "reply may fill (at most the model's)", lower_bound=2, flag_values=values)
  flags.DEFINE_string("judge_model", None, "the judge model's name at that endpoint (with "
                      "--judge_checkpoint: the name recorded; default the checkpoint's)", flag_values=values)
  flags.DEFINE_string("judge_api_key_env", DEFAULT_KEY_ENV, "environment variable holding the API key",
                      flag_values=values)
  flags.DEFINE_float("judge_temperature", 0.0, "sampling temperature of the judge", lower_bound=0.0,
                     flag_values=values)
  flags.DEFINE_integer("judge_max_tokens", 1024, "most tokens a judge reply may have", lower_bound=1,
                       flag_values=values)
  flags.DEFINE_float("judge_timeout", 120.0, "seconds a request may take before it is retried",
                     lower_bound=0.001, flag_values=values)
  flags.DEFINE_integer("parallel", 4, "requests in flight at once", lower_bound=1, flag_values=values)
  flags.DEFINE_integer("max_retries", 6, "retries of a request after 429 / 5xx / timeouts", lower_bound=0,
                       flag_values=values)
  flags.DEFINE_float("backoff_seconds", 1.0, "first wait before a retry (doubled each time) when the "
                     "endpoint sends no Retry-After", lower_bound=0.0, flag_values=values)
  flags.DEFINE_integer("parse_retries", 2, "times an unreadable reply is asked again before it is "
                       "recorded as unparsed", lower_bound=0, flag_values=values)


def _api_key(values) -> str | None:
  name = values.judge_api_key_env
  key = os.environ.get(name)
  if not key and values["judge_api_key_env"].present:
    raise errors.InputError(f"--judge_api_key_env={name}: the environment variable {name} is not set")
  return key


def _tasks(kind: str, positional: Sequence[str], values, ask: run_lib.Asker) -> list[run_lib.Task]:
  if kind == prompts.PAIRWISE:
    for flag in ("a", "b"):
      if not values[flag].value:
        raise errors.InputError(f"--{flag}: pairwise needs --a A.jsonl and --b B.jsonl")
    return run_lib.pairwise_tasks(answers.paired_answers(values.a, values.b), ask)
  if kind == prompts.ABSOLUTE:
    return run_lib.absolute_tasks(answers.single_answers(positional[0], kind), ask)
  return run_lib.likert_tasks(answers.read_answers(positional[0]), ask)


def _summary(tally: run_lib.Tally, counter: client_lib.RequestCounter, output: str, seconds: float) -> str:
  tokens = counter.prompt_tokens + counter.completion_tokens
  return (f"wrote {output}: {tally.prompts} prompts ({tally.prompts - tally.reused} judged now, "
          f"{tally.reused} from earlier runs) in {seconds:.1f} s; {counter.requests} requests "
          f"({counter.retries} retries), {tokens} tokens ({counter.prompt_tokens} prompt + "
          f"{counter.completion_tokens} completion); unparsed: {tally.unparsed_prompts} prompts, "
          f"{tally.unparsed_replies} replies asked again or given up on")


def _checkpoint_judge(values, counter: client_lib.RequestCounter):
  from lima_jax import inference  # pylint: disable=g-import-not-at-top
  from lima_jax import sharding  # pylint: disable=g-import-not-at-top
  from lima_jax.judge import local  # pylint: disable=g-import-not-at-top
  path = values.judge_checkpoint
  common.setup_process()  # The CPU where no TPU is, before jax starts (as the other commands do).
  try:
    loaded = inference.load_model(path, mesh=sharding.make_mesh({"fsdp": -1}))
  except (FileNotFoundError, ValueError) as e:
    raise errors.InputError(f"--judge_checkpoint {path}: {e}") from None
  template = (chat_template_lib.ChatTemplate(loaded.path)
              if values.judge_chat_template == chat_template_lib.MODEL else None)
  return local.EngineJudge(loaded, values.judge_model or inference.generator_name(loaded.path),
                           max_tokens=values.judge_max_tokens, temperature=values.judge_temperature,
                           slots=values.parallel, max_len=values.judge_context, template=template,
                           counter=counter)


def make_judge(values, counter: client_lib.RequestCounter):
  """The judge the flags name: an endpoint (--judge_url, --judge_model) or a checkpoint run
  in-process (--judge_checkpoint); it has `model`, `complete` and `close`."""
  if bool(values.judge_url) == bool(values.judge_checkpoint):
    raise errors.InputError("give one judge: --judge_url URL --judge_model M, or --judge_checkpoint C")
  if values.judge_checkpoint:
    return _checkpoint_judge(values, counter)
  if not values.judge_model:
    raise errors.InputError("--judge_model is required with --judge_url")
  return client_lib.ChatCompletionsClient(
      values.judge_url, values.judge_model, api_key=_api_key(values), temperature=values.judge_temperature,
      max_tokens=values.judge_max_tokens, timeout_seconds=values.judge_timeout,
      retry=client_lib.RetryPolicy(max_retries=values.max_retries, backoff_seconds=values.backoff_seconds),
      counter=counter, fold_system=values.judge_system_in_user)


def judge(kind: str, positional: Sequence[str], values) -> None:
  if not values.output:
    raise errors.InputError("--output is required")
  counter, tally = client_lib.RequestCounter(), run_lib.Tally()
  judge_client = make_judge(values, counter)
  start = time.time()
  try:
    ask = run_lib.Asker(judge_client, kind, values.parse_retries, tally)
    tasks = _tasks(kind, positional, values, ask)
    log = run_lib.JudgementLog(values.output, kind, judge_client.model)
    run_lib.judge_all(tasks, log, tally, values.parallel, lambda line: print(line, file=sys.stderr))
  finally:
    judge_client.close()
  print(_summary(tally, counter, values.output, time.time() - start))


def main(argv: Sequence[str] | None = None) -> int:
  """`lima-judge MODE [ANSWERS] [flags]`; returns the exit status."""
  argv = sys.argv[1:] if argv is None else list(argv)
  kind = argv[0] if argv and not argv[0].startswith("-") else None
  if kind is not None and kind not in prompts.KINDS:
    common.fail(f"MODE {kind!r}: expected one of {', '.join(prompts.KINDS)}")
  if kind is None and not common.help_requested([common.prog_name(), *argv]):
    common.fail(f"the first argument is the MODE, one of {', '.join(prompts.KINDS)}")
  positional = ("MODE",) if kind == prompts.PAIRWISE else ("MODE", "ANSWERS")
  values, args = common.parse_own_flags(argv, define_flags, __doc__, positional=positional)
  try:
    judge(kind, args[1:], values)
  except errors.InputError as e:
    print(f"{common.prog_name()}: error: {e}", file=sys.stderr)
    return errors.EXIT_BAD_INPUT
  except client_lib.JudgeUnavailable as e:
    print(f"{common.prog_name()}: error: {e}", file=sys.stderr)
    return 1
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
