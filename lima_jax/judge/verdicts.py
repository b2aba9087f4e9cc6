"""Reading a verdict out of a judge's free-text reply, and combining the two orders of a pair.

Each reader looks for the final line the prompt asks for (`Verdict: A`, `Label: pass`,
`Score: 4`, markdown emphasis and brackets allowed) and takes the last one; failing that, one
unambiguous phrasing of a single choice (e.g. only "Answer B is significantly better" appears).
Anything else is None: the caller asks again, then records the reply as unparsed; a reply is
never guessed into a tie.
"""

import re

A, B, NEITHER = "a", "b", "neither"
TIE = "tie"
ABSOLUTE_LABELS = ("fail", "pass", "excellent")
LIKERT_SCORES = range(1, 7)

_DECORATION = r"[\s*_`\[\]\(\)\"']*"
_PAIRWISE_LINE = re.compile(rf"verdict{_DECORATION}[:\-]{_DECORATION}(?:answer\s+)?(a|b|neither)\b", re.I)
_PAIRWISE_PHRASES = {
    A: re.compile(r"\banswer a is (?:significantly|clearly|much) better\b", re.I),
    B: re.compile(r"\banswer b is (?:significantly|clearly|much) better\b", re.I),
    NEITHER: re.compile(r"\bneither (?:answer )?is significantly better\b", re.I),
}
_LABEL_LINE = re.compile(rf"label{_DECORATION}[:\-]{_DECORATION}(fail|pass|excellent)\b", re.I)
_SCORE_LINE = re.compile(rf"(?:score|rating){_DECORATION}[:\-]{_DECORATION}([1-6])(?:\s*/\s*6)?(?![\d.])", re.I)


def _last_match(pattern: re.Pattern, text: str) -> str | None:
  found = pattern.findall(text)
  return found[-1].lower() if found else None


def _only_phrase(text: str, phrases: dict[str, re.Pattern]) -> str | None:
  present = [choice for choice, pattern in phrases.items() if pattern.search(text)]
  return present[0] if len(present) == 1 else None


def parse_pairwise(text: str) -> str | None:
  """"a", "b" or "neither" (the answers as shown: a = the one shown first), or None."""
  return _last_match(_PAIRWISE_LINE, text) or _only_phrase(text, _PAIRWISE_PHRASES)


def parse_absolute(text: str) -> str | None:
  """"fail", "pass" or "excellent", or None."""
  label = _last_match(_LABEL_LINE, text)
  if label:
    return label
  lines = [line for line in text.strip().splitlines() if line.strip()]
  if not lines:
    return None
  on_last = set(re.findall(r"\b(fail|pass|excellent)\b", lines[-1].lower()))
  return on_last.pop() if len(on_last) == 1 else None


def parse_likert(text: str) -> int | None:
  """The 1-6 helpfulness score, or None."""
  score = _last_match(_SCORE_LINE, text)
  return int(score) if score else None


def unswap(shown_verdict: str, first_shown: str) -> str:
  """A verdict about the answers as shown, as a verdict about the systems a and b."""
  if shown_verdict == NEITHER or first_shown == A:
    return shown_verdict
  return B if shown_verdict == A else A


def combine_orders(verdict_ab: str, verdict_ba: str) -> str:
  """FastChat's rule: a winner only when both orders name it; any disagreement, or neither, is a tie."""
  if verdict_ab == verdict_ba and verdict_ab in (A, B):
    return verdict_ab
  return TIE
