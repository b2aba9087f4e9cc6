r"""Blind pairwise annotation in the browser: the LIMA paper's human preference study.

  lima-annotate --a A.jsonl --b B.jsonl --output judgements.jsonl [--overlap K] [--seed S] \
      [--host 127.0.0.1] [--port 8080] [--token TOKEN]

A and B are answer files as `lima-evaluate` writes them, for the same prompts. The page shows one
prompt (the whole conversation) and the two answers, the systems' names hidden and their sides
drawn per item and annotator from --seed; annotators choose "A significantly better", "B
significantly better" or "neither" (the paper's options), with the mouse or the keyboard, and
can go back to change an answer. Each annotator enters a name once (the browser keeps it).

Every choice is written to --output at once (the whole file rewritten atomically; gs:// too):
`{"id", "winner": "a"|"b"|"tie", "annotator", "choice", "shown", "seconds", "time", ...}`, what
`lima-compare pairwise` and `lima-compare agreement` read. A rerun with the same --output resumes
every annotator where they stopped. --overlap K: each item goes to K annotators (the first K to
reach it in their own order), so agreement can be measured. --token (or $LIMA_ANNOTATE_TOKEN):
the page asks for it and every API call must carry it; give annotators the printed link.

Exit status: 0 stopped with Ctrl-C; 2 bad input (a message names the file, line or flag).
"""

import os

from absl import flags

from lima_jax import errors
from lima_jax import paths
from lima_jax.cli import common

TOKEN_ENV = "LIMA_ANNOTATE_TOKEN"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def define_flags() -> None:
  flags.DEFINE_string("a", None, "answers of system A (lima-evaluate's output JSONL)")
  flags.DEFINE_string("b", None, "answers of system B, for the same prompts")
  flags.DEFINE_string("output", None, "judgements JSONL, rewritten at each choice; resumed from if it exists")
  flags.DEFINE_integer("overlap", 1, "annotators per item (K >= 2 lets agreement be measured)", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "seed of each annotator's item order and side order")
  flags.DEFINE_string("host", "127.0.0.1", "address to bind (another than loopback needs --token)")
  flags.DEFINE_integer("port", 8080, "port to bind", lower_bound=1, upper_bound=65535)
  flags.DEFINE_string("token", None, f"access token the page must send (default: ${TOKEN_ENV})")
  flags.DEFINE_float("hold_minutes", 30.0, "an item shown to an annotator is kept for them this long",
                     lower_bound=0.0)
  flags.mark_flags_as_required(["a", "b", "output"])


def main(argv) -> None:
  if len(argv) > 1:
    raise errors.InputError(f"unexpected arguments {argv[1:]}")
  import uvicorn  # pylint: disable=g-import-not-at-top  # Only once the flags are good.
  from lima_jax.annotate import server  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if not paths.is_remote(f.output) and not paths.absolute(f.output).parent.is_dir():
    raise errors.InputError(f"--output {f.output}: the directory does not exist")
  token = f.token or os.environ.get(TOKEN_ENV) or None
  if f.host not in LOOPBACK and not token:
    raise errors.InputError(f"--host {f.host}: serving beyond this machine needs --token (or ${TOKEN_ENV})")
  service = server.open_study(f.a, f.b, f.output, overlap=f.overlap, seed=f.seed,
                              hold_seconds=60.0 * f.hold_minutes)
  done = len(service.annotations.records)
  if done:
    print(f"resuming: {done} choices by {len(service.annotations.annotators())} annotators in {f.output}")
  shown_host = f"[{f.host}]" if ":" in f.host else f.host
  link = f"http://{shown_host}:{f.port}/" + (f"?token={token}" if token else "")
  print(f"{len(service.study.items)} items, {f.overlap} annotator(s) each; open {link} (Ctrl-C stops)",
        flush=True)
  uvicorn.run(server.create_app(service, token), host=f.host, port=f.port, log_level="warning")
  print(f"{len(service.annotations.records)} choices by {len(service.annotations.annotators())} "
        f"annotator(s) in {f.output}")


def run() -> None:
  common.run(main, define_flags, auto_cpu=False)


if __name__ == "__main__":
  run()
