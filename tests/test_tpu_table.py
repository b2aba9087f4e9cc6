"""tools/make_tpu_table.py renders its tables and the README block from cached compile reports
(no compile here: --cached-only reads docs/tpu_table.json's format)."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_tpu_table", ROOT / "tools" / "make_tpu_table.py")
make_tpu_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tpu_table)
GiB = make_tpu_table.GiB


def _report(peak_gib, fits, usable_gib=95.74):
  return {"fits": fits, "memory": {"peak_bytes": int(peak_gib * GiB)}, "usable_hbm_bytes": int(usable_gib * GiB),
          "step_seconds": 9.1, "tokens_per_second": 7200.0, "mesh": {"data": 1, "fsdp": 16},
          "micro_batches": 1, "versions": make_tpu_table.versions(), "mfu_assumed": 0.4,
          "update": "fused"}


def test_readme_block_names_the_smallest_fitting_slice_and_why_smaller_ones_do_not(tmp_path):
  results_path = tmp_path / "table.json"
  # 65b: v5p-8 is ruled out by the state alone, v5p-16 compiled and does not fit, v5p-32 fits.
  results_path.write_text(json.dumps({"65b@v5p-16": _report(99.0, False),
                                      "65b@v5p-32": _report(68.4, True)}))
  results = make_tpu_table.Results(str(results_path), force=False, mfu=0.4, timeout=1, cached_only=True)
  block = make_tpu_table.readme_block(results, ["65b", "7b"], ["v5p-32"], ["v5p"])
  assert "| 65b | 68.4 / 95.7 GiB ✓ 9.1 s (7.2k tok/s) |" in block
  assert "| 65b | v5p-32 (68.4 GiB a chip, 9.1 s a step at 40% MFU) |" in block
  assert "| 7b | search incomplete: v5p-8: not compiled yet |" in block
  table = make_tpu_table.render(results, ["65b", "7b"], ["v5p-32"], ["v5p"])
  assert "68.4 / 95.7 GiB ✓" in table and "v5p-8: state alone 182.4 GiB a chip" in table

  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{make_tpu_table.README_BEGIN}\nOLD-BLOCK\n{make_tpu_table.README_END}\nrest\n")
  assert make_tpu_table.splice_readme(str(readme), block)
  text = readme.read_text()
  assert text.startswith("intro\n") and text.endswith("\nrest\n") and "OLD-BLOCK" not in text and block in text
  readme.write_text("no markers\n")
  assert not make_tpu_table.splice_readme(str(readme), block)
  assert readme.read_text() == "no markers\n"


def test_lora_rows_are_searched_under_their_own_name_with_the_bf16_base_as_floor(tmp_path):
  results_path = tmp_path / "table.json"
  results_path.write_text(json.dumps({"65b+lora16@v5p-8": _report(69.1, True)}))
  results = make_tpu_table.Results(str(results_path), force=False, mfu=0.4, timeout=1, cached_only=True)
  assert make_tpu_table.split_name("65b+lora16") == ("65b", 16)
  v5p8 = make_tpu_table.chips.parse_slice("v5p-8")
  full, lora = (make_tpu_table.state_floor_bytes(p, v5p8) for p in ("65b", "65b+lora16"))
  assert full == 6 * lora and lora / GiB > 30  # fp32 weights + moments vs the bf16 base, 4 chips.
  block = make_tpu_table.readme_block(results, ["65b"], [], ["v5p"], lora_presets=["65b+lora16"],
                                      lora_generations=["v5p"])
  assert "| 65b+lora16 | v5p-8 (69.1 GiB a chip, 9.1 s a step at 40% MFU) |" in block
  table = make_tpu_table.render(results, ["65b"], [], ["v5p"], lora_presets=["65b+lora16"],
                                lora_generations=["v5p"])
  assert "with LoRA" in table and "**v5p-8** (69.1 GiB" in table


def test_cells_from_before_the_fused_step_are_recompiled_and_keep_their_peak_as_the_ordinary_one(
    tmp_path, monkeypatch):
  results_path = tmp_path / "table.json"
  old = _report(34.1, False, usable_gib=30.75)
  del old["update"]
  results_path.write_text(json.dumps({"65b@v4-64": old}))
  cached = make_tpu_table.Results(str(results_path), force=False, mfu=0.4, timeout=1, cached_only=True)
  # Compiled before the fused step: shown (marked) when nothing compiles, recompiled otherwise.
  assert "| 65b | 34.1 / 30.8 GiB ✗† |" in make_tpu_table.render(cached, ["65b"], ["v4-64"], [])
  compiled = []
  def fake_compile(preset, topology, mfu, timeout, flags=()):
    compiled.append((preset, topology, tuple(flags)))
    return _report(26.0 if not flags else 34.0, not flags, usable_gib=30.75)
  monkeypatch.setattr(make_tpu_table, "compile_one", fake_compile)
  results = make_tpu_table.Results(str(results_path), force=False, mfu=0.4, timeout=1)
  entry = results.get("65b", "v4-64")
  assert entry["ordinary_step"]["peak_bytes"] == int(34.1 * GiB)
  results.compare_ordinary("65b", "v4-64")
  assert compiled == [("65b", "v4-64", ()), ("65b", "v4-64", ("--config.train.fused_update=false",))]
  table = make_tpu_table.render(results, ["65b"], ["v4-64"], [])
  assert "| 65b | v4-64 | 34.0 GiB ✗ | 26.0 GiB ✓ (fused) | 8.0 GiB |" in table
  results.compare_ordinary("65b", "v4-64")  # Already compiled beside it: nothing more.
  assert len(compiled) == 2
