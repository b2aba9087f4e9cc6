"""The questions put to a judge, one per kind, each with a version recorded in every judgement.

The pairwise question is the LIMA paper's (which answer better satisfies the user's need: A
significantly better, B significantly better, or neither); the absolute one uses the paper's
three labels and their definitions; the Likert one is the ablations' 1-6 helpfulness scale, the
reasoning asked for before the choice. Each prompt ends by asking for one fixed final line, which
`verdicts` reads. Changing any text here means a new version: a rerun then judges again instead
of mixing answers to two different questions.
"""

from typing import Sequence

PAIRWISE = "pairwise"
ABSOLUTE = "absolute"
LIKERT = "likert"
KINDS = (PAIRWISE, ABSOLUTE, LIKERT)

VERSIONS = {PAIRWISE: "lima-pairwise-1", ABSOLUTE: "lima-absolute-1", LIKERT: "lima-likert-1"}

SYSTEM = "You are a careful, impartial evaluator of an AI assistant's answers."

_PAIRWISE = """\
Imagine you have a very capable AI assistant and you need its help with the request below. Two
assistants answered it. Which answer better satisfies your need?

{request}
[Answer A]
{first}
[End of answer A]

[Answer B]
{second}
[End of answer B]

Compare the two answers for how well each meets the need behind the request: correctness,
helpfulness, completeness and clarity. Do not let their order or their length sway you. Explain
your comparison briefly, then give your choice on the last line, exactly one of:
Verdict: A   (answer A is significantly better)
Verdict: B   (answer B is significantly better)
Verdict: neither   (neither answer is significantly better)"""

_ABSOLUTE = """\
Label the AI assistant's answer to the request below.

{request}
[Answer]
{first}
[End of answer]

The labels:
fail: the answer does not meet the requirements of the request.
pass: the answer meets the requirements of the request.
excellent: the answer provides an excellent response to the request.

Explain briefly, then give the label on the last line, exactly one of:
Label: fail
Label: pass
Label: excellent"""

_LIKERT = """\
Rate how helpful the AI assistant's answer to the request below is.

{request}
[Answer]
{first}
[End of answer]

The scale:
1: not helpful at all: off-topic, wrong, or refuses without reason.
2: slightly helpful: touches the request but misses most of what was asked.
3: somewhat helpful: addresses part of the request, with notable errors or gaps.
4: helpful: addresses the request, with minor errors or omissions.
5: very helpful: accurate and complete, well organised.
6: highly helpful: accurate, complete and insightful; as good as an expert's answer.

First reason step by step about the answer's strengths and weaknesses. Then give your choice on
the last line, exactly:
Score: N   (N one of 1, 2, 3, 4, 5, 6)"""

_TEMPLATES = {PAIRWISE: _PAIRWISE, ABSOLUTE: _ABSOLUTE, LIKERT: _LIKERT}


def render_request(conversation: Sequence[str]) -> str:
  """The request as the judge sees it: earlier turns as context, then the last user turn."""
  *context, last = conversation
  lines = []
  if context:
    lines.append("[Conversation so far]")
    for i, turn in enumerate(context):
      lines.append(f"{'User' if i % 2 == 0 else 'Assistant'}: {turn}")
    lines.append("[End of conversation so far]\n")
  lines += ["[Request]", last, "[End of request]"]
  return "\n".join(lines) + "\n"


def messages(kind: str, conversation: Sequence[str], first: str, second: str | None = None) -> list[dict]:
  """Chat messages asking `kind` about one answer (`first`), or two (`first` shown as A)."""
  user = _TEMPLATES[kind].format(request=render_request(conversation), first=first, second=second)
  return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
