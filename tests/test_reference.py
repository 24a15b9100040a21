"""The contract of jax_ep's API, checked on the pure-JAX reference backend (8 CPU devices)
against the independent NumPy statement in oracle.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ep
import oracle
from conftest import cpu_mesh, run_sharded
from helpers import dispatch_all, inputs, per_rank, routing
from jax_ep.demo import dense_moe, moe_layer

R, H, E, K = 8, 128, 32, 4


@pytest.fixture(scope="module")
def mesh():
    return cpu_mesh((R,), ("ep",))


@pytest.fixture(scope="module")
def buf(mesh):
    return jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="reference")


def test_auto_backend_is_reference_without_gpus(mesh):
    assert jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H).backend == "reference"


def test_layout_matches_numpy(mesh):
    buf = jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="reference",
                        num_ranks_per_node=4)
    rng = np.random.default_rng(1)
    idx = routing(rng, R * 37, E, K)
    outs = run_sharded(mesh, lambda i: tuple(a if a.ndim == 2 else a[None]
                                             for a in buf.get_dispatch_layout(i)),
                       jnp.asarray(idx), out_specs=(P("ep"),) * 4)
    per_rank_tokens, per_node, per_expert, in_rank = (per_rank(o, R) for o in outs)
    for r in range(R):
        want = oracle.layout(idx[r * 37:(r + 1) * 37], R, E, 4)
        np.testing.assert_array_equal(per_rank_tokens[r, 0], want[0])
        np.testing.assert_array_equal(per_node[r, 0], want[1])
        np.testing.assert_array_equal(per_expert[r, 0], want[2])
        np.testing.assert_array_equal(in_rank[r], want[3])
    assert in_rank.dtype == bool and per_expert.dtype == np.int32


@pytest.mark.parametrize("layout", ["rank", "expert"])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_dispatch_matches_oracle(mesh, buf, layout, num_tokens):
    rng = np.random.default_rng(num_tokens)
    x, idx, w = inputs(rng, R, num_tokens, H, E, K)
    got = dispatch_all(buf, mesh, x, idx, w, layout=layout)
    want = oracle.dispatch(per_rank(x, R), per_rank(idx, R), per_rank(w, R), E,
                           capacity=got["recv_x"].shape[1], layout=layout)
    for r in range(R):
        for name in ("recv_x", "recv_topk_idx", "recv_topk_weights",
                     "num_recv_tokens_per_expert"):
            np.testing.assert_array_equal(got[name][r], want[r][name], err_msg=f"{name} rank {r}")
        assert got["num_recv_tokens"][r, 0] == want[r]["num_recv_tokens"]
        assert got["num_dropped"][r, 0] == 0


def test_rank_layout_rows_grouped_by_source_then_token(mesh, buf):
    """Row i of every rank is (source, token) in ascending order: DeepEP's order."""
    num_tokens = 16
    rng = np.random.default_rng(2)
    _, idx, w = inputs(rng, R, num_tokens, H, E, K)
    ids = np.arange(R * num_tokens, dtype=np.float32)  # x[row] = global token id
    x = jnp.asarray(np.repeat(ids[:, None], H, axis=1))
    got = dispatch_all(buf, mesh, x, idx, w)
    for r in range(R):
        n = got["num_recv_tokens"][r, 0]
        order = got["recv_x"][r, :n, 0]
        assert np.all(np.diff(order) > 0)
        assert np.all(got["recv_x"][r, n:] == 0)


