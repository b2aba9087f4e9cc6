"""The command lines and the package around them: one-line errors with exit 2, presets from any
directory, no side effects on import, the README's Python API, packaging kept in step."""

import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import jax
import numpy as np
import pytest

from lima_jax import checkpoint
from lima_jax import data as data_lib
from lima_jax import errors
from lima_jax import model as model_lib
from lima_jax import records
from lima_jax import tokenizer as tokenizer_lib
from lima_jax.cli import common

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))

# Each entry point as the README runs it; flags they require are given, so only the typo is wrong.
ENTRY_POINTS = {
    "train": ["-m", "lima_jax.train"],
    "evaluate": [str(ROOT / "tools" / "evaluate.py"), "--checkpoint=x", "--prompts=y", "--output=z"],
    "chat": [str(ROOT / "tools" / "chat.py"), "--checkpoint=x"],
    "aot": [str(ROOT / "tools" / "aot_compile.py"), "--config=7b", "--topology=v5p-8"],
}


def _run(args, cwd=ROOT, env=ENV, timeout=300):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env,
                        timeout=timeout, check=False)


def _one_line(stderr: str) -> str:
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_a_mistyped_config_key_is_one_line_and_exit_2(entry, tmp_path):
  proc = _run(ENTRY_POINTS[entry] + ["--config.train.epoch=3"], cwd=tmp_path)
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = _one_line(proc.stderr)
  assert "error: --config.train.epoch: no such field; did you mean --config.train.epochs?" in line


@pytest.mark.parametrize("arg, message", [
    ("--config.train.epochs=abc", r"--config.train.epochs=abc: invalid literal"),
    ("--config=configs/lima.py:7c", r"unknown preset '7c'; expected one of tiny, cpu, 7b"),
    ("--config=missing.py", r"--config=missing.py: no such file"),
    ("--config.model.nlayers=2", r"did you mean --config.model.n_layers\?"),
    ("--bogus_flag=1", r"Unknown command line flag 'bogus_flag'"),
])
@pytest.mark.slow
def test_train_answers_bad_flags_in_one_line(arg, message):
  proc = _run(ENTRY_POINTS["train"] + [arg])
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert re.search(message, _one_line(proc.stderr))


def test_presets_resolve_from_any_directory_and_in_any_case(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  presets = common.presets_path()
  assert os.path.isfile(presets) and presets.endswith(os.path.join("configs", "lima.py"))
  assert common.resolve_config_spec("7B") == f"{presets}:7B"
  assert common.resolve_config_spec("configs/lima.py:13b") == f"{presets}:13b"
  mine = tmp_path / "mine.py"
  mine.write_text("import ml_collections\ndef get_config():\n  return ml_collections.ConfigDict({'a': 1})\n")
  assert common.resolve_config_spec("mine.py") == "mine.py"  # Any other file: as given.
  assert common.load_config(common.resolve_config_spec("7B")).preset == "7b"
  assert common.load_config(common.resolve_config_spec("configs/lima.py:TINY")).preset == "tiny"
  argv = common.with_config_resolved(["prog", "--config", "65b", "--config.train.epochs=1"])
  assert argv == ["prog", "--config", f"{presets}:65b", "--config.train.epochs=1"]
  common.check_config_args(argv, None)
  with pytest.raises(errors.InputError, match=r"--config.optimizer.l: no such field; did you mean "
                                              r"--config.optimizer.lr\?"):
    common.check_config_args(["prog", "--config=7b", "--config.optimizer.l=1"], None)
  with pytest.raises(errors.InputError, match=r"--config.train.epochs is a value"):
    common.check_config_args(["prog", "--config.train.epochs.x=1"], "tiny")


def test_every_bad_input_type_is_an_input_error():
  from lima_jax import convert  # pylint: disable=g-import-not-at-top
  from lima_jax.cli import compare, evaluate  # pylint: disable=g-import-not-at-top
  for kind in (records.DataError, convert.ConversionError, evaluate.InputError, compare.InputError):
    assert issubclass(kind, errors.InputError) and issubclass(kind, ValueError), kind


_AUTO_CPU_SCRIPT = ("import os; from lima_jax import process; "
                    "print(process.default_to_cpu_without_tpu(log=True), os.environ.get('JAX_PLATFORMS'))")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None or os.path.exists("/dev/accel0"),
                    reason="needs libtpu installed on a host without a TPU")
