"""jax_ep.moe on local GPUs: CUDA dispatch/combine + Mosaic grouped matmul against the
reference backend + jax.lax.ragged_dot, forward and gradients, on random data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_ep

pytestmark = pytest.mark.gpu


def _run(buf, matmul_impl, x, params, ct, top_k):
    specs = jax_ep.moe_partition_specs("ep")

    def loss(x, params, ct):
        out = jax_ep.moe(buf, x, params, top_k=top_k, matmul_impl=matmul_impl)
        value = (out.y.astype(jnp.float32) * ct).sum() + 0.01 * out.aux_loss + 1e-3 * out.z_loss
        return jax.lax.psum(value, "ep"), (out.y, out.num_dropped[None])

    def body(x, ct, params):
        (value, (y, dropped)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(
            x, params, ct)
        return value, y, dropped, grads

    fn = jax.jit(jax.shard_map(body, mesh=buf.mesh, in_specs=(P("ep"), P("ep"), specs),
                               out_specs=(P(), P("ep"), P("ep"), (P("ep"), specs))))
    return jax.tree.map(lambda a: np.asarray(a.astype(jnp.float32)), fn(x, ct, params))


@pytest.mark.parametrize("hidden,experts,ffn,top_k,tokens", [(1024, 64, 512, 8, 512),
                                                             (2048, 16, 768, 4, 1000)])
def test_moe_cuda_mosaic_matches_reference(hidden, experts, ffn, top_k, tokens):
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    mesh = Mesh(np.array(gpus), ("ep",))
    num_ranks = len(gpus)
    rng = np.random.default_rng(hidden + experts)
    params = jax_ep.init_moe_params(jax.random.key(0), hidden=hidden, ffn=ffn,
                                    num_experts=experts, shared_ffn=256)
    params = params._replace(router=params.router * 8)  # skewed, realistic routing
    shard = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
    params = jax.tree.map(shard, params, jax_ep.moe_partition_specs("ep"))
    x = shard(jnp.asarray(rng.standard_normal((num_ranks * tokens, hidden)), jnp.bfloat16), P("ep"))
    ct = shard(jnp.asarray(rng.standard_normal((num_ranks * tokens, hidden)), jnp.float32), P("ep"))
    kw = dict(num_experts=experts, hidden=hidden, max_tokens_per_rank=tokens)
    cuda = jax_ep.Buffer(mesh, "ep", backend="cuda", **kw)
    ref = jax_ep.Buffer(mesh, "ep", backend="reference", **kw)
    got = _run(cuda, "mosaic", x, params, ct, top_k)
    want = _run(ref, "xla", x, params, ct, top_k)
    cuda.check()
    value, y, dropped, (dx, dparams) = got
    assert not dropped.any()
    np.testing.assert_allclose(y, want[1], rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(dx, want[3][0], rtol=5e-2, atol=5e-2)
    for name, a, b in zip(jax_ep.MoEParams._fields, dparams, want[3][1]):
        if a is None:
            continue
        scale = float(np.abs(b).max())
        np.testing.assert_allclose(a, b, atol=3e-2 * scale, err_msg=name)
