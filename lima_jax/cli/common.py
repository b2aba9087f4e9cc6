"""What every lima_jax command shares: the preset file, flags that fail in one line, quiet logs.

`run(main, define_flags)` is each command's `app.run`: it defines the flags inside absl's flags
parser, so `--help` (`-h`, `--helpshort`) prints the command's docstring and its own flags and
`--helpfull` every flag, both with exit status 0 (`parse_own_flags` does the same for commands
with a FlagValues of their own); a bad `--config.*` key or value (caught while the config loads,
whether or not `--config` is given) and any other bad flag print one `PROG: error: ...` line and
exit with status 2, as an `errors.InputError` from `main` does. absl and Orbax log at WARNING unless
`--verbosity` is given. The process set-up (CPU instead of an absent TPU, the CPU allocator
restart) happens here, in the entry point, never on `import lima_jax`.

Stdlib and absl only at import time: `tools/aot_compile.py` must set libtpu's environment
before jax loads.
"""

import difflib
import functools
import importlib.util
import json
import os
import runpy
import sys
import textwrap
from typing import Callable, Sequence

from lima_jax import errors
from lima_jax import process

PRESETS_FILE = "lima.py"
CONFIG_FLAG = "config"
PRINT_CONFIG_FLAG = "print_config"
SHORT_HELP_ARGS = ("-h", "-?", "--help", "-help", "--helpshort", "-helpshort")
FULL_HELP_ARGS = ("--helpfull", "-helpfull")
HELP_WIDTH = 100
# Set while the flags are defined only to print --help: the --config default is then not loaded
# (a config file imports jax, seconds that --help need not wait).
_help_only = False


def presets_path() -> str:
  """configs/lima.py as installed (the `lima_jax.configs` package), or beside a source checkout."""
  spec = importlib.util.find_spec("lima_jax.configs")
  if spec is not None and spec.submodule_search_locations:
    path = os.path.join(list(spec.submodule_search_locations)[0], PRESETS_FILE)
    if os.path.isfile(path):
      return path
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(os.path.dirname(package), "configs", PRESETS_FILE)


@functools.cache
def preset_names() -> tuple[str, ...]:
  """The presets configs/lima.py defines (its `PRESETS`): the one list every message names."""
  return tuple(runpy.run_path(presets_path())["PRESETS"])


def _presets_text() -> str:
  return ", ".join(preset_names())


def resolve_config_spec(spec: str) -> str:
  """`7b`, `configs/lima.py:7b` (from any directory) or `my_config.py:x` -> the file to load.

  A bare preset and the repo-relative `configs/lima.py` both mean the installed presets file, so
  the README's commands work outside the checkout; any other path is taken as given.
  """
  path, sep, arg = spec.partition(":")
  if not sep and not path.endswith(".py"):
    return f"{presets_path()}:{spec}"
  if not os.path.exists(path) and os.path.normpath(path) == os.path.join("configs", PRESETS_FILE):
    return f"{presets_path()}{sep}{arg}"
  return spec


def _config_value_index(argv: Sequence[str]) -> int | None:
  """Index in argv of the `--config` value (`--config=X` or `--config X`), None if absent."""
  for i, arg in enumerate(argv):
    name, eq, _ = arg.lstrip("-").partition("=")
    if not arg.startswith("-") or name != CONFIG_FLAG:
      continue
    if eq:
      return i
    return i + 1 if i + 1 < len(argv) else None
  return None


def _config_spec(argv: Sequence[str]) -> str | None:
  index = _config_value_index(argv)
  if index is None:
    return None
  arg = argv[index]
  return arg.split("=", 1)[1] if arg.startswith("-") else arg


def with_config_resolved(argv: Sequence[str]) -> list[str]:
  """argv with its `--config` value resolved by `resolve_config_spec`."""
  argv = list(argv)
  index = _config_value_index(argv)
  if index is not None:
    arg = argv[index]
    if arg.startswith("-"):
      name, value = arg.split("=", 1)
      argv[index] = f"{name}={resolve_config_spec(value)}"
    else:
      argv[index] = resolve_config_spec(arg)
  return argv


def _overrides(argv: Sequence[str]) -> list[str]:
  """The `a.b` of every `--config.a.b[=v]` (and `--noconfig.a.b`) in argv."""
  out = []
  for arg in argv:
    name = arg.lstrip("-").split("=", 1)[0]
    if not arg.startswith("-"):
      continue
    for prefix in (f"{CONFIG_FLAG}.", f"no{CONFIG_FLAG}."):
      if name.startswith(prefix):
        out.append(name[len(prefix):])
  return out


def _root_message(e: BaseException) -> str:
  """The innermost cause's message, on one line."""
  while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
    e = e.__cause__ or e.__context__
  text = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
  return " ".join(text.split()) or type(e).__name__