def test_entry_points_choose_the_cpu_visibly_and_can_be_told_not_to():
  env = {k: v for k, v in ENV.items() if k not in ("JAX_PLATFORMS", "LIMA_JAX_AUTO_CPU")}
  proc = _run(["-c", _AUTO_CPU_SCRIPT], env=env)
  assert proc.stdout.split() == ["True", "cpu"], proc.stderr
  assert "running on the CPU" in proc.stderr and "LIMA_JAX_AUTO_CPU=0" in proc.stderr
  proc = _run(["-c", _AUTO_CPU_SCRIPT], env={**env, "LIMA_JAX_AUTO_CPU": "0"})
  assert proc.stdout.split() == ["False", "None"] and not proc.stderr.strip(), proc.stderr


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  """A lima_jax checkpoint of a tiny random model with the bundled tokenizer stored in it."""
  tok = tokenizer_lib.load_tokenizer(data_lib.bundled_paths()["tokenizer"])
  config = model_lib.ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2,
                                 mlp_dim=32)
  path = tmp_path_factory.mktemp("ckpt") / "tiny"
  checkpoint.save_model(path, model_lib.init_params(config, jax.random.key(0)), config, tok.to_blob())
  return path


def test_load_tokenizer_reads_a_checkpoint_or_workdir(tiny_checkpoint, tmp_path):
  bundled = tokenizer_lib.load_tokenizer(data_lib.bundled_paths()["tokenizer"])
  workdir = tmp_path / "run"
  (workdir / checkpoint.CHECKPOINTS_SUBDIR).mkdir(parents=True)
  shutil.copytree(tiny_checkpoint, workdir / checkpoint.CHECKPOINTS_SUBDIR / "7")
  for path in (tiny_checkpoint, workdir):
    tok = tokenizer_lib.load_tokenizer(path)
    assert (tok.vocab_size, tok.eot_id) == (bundled.vocab_size, bundled.eot_id)
    assert tok.encode("Hello there") == bundled.encode("Hello there")
  # An API user is told what the path lacks, not sent to a config field.
  (tmp_path / "emptydir").mkdir()
  with pytest.raises(FileNotFoundError, match="not a lima_jax checkpoint") as caught:
    tokenizer_lib.load_tokenizer(tmp_path / "emptydir")
  assert "tokenizer_path" not in str(caught.value) and "config" not in str(caught.value)


def test_the_readme_python_api_snippet_runs(tiny_checkpoint):
  readme = (ROOT / "README.md").read_text()
  section = readme.split("## Python API", 1)[1]
  snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  assert '"/models/llama-2-7b-hf"' in snippet
  scope = {}
  exec(snippet.replace('"/models/llama-2-7b-hf"', repr(str(tiny_checkpoint))), scope)  # pylint: disable=exec-used
  logits, token_ids = scope["logits"], scope["token_ids"]
  assert logits.shape == (1, len(token_ids[0]), scope["tok"].vocab_size)
  assert np.isfinite(np.asarray(logits)).all()


def _requirements(path: pathlib.Path) -> list[str]:
  lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
  return [line for line in lines if line and not line.startswith("-r")]


def test_pyproject_and_requirements_list_the_same_packages():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert sorted(project["dependencies"]) == sorted(_requirements(ROOT / "requirements.txt"))
  extras = project["optional-dependencies"]
  assert sorted(extras["test"]) == sorted(_requirements(ROOT / "requirements-test.txt"))
  assert sorted(extras["tpu"]) == sorted(_requirements(ROOT / "requirements-tpu.txt"))
  scripts = project["scripts"]
  assert sorted(scripts) == ["lima-annotate", "lima-aot", "lima-chat", "lima-compare", "lima-convert",
                             "lima-evaluate", "lima-judge", "lima-select", "lima-serve", "lima-train"]
  for target in scripts.values():
    module, function = target.split(":")
    assert callable(getattr(importlib.import_module(module), function)), target


def test_no_sys_path_changes_in_the_code():
  offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
               if "sys.path.insert" in p.read_text(encoding="utf-8") and p.name != "test_cli.py"]
  assert not offenders


def _installed_script(name: str) -> str | None:
  beside = pathlib.Path(sys.executable).parent / name
  return str(beside) if beside.is_file() else shutil.which(name)


@pytest.mark.slow
@pytest.mark.skipif(_installed_script("lima-train") is None,
                    reason="lima_jax is not installed (pip install -e .): no console scripts")
