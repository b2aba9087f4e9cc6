"""The test session is an entry point: it picks the CPU over an absent TPU (libtpu installed on a
CPU host), as the commands do, before any test starts a jax backend."""

from lima_jax import hardware

hardware.default_to_cpu_without_tpu()
