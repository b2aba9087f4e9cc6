r"""Regenerates docs/tpu_table.md and README.md's TPU tables: does each preset train at LIMA's
batch on each TPU slice, and on which slice at the smallest?

  python tools/make_tpu_table.py                 # compile what docs/tpu_table.json lacks
  python tools/make_tpu_table.py --force         # recompile everything
  python tools/make_tpu_table.py --presets=7b --slices=v5p-8,v5p-16 --no-search

Every cell comes from compiling the real training step with `tools/aot_compile.py` (one process
a compile, libtpu's TPU compiler on this host) with the preset's defaults for that slice; nothing
is typed by hand. Results are kept in docs/tpu_table.json, keyed by preset, slice and the jax and
libtpu versions, so a rerun only compiles what is missing or stale. A 65B compile takes a few
CPU minutes.

Besides the table it finds, for each preset and TPU generation, the smallest slice that fits:
slices whose state alone (fp32 weights and AdamW moments, 12 bytes a parameter over all chips:
the fused step holds no gradient) exceeds the chip's HBM are ruled out without compiling; the
rest are compiled from the smallest up until one fits.

Cells are compiled with the step training runs: the fused optimizer step where it applies
(`lima_jax.fused_update`). `--compare_ordinary=65b@v4-64,...` also compiles the ordinary step
(`--config.train.fused_update=false`) of those cells, and a cell compiled before the fused step
existed keeps its peak as the ordinary step's: docs/tpu_table.md sets the two side by side.
The same search runs for LoRA (`--lora_rank`, default 16: `--config.lora.rank=16`, whose floor
is the bf16 base, 2 bytes a parameter); those entries are keyed "PRESET+loraR@SLICE".
"""

import argparse
import concurrent.futures
import datetime
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from lima_jax import chips
from lima_jax import paths

GiB = chips.GiB
PRESETS = ("7b", "13b", "33b", "65b")
TABLE_SLICES = ("v4-64", "v4-128", "v5p-32", "v5p-64", "v5p-128", "v5e-256", "v6e-64")
# The 7-8B presets of the other families get their own table, on the slices that suit that size.
FAMILY_PRESETS = ("llama3-8b", "mistral-7b", "qwen2.5-7b")
FAMILY_SLICES = ("v5p-8", "v5p-32", "v4-16", "v6e-8")
# Candidates for "smallest slice", per generation, smallest first.
SEARCH = {
    "v5p": ("v5p-8", "v5p-16", "v5p-32", "v5p-64", "v5p-128", "v5p-256"),
    "v4": ("v4-8", "v4-16", "v4-32", "v4-64", "v4-128", "v4-256"),
    "v5e": ("v5e-8", "v5e-16", "v5e-32", "v5e-64", "v5e-128", "v5e-256"),
    "v6e": ("v6e-8", "v6e-16", "v6e-32", "v6e-64", "v6e-128", "v6e-256"),
}


def versions() -> str:
  def version(name):
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      return "none"
  return f"jax {version('jax')}, libtpu {version('libtpu')}"


def lora_name(preset: str, rank: int) -> str:
  """The table's name of a preset trained with LoRA of `rank`."""
  return f"{preset}+lora{rank}"


def split_name(name: str) -> tuple[str, int]:
  """(preset, LoRA rank or 0) of a table name."""
  preset, _, lora = name.partition("+lora")
  return preset, int(lora or 0)


def state_floor_bytes(preset: str, tpu_slice: chips.Slice) -> float:
  """fp32 weights + 2 fp32 AdamW moments (the fused step holds no gradient), split over every
  chip; with LoRA the bf16 base alone."""
  from lima_jax.configs import lima  # pylint: disable=g-import-not-at-top
  from lima_jax import model  # pylint: disable=g-import-not-at-top
  preset, rank = split_name(preset)
  config = model.ModelConfig.from_dict(lima.get_config(preset).model)
  return (2 if rank else 12) * config.num_params() / tpu_slice.num_devices


