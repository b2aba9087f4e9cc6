"""Who sees which item, in which order, and on which side each system's answer appears.

Every annotator has their own order of the items and their own left/right side for each item,
both drawn from `--seed` and the annotator's name (so a reload or a restart shows the same
thing again, and two annotators see different orders). With overlap K, an item goes to the first
K annotators who reach it in their own order: an annotator is given the first item of their
order that they have not labelled and that fewer than K others have labelled or are looking at
now. Looking at an item holds it for `hold_seconds` (an annotator who leaves gives it back
then); holds live in memory only, so after a restart an item may, rarely, get one label more
than K, which agreement can use and nothing else counts twice.
"""

import hashlib
import random
import time

from lima_jax.annotate import log as log_lib


def _draw(*parts) -> int:
  return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode("utf-8")).digest()[:8], "big")


def order(item_ids, annotator: str, seed: int) -> list[str]:
  """The annotator's own order of the items."""
  ids = list(item_ids)
  random.Random(_draw(seed, "order", annotator)).shuffle(ids)
  return ids


def shown(item_id: str, annotator: str, seed: int) -> tuple[str, str]:
  """The systems on the (left, right) of the page for this annotator and item."""
  return ("b", "a") if _draw(seed, "side", annotator, item_id) % 2 else ("a", "b")


class Assigner:
  """Hands out items to annotators for a study with `overlap` annotators an item."""

  def __init__(self, item_ids, annotations: log_lib.AnnotationLog, *, overlap: int, seed: int,
               hold_seconds: float = 1800.0, clock=time.monotonic):
    self.item_ids = list(item_ids)
    self.annotations = annotations
    self.overlap = overlap
    self.seed = seed
    self.hold_seconds = hold_seconds
    self.clock = clock
    self.holds: dict[str, tuple[str, float]] = {}  # annotator -> (item id, since).
    self._orders: dict[str, list[str]] = {}

  def _order(self, annotator: str) -> list[str]:
    if annotator not in self._orders:
      self._orders[annotator] = order(self.item_ids, annotator, self.seed)
    return self._orders[annotator]

  def _held_by_others(self, item_id: str, annotator: str) -> int:
    now = self.clock()
    return sum(1 for name, (pid, since) in self.holds.items()
               if pid == item_id and name != annotator and now - since < self.hold_seconds)

  def _open_to(self, item_id: str, annotator: str) -> bool:
    labellers = self.annotations.labellers(item_id)
    if annotator in labellers:
      return False
    return len(labellers) + self._held_by_others(item_id, annotator) < self.overlap

  def _holding(self, annotator: str, item_id: str) -> bool:
    """The annotator was given this item less than `hold_seconds` ago and has not labelled it."""
    held = self.holds.get(annotator)
    return (held is not None and held[0] == item_id and self.clock() - held[1] < self.hold_seconds
            and annotator not in self.annotations.labellers(item_id))

  def may_label(self, annotator: str, item_id: str) -> bool:
    """The item given to the annotator, one still open to them (a page shown before a server
    restart, which forgot its holds), or one they labelled before (a changed answer)."""
    return (self._holding(annotator, item_id) or self._open_to(item_id, annotator)
            or annotator in self.annotations.labellers(item_id))

  def next_item(self, annotator: str) -> str | None:
    """The item the annotator should label now (held for them), or None when none is left."""
    held = self.holds.get(annotator)
    if held and self._holding(annotator, held[0]):
      self.holds[annotator] = (held[0], self.clock())
      return held[0]
    self.holds.pop(annotator, None)
    for item_id in self._order(annotator):
      if self._open_to(item_id, annotator):
        self.holds[annotator] = (item_id, self.clock())
        return item_id
    return None

  def progress(self, annotator: str) -> dict:
    """The annotator's done / total (total shrinks as others take shared items) and the study's."""
    done = len(self.annotations.done(annotator))
    open_items = sum(1 for pid in self.item_ids if self._open_to(pid, annotator) or self._holding(annotator, pid))
    labels = sum(min(self.overlap, len(self.annotations.labellers(pid))) for pid in self.item_ids)
    return {"done": done, "total": done + open_items, "study_done": labels,
            "study_total": self.overlap * len(self.item_ids)}