def test_console_scripts_work_from_another_directory(tmp_path):
  env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
  proc = subprocess.run([_installed_script("lima-train"), "--config=7B", "--config.train.epoch=3"],
                        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
  assert proc.returncode == 2 and "did you mean --config.train.epochs?" in _one_line(proc.stderr)
  judgements = tmp_path / "j.jsonl"
  judgements.write_text('{"id": 1, "winner": "a"}\n{"id": 2, "winner": "tie"}\n')
  proc = subprocess.run([_installed_script("lima-compare"), "pairwise", str(judgements)],
                        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
  assert proc.returncode == 0 and "A wins" in proc.stdout, proc.stderr


# -- Help that helps ----------------------------------------------------------------------------------

# Each command as the README runs it (a shim in tools/ or `python -m`), with some of its own flags.
HELP_COMMANDS = {
    "train": (["-m", "lima_jax.train"], ["--config", "--workdir", "--[no]print_config"]),
    "evaluate": ([str(ROOT / "tools" / "evaluate.py")], ["--checkpoint", "--prompts", "--output", "--config"]),
    "chat": ([str(ROOT / "tools" / "chat.py")], ["--checkpoint", "--max_new_tokens", "--config"]),
    "aot": ([str(ROOT / "tools" / "aot_compile.py")], ["--topology", "--program", "--config"]),
    "convert": ([str(ROOT / "tools" / "convert_weights.py")], ["--hf_dir", "--ckpt_dir", "--peft_dir"]),
    "convert hf-to-orbax": ([str(ROOT / "tools" / "convert_weights.py"), "hf-to-orbax"],
                            ["--hf_dir", "--ckpt_dir", "--[no]add_eot"]),
    "compare": ([str(ROOT / "tools" / "compare.py")], ["--prompts", "--resamples", "--level"]),
    "serve": ([str(ROOT / "tools" / "serve.py")], ["--checkpoint", "--host", "--port", "--api_key", "--config"]),
    "judge": ([str(ROOT / "tools" / "judge.py")], ["--a", "--b", "--judge_url", "--judge_model"]),
    "annotate": ([str(ROOT / "tools" / "annotate.py")], ["--a", "--b", "--output", "--overlap"]),
    "select": ([str(ROOT / "tools" / "select_checkpoint.py")], ["--workdir", "--epochs", "--config"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(HELP_COMMANDS))
@pytest.mark.parametrize("help_flag", ["--help", "-h"])
def test_help_lists_the_commands_own_flags_and_exits_0(command, help_flag):
  args, own = HELP_COMMANDS[command]
  proc = _run(args + [help_flag])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Try --helpfull" not in proc.stdout
  for flag in own:
    assert re.search(rf"^  {re.escape(flag)}: \S", proc.stdout, re.M), (flag, proc.stdout)
  assert "--flagfile:" not in proc.stdout  # absl's own flags only under --helpfull.
  if "--config" in own:
    assert f"Presets: {', '.join(common.preset_names())}." in " ".join(proc.stdout.split())


@pytest.mark.slow
def test_helpfull_adds_every_flag_and_exits_0():
  proc = _run(["-m", "lima_jax.train", "--helpfull"])
  assert proc.returncode == 0 and "--workdir:" in proc.stdout and "--verbosity" in proc.stdout


def test_a_new_command_on_common_run_gets_its_help_without_asking(tmp_path):
  script = tmp_path / "lima_new.py"
  script.write_text('"""`lima-new`: a command someone adds later."""\n'
                    "from absl import flags\nfrom lima_jax.cli import common\n"
                    "def define_flags():\n"
                    "  flags.DEFINE_integer('port', 8000, 'where it listens')\n"
                    "def main(argv):\n  raise SystemExit(7)\n"
                    "if __name__ == '__main__':\n  common.run(main, define_flags, auto_cpu=False)\n")
  proc = _run([str(script), "--help"])
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("`lima-new`: a command someone adds later.")
  assert "  --port: where it listens (default: 8000)" in proc.stdout


def test_presets_come_from_one_list_and_help_does_not_wait_for_jax():
  from configs import lima  # pylint: disable=g-import-not-at-top
  assert common.preset_names() == lima.PRESETS and {"tiny", "cpu", "qwen2.5-7b"} <= set(lima.PRESETS)
  proc = _run(["-c", "import sys; from lima_jax.cli import common; common.preset_names(); "
                     "print('jax' in sys.modules)"])
  assert proc.stdout.strip() == "False", proc.stderr


@pytest.mark.slow
def test_print_config_prints_the_resolved_config_with_overrides_and_exits_0(tmp_path):
  proc = _run(ENTRY_POINTS["train"] + ["--config=cpu", "--config.optimizer.lr=3e-5",
                                       "--config.model.init_from=/models/smol", "--print_config",
                                       f"--workdir={tmp_path / 'run'}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert {'preset = "cpu"', "optimizer.lr = 3e-05", "optimizer.end_lr = 1e-06",
          'model.init_from = "/models/smol"', "train.micro_batches = 4"} <= set(lines)
  assert any("comes from its own config at run time" in line for line in lines)
  assert not (tmp_path / "run").exists()  # Printing starts nothing.


def test_config_text_is_one_field_a_line_in_override_syntax():
  from configs import lima  # pylint: disable=g-import-not-at-top
  text = common.config_text(lima.get_config("tiny"))
  assert "model.rope_scaling = {}" in text.splitlines() and 'data.eot_token = "<EOT>"' in text
  assert len([l for l in text.splitlines() if not l.startswith("#")]) > 60
