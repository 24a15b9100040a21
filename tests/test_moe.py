"""jax_ep.moe (router + SwiGLU experts + shared expert over dispatch/combine) on the reference
backend (CPU devices), against a dense single-device statement of the same layer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_ep
from conftest import cpu_mesh
from jax_ep.moe import MoEOutput, MoEParams

R, H, E, F, FS, K, T = 8, 128, 16, 64, 32, 4, 12   # T tokens per shard
TOKENS = P("ep")


# ------------------------------------------------------------------ dense oracle
def dense_route(x, router, top_k, score_func, normalize, scaling):
    """Plain jnp routing of every token: idx [N, K], weights [N, K], logits, probs."""
    logits = jnp.dot(x, router.astype(x.dtype), preferred_element_type=jnp.float32)
    if score_func == "softmax":
        scores = jnp.exp(logits - logits.max(-1, keepdims=True))
        scores = scores / scores.sum(-1, keepdims=True)
        probs = scores
    else:
        scores = 1 / (1 + jnp.exp(-logits))
        probs = scores / scores.sum(-1, keepdims=True)
    idx = jnp.argsort(-scores, axis=-1)[:, :top_k]
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdims=True)
    return idx, weights * scaling, logits, probs


def dense_moe(x, params, *, top_k, score_func="softmax", normalize=False, scaling=1.0,
              num_shards=R):
    """Every token through its top-k experts on one device, in float32.
    Returns y [N, H] float32, aux [num_shards], z [num_shards], counts [num_shards, E]."""
    idx, weights, logits, probs = dense_route(x, params.router, top_k, score_func, normalize,
                                              scaling)
    xf = x.astype(jnp.float32)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    h = jnp.einsum("nh,ehf->nef", xf, f32(params.w_gate_up))          # every expert
    g, u = h[..., :F], h[..., F:]
    per_expert = jnp.einsum("nef,efh->neh", g / (1 + jnp.exp(-g)) * u, f32(params.w_down))
    gates = (jax.nn.one_hot(idx, E) * weights[:, :, None]).sum(1)     # [N, E]
    y = jnp.einsum("ne,neh->nh", gates, per_expert)
    if params.shared_gate_up is not None:
        hs = xf @ f32(params.shared_gate_up)
        fs = hs.shape[1] // 2
        g, u = hs[:, :fs], hs[:, fs:]
        y = y + (g / (1 + jnp.exp(-g)) * u) @ f32(params.shared_down)
    counts = jax.nn.one_hot(idx, E, dtype=jnp.int32).sum(1).reshape(num_shards, -1, E).sum(1)
    frac = counts / (x.shape[0] // num_shards * top_k)
    mean_p = probs.reshape(num_shards, -1, E).mean(1)
    aux = E * (frac * mean_p).sum(-1)
    lse = jnp.log(jnp.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    z = (lse ** 2).reshape(num_shards, -1).mean(1)
    return y, aux, z, counts


# ------------------------------------------------------------------ fixtures / helpers
@pytest.fixture(scope="module")
def mesh():
    return cpu_mesh((R,), ("ep",))


@pytest.fixture(scope="module")
def buf(mesh):
    return jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="reference")


def make(seed, dtype=jnp.float32, shared=True, num_tokens=R * T, weight_dtype=None):
    """Random x [num_tokens, H] (dtype) and global MoEParams (expert and shared weights in
    weight_dtype, default dtype; router float32, scaled up so routing is decisive). NumPy
    draws: eager jax.random costs seconds of compilation per shape on CPU."""
    rng = np.random.default_rng(seed)
    wd = dtype if weight_dtype is None else weight_dtype
    normal = lambda shape, fan_in, dt=wd: jnp.asarray(  # noqa: E731
        rng.standard_normal(shape) / np.sqrt(fan_in), dt)
    params = MoEParams(router=normal((H, E), H / 16, jnp.float32),
                       w_gate_up=normal((E, H, 2 * F), H), w_down=normal((E, F, H), F),
                       shared_gate_up=normal((H, 2 * FS), H) if shared else None,
                       shared_down=normal((FS, H), FS) if shared else None)
    return jnp.asarray(rng.standard_normal((num_tokens, H)), dtype), params


def shard_jit(mesh, fn, in_specs, out_specs):
    """jit(shard_map(fn)) whose arguments may be pytrees (MoEParams), placed first."""
    mapped = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))

    def call(*args):
        args = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), args,
                            tuple(in_specs), is_leaf=lambda a: a is None)
        return mapped(*args)
    return call


def run_moe(mesh, buf, x, params, tokens=TOKENS, **kwargs):
    """Per-shard outputs: y [N, H], aux [S], z [S], dropped [S], counts [S, E]."""
    def body(x, params):
        out = jax_ep.moe(buf, x, params, **kwargs)
        assert isinstance(out, MoEOutput)
        return (out.y, out.aux_loss[None], out.z_loss[None], out.num_dropped[None],
                out.tokens_per_expert[None])

    return shard_jit(mesh, body, (tokens, jax_ep.moe_partition_specs("ep")), (tokens,) * 5)(
        x, params)


def rel_err(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


# ------------------------------------------------------------------ forward
def dense_jit(x, params, **kw):
    return jax.jit(functools.partial(dense_moe, **kw))(x, params)


@pytest.mark.parametrize("dtype,score_func,normalize,scaling,shared,weight_dtype", [
    (jnp.float32, "softmax", False, 1.0, True, None),
    (jnp.float32, "sigmoid", True, 2.5, False, None),
    (jnp.bfloat16, "softmax", True, 1.0, True, None),
    (jnp.bfloat16, "sigmoid", False, 2.5, True, jnp.float32),  # f32 master weights, bf16 x
])
def test_forward_matches_dense(mesh, buf, dtype, score_func, normalize, scaling, shared,
                               weight_dtype):
    x, params = make(1, dtype, shared, weight_dtype=weight_dtype)
    kw = dict(top_k=K, score_func=score_func, normalize_topk=normalize, routed_scaling=scaling)
    y, aux, z, dropped, counts = run_moe(mesh, buf, x, params, **kw)
    y_ref, aux_ref, z_ref, counts_ref = dense_jit(x, params, top_k=K, score_func=score_func,
                                                  normalize=normalize, scaling=scaling)
    assert y.dtype == dtype and y.shape == (R * T, H)
    assert aux.dtype == z.dtype == jnp.float32
    assert dropped.dtype == counts.dtype == jnp.int32
    assert np.all(np.asarray(dropped) == 0)
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(counts_ref))
    assert np.asarray(counts).min(axis=None) >= 0 and np.asarray(counts).sum() == R * T * K
    assert np.abs(np.asarray(y_ref)).max() > 0.1, "the test needs a non-trivial output"
    if dtype == jnp.float32:
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    else:  # bf16 storage of x, weights, h, act and y
        assert rel_err(y, y_ref) < 2e-2
    np.testing.assert_allclose(np.asarray(aux), np.asarray(aux_ref), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(z), np.asarray(z_ref), rtol=1e-5)


# ------------------------------------------------------------------ gradients
def _losses(mesh, buf, kw, tokens=TOKENS, remat=False, num_shards=R):
    """(loss through moe on the mesh, loss through the dense oracle), both f(x, params):
    <y, random cotangent> + 0.3 * sum of aux losses + 0.01 * sum of z losses."""
    cot_key = jax.random.key(99)

    def loss_ep(x, params):
        def body(x, params):
            fn = lambda x, p: jax_ep.moe(buf, x, p, **kw)  # noqa: E731
            out = (jax.checkpoint(fn) if remat else fn)(x, params)
            return out.y, out.aux_loss[None], out.z_loss[None]

        y, aux, z = jax.shard_map(body, mesh=mesh,
                                  in_specs=(tokens, jax_ep.moe_partition_specs("ep")),
                                  out_specs=(tokens,) * 3)(x, params)
        cot = jax.random.normal(cot_key, y.shape, jnp.float32)
        return (y * cot).sum() + 0.3 * aux.sum() + 0.01 * z.sum()

    def loss_dense(x, params):
        y, aux, z, _ = dense_moe(x, params, top_k=kw["top_k"], score_func=kw["score_func"],
                                 normalize=kw["normalize_topk"], scaling=kw["routed_scaling"],
                                 num_shards=num_shards)
        cot = jax.random.normal(cot_key, y.shape, jnp.float32)
        return (y * cot).sum() + 0.3 * aux.sum() + 0.01 * z.sum()

    return loss_ep, loss_dense


def _check_grads(loss_ep, loss_dense, x, params):
    gx, gp = jax.jit(jax.grad(loss_ep, argnums=(0, 1)))(x, params)
    wx, wp = jax.jit(jax.grad(loss_dense, argnums=(0, 1)))(x, params)
    pairs = [("x", gx, wx)] + [(name, g, w) for name, g, w in zip(MoEParams._fields, gp, wp)
                                if w is not None]
    assert len(pairs) == 6
    for name, g, w in pairs:
        assert np.abs(np.asarray(w)).max() > 0, f"d {name} must not be zero"
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-4, atol=2e-5,
                                   err_msg=f"d {name}")


@pytest.mark.parametrize("score_func,normalize,scaling,remat", [
    ("softmax", False, 1.0, False), ("sigmoid", True, 2.5, True)],
    ids=["softmax", "sigmoid-normalized-checkpoint"])
def test_gradients_match_dense(mesh, buf, score_func, normalize, scaling, remat):
    """d x, d router (through the top-k weights and the aux / z losses) and d of every expert
    and shared weight, float32; the second case runs the layer under jax.checkpoint."""
    x, params = make(2)
    kw = dict(top_k=K, score_func=score_func, normalize_topk=normalize, routed_scaling=scaling)
    _check_grads(*_losses(mesh, buf, kw, remat=remat), x, params)


def test_dp_ep_mesh():
    """(dp=2, ep=4): two EP groups of 4, tokens split over both axes, experts over ep only."""
    mesh = cpu_mesh((2, 4), ("dp", "ep"))
    buf = jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="reference")
    tokens = P(("dp", "ep"))
    x, params = make(4)
    kw = dict(top_k=K, score_func="softmax", normalize_topk=True, routed_scaling=1.0)
    y, aux, z, dropped, counts = run_moe(mesh, buf, x, params, tokens=tokens, **kw)
    y_ref, aux_ref, z_ref, counts_ref = dense_jit(x, params, top_k=K, score_func="softmax",
                                                  normalize=True, num_shards=8)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(aux), np.asarray(aux_ref), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(z), np.asarray(z_ref), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(counts_ref))
    assert np.all(np.asarray(dropped) == 0)
    _check_grads(*_losses(mesh, buf, kw, tokens=tokens, num_shards=8), x, params)


def test_small_capacity_drops_rows(mesh, buf):
    x, params = make(5, shared=False)
    capacity = 10
    y, _, _, dropped, _ = run_moe(mesh, buf, x, params, top_k=K, capacity=capacity)
    idx = np.asarray(dense_route(x, params.router, K, "softmax", False, 1.0)[0])
    # A rank receives one row per (token, local expert) selection; rows past C drop.
    rows_per_rank = np.bincount(idx.reshape(-1) // (E // R), minlength=R)
    want = np.maximum(rows_per_rank - capacity, 0)
    assert want.sum() > 0, "the test must overflow"
    np.testing.assert_array_equal(np.asarray(dropped), want)
    assert np.all(np.isfinite(np.asarray(y)))


def test_init_and_partition_specs():
    params = jax_ep.init_moe_params(jax.random.key(0), hidden=128, ffn=64, num_experts=8,
                                    shared_ffn=32)
    assert params.router.shape == (128, 8) and params.router.dtype == jnp.float32
    assert params.w_gate_up.shape == (8, 128, 128) and params.w_gate_up.dtype == jnp.bfloat16
    assert params.w_down.shape == (8, 64, 128) and params.w_down.dtype == jnp.bfloat16
    assert params.shared_gate_up.shape == (128, 64) and params.shared_down.shape == (32, 128)
    for a, fan_in in [(params.router, 128), (params.w_gate_up, 128), (params.w_down, 64),
                      (params.shared_gate_up, 128), (params.shared_down, 32)]:
        std = float(np.asarray(a, np.float32).std())
        assert abs(std * np.sqrt(fan_in) - 1) < 0.1, (a.shape, std)
    assert not np.allclose(np.asarray(params.w_gate_up[0], np.float32),
                           np.asarray(params.w_gate_up[1], np.float32))
    no_shared = jax.eval_shape(lambda k: jax_ep.init_moe_params(
        k, hidden=128, ffn=64, num_experts=8, dtype=jnp.float32), jax.random.key(0))
    assert no_shared.shared_gate_up is None and no_shared.shared_down is None
    assert no_shared.w_down.dtype == jnp.float32
    assert jax_ep.moe_partition_specs("experts") == MoEParams(P(), P("experts"), P("experts"),
                                                              P(), P())


# ------------------------------------------------------------------ validation
def test_validation_errors(buf):
    """Checks run before any collective, so a direct call with per-shard shapes raises."""
    x, params = make(7, shared=True, num_tokens=T)
    local = params._replace(w_gate_up=params.w_gate_up[:E // R], w_down=params.w_down[:E // R])
    call = lambda x=x, p=local, **kw: jax_ep.moe(buf, x, p, **{"top_k": K, **kw})  # noqa: E731
    cases = [
        (ValueError, "router must be", dict(p=local._replace(router=local.router[:, :8]))),
        (ValueError, "looks global", dict(p=local._replace(w_gate_up=params.w_gate_up))),
        (ValueError, "w_gate_up must be", dict(p=local._replace(w_gate_up=local.w_gate_up[:, :64]))),
        (ValueError, "w_down must be", dict(p=local._replace(w_down=local.w_down[:, :32]))),
        (ValueError, "top_k", dict(top_k=0)),
        (ValueError, "top_k", dict(top_k=E + 1)),
        (ValueError, "top_k", dict(top_k=2.0)),
        (ValueError, "score_func", dict(score_func="relu")),
        (ValueError, "or neither", dict(p=local._replace(shared_down=None))),
        (ValueError, "shared_down must be",
         dict(p=local._replace(shared_down=local.shared_down[:8]))),
        (ValueError, "hidden", dict(x=x[:, :64])),
        (TypeError, "bfloat16 or float32", dict(x=x.astype(jnp.float16))),
        (TypeError, "floating point", dict(p=local._replace(w_down=local.w_down.astype(jnp.int32)))),
        (ValueError, "matmul_impl", dict(matmul_impl="cublas")),
    ]
    for exc, match, kw in cases:
        with pytest.raises(exc, match=match):
            call(**kw)
    with pytest.raises(TypeError, match="MoEParams"):
        jax_ep.moe(buf, x, tuple(local), top_k=K)
