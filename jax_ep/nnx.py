"""`jax_ep.nnx.MoE`: the expert-parallel MoE layer as a Flax NNX module.

    import jax_ep, jax_ep.nnx
    buf = jax_ep.Buffer(mesh, "ep", num_experts=64, hidden=1024)        # eager, outside jit
    layer = jax_ep.nnx.MoE(buf, ffn=512, top_k=4, rngs=nnx.Rngs(0))
    y, aux = layer(x)          # x [B, S, H] or [N, H], global view, tokens sharded over the mesh

The module holds GLOBAL parameters (the experts sharded over the Buffer's axis) and runs
`jax_ep.moe.moe` per shard inside `jax.shard_map`. Flax is an optional extra
(`pip install "jax_ep[nnx]"`); `import jax_ep` never imports it.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

try:
    from flax import nnx
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("jax_ep.nnx needs Flax: pip install flax (or pip install "
                      "\"jax_ep[nnx]\").") from e

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jax_ep.moe import MoEParams, init_moe_params, moe, moe_partition_specs

__all__ = ["MoE"]


def _param(value: jax.Array, names: tuple, mesh) -> nnx.Param:
    """An nnx.Param holding `value` with a sharding annotation (mesh axis name or None per
    dimension); Flax places the value accordingly when eager sharding is on."""
    return nnx.Param(nnx.with_partitioning(lambda: value, names, mesh=mesh)())


class MoE(nnx.Module):
    """Routed SwiGLU experts (plus optional shared experts), expert-parallel over `buf`.

    Args:
      buf: a `jax_ep.Buffer`; sets the mesh, the EP axis, E (`num_experts`) and H (`hidden`).
      ffn: F, each routed expert's intermediate width.
      top_k: K, experts per token.
      shared_ffn: Fs, the shared experts' intermediate width (0: none).
      score_func, normalize_topk, routed_scaling, capacity, matmul_impl: passed to
        `jax_ep.moe.moe` (capacity is per shard: rows each rank receives).
      dtype: the experts' parameter dtype (the router is float32).
      data_axes: mesh axes the tokens are split over (default: every mesh axis), e.g.
        ("dp", "ep") on a (dp, ep) mesh.
      rngs: `nnx.Rngs`; initialisation uses `rngs.params()`.

    Parameters (global shapes, `sharding` annotation in brackets):
      router [H, E] float32 (None, None); w_gate_up [E, H, 2F] (ep, None, None);
      w_down [E, F, H] (ep, None, None); shared_gate_up [H, 2Fs] and shared_down [Fs, H]
      (None, None) when shared_ffn > 0.
    """

    def __init__(self, buf, *, ffn: int, top_k: int, shared_ffn: int = 0,
                 score_func: str = "softmax", normalize_topk: bool = False,
                 routed_scaling: float = 1.0, capacity: Optional[int] = None,
                 matmul_impl: str = "auto", dtype=jnp.bfloat16,
                 data_axes: Optional[Union[str, Sequence[str]]] = None, rngs: nnx.Rngs):
        self.buf = buf
        self.top_k = int(top_k)
        self.score_func = score_func
        self.normalize_topk = bool(normalize_topk)
        self.routed_scaling = float(routed_scaling)
        self.capacity = capacity
        self.matmul_impl = matmul_impl
        mesh, ep = buf.mesh, buf.config.axis_name
        if data_axes is None:
            data_axes = tuple(mesh.axis_names)
        elif isinstance(data_axes, str):
            data_axes = (data_axes,)
        self.data_axes = tuple(data_axes)
        if ep not in self.data_axes:
            raise ValueError(f"data_axes={self.data_axes} must include the Buffer's axis {ep!r}: "
                             "every EP rank brings its own tokens.")

        p = init_moe_params(rngs.params(), hidden=buf.config.hidden, ffn=ffn,
                            num_experts=buf.config.num_experts, shared_ffn=shared_ffn, dtype=dtype)
        self.router = _param(p.router, (None, None), mesh)
        self.w_gate_up = _param(p.w_gate_up, (ep, None, None), mesh)
        self.w_down = _param(p.w_down, (ep, None, None), mesh)
        if shared_ffn:
            self.shared_gate_up = _param(p.shared_gate_up, (None, None), mesh)
            self.shared_down = _param(p.shared_down, (None, None), mesh)
        else:
            self.shared_gate_up = self.shared_down = None

    def params(self) -> MoEParams:
        """The parameter values as a `MoEParams` of global arrays."""
        shared = self.shared_gate_up is not None
        return MoEParams(self.router[...], self.w_gate_up[...], self.w_down[...],
                         self.shared_gate_up[...] if shared else None,
                         self.shared_down[...] if shared else None)

    def __call__(self, x: jax.Array):
        """x: [B, S, H] or [N, H] (global view; tokens split over `data_axes`).

        Returns (y, aux): y with x's shape and dtype; aux a dict of
          aux_loss f32 [] and z_loss f32 [] (means over shards),
          num_dropped int32 [] and tokens_per_expert int32 [E] (sums over shards).
        """
        hidden = self.buf.config.hidden
        if x.shape[-1] != hidden:
            raise ValueError(f"x has hidden size {x.shape[-1]} but the Buffer was made with "
                             f"hidden={hidden}.")
        params = self.params()
        specs = moe_partition_specs(self.buf.config.axis_name)
        specs = MoEParams(*(s if v is not None else None for s, v in zip(specs, params)))
        axes = self.data_axes
        tokens = P(axes)

        def per_shard(x, params):  # x [T, H]
            out = moe(self.buf, x, params, top_k=self.top_k, score_func=self.score_func,
                      normalize_topk=self.normalize_topk, routed_scaling=self.routed_scaling,
                      capacity=self.capacity, matmul_impl=self.matmul_impl)
            aux = {"aux_loss": jax.lax.pmean(out.aux_loss, axes),
                   "z_loss": jax.lax.pmean(out.z_loss, axes),
                   "num_dropped": jax.lax.psum(out.num_dropped, axes),
                   "tokens_per_expert": jax.lax.psum(out.tokens_per_expert, axes)}
            return out.y, aux

        aux_specs = {"aux_loss": P(), "z_loss": P(), "num_dropped": P(), "tokens_per_expert": P()}
        y, aux = jax.shard_map(per_shard, mesh=self.buf.mesh, in_specs=(tokens, specs),
                               out_specs=(tokens, aux_specs))(x.reshape(-1, hidden), params)
        return y.reshape(x.shape), aux