def test_combine_of_dispatch_is_x_times_ranks_per_token(mesh, buf):
    rng = np.random.default_rng(3)
    x, idx, w = inputs(rng, R, 40, H, E, K)
    out = run_sharded(mesh, lambda x, i, w: buf.combine(buf.dispatch(x, i, w).recv_x,
                                                        buf.dispatch(x, i, w).handle), x, idx, w)
    in_rank = np.zeros((R * 40, R), bool)
    for t, row in enumerate(np.asarray(idx)):
        for e in row[row >= 0]:
            in_rank[t, e // (E // R)] = True
    np.testing.assert_allclose(np.asarray(out), np.asarray(x) * in_rank.sum(1)[:, None], rtol=1e-6)


@pytest.mark.parametrize("layout", ["rank", "expert"])
def test_combine_matches_oracle_with_bias(mesh, buf, layout):
    rng = np.random.default_rng(4)
    num_tokens = 21
    x, idx, w = inputs(rng, R, num_tokens, H, E, K)
    capacity = num_tokens * R * (2 if layout == "expert" else 1)
    y = rng.standard_normal((R * capacity, H)).astype(np.float32)
    bias = rng.standard_normal((R * num_tokens, H)).astype(np.float32)

    def body(x, idx, w, y, bias):
        out = buf.dispatch(x, idx, w, layout=layout, capacity=capacity)
        return buf.combine(y, out.handle, bias=bias)

    out = run_sharded(mesh, body, x, idx, w, jnp.asarray(y), jnp.asarray(bias))
    dispatched = oracle.dispatch(per_rank(x, R), per_rank(idx, R), per_rank(w, R), E,
                                 capacity, layout)
    want = oracle.combine(per_rank(y, R), dispatched, num_tokens, per_rank(bias, R))
    np.testing.assert_allclose(per_rank(out, R), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("layout", ["rank", "expert"])
@pytest.mark.parametrize("ranks_per_node", [2, 4, 8])
def test_combine_summation_order_is_bit_exact(mesh, ranks_per_node, layout, dtype, with_bias):
    """One node: bias, then ranks in ascending order. Several nodes (the internode mode):
    a partial per node over its ranks, then bias plus the nodes' partials in ascending node."""
    buf = jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="reference",
                        num_ranks_per_node=ranks_per_node)
    assert buf.config.num_nodes == R // ranks_per_node
    rng = np.random.default_rng(100 + ranks_per_node)
    num_tokens = 13
    x, idx, w = inputs(rng, R, num_tokens, H, E, K, dtype)
    capacity = num_tokens * R * (K if layout == "expert" else 1)
    scale = np.exp2(rng.integers(-6, 7, (R * capacity, 1)))  # spread magnitudes: order matters
    y = jnp.asarray(rng.standard_normal((R * capacity, H)) * scale, dtype)
    bias = jnp.asarray(rng.standard_normal((R * num_tokens, H)), dtype) if with_bias else None

    def body(x, idx, w, y, *bias):
        out = buf.dispatch(x, idx, w, layout=layout, capacity=capacity)
        return buf.combine(y, out.handle, bias=bias[0] if bias else None)

    out = run_sharded(mesh, body, x, idx, w, y, *(() if bias is None else (bias,)))
    assert out.dtype == dtype
    dispatched = oracle.dispatch(per_rank(x, R), per_rank(idx, R), per_rank(w, R), E,
                                 capacity, layout)
    assert all(d["num_dropped"] == 0 for d in dispatched)
    args = (per_rank(y, R), per_rank(idx, R), dispatched, E)
    bias_r = None if bias is None else per_rank(bias, R)
    want = oracle.combine_exact(*args, ranks_per_node, bias_r)
    np.testing.assert_array_equal(per_rank(out, R).astype(np.float32), want.astype(np.float32))
    if ranks_per_node < R and dtype == jnp.float32:  # the test tells the two orders apart
        flat = oracle.combine_exact(*args, R, bias_r)
        assert not np.array_equal(want, flat)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("ranks_per_node", [2, 4, 8])
def test_combine_order_crafted_bf16(mesh, ranks_per_node, with_bias):
    """Every token goes to ranks 0, 1, G, G + 1 (G = 2 or 4: two nodes), which send back
    -2**24, 1, 1, 2**24. Flat, in fp32: (((b - 2**24) + 1) + 1) + 2**24 = b + 2 (b = bias, 0
    or 1). By node, each node's fp32 partial rounded to bf16 (it crosses the network in y's
    dtype): b + bf16(1 - 2**24) + bf16(1 + 2**24) = b - 2**24 + 2**24 = b (with fp32
    partials it would be b + 1). With G = 8 ranks 0, 1, 2, 3: one node, flat."""
    buf = jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="reference",
                        num_ranks_per_node=ranks_per_node)
    group = ranks_per_node if ranks_per_node < R else 2
    ranks = [0, 1, group, group + 1]
    idx = jnp.asarray(np.tile(np.array(ranks, np.int32) * (E // R), (R, 1)))
    x = jnp.zeros((R, H), jnp.bfloat16)
    w = jnp.ones((R, K), jnp.float32)
    sent = np.zeros((R, R, H), np.float32)  # [holder, row = source, H]
    for r, v in zip(ranks, [-2.0**24, 1.0, 1.0, 2.0**24]):
        sent[r] = v
    y = jnp.asarray(sent.reshape(R * R, H), jnp.bfloat16)
    bias = jnp.ones((R, H), jnp.bfloat16)

    def body(x, idx, w, y, *bias):
        out = buf.dispatch(x, idx, w, capacity=R)
        return buf.combine(y, out.handle, bias=bias[0] if bias else None)

    out = run_sharded(mesh, body, x, idx, w, y, *((bias,) if with_bias else ()))
    b = 1.0 if with_bias else 0.0
    want = b if ranks_per_node < R else b + 2
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.full((R, H), want, np.float32))
    dispatched = oracle.dispatch(per_rank(x, R), per_rank(idx, R), per_rank(w, R), E, R, "rank")
    exact = oracle.combine_exact(per_rank(y, R), per_rank(idx, R), dispatched, E, ranks_per_node,
                                 per_rank(bias, R) if with_bias else None)
    np.testing.assert_array_equal(exact.reshape(R, H).astype(np.float32), np.asarray(out, np.float32))


@pytest.mark.parametrize("layout", ["rank", "expert"])
def test_capacity_overflow_is_counted_and_corrupts_nothing(mesh, buf, layout):
    rng = np.random.default_rng(5)
    num_tokens, capacity = 24, 30
    x, idx, w = inputs(rng, R, num_tokens, H, E, K, )
    got = dispatch_all(buf, mesh, x, idx, w, capacity=capacity, layout=layout)
    full = oracle.dispatch(per_rank(x, R), per_rank(idx, R), per_rank(w, R), E, 10**6, layout)
    kept = oracle.dispatch(per_rank(x, R), per_rank(idx, R), per_rank(w, R), E, capacity, layout)
    assert sum(d["num_dropped"] for d in kept) > 0, "the test must overflow"
    for r in range(R):
        assert got["num_dropped"][r, 0] == len(full[r]["rows"]) - capacity
        assert got["num_recv_tokens"][r, 0] == capacity
        np.testing.assert_array_equal(got["recv_x"][r], kept[r]["recv_x"])
        np.testing.assert_array_equal(got["num_recv_tokens_per_expert"][r],
                                      kept[r]["num_recv_tokens_per_expert"])
    y = rng.standard_normal((R * capacity, H)).astype(np.float32)

    def body(x, idx, w, y):
        return buf.combine(y, buf.dispatch(x, idx, w, capacity=capacity, layout=layout).handle)

    out = run_sharded(mesh, body, x, idx, w, jnp.asarray(y))
    want = oracle.combine(per_rank(y, R), kept, num_tokens)
    np.testing.assert_allclose(per_rank(out, R), want, rtol=1e-5, atol=1e-5)


def test_tokens_with_no_expert_are_skipped(mesh, buf):
    rng = np.random.default_rng(6)
    x, idx, w = inputs(rng, R, 12, H, E, K)
    idx = np.asarray(idx).copy()
    idx[::3] = -1
    bias = rng.standard_normal((R * 12, H)).astype(np.float32)

    def body(x, idx, w, bias):
        out = buf.dispatch(x, idx, w)
        return buf.combine(out.recv_x, out.handle, bias=bias), out.num_recv_tokens[None]

    out, n = run_sharded(mesh, body, x, jnp.asarray(idx), w, jnp.asarray(bias),
                         out_specs=(P("ep"), P("ep")))
    np.testing.assert_allclose(np.asarray(out)[::3], bias[::3], rtol=1e-6)
    expected = sum(len(oracle.pairs_of(per_rank(idx, R), r, E // R)) for r in range(R))
    assert int(np.asarray(n).sum()) == expected


def test_expert_layout_group_sizes_feed_ragged_dot(mesh, buf):
    rng = np.random.default_rng(7)
    x, idx, w = inputs(rng, R, 20, H, E, K)
    w_experts = jnp.asarray(rng.standard_normal((E, H, H)).astype(np.float32) / np.sqrt(H))

    def body(x, idx, w, w_local):
        out = buf.dispatch(x, idx, w, layout="expert")
        assert out.num_recv_tokens_per_expert.shape == (E // R,)
        h = jax.lax.ragged_dot(out.recv_x, w_local, out.num_recv_tokens_per_expert)
        return (out.num_recv_tokens_per_expert.sum() == out.num_recv_tokens)[None], h, out.recv_x, \
            out.recv_topk_idx

    ok, h, recv_x, recv_idx = run_sharded(mesh, body, x, idx, w, w_experts,
                                          out_specs=(P("ep"),) * 4)
    assert np.all(np.asarray(ok))
    h, recv_x, recv_idx = per_rank(h, R), per_rank(recv_x, R), per_rank(recv_idx, R)
    w_experts = per_rank(w_experts, R)
    for r in range(R):
        for row in range(h.shape[1]):
            e = recv_idx[r, row].max()
            want = recv_x[r, row] @ w_experts[r, e] if e >= 0 else np.zeros(H)
            np.testing.assert_allclose(h[r, row], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["rank", "expert"])
def test_gradients_match_dense(mesh, buf, layout):
    rng = np.random.default_rng(8)
    x, idx, w = inputs(rng, R, 16, H, E, K)
    w_all = jnp.asarray(rng.standard_normal((E, H, H)).astype(np.float32) / np.sqrt(H))

    def loss_ep(x, w, w_all):
        fn = jax.shard_map(lambda x, i, w, we: moe_layer(buf, x, i, w, we, layout=layout),
                           mesh=mesh, in_specs=(P("ep"),) * 4, out_specs=P("ep"))
        return (fn(x, idx, w, w_all) ** 2).sum()

    def loss_dense(x, w, w_all):
        return (dense_moe(x, idx, w, w_all) ** 2).sum()

    got = jax.jit(jax.grad(loss_ep, argnums=(0, 1, 2)))(x, w, w_all)
    want = jax.grad(loss_dense, argnums=(0, 1, 2))(x, w, w_all)
    for g, v in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(v), rtol=1e-4, atol=1e-4)


def test_combine_gradient_is_cached_dispatch_with_bias(mesh, buf):
    rng = np.random.default_rng(9)
    x, idx, w = inputs(rng, R, 10, H, E, K)
    cot = jnp.asarray(rng.standard_normal((R * 10, H)).astype(np.float32))

    def body(x, idx, w, cot):
        out = buf.dispatch(x, idx, w)
        y = out.recv_x * 2.0
        bias = jnp.zeros_like(x)
        (dy, dbias) = jax.grad(lambda y, b: (buf.combine(y, out.handle, bias=b) * cot).sum(),
                               argnums=(0, 1))(y, bias)
        return dy, dbias, buf.dispatch(cot, idx, w).recv_x

    dy, dbias, want = run_sharded(mesh, body, x, idx, w, cot, out_specs=(P("ep"),) * 3)
    np.testing.assert_allclose(np.asarray(dy), np.asarray(want), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dbias), np.asarray(cot), rtol=1e-6)


def test_dp_ep_mesh_holds_independent_groups():
    mesh = cpu_mesh((2, 4), ("dp", "ep"))
    buf = jax_ep.Buffer(mesh, "ep", num_experts=16, hidden=H, backend="reference")
    rng = np.random.default_rng(10)
    x, idx, w = inputs(rng, 8, 9, H, 16, 3)
    spec = P(("dp", "ep"))

    def body(x, idx, w):
        out = buf.dispatch(x, idx, w)
        return out.recv_x, buf.combine(out.recv_x, out.handle)

    recv_x, out = run_sharded(mesh, body, x, idx, w, in_specs=(spec,) * 3, out_specs=(spec, spec))
    recv_x = per_rank(recv_x, 8)
    for group in range(2):
        sl = slice(group * 4, (group + 1) * 4)
        want = oracle.dispatch(per_rank(x, 8)[sl], per_rank(idx, 8)[sl], per_rank(w, 8)[sl], 16,
                               capacity=recv_x.shape[1], layout="rank")
        for r in range(4):
            np.testing.assert_array_equal(recv_x[group * 4 + r], want[r]["recv_x"])
    counts = np.array([len({e // 4 for e in row if e >= 0}) for row in np.asarray(idx)])
    np.testing.assert_allclose(np.asarray(out), np.asarray(x) * counts[:, None], rtol=1e-6)


def test_fp8_dispatch_carries_values_and_scales(mesh, buf):
    rng = np.random.default_rng(11)
    x, idx, w = inputs(rng, R, 8, H, E, K)
    q, scales = jax_ep.quantize_fp8(x)

    def body(q, s, idx, w):
        out = buf.dispatch((q, s), idx, w)
        rq, rs = out.recv_x
        return rq.astype(jnp.float32), rs, out.recv_topk_idx

    rq, rs, _ = run_sharded(mesh, body, q, scales, idx, w, out_specs=(P("ep"),) * 3)
    want = oracle.dispatch(per_rank(np.asarray(q.astype(jnp.float32)), R), per_rank(idx, R),
                           per_rank(w, R), E, capacity=8 * R, layout="rank")
    want_s = oracle.dispatch(per_rank(scales, R), per_rank(idx, R), per_rank(w, R), E,
                             capacity=8 * R, layout="rank")
    for r in range(R):
        np.testing.assert_array_equal(per_rank(rq, R)[r], want[r]["recv_x"])
        np.testing.assert_array_equal(per_rank(rs, R)[r], want_s[r]["recv_x"])


@pytest.mark.parametrize("fp8", [False, True])
def test_low_latency_round_trip(mesh, buf, fp8):
    rng = np.random.default_rng(12)
    num_tokens, m = 6, 8
    x, idx, w = inputs(rng, R, num_tokens, H, E, K)

    def body(x, idx, w):
        out = buf.low_latency_dispatch(x, idx, max_tokens_per_rank=m, fp8=fp8)
        recv = out.recv_x
        if fp8:
            recv = jax_ep.dequantize_fp8(recv, out.recv_scales)
        return buf.low_latency_combine(recv, idx, w, out.handle), out.recv_count, recv

    out, count, recv = run_sharded(mesh, body, x, idx, w, out_specs=(P("ep"),) * 3)
    valid_w = np.where(np.asarray(idx) >= 0, np.asarray(w), 0)
    want = np.asarray(x) * valid_w.sum(1, keepdims=True)
    if fp8:  # e4m3 keeps 3 mantissa bits: relative error per element <= 2^-4
        np.testing.assert_allclose(np.asarray(out), want,
                                   atol=np.abs(np.asarray(x)).max() * valid_w.sum(1).max() / 16)
        assert not np.allclose(np.asarray(out), want, atol=1e-6), "FP8 must actually quantize"
    else:
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)
    recv = per_rank(recv, R).reshape(R, E // R, R, m, H)
    count = per_rank(count, R)
    idx_r, x_r = per_rank(idx, R), per_rank(x, R)
    for r in range(R):
        for e in range(E // R):
            sources = [(s, t) for s in range(R) for t in range(num_tokens)
                       if r * (E // R) + e in idx_r[s, t]]
            assert count[r, e] == len(sources)
            flat = recv[r, e].reshape(R * m, H)
            for row, (s, t) in enumerate(sources):
                np.testing.assert_allclose(flat[row], x_r[s, t], rtol=1 / 8 if fp8 else 0,
                                           atol=1e-2 if fp8 else 0)
            assert np.all(flat[len(sources):] == 0)


@pytest.mark.parametrize("num_tokens", [3, 8])
def test_low_latency_ops_under_a_cap_match_the_uncapped_buffer(mesh, buf, num_tokens):
    """low_latency_max_tokens_per_rank = 8 >= T changes no result of the low-latency ops,
    fused or hooked."""
    capped = jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="reference",
                           low_latency_max_tokens_per_rank=8)
    rng = np.random.default_rng(14)
    x, idx, w = inputs(rng, R, num_tokens, H, E, K)

    def body(b):
        def fn(x, idx, w):
            out = b.low_latency_dispatch(x, idx, max_tokens_per_rank=8)
            hooked = b.low_latency_dispatch_recv(b.low_latency_dispatch_send(x, idx))
            return (out.recv_x, out.recv_count,
                    b.low_latency_combine(out.recv_x, idx, w, out.handle),
                    b.low_latency_combine_recv(b.low_latency_combine_send(
                        hooked.recv_x, idx, w, hooked.handle)))
        return fn

    got = run_sharded(mesh, body(capped), x, idx, w, out_specs=(P("ep"),) * 4)
    want = run_sharded(mesh, body(buf), x, idx, w, out_specs=(P("ep"),) * 4)
    for g, v in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(v))


def test_low_latency_combine_gradients_match_dense(mesh, buf):
    rng = np.random.default_rng(13)
    x, idx, w = inputs(rng, R, 5, H, E, K)
    scale = jnp.asarray(rng.standard_normal((E // R * R, 1, H)).astype(np.float32))

    def loss_ep(x, w, scale):
        def body(x, idx, w, scale):
            out = buf.low_latency_dispatch(x, idx, max_tokens_per_rank=5)
            return buf.low_latency_combine(out.recv_x * scale, idx, w, out.handle)
        return (jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 4, out_specs=P("ep"))(
            x, idx, w, scale) ** 2).sum()

    def loss_dense(x, w, scale):
        slot = scale[jnp.clip(idx, 0), 0] * x[:, None, :]
        return (((jnp.where(idx >= 0, w, 0)[:, :, None] * slot).sum(1)) ** 2).sum()

    got = jax.jit(jax.grad(loss_ep, argnums=(0, 1, 2)))(x, w, scale)
    want = jax.grad(loss_dense, argnums=(0, 1, 2))(x, w, scale)
    for g, v in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(v), rtol=1e-4, atol=1e-4)