def compile_one(preset: str, topology: str, mfu: float, timeout: int, flags=()) -> dict:
  """One `tools/aot_compile.py` run (with `flags`) in its own process; its JSON report."""
  preset, rank = split_name(preset)
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "report.json")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "aot_compile.py"),
           f"--config={os.path.join(ROOT, 'configs', 'lima.py')}:{preset}",
           f"--topology={topology}", f"--mfu={mfu}", f"--output={out}"]
    if rank:
      cmd.append(f"--config.lora.rank={rank}")
    cmd += list(flags)
    env = dict(os.environ, LIMA_AOT_LOG_DIR=os.path.join(tmp, "tpu_logs"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if proc.returncode not in (0, 2) or not os.path.exists(out):
      tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
      raise RuntimeError(f"{preset} on {topology}: aot_compile exited {proc.returncode}:\n" +
                         "\n".join(tail))
    with open(out) as f:
      report = json.load(f)
  report.pop("compiler_log_dir", None)
  return report


class Results:
  """docs/tpu_table.json: reports keyed "preset@slice", reused while the versions match."""

  def __init__(self, path: str, force: bool, mfu: float, timeout: int, cached_only: bool = False):
    self.path, self.force, self.mfu, self.timeout = path, force, mfu, timeout
    self.cached_only = cached_only
    self.lock = threading.Lock()
    self.versions = versions()
    self.data = {}
    if os.path.exists(path):
      with open(path) as f:
        self.data = json.load(f)

  def _fresh(self, entry: dict | None) -> bool:
    """Compiled by these versions at this MFU, by the code that has the fused step (its
    reports name the update; LoRA steps, always ordinary, are unchanged by it)."""
    return bool(entry) and entry.get("versions") == self.versions and entry.get(
        "mfu_assumed", self.mfu) == self.mfu and ("update" in entry or "lora" in entry)

  def get(self, preset: str, topology: str) -> dict | None:
    """The cached report, else a fresh compile (None: not compiled, with --cached-only)."""
    key = f"{preset}@{topology}"
    entry = self.data.get(key)
    if self._fresh(entry) and (self.cached_only or not (self.force or "error" in entry)):
      return entry  # Failed compiles are shown, and retried by the next run that compiles.
    if self.cached_only:  # A compile of the ordinary step by these versions is shown, marked.
      return entry if entry and entry.get("versions") == self.versions else None
    new = self._compile(preset, topology)
    if entry and "error" not in entry and "update" not in entry and "lora" not in entry:
      new.setdefault("ordinary_step", _summary(entry, "the cell's previous compile"))
    elif entry and "ordinary_step" in entry:
      new.setdefault("ordinary_step", entry["ordinary_step"])
    self._store(key, new)
    return new

  def compare_ordinary(self, preset: str, topology: str) -> None:
    """Compiles the cell's ordinary step too (unless done by these versions) and records it."""
    entry = self.get(preset, topology)
    done = (entry or {}).get("ordinary_step", {})
    if entry is None or "error" in entry or entry.get("update") != "fused" or (
        done.get("versions") == self.versions and done.get("source") == "compiled beside it"):
      return
    ordinary = self._compile(preset, topology, ["--config.train.fused_update=false"])
    entry["ordinary_step"] = _summary(ordinary, "compiled beside it")
    self._store(f"{preset}@{topology}", entry)

  def _compile(self, preset: str, topology: str, flags=()) -> dict:
    print(f"compiling {preset} on {topology} {' '.join(flags)}...", flush=True)
    try:
      entry = compile_one(preset, topology, self.mfu, self.timeout, flags)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
      print(f"  FAILED: {e}", flush=True)
      reason = (f"compile did not finish in {self.timeout} s" if isinstance(
          e, subprocess.TimeoutExpired) else str(e).splitlines()[-1][:200])
      entry = {"error": reason, "fits": None, "mfu_assumed": self.mfu}
    entry["versions"] = self.versions
    entry["compiled_on"] = datetime.date.today().isoformat()
    print(f"  {preset} on {topology}: fits={entry['fits']} peak {_peak(entry) / GiB:.1f} GiB",
          flush=True)
    return entry

  def _store(self, key: str, entry: dict) -> None:
    with self.lock:
      self.data[key] = entry
      paths.write_text_atomic(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n")


def _summary(entry: dict, source: str) -> dict:
  """What the before/after table keeps of a compile of the ordinary step."""
  return {"peak_bytes": _peak(entry), "fits": entry.get("fits"), "source": source,
          "versions": entry.get("versions"), "compiled_on": entry.get("compiled_on"),
          "micro_batches": entry.get("micro_batches", 1)}


def _peak(entry: dict) -> int:
  mem = entry.get("memory", {})
  return int(mem.get("peak_bytes") or mem.get("needed_bytes") or 0)


PRE_FUSED_MARK = "†"
PRE_FUSED_NOTE = (f"{PRE_FUSED_MARK} compiled before the fused optimizer step existed, with the "
                  "ordinary step (whole fp32 gradient); not recompiled yet. The fused step's peak "
                  "is lower by about 4 bytes a parameter over the chips (see the before/after "
                  "table).")


def _pre_fused(entry: dict) -> bool:
  return "update" not in entry and "lora" not in entry and "error" not in entry


def _mark(entry: dict) -> str:
  return PRE_FUSED_MARK if _pre_fused(entry) else ""


def _cell(entry: dict | None) -> str:
  if entry is None:
    return "not compiled yet"
  if "error" in entry:
    return entry["error"]
  hbm = entry["usable_hbm_bytes"] / GiB
  mark = _mark(entry)
  if entry["fits"]:
    return (f"{_peak(entry) / GiB:.1f} / {hbm:.1f} GiB ✓{mark} {entry['step_seconds']:.1f} s "
            f"({entry['tokens_per_second'] / 1e3:.1f}k tok/s)")
  need = _peak(entry) / GiB
  return f"{need:.1f} / {hbm:.1f} GiB ✗{mark}" if need else f"— / {hbm:.1f} GiB ✗"


def _mesh(entry: dict | None) -> str:
  if entry is None or "error" in entry:
    return ""
  m = entry["mesh"]
  parts = [f"{k} {v}" for k, v in m.items() if v > 1]
  return ", ".join(parts) + (f"; {entry['micro_batches']} micro-batches"
                             if entry.get("micro_batches", 1) > 1 else "")


def smallest(results: Results, preset: str, generation: str) -> tuple[str, dict | None, list[str]]:
  """The first slice of `generation` (smallest first) on which the preset fits, and why not below."""
  notes = []
  for name in SEARCH[generation]:
    tpu_slice = chips.parse_slice(name)
    floor = state_floor_bytes(preset, tpu_slice)
    if floor > tpu_slice.usable_hbm_bytes():
      notes.append(f"{name}: state alone {floor / GiB:.1f} GiB a chip")
      continue
    entry = results.get(preset, name)
    if entry is None or "error" in entry:  # Noted; a larger slice may still be known to fit.
      notes.append(f"{name}: " + (entry["error"] if entry else "not compiled yet"))
      continue
    if entry["fits"]:
      return name, entry, notes
    notes.append(f"{name}: needs {_peak(entry) / GiB:.1f} GiB a chip{_mark(entry)}")
  unsettled = _unsettled(notes)
  return "", None, notes[:notes.index(unsettled[0]) + 1] if unsettled else notes


def _unsettled(notes: list[str]) -> list[str]:
  """The notes of slices neither ruled out nor compiled (not compiled yet, or failed)."""
  return [n for n in notes if not n.split(": ", 1)[1].startswith(("state", "needs"))]


def _fit_table(results: Results, presets, slices) -> list[str]:
  """Preset x slice: per-chip peak / usable HBM, fits, implied step time and tokens/s."""
  lines = ["| preset | " + " | ".join(slices) + " |", "|---|" + "---|" * len(slices)]
  for preset in presets:
    lines.append(f"| {preset} | " + " | ".join(_cell(results.get(preset, s)) for s in slices) + " |")
  return lines


def _smallest_rows(results: Results, presets, generations) -> list[str]:
  """The smallest-slice table of docs/tpu_table.md: the slice, and why smaller ones do not fit."""
  lines = ["| preset | " + " | ".join(generations) + " |", "|---|" + "---|" * len(generations)]
  for preset in presets:
    cells = []
    for generation in generations:
      name, entry, notes = smallest(results, preset, generation)
      text = (f"**{name}** ({_peak(entry) / GiB:.1f} GiB{_mark(entry)}, "
              f"{entry['step_seconds']:.1f} s/step)"
              if entry else "search incomplete" if _unsettled(notes)
              else "none up to " + SEARCH[generation][-1])
      if notes:
        text += "<br>" + "<br>".join(notes)
      cells.append(text)
    lines.append(f"| {preset} | " + " | ".join(cells) + " |")
  return lines


def _readme_smallest_rows(results: Results, presets, generations) -> list[str]:
  lines = ["| preset | " + " | ".join(f"smallest {g} slice" for g in generations) + " |",
           "|---|" + "---|" * len(generations)]
  for preset in presets:
    cells = []
    for generation in generations:
      name, entry, notes = smallest(results, preset, generation)
      unsettled = _unsettled(notes)
      if entry:
        cells.append(f"{name} ({_peak(entry) / GiB:.1f} GiB a chip{_mark(entry)}, "
                     f"{entry['step_seconds']:.1f} s a step "
                     f"at {results.mfu:.0%} MFU)" + "".join(
                         f"; {note} (may fit)" for note in unsettled))
      elif unsettled:
        cells.append("search incomplete: " + "; ".join(unsettled))
      else:
        cells.append("none up to " + SEARCH[generation][-1])
    lines.append(f"| {preset} | " + " | ".join(cells) + " |")
  return lines


def _before_after_rows(results: Results, presets) -> list[str]:
  """Each compiled cell that also has the ordinary step's peak: both, and what the fused saves."""
  lines = ["| preset | slice | ordinary step (gradient, then update) | fused step | saved a chip |",
           "|---|---|---|---|---|"]
  order = {p: i for i, p in enumerate(presets)}
  cells = [k.split("@") for k, e in results.data.items() if "ordinary_step" in e and "error" not in e]
  for preset, name in sorted(cells, key=lambda c: (order.get(c[0], len(order)), c[1])):
    entry = results.data[f"{preset}@{name}"]
    before, after = entry["ordinary_step"], _peak(entry)
    mark = lambda fits: "✓" if fits else "✗"
    micro = (f", {before['micro_batches']} micro-batches" if before.get("micro_batches", 1) > 1
             else "")
    lines.append(f"| {preset} | {name} | {before['peak_bytes'] / GiB:.1f} GiB {mark(before['fits'])}"
                 f"{micro} | {after / GiB:.1f} GiB {mark(entry['fits'])} ({entry.get('update', '')}) | "
                 f"{(before['peak_bytes'] - after) / GiB:.1f} GiB |")
  return lines


LORA_NOTE = ("LoRA (`--config.lora.rank=R`, all seven projections): the base frozen in bf16 with "
             "no optimizer state, adapters and EOT rows in fp32; the step computes no weight "
             "gradients of the base (model FLOPs 4·N·tokens + 6·N_lora·tokens + attention).")


def render(results: Results, presets, slices, generations, more_tables=(), lora_presets=(),
           lora_generations=()) -> str:
  """docs/tpu_table.md: a fit and a mesh table for `presets` x `slices` and each (presets,
  slices) of `more_tables`, then the smallest slice of every preset (and with LoRA)."""
  mfu = results.mfu
  lines = [
      "# lima_jax on Cloud TPU: does LIMA's batch fit? (generated)",
      "",
      "Generated by `python tools/make_tpu_table.py` from ahead-of-time compiles of the real "
      "training step (`lima_jax.train_step.make_train_step`) with libtpu's compiler "
      f"({results.versions}); do not edit by hand. Batch: 64 conversations x 2048 tokens "
      "(32 for 65b), fp32 master weights and AdamW moments, bf16 compute, full remat, splash "
      "attention, each preset's default mesh for the slice, and the fused optimizer step "
      "(no whole-model gradient; `lima_jax.fused_update`) wherever one micro-batch is chosen.",
      "",
      "Each cell: per-chip peak (`memory_analysis().peak_memory_in_bytes`) / usable HBM, fits "
      f"(✓/✗), and the step time and tokens/s implied at {mfu:.0%} MFU by the analytic model "
      "FLOPs (6·N·tokens + 12·L·d·seq²·batch; see docs/tpu.md).",
      "",
  ]
  lines += ["Chips (`lima_jax/chips.py`; usable HBM as libtpu's compiler reports it):", "",
            "| chip | usable HBM / chip | bf16 peak / chip | HBM bandwidth | chips / host | "
            "cores / chip |", "|---|---|---|---|---|---|"]
  for chip in chips.CHIPS.values():
    lines.append(f"| {chip.name} | {chip.hbm_bytes / GiB:.2f} GiB | {chip.bf16_flops / 1e12:.0f} "
                 f"TFLOP/s | {chip.hbm_bandwidth / 1e9:.0f} GB/s | {chip.chips_per_host} | "
                 f"{chip.cores_per_chip} |")
  tables = [(presets, slices), *more_tables]
  for table_presets, table_slices in tables:
    lines += [""] + _fit_table(results, table_presets, table_slices)
  for table_presets, table_slices in tables:
    lines += ["", "Meshes chosen (axes of size > 1):", "",
              "| preset | " + " | ".join(table_slices) + " |", "|---|" + "---|" * len(table_slices)]
    for preset in table_presets:
      lines.append(f"| {preset} | " + " | ".join(_mesh(results.get(preset, s)) for s in table_slices)
                   + " |")
  presets = [p for table_presets, _ in tables for p in table_presets]
  if generations:
    lines += ["", "## Smallest slice that trains each preset at the paper's batch size", "",
              "Per generation, compiled from the smallest slice up; smaller slices are listed "
              "with why they do not fit.", ""]
    lines += _smallest_rows(results, presets, generations)
  if any(_pre_fused(e) for e in results.data.values()):
    lines += ["", PRE_FUSED_NOTE]
  before_after = _before_after_rows(results, presets)
  if len(before_after) > 2:
    lines += ["", "## The fused optimizer step: per-chip peak before and after", "",
              "The ordinary step holds the whole fp32 gradient (4 bytes a parameter, split over the "
              "chips) between the backward pass and the update; the fused step "
              "(`lima_jax.fused_update`, the default where it applies) updates each layer as its "
              "gradient is produced. Same compiler; the ordinary step's peak comes from the "
              "cell's compile before the fused step existed, or from "
              "`--compare_ordinary` (`--config.train.fused_update=false`).", ""]
    lines += before_after
  if lora_presets and lora_generations:
    lines += ["", "## Smallest slice that trains each preset with LoRA at the paper's batch size",
              "", LORA_NOTE, ""]
    lines += _smallest_rows(results, lora_presets, lora_generations)
  lines.append("")
  return "\n".join(lines)


README_BEGIN = "<!-- tpu-tables: generated by tools/make_tpu_table.py, do not edit -->"
README_END = "<!-- /tpu-tables -->"


def readme_block(results: Results, presets, slices, generations, more_tables=(), lora_presets=(),
                 lora_generations=()) -> str:
  """The README's tables: preset x slice fit (and each of `more_tables`), and the smallest slice
  of each generation for every preset (and with LoRA)."""
  lines = [README_BEGIN,
           f"Per-chip peak / usable HBM, fits, and the step time and tokens/s implied at "
           f"{results.mfu:.0%} MFU, with the fused optimizer step that holds no whole-model "
           "gradient ([docs/training.md](docs/training.md#the-fused-optimizer-step-no-whole-model-"
           "gradient); [docs/tpu_table.md](docs/tpu_table.md) has the meshes and the peaks before "
           "and after it):", ""]
  lines += _fit_table(results, presets, slices)
  for table_presets, table_slices in more_tables:
    lines += [""] + _fit_table(results, table_presets, table_slices)
  presets = [*presets, *(p for table_presets, _ in more_tables for p in table_presets)]
  lines += ["", "Smallest slice that trains each preset at LIMA's batch:", ""]
  lines += _readme_smallest_rows(results, presets, generations)
  if lora_presets and lora_generations:
    lines += ["", "With LoRA (base frozen in bf16; " + ", ".join(
        f"`{p}` = `--config.lora.rank={split_name(p)[1]}`" for p in lora_presets[:1]) + "):", ""]
    lines += _readme_smallest_rows(results, lora_presets, lora_generations)
  if any(_pre_fused(e) for e in results.data.values()):
    lines += ["", PRE_FUSED_NOTE]
  lines.append(README_END)
  return "\n".join(lines)


def splice_readme(path: str, block: str) -> bool:
  """Replaces the generated block in `path`; False (and no write) when its markers are missing."""
  with open(path) as f:
    text = f.read()
  start, end = text.find(README_BEGIN), text.find(README_END)
  if start < 0 or end < start:
    return False
  paths.write_text_atomic(path, text[:start] + block + text[end + len(README_END):])
  return True


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", default=",".join(PRESETS + FAMILY_PRESETS))
  parser.add_argument("--slices", default=",".join(TABLE_SLICES),
                      help=f"table columns for the presets not in {','.join(FAMILY_PRESETS)}")
  parser.add_argument("--family_slices", default=",".join(FAMILY_SLICES),
                      help=f"table columns for {','.join(FAMILY_PRESETS)}")
  parser.add_argument("--output", default=os.path.join(ROOT, "docs", "tpu_table.md"))
  parser.add_argument("--results", default=os.path.join(ROOT, "docs", "tpu_table.json"))
  parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"),
                      help="file whose generated TPU-table block is rewritten (with the search)")
  parser.add_argument("--mfu", type=float, default=0.4)
  parser.add_argument("--force", action="store_true", help="recompile cached entries")
  parser.add_argument("--no-search", dest="search", action="store_false",
                      help="skip the smallest-slice search")
  parser.add_argument("--search_generations", default="v5p,v4",
                      help=f"generations searched for the smallest slice (of {','.join(SEARCH)})")
  parser.add_argument("--lora_presets", default=",".join(PRESETS),
                      help="presets whose smallest slice with LoRA is searched ('' = none)")
  parser.add_argument("--lora_rank", type=int, default=16)
  parser.add_argument("--lora_search_generations", default="v5p,v4",
                      help="generations searched for the smallest LoRA slice")
  parser.add_argument("--compare_ordinary", default="",
                      help="cells PRESET@SLICE,... whose ordinary step is compiled too, for the "
                           "before/after table")
  parser.add_argument("--cached-only", dest="cached_only", action="store_true",
                      help="compile nothing; render what docs/tpu_table.json holds")
  parser.add_argument("--timeout", type=int, default=1800, help="seconds per compile")
  parser.add_argument("--jobs", type=int, default=1, help="compiles run at once (one CPU core each)")
  args = parser.parse_args(argv)
  presets = [p for p in args.presets.split(",") if p]
  slices = [s for s in args.slices.split(",") if s]
  family_slices = [s for s in args.family_slices.split(",") if s]
  for s in slices + family_slices:
    chips.parse_slice(s)
  generations = [g for g in args.search_generations.split(",") if g]
  unknown = set(generations) - set(SEARCH)
  if unknown:
    parser.error(f"--search_generations: unknown {sorted(unknown)}; known {list(SEARCH)}")
  lora_presets = [lora_name(p, args.lora_rank) for p in args.lora_presets.split(",") if p]
  lora_generations = [g for g in args.lora_search_generations.split(",") if g]
  unknown = set(lora_generations) - set(SEARCH)
  if unknown:
    parser.error(f"--lora_search_generations: unknown {sorted(unknown)}; known {list(SEARCH)}")
  if not args.search:
    lora_generations = []
  results = Results(args.results, args.force, args.mfu, args.timeout, args.cached_only)
  # The largest preset first: it is the one whose fit is in question.
  order = sorted(presets, key=lambda p: PRESETS.index(p) if p in PRESETS else -1, reverse=True)
  family = [p for p in order if p in FAMILY_PRESETS]
  order = [p for p in order if p not in FAMILY_PRESETS]
  cells = [(p, s) for p in order for s in slices] + [(p, s) for s in family_slices for p in family]
  compare = [tuple(c.split("@")) for c in args.compare_ordinary.split(",") if c]
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
    if not args.cached_only:
      list(pool.map(lambda ps: results.compare_ordinary(*ps), compare))
    list(pool.map(lambda ps: results.get(*ps), cells))
    if args.search:
      list(pool.map(lambda pg: smallest(results, *pg),
                    [(p, g) for p in order + family for g in generations]))
      lora_order = sorted(lora_presets, key=lambda p: PRESETS.index(split_name(p)[0]), reverse=True)
      list(pool.map(lambda pg: smallest(results, *pg),
                    [(p, g) for g in lora_generations for p in lora_order]))
  presets = [p for p in presets if p not in FAMILY_PRESETS]
  more = [([p for p in FAMILY_PRESETS if p in family], family_slices)] if family else []
  text = render(results, presets, slices, generations if args.search else [], more, lora_presets,
                lora_generations)
  paths.write_text_atomic(args.output, text)
  print(f"wrote {args.output}")
  if args.search and args.readme:
    if splice_readme(args.readme, readme_block(results, presets, slices, generations, more,
                                               lora_presets, lora_generations)):
      print(f"updated the TPU tables in {args.readme}")
    else:
      print(f"note: {args.readme} has no {README_BEGIN} ... {README_END} block; left as it is")
  return 0


if __name__ == "__main__":
  sys.exit(main())
