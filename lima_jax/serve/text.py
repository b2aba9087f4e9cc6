"""An answer's text as it grows: stop strings, and no half character or half stop string sent.

The streamed pieces always join into exactly the text a non-streamed response returns, because
both are cut by this one rule.
"""

from typing import Sequence


class AnswerText:
  """Decodes an answer's tokens and finds the first stop string in the text."""

  def __init__(self, decode, stops: Sequence[str]):
    self.decode, self.stops = decode, tuple(stops)
    self.sent = 0  # Characters handed out by `delta`.
    self.stopped = False  # A stop string was found; the text ends before it.

  def text(self, tokens: Sequence[int], final: bool) -> str:
    """The text so far that is certain: cut at a stop string; unless `final`, without a trailing
    partial UTF-8 character or a tail that could be the start of a stop string."""
    text = self.decode(tokens)
    cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
    if cut >= 0:
      self.stopped = True
      return text[:cut]
    if final:
      return text
    text = text.rstrip("\ufffd")
    held = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
               default=0)
    return text[:len(text) - held]

  def delta(self, tokens: Sequence[int], final: bool) -> str:
    """The text not handed out yet (never takes back what was sent)."""
    text = self.text(tokens, final)
    piece = text[self.sent:]
    self.sent = max(self.sent, len(text))
    return piece
