"""`dense`: the MLP's matmul, with a CPU-only weight gradient that keeps XLA:CPU off a slow transpose."""

import jax
import jax.numpy as jnp

from lima_jax import sharding


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] @ w [K, N]. On CPU its weight gradient transposes the smaller operand itself.

  XLA:CPU computes x^T @ g by transposing the larger output gradient g in a slow fused loop
  (docs/training.md#speed); TPUs fold the transpose into the matmul, so they (and ahead-of-time
  compiles for them) keep the plain product.
  """
  if sharding.target_platform() != "cpu":
    return jnp.einsum("...k,kn->...n", x, w)
  return _cpu_dense(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


@jax.custom_vjp
def _cpu_dense(x, w):
  return x @ w


def _cpu_dense_fwd(x, w):
  return x @ w, (x, w)


def _cpu_dense_bwd(residuals, d_out):
  x, w = residuals
  d_x = d_out @ w.T
  # The barrier keeps the transpose a plain copy instead of a loop fused into its producer.
  if x.shape[1] <= d_out.shape[1]:
    d_w = jax.lax.optimization_barrier(x.T) @ d_out
  else:
    d_w = (jax.lax.optimization_barrier(d_out.T) @ x).T
  return d_x, d_w


_cpu_dense.defvjp(_cpu_dense_fwd, _cpu_dense_bwd)