def load_config(spec: str):
  """`get_config(arg)` of the file a resolved `--config` value names; InputError if it cannot."""
  path, sep, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise errors.InputError(f"--{CONFIG_FLAG}={spec}: no such file; give a preset ({_presets_text()}, "
                            f"e.g. --{CONFIG_FLAG}=7b) or a config file such as configs/lima.py:7b")
  try:
    module = runpy.run_path(path)
    return module["get_config"](*([arg] if sep else []))
  except Exception as e:  # pylint: disable=broad-except  # A user's config file may raise anything.
    raise errors.InputError(f"--{CONFIG_FLAG}={spec}: {_root_message(e)}") from None


def _field_problem(config, override: str) -> str | None:
  """Why `--config.<override>` names no field of `config` (with the nearest one), or None."""
  node, done = config, []
  for part in override.split("."):
    if not hasattr(node, "keys"):
      return f"--{CONFIG_FLAG}.{'.'.join(done)} is a value, not a section with fields"
    keys = list(node.keys())
    if part not in keys:
      where = f"--{CONFIG_FLAG}." + ".".join(done + [part])
      close = difflib.get_close_matches(part, keys, n=1, cutoff=0.5)
      if close:
        return f"{where}: no such field; did you mean --{CONFIG_FLAG}." + ".".join(done + close) + "?"
      return f"{where}: no such field (fields there: {', '.join(sorted(keys))})"
    node, done = node[part], done + [part]
  return None


def check_config_args(argv: Sequence[str], default_spec: str | None) -> None:
  """InputError naming the first bad `--config` file, preset or field in argv."""
  spec = _config_spec(argv) or default_spec
  overrides = _overrides(argv)
  if spec is None:
    if overrides:
      raise errors.InputError(f"--{CONFIG_FLAG}.{overrides[0]} needs --{CONFIG_FLAG}=PRESET "
                              f"({_presets_text()}) before it")
    return
  config = load_config(resolve_config_spec(spec))
  for override in overrides:
    problem = _field_problem(config, override)
    if problem:
      raise errors.InputError(problem)


def define_config_flag(default: str | None, help_string: str) -> None:
  """`--config`: a preset (`7b`), a presets file with one (`configs/lima.py:7b`), or any config
  file; its help names every preset. Also `--print_config`, which `run` answers."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  default_text = f" Default: {default}." if default else ""
  config_flags.DEFINE_config_file(
      CONFIG_FLAG, resolve_config_spec(default) if default and not _help_only else None,
      f"{help_string.rstrip('.')}. Presets: {_presets_text()}.{default_text} Override any field "
      f"with --{CONFIG_FLAG}.SECTION.FIELD=VALUE (e.g. --{CONFIG_FLAG}.sampling.temperature=0.5); "
      f"--{PRINT_CONFIG_FLAG} lists every field.",
      lock_config=False)  # Locking fails on the FrozenConfigDict of model.rope_scaling.
  flags.DEFINE_bool(PRINT_CONFIG_FLAG, False, f"Print the resolved config (the --{CONFIG_FLAG} "
                    f"preset or file with every --{CONFIG_FLAG}.* override applied), one field a "
                    f"line, and exit.")


def _flat_fields(tree, prefix: str = "") -> list[tuple[str, object]]:
  out = []
  for key, value in tree.items():
    if hasattr(value, "items") and value:
      out += _flat_fields(value, f"{prefix}{key}.")
    else:
      out.append((f"{prefix}{key}", dict(value) if hasattr(value, "items") else value))
  return out


def config_text(config) -> str:
  """Every field of a config as `section.field = value` lines (values as JSON), with a header
  that says how to override them."""
  lines = [f"# The resolved config: override any field with --{CONFIG_FLAG}.FIELD=VALUE."]
  if config.get("model", {}).get("init_from"):
    lines.append("# model.init_from is set: the model's architecture (vocab_size, d_model, n_layers, "
                 "heads, ...) comes from its own config at run time; dtype, param_dtype, scan_layers, "
                 "remat_policy, residual_dropout and attention stay as here.")
  lines += [f"{name} = {json.dumps(value, default=str)}" for name, value in _flat_fields(config)]
  return "\n".join(lines)


def prog_name() -> str:
  return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "lima_jax"


def fail(message: str) -> None:
  """The one line a bad input gets, on stderr, and exit status 2."""
  print(f"{prog_name()}: error: {message}", file=sys.stderr)
  sys.exit(errors.EXIT_BAD_INPUT)


def _first_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[0] if lines else type(e).__name__


def help_requested(argv: Sequence[str]) -> str | None:
  """"short" for `--help`/`-h`/`--helpshort`, "full" for `--helpfull`, else None (argv[0] is the
  program; nothing after `--` counts)."""
  for arg in argv[1:]:
    if arg == "--":
      break
    name = arg.split("=", 1)[0]
    if name in FULL_HELP_ARGS:
      return "full"
    if name in SHORT_HELP_ARGS:
      return "short"
  return None


def _flag_line(flag) -> str:
  name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
  text = " ".join((flag.help or "").split())
  default = flag.default
  if flag.name != CONFIG_FLAG and default not in (None, ""):
    text += f" (default: {str(default).lower() if flag.boolean else default})"
  return textwrap.fill(f"{name}: {text}", width=HELP_WIDTH, initial_indent="  ",
                       subsequent_indent="      ", break_on_hyphens=False)


ABSL_APP_HELP_TRAILER = ("Also --verbosity=N (absl/Orbax/jax log lines), --flagfile=FILE, and "
                         "--helpfull (every flag, absl's and jax's included).")


def help_text(usage: str, own_flags: Sequence, trailer: str = "") -> str:
  """A command's --help: its docstring, then each of its own flags with its help and default."""
  lines = [textwrap.dedent(usage or prog_name()).strip(), "", "flags:"]
  lines += [_flag_line(flag) for flag in own_flags]
  if trailer:
    lines += ["", textwrap.fill(trailer, width=HELP_WIDTH)]
  return "\n".join(lines)


