import sys, faulthandler; faulthandler.enable()
sys.path.insert(0, "tests")
import os
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
import jax_ep
from jax_ep.demo import moe_layer
from helpers import inputs
backend, layout, H = sys.argv[1], sys.argv[2], int(sys.argv[3])
mesh = Mesh(np.array(jax.devices()[:4]), ("ep",))
buf = jax_ep.Buffer(mesh, "ep", num_experts=64, hidden=H, backend=backend, max_tokens_per_rank=256)
rng = np.random.default_rng(7)
x, idx, w = inputs(rng, 4, 256, H, 64, 4, jnp.bfloat16)
w_all = jnp.asarray(rng.standard_normal((64, H, H)) / np.sqrt(H), jnp.bfloat16)
def loss(x, w, w_all):
    fn = jax.shard_map(lambda x, i, w, we: moe_layer(buf, x, i, w, we, layout=layout),
                       mesh=mesh, in_specs=(P("ep"),) * 4, out_specs=P("ep"))
    return (fn(x, idx, w, w_all).astype(jnp.float32) ** 2).sum()
print("compiling", backend, layout, H, flush=True)
f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
g = f(x, w, w_all)
print("ok", backend, layout, H, [float(jnp.linalg.norm(a.astype(jnp.float32))) for a in g], flush=True)
