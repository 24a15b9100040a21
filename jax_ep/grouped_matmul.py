"""Grouped matmul for MoE experts: `grouped_matmul(x [M, K], w [G, K, N], group_sizes [G])`.

Rows of `x` are grouped by expert: rows [o_g, o_g + group_sizes[g]) with
o_g = sum(group_sizes[:g]) are multiplied by w[g]. Rows past sum(group_sizes) (the unused
capacity of a dispatch) come out zero. This is `jax.lax.ragged_dot` with a custom VJP:
  dx = grouped_matmul(dy, w^T)            (the same kernel reading w transposed, no copy)
  dw[g] = x_g^T @ dy_g                    (a transposed grouped matmul, [G, K, N])

impl="auto" runs jax_ep's Pallas Mosaic GPU kernels on Hopper GPUs and falls back to
`jax.lax.ragged_dot` elsewhere (CPU, TPU, other GPUs, shapes the kernels do not take).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_ep.vma import cotangent_like, varying_like

IMPLS = ("auto", "mosaic", "xla")


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                   impl: str = "auto") -> jax.Array:
    """Per-group matmul of row blocks.

    Args:
      x: [M, K] bfloat16 or float32, rows grouped by group (rows past sum(group_sizes)
        are ignored).
      w: [G, K, N], the same dtype as x.
      group_sizes: int32 [G], rows of each group; sum(group_sizes) <= M.
      impl: "auto" (Mosaic GPU kernels on Hopper, else XLA), "mosaic", or "xla"
        (`jax.lax.ragged_dot`).

    Returns [M, N] x.dtype (accumulated in float32); rows >= sum(group_sizes) are zero.
    Differentiable in x and w.
    """
    _check(x, w, group_sizes, impl)
    if _resolve(impl, x, w) == "xla":
        return _xla_grouped_matmul(x, w, group_sizes)
    return _mosaic_grouped_matmul(x, w, group_sizes)


def _check(x, w, group_sizes, impl):
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {IMPLS}.")
    if x.ndim != 2 or w.ndim != 3:
        raise ValueError(f"x must be [M, K] and w [G, K, N]; got x {x.shape}, w {w.shape}.")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} columns but w has K={w.shape[1]} rows per "
                         "group; they must match.")
    if x.dtype != w.dtype:
        raise TypeError(f"x is {x.dtype} but w is {w.dtype}; cast one so they match.")
    if group_sizes.shape != (w.shape[0],) or group_sizes.dtype != jnp.int32:
        raise ValueError(f"group_sizes must be int32 [{w.shape[0]}] (one per group of w); got "
                         f"{group_sizes.dtype} {group_sizes.shape}.")


def _resolve(impl, x, w):
    """'xla' or 'mosaic' for this call (decided at trace time)."""
    if impl == "xla":
        return "xla"
    fits = mosaic_fits(x.shape, w.shape, x.dtype)
    if impl == "mosaic":
        if not fits:
            raise ValueError(f"impl='mosaic' does not take x {x.shape} {x.dtype}, w {w.shape}: "
                             "it needs bfloat16 and K, N multiples of 256. Use impl='auto'.")
        return "mosaic"
    return "mosaic" if fits and _on_hopper() else "xla"


def _on_hopper() -> bool:
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "") == "9.0"


def mosaic_fits(x_shape, w_shape, dtype) -> bool:
    """Whether the Mosaic GPU kernels take these shapes, forward and backward: bfloat16, K
    and N multiples of 256 (the default block's columns; dx swaps K and N)."""
    _, k = x_shape
    _, _, n = w_shape
    return jnp.dtype(dtype) == jnp.bfloat16 and k % 256 == 0 and n % 256 == 0


def _xla_grouped_matmul(x, w, group_sizes):
    # ragged_dot leaves rows past sum(group_sizes) zero and has its own VJP.
    return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32).astype(x.dtype)


@jax.custom_vjp
def _mosaic_grouped_matmul(x, w, group_sizes):
    from jax_ep import mosaic_kernels
    return varying_like(mosaic_kernels.gmm(x, w, group_sizes, transpose_w=False), x, w, group_sizes)


def _mosaic_fwd(x, w, group_sizes):
    return _mosaic_grouped_matmul(x, w, group_sizes), (x, w, group_sizes)


def _mosaic_bwd(residuals, dy):
    from jax_ep import mosaic_kernels
    x, w, group_sizes = residuals
    dx = mosaic_kernels.gmm(dy, w, group_sizes, transpose_w=True)
    dw = mosaic_kernels.tgmm(x, dy, group_sizes)
    dx = cotangent_like(varying_like(dx, dy, w, group_sizes), x)
    dw = cotangent_like(varying_like(dw, x, dy, group_sizes), w)
    return dx, dw, None


_mosaic_grouped_matmul.defvjp(_mosaic_fwd, _mosaic_bwd)
