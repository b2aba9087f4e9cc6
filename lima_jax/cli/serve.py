r"""Serves a model over OpenAI's HTTP API, on the continuous-batching engine (docs/serving.md).

  lima-serve --checkpoint WORKDIR_OR_CKPT_OR_HF_DIR [--host 127.0.0.1] [--port 8000] \
      [--served_model_name NAME] [--api_key KEY] [--slots 8] \
      [--config=configs/lima.py:7b --config.sampling.max_len=2048 --config.serve.max_queue=256 ...]

Endpoints: GET /v1/models, GET /health, POST /v1/chat/completions, POST /v1/completions. Omitted
sampling fields take LIMA's decoding from `--config.sampling`; `sampling.max_len` is each slot's
context. The API key may also come from $LIMA_SERVE_API_KEY; without one, anyone who can reach
the port may use the server (it binds 127.0.0.1 unless told otherwise). SIGTERM (or Ctrl-C)
stops accepting, lets the answers in flight finish for up to `serve.shutdown_timeout` seconds,
and exits 0.
"""

import os
import signal
import sys

import jax
from absl import flags

from lima_jax import errors
from lima_jax import inference
from lima_jax import sharding
from lima_jax.cli import common
from lima_jax.cli import decoding as decoding_flags
from lima_jax.serve import batcher as batcher_lib
from lima_jax.serve import engine as engine_lib

DEFAULT_CONFIG = "7b"
API_KEY_ENV = "LIMA_SERVE_API_KEY"


def build_service(f, log):
  """Loads the model, builds and warms up the engine; returns the server's Service."""
  from lima_jax.serve import server  # pylint: disable=g-import-not-at-top  (FastAPI only here)
  config = f.config
  try:
    scfg = decoding_flags.sampling_config_from_flags(f)
    mesh = sharding.make_mesh(sharding.decode_mesh_config(dict(config.mesh), jax.devices()[0].platform, jax.device_count()))
  except ValueError as e:
    raise errors.InputError(f"--config: {e}") from None
  try:
    loaded = inference.load_model(f.checkpoint, mesh=mesh, tokenizer_path=f.tokenizer, dtype=f.dtype)
  except (FileNotFoundError, ValueError) as e:
    raise errors.InputError(f"--checkpoint {f.checkpoint}: {e}") from None
  for note in loaded.notes:
    log(f"note: {note}")
  serve = dict(config.get("serve", {}))
  slots = f.slots or int(serve.get("slots", 8))
  max_len = min(scfg.max_len, loaded.model_config.max_seq_len)
  engine = engine_lib.Engine(
      loaded.model_config, loaded.params, slots=slots, max_len=max_len, stop_ids=loaded.stop_ids,
      pad_id=loaded.tokenizer.pad_id or 0, mesh=mesh, steps_per_call=int(serve.get("steps_per_call", 4)),
      top_logprobs=int(serve.get("top_logprobs", 20)), min_cache_len=int(serve.get("min_cache_len", 128)))
  log(f"compiling the engine ({slots} slots, context {max_len}, prompt buckets {engine.buckets()}, "
      f"cache lengths {engine.cache_lengths})")
  engine.warm_up(with_score=True)
  batcher = batcher_lib.Batcher(engine, max_queue=int(serve.get("max_queue", 256)))
  name = f.served_model_name or inference.generator_name(loaded.path)
  api_key = f.api_key or os.environ.get(API_KEY_ENV) or None
  service = server.Service(loaded, batcher, scfg.replace(max_len=max_len), name, api_key)
  return service, float(serve.get("shutdown_timeout", 30.0))


def main(argv):
  if len(argv) > 1:
    raise errors.InputError(f"unexpected arguments {argv[1:]}")
  import uvicorn  # pylint: disable=g-import-not-at-top
  from lima_jax.serve import server  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  log = lambda message: print(message, file=sys.stderr, flush=True)
  service, shutdown_timeout = build_service(f, log)
  service.batcher.start()
  log(f"serving {service.model_name!r} on http://{f.host}:{f.port}/v1")
  # uvicorn stops accepting on SIGTERM / SIGINT, waits for open requests (bounded), restores the
  # handlers found and raises the signal again: these let the process then finish and exit 0.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: None)
  uvicorn.run(server.create_app(service), host=f.host, port=f.port, log_level="warning",
              timeout_graceful_shutdown=shutdown_timeout)
  finished = service.batcher.shutdown(shutdown_timeout)
  log("stopped" + ("" if finished else " (answers still running were cancelled)"))


def define_flags() -> None:
  decoding_flags.define_decoding_flags(DEFAULT_CONFIG)
  flags.DEFINE_string("host", "127.0.0.1", "address to bind (0.0.0.0: every interface)")
  flags.DEFINE_integer("port", 8000, "TCP port")
  flags.DEFINE_string("served_model_name", None, "the model's name in the API (default: the checkpoint's)")
  flags.DEFINE_string("api_key", None, f"clients must send it as a Bearer token (or set ${API_KEY_ENV})")
  flags.DEFINE_integer("slots", None, "decode slots (= --config.serve.slots)")
  flags.mark_flags_as_required(["checkpoint"])


def run() -> None:
  common.run(main, define_flags, default_config=DEFAULT_CONFIG)


if __name__ == "__main__":
  run()
