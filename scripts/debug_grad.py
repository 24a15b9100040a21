"""Which part of a rank-layout MoE gradient makes XLA:GPU crash at compile (debug aid)."""
import faulthandler
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

import jax_ep

faulthandler.enable()
sys.path.insert(0, "tests")
from helpers import inputs  # noqa: E402

variant = sys.argv[1]
H = 2048
mesh = Mesh(np.array(jax.devices()[:4]), ("ep",))
buf = jax_ep.Buffer(mesh, "ep", num_experts=64, hidden=H, backend="cuda", max_tokens_per_rank=256)
rng = np.random.default_rng(7)
x, idx, w = inputs(rng, 4, 256, H, 64, 4, jnp.bfloat16)
w_all = jnp.asarray(rng.standard_normal((64, H, H)) / np.sqrt(H), jnp.bfloat16)


def layer(x, i, w, we):
    out = buf.dispatch(x, i, w)
    recv_idx = out.recv_topk_idx
    if variant == "barrier":
        recv_idx = jax.lax.optimization_barrier(recv_idx)
    per_expert = jnp.einsum("ch,lhd->cld", out.recv_x, we, preferred_element_type=jnp.float32)
    if variant == "onehot":
        gates = (jax.nn.one_hot(recv_idx, we.shape[0]) * out.recv_topk_weights[:, :, None]).sum(1)
        y = jnp.einsum("cld,cl->cd", per_expert, gates)
    elif variant == "noweights":
        y = per_expert.sum(1)
    else:
        slot = jnp.take_along_axis(per_expert, jnp.clip(recv_idx, 0)[:, :, None], axis=1)
        y = (slot * out.recv_topk_weights[:, :, None]).sum(1)
    return buf.combine(y.astype(x.dtype), out.handle)


def loss(x, w, w_all):
    fn = jax.shard_map(layer, mesh=mesh, in_specs=(P("ep"),) * 4, out_specs=P("ep"))
    return (fn(x, idx, w, w_all).astype(jnp.float32) ** 2).sum()


argnums = (0, 2) if variant == "noweights" else (0, 1, 2)
g = jax.jit(jax.grad(loss, argnums=argnums))(x, w, w_all)
print("ok", variant, [float(jnp.linalg.norm(a.astype(jnp.float32))) for a in g], flush=True)