def _own_flags(values, names: Sequence[str]) -> list:
  """The distinct Flag objects of `names` in `values`, in their order (a short name repeats one)."""
  seen, out = set(), []
  for name in names:
    flag = values[name]
    if id(flag) not in seen:
      seen.add(id(flag))
      out.append(flag)
  return out


def print_help_and_exit(kind: str, usage: str, values, own_names: Sequence[str],
                        trailer: str = "") -> None:
  """--help (kind "short") or --helpfull ("full") on stdout; exit status 0."""
  print(help_text(usage, _own_flags(values, own_names), trailer))
  if kind == "full":
    print("\nall flags:\n" + values.get_help())
  sys.exit(0)


def parse_flags(argv: Sequence[str], *, define_flags: Callable[[], None],
                default_config: str | None = None, usage: str = "") -> list[str]:
  """absl's flags parser for `run`: defines the flags, then parses; --help -> the command's own
  flags and exit 0; bad input -> `fail`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  argv = with_config_resolved(argv)
  wanted = help_requested(argv)
  if wanted:
    global _help_only
    defined_before, _help_only = set(flags.FLAGS), True
    define_flags()
    own = [name for name in flags.FLAGS if name not in defined_before]
    print_help_and_exit(wanted, usage, flags.FLAGS, own, ABSL_APP_HELP_TRAILER)
  try:
    if default_config is not None or _config_spec(argv) is not None or _overrides(argv):
      check_config_args(argv, default_config)
    define_flags()
    return flags.FLAGS(argv)
  except errors.InputError as e:
    fail(str(e))
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    fail(_first_line(e))
  return []  # Unreachable: fail exits.


def parse_own_flags(argv: Sequence[str], define_flags: Callable, usage: str, *,
                    positional: Sequence[str]):
  """absl flags on a FlagValues of the command's own, for commands that are also called in-process
  (`main(argv) -> status`): returns (flag values, positional arguments); bad flags -> `fail`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  values = flags.FlagValues()
  defined_before = set(values)
  define_flags(values)
  wanted = help_requested([prog_name()] + list(argv))
  if wanted:
    print_help_and_exit(wanted, usage, values, [name for name in values if name not in defined_before])
  try:
    args = values([prog_name()] + list(argv))[1:]
  except flags.Error as e:
    fail(_first_line(e))
  if len(args) != len(positional):
    fail(f"expected {len(positional)} argument(s) ({' '.join(positional)}), got {len(args)}: "
         f"{' '.join(args) or 'none'}; --help shows the usage")
  return values, args


def quiet_logging() -> None:
  """absl (and through it Orbax's and jax's) INFO lines off, unless `--verbosity` was given."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def setup_process(cpu_allocator: bool = False) -> None:
  """The entry points' process set-up, each step said on stderr (see lima_jax/process.py)."""
  process.default_to_cpu_without_tpu(log=True)
  if cpu_allocator:
    process.restart_with_cpu_allocator(log=True)


def run(main: Callable[[list[str]], int | None], define_flags: Callable[[], None], *,
        default_config: str | None = None, cpu_allocator: bool = False,
        auto_cpu: bool = True) -> None:
  """`app.run(main)` with one-line errors (exit 2), quiet logs, the process set-up, and --help
  (the docstring of `main`'s module and the flags `define_flags` defines, exit 0). A command with
  `define_config_flag` also answers `--print_config` here, before any set-up."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  def guarded(argv):
    quiet_logging()
    if PRINT_CONFIG_FLAG in flags.FLAGS and flags.FLAGS[PRINT_CONFIG_FLAG].value:
      if flags.FLAGS[CONFIG_FLAG].value is None:
        fail(f"--{PRINT_CONFIG_FLAG} needs --{CONFIG_FLAG}=PRESET ({_presets_text()})")
      print(config_text(flags.FLAGS[CONFIG_FLAG].value))
      return 0
    if auto_cpu:
      setup_process(cpu_allocator)
    try:
      return main(argv)
    except errors.InputError as e:
      fail(str(e))

  usage = getattr(sys.modules.get(main.__module__), "__doc__", None) or ""
  parser = functools.partial(parse_flags, define_flags=define_flags, default_config=default_config,
                             usage=usage)
  app.run(guarded, flags_parser=parser)
