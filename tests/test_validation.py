"""Bad input: every out-of-contract input gets a trace-time error that says what to change,
or (where only device data can tell) the documented behaviour of docs/bad_input.md. Every
row of that table names its test here (or in test_contract.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.sharding import PartitionSpec as P

import jax_ep
from conftest import cpu_mesh, run_sharded
from jax_ep.buffer import check_topk_idx

R, H, E, K, T = 4, 128, 16, 2, 8
L = E // R


@pytest.fixture(scope="module")
def mesh():
    return cpu_mesh((R,), ("ep",))


@pytest.fixture(scope="module")
def buf(mesh):
    return jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="reference",
                         max_tokens_per_rank=T)


def _good(num_tokens=T):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((R * num_tokens, H)), jnp.float32)
    idx = jnp.asarray(np.tile(np.arange(K, dtype=np.int32), (R * num_tokens, 1)))
    w = jnp.ones((R * num_tokens, K), jnp.float32) * 0.5
    return x, idx, w


def _distinct():
    """Global x, topk_idx (distinct random experts, some -1), topk_weights."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((R * T, H)), jnp.float32)
    idx = np.argsort(rng.random((R * T, E)), axis=1)[:, :K].astype(np.int32)
    idx[rng.random(idx.shape) < 0.2] = -1
    w = jnp.asarray(rng.random((R * T, K)), jnp.float32)
    return x, jnp.asarray(idx), w


def _dispatch(mesh, buf, x, idx, w, **kwargs):
    return run_sharded(mesh, lambda x, i, w: buf.dispatch(x, i, w, **kwargs).recv_x, x, idx, w)


def _round_trip(buf, layout="rank", **kwargs):
    def body(x, i, w):
        out = buf.dispatch(x, i, w, layout=layout, **kwargs)
        return buf.combine(out.recv_x * out.recv_topk_weights.sum(-1, keepdims=True), out.handle)
    return body


# ------------------------------------------------------------------ the constructor
def test_num_experts_must_divide_by_ranks(mesh):
    with pytest.raises(ValueError, match="multiple of the 4 ranks"):
        jax_ep.Buffer(mesh, "ep", num_experts=6, hidden=H)


def test_hidden_must_be_a_multiple_of_128(mesh):
    with pytest.raises(ValueError, match="hidden=100 is not allowed.*multiple of 128"):
        jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=100)


def test_unknown_axis(mesh):
    with pytest.raises(ValueError, match="'tp' is not an axis"):
        jax_ep.Buffer(mesh, "tp", num_experts=E, hidden=H)


def test_unknown_backend(mesh):
    with pytest.raises(ValueError, match="backend='nccl'"):
        jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="nccl")


def test_cuda_backend_needs_gpus(mesh):
    with pytest.raises(ValueError, match="needs a mesh of GPUs"):
        jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="cuda")


SIZES = ["num_experts", "hidden", "max_tokens_per_rank", "num_ranks_per_node", "num_sms",
         "low_latency_num_sms"]


@pytest.mark.parametrize("name", SIZES)
@pytest.mark.parametrize("value", [4096.0, True, "8", np.float32(8)])
def test_sizes_must_be_ints(mesh, name, value):
    with pytest.raises(TypeError, match=f"{name}=.* must be a Python int.*never rounded"):
        jax_ep.Buffer(mesh, "ep", **{"num_experts": E, "hidden": H, name: value})


@pytest.mark.parametrize("name", SIZES)
@pytest.mark.parametrize("value", [0, -4])
def test_sizes_must_be_positive(mesh, name, value):
    with pytest.raises(ValueError, match=f"{name}={value} must be a positive int"):
        jax_ep.Buffer(mesh, "ep", **{"num_experts": E, "hidden": H, name: value})


def test_sizes_accept_numpy_ints(mesh):
    buf = jax_ep.Buffer(mesh, "ep", num_experts=np.int64(E), hidden=np.int32(H),
                        max_tokens_per_rank=np.int64(T), num_ranks_per_node=np.int64(2),
                        num_sms=np.int64(4), low_latency_num_sms=np.int64(7),
                        low_latency_max_tokens_per_rank=np.int64(T // 2), backend="reference")
    assert buf.config == jax_ep.EPConfig("ep", R, E, H, 2, T, 4, 7, T // 2)
    assert all(type(v) is int for v in vars(buf.config).values() if not isinstance(v, str))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(num_ranks_per_node=3), ValueError, "num_ranks_per_node=3 must divide the 4 ranks"),
    (dict(num_sms=3), ValueError, "num_sms=3 must be even"),
    (dict(axis_name=("ep",)), TypeError, "axis_name=\\('ep',\\) must be a str"),
    (dict(mesh="mesh"), TypeError, "mesh must be a jax.sharding.Mesh"),
    (dict(backend=None), ValueError, "backend=None is not one of"),
    (dict(num_sms=None), TypeError, "num_sms=None \\(NoneType\\) must be a Python int"),
])
def test_constructor_rejects_bad_arguments(mesh, kwargs, error, message):
    args = {"mesh": mesh, "axis_name": "ep", **kwargs}
    with pytest.raises(error, match=message):
        jax_ep.Buffer(args.pop("mesh"), args.pop("axis_name"), num_experts=E, hidden=H, **args)


@pytest.mark.parametrize("value, error, message", [
    (8.0, TypeError, "low_latency_max_tokens_per_rank=8.0 \\(float\\) must be a Python int"),
    (True, TypeError, "low_latency_max_tokens_per_rank=True \\(bool\\) must be a Python int"),
    ("8", TypeError, "low_latency_max_tokens_per_rank='8' \\(str\\) must be a Python int"),
    (-4, ValueError, "low_latency_max_tokens_per_rank=-4 must be 0 or a positive int. Pass 0 "
                     "for a Buffer that runs no low-latency ops, or None"),
    (T + 1, ValueError, f"low_latency_max_tokens_per_rank={T + 1} exceeds "
                        f"max_tokens_per_rank={T}; pass at most {T}"),
])
def test_low_latency_max_tokens_per_rank_is_checked(mesh, value, error, message):
    with pytest.raises(error, match=message):
        jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="reference",
                      max_tokens_per_rank=T, low_latency_max_tokens_per_rank=value)


@pytest.mark.parametrize("value, cap", [(None, T), (T, T), (T // 2, T // 2), (0, 0)])
def test_low_latency_max_tokens_per_rank_reaches_the_config(mesh, value, cap):
    capped = jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="reference",
                           max_tokens_per_rank=T, low_latency_max_tokens_per_rank=value)
    assert capped.config.low_latency_max_tokens_per_rank == value
    assert capped.config.low_latency_max_tokens == cap


# ------------------------------------------------------------------ where ops run
def _ops(buf):
    """Every device op of `buf`, called first on well-formed per-shard operands (handles and
    pending values made by hand: the checks run before any of them is read)."""
    handle = lambda: jax_ep.Handle(  # noqa: E731
        jnp.zeros((T, R), jnp.int32), jnp.zeros((R, R), jnp.int32), jnp.zeros((0, K), jnp.int32),
        capacity=T * R, layout="rank", buffer_id=buf.id)
    ll_handle = lambda: jax_ep.LowLatencyHandle(jnp.zeros((R, T, K), jnp.int32),  # noqa: E731
                                                buffer_id=buf.id)
    pending = lambda op: jax_ep.LowLatencyPending((), op=op, buffer_id=buf.id,  # noqa: E731
                                                  info=())
    ll_x = lambda: jnp.zeros((L, R * T, H), jnp.float32)  # noqa: E731
    return {
        "get_dispatch_layout": lambda x, i, w: buf.get_dispatch_layout(i).is_token_in_rank,
        "dispatch": lambda x, i, w: buf.dispatch(x, i, w).recv_x,
        "combine": lambda x, i, w: buf.combine(jnp.zeros((T * R, H)), handle()),
        "low_latency_dispatch": lambda x, i, w: buf.low_latency_dispatch(x, i).recv_x,
        "low_latency_dispatch_send": lambda x, i, w: buf.low_latency_dispatch_send(x, i),
        "low_latency_dispatch_recv": lambda x, i, w: buf.low_latency_dispatch_recv(
            pending("dispatch")),
        "low_latency_combine": lambda x, i, w: buf.low_latency_combine(ll_x(), i, w, ll_handle()),
        "low_latency_combine_send": lambda x, i, w: buf.low_latency_combine_send(
            ll_x(), i, w, ll_handle()),
        "low_latency_combine_recv": lambda x, i, w: buf.low_latency_combine_recv(
            pending("combine")),
    }


@pytest.mark.parametrize("op", list(_ops(None)))
def test_ops_outside_shard_map_say_so(buf, op):
    x, i, w = (a[:T] for a in _good())
    fn = _ops(buf)[op]
    for call in (lambda: fn(x, i, w), lambda: jax.jit(fn)(x, i, w)):
        with pytest.raises(ValueError, match=f"Buffer.{op} must be called per shard inside "
                                             "jax.shard_map over the Buffer's mesh"):
            call()


def test_every_op_of_a_closed_buffer_raises(mesh):
    """Checked before anything else, even outside shard_map; close stays idempotent."""
    closed = jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="reference",
                           max_tokens_per_rank=T)
    closed.close()
    closed.close()
    x, i, w = (a[:T] for a in _good())
    calls = [lambda fn=fn: fn(x, i, w) for fn in _ops(closed).values()]
    for call in calls + [closed.masked_ranks, closed.check]:
        with pytest.raises(RuntimeError, match="this Buffer is closed"):
            call()


def test_op_where_the_axis_is_not_manual_says_so(buf):
    """shard_map over the other axis only: 'ep' exists but is not manual."""
    mesh2 = cpu_mesh((2, R), ("dp", "ep"))
    fn = jax.shard_map(lambda x, i, w: buf.dispatch(x, i, w).recv_x, mesh=mesh2,
                       in_specs=(P("dp"),) * 3, out_specs=P("dp"), axis_names={"dp"})
    with pytest.raises(ValueError, match="'ep' is not bound \\(mesh \\{'dp': 2, 'ep': 4\\}, "
                                         "manual axes \\('dp',\\)\\)"):
        jax.jit(fn)(*(a[:2 * T] for a in _good()))


@pytest.mark.parametrize("op", list(_ops(None)))
@pytest.mark.parametrize("shape", [(4, 2), (8,)])
def test_ops_on_a_mesh_whose_axis_size_differs_say_so(buf, op, shape):
    """The same devices in another mesh: (dp=4, ep=2), or all 8 devices on ep."""
    names = ("dp", "ep")[-len(shape):]
    other = cpu_mesh(shape, names)
    size = shape[-1]
    spec = P(names)
    with pytest.raises(ValueError, match=f"Buffer.{op}: axis 'ep' has size {size} in the "
                                         "enclosing shard_map, but this Buffer was made for 4"):
        run_sharded(other, _ops(buf)[op], *_good(2 * T), in_specs=(spec,) * 3, out_specs=spec)


def test_another_mesh_with_the_same_axis_size_runs_per_group(buf):
    """Not detectable at trace time: a (dp=2, ep=4) mesh runs one EP group per dp index (the
    reference backend; the CUDA backend's buffers belong to buf.mesh's devices)."""
    other = cpu_mesh((2, R), ("dp", "ep"))
    x, i, w = _good(2 * T)  # experts 0 and 1 (rank 0), weights 0.5 each: the round trip is x
    spec = P(("dp", "ep"))
    got = run_sharded(other, _round_trip(buf), x, i, w, in_specs=(spec,) * 3, out_specs=spec)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x), rtol=1e-6)


def test_ops_accept_vmap_axis(buf):
    """An axis bound by jax.vmap(axis_name=...) with the Buffer's size also works."""
    x, i, w = _good()  # experts 0 and 1 (rank 0), weights 0.5 each: the round trip is x
    got = jax.jit(jax.vmap(_round_trip(buf), axis_name="ep"))(
        x.reshape(R, T, H), i.reshape(R, T, K), w.reshape(R, T, K))
    np.testing.assert_allclose(np.asarray(got).reshape(R * T, H), np.asarray(x), rtol=1e-6)


# ------------------------------------------------------------------ get_dispatch_layout
@pytest.mark.parametrize("change, error, message", [
    (lambda i: i[:, 0], ValueError, "topk_idx must be int32 \\[num_tokens, top_k\\]"),
    (lambda i: i.astype(jnp.uint32), TypeError, "topk_idx must be int32, got uint32; cast it"),
    (lambda i: i.astype(jnp.float32), TypeError, "topk_idx must be int32, got float32"),
    (lambda i: i[:, :0], ValueError, "top_k = 0. Give every token at least one slot"),
])
def test_get_dispatch_layout_rejects_bad_topk_idx(mesh, buf, change, error, message):
    with pytest.raises(error, match=message):
        run_sharded(mesh, lambda i: buf.get_dispatch_layout(change(i)).is_token_in_rank,
                    _good()[1])


def test_int64_topk_idx_under_x64_is_refused(mesh, buf):
    with jax.enable_x64(True):
        idx = jnp.asarray(np.asarray(_good()[1]), jnp.int64)
        assert idx.dtype == jnp.int64
        with pytest.raises(TypeError, match="topk_idx must be int32, got int64; cast it with "
                                            "topk_idx.astype\\(jnp.int32\\)"):
            run_sharded(mesh, lambda i: buf.get_dispatch_layout(i).is_token_in_rank, idx)


def test_get_dispatch_layout_of_zero_tokens(mesh, buf):
    lay = run_sharded(mesh, lambda i: jax.tree.map(lambda a: a[None], buf.get_dispatch_layout(i)),
                      jnp.zeros((0, K), jnp.int32), out_specs=P("ep"))
    assert lay.is_token_in_rank.shape == (R, 0, R)
    assert not np.asarray(lay.num_tokens_per_rank).any()
    assert not np.asarray(lay.num_tokens_per_expert).any()


def test_out_of_range_ids_are_treated_as_empty(mesh, buf):
    """Ids >= E or < -1 count as -1 (documented; check_topk_idx finds them on device)."""
    x, idx, w = _distinct()
    bad = np.asarray(idx).copy()
    bad[::3, 0] = E
    bad[1::3, 0] = -7
    bad = jnp.asarray(bad)
    empty = jnp.asarray(np.where((np.asarray(bad) < 0) | (np.asarray(bad) >= E), -1, bad))

    def body(x, i, w):
        lay = buf.get_dispatch_layout(i)
        out = buf.dispatch(x, i, w)
        ll = buf.low_latency_dispatch(x, i)
        return (lay.num_tokens_per_expert[None], out.recv_x, out.recv_topk_idx,
                out.recv_topk_weights, buf.combine(out.recv_x, out.handle), ll.recv_x,
                buf.low_latency_combine(ll.recv_x, i, w, ll.handle))

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3,
                               out_specs=(P("ep"),) * 7))
    for got, want in zip(fn(x, bad, w), fn(x, empty, w)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ------------------------------------------------------------------ dispatch
@pytest.mark.parametrize("change, message", [
    (lambda x, i, w: (x.astype(jnp.float16), i, w), "dtype float16; supported: bfloat16, float32"),
    (lambda x, i, w: (x[:, :64], i, w), "hidden size 64 but the Buffer was made with hidden=128"),
    (lambda x, i, w: (x[:, None], i, w), "x must be \\[num_tokens, hidden\\] per shard"),
    (lambda x, i, w: (x, i.astype(jnp.float32), w), "topk_idx must be int32"),
    (lambda x, i, w: (x, i[:, :1], w), "topk_weights has shape .* they must match"),
    (lambda x, i, w: (x, i, w.astype(jnp.bfloat16)), "topk_weights must be float32"),
    (lambda x, i, w: (x, i[: R * (T - 1)], w[: R * (T - 1)]), "has 7 tokens but x has 8"),
    (lambda x, i, w: (x, i[:, :0], w[:, :0]), "top_k = 0"),
])
def test_dispatch_rejects_bad_operands(mesh, buf, change, message):
    with pytest.raises((TypeError, ValueError), match=message):
        _dispatch(mesh, buf, *change(*_good()))


def test_dispatch_rejects_lists(mesh, buf):
    x, idx, w = _good()
    rows = np.asarray(idx[:T]).tolist()
    with pytest.raises(TypeError, match="topk_idx must be an array .* got list; convert it"):
        run_sharded(mesh, lambda x, w: buf.dispatch(x, rows, w).recv_x, x, w)
    with pytest.raises(TypeError, match="topk_weights must be an array .* got float"):
        run_sharded(mesh, lambda x, i: buf.dispatch(x, i, 1.0).recv_x, x, idx)
    with pytest.raises(ValueError, match="x must be a \\[T, H\\] array, or an FP8 tuple .* got a "
                                         "list of 8 items"):
        run_sharded(mesh, lambda i, w: buf.dispatch([[0.0] * H] * T, i, w).recv_x, idx, w)


def test_dispatch_rejects_more_tokens_than_the_buffer_holds(mesh):
    small = jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="reference",
                          max_tokens_per_rank=4)
    with pytest.raises(ValueError, match="exceed max_tokens_per_rank=4"):
        _dispatch(mesh, small, *_good())


def test_dispatch_of_zero_tokens_says_to_pad(mesh, buf):
    for layout, capacity in (("rank", None), ("expert", 4)):
        with pytest.raises(ValueError, match="x has 0 tokens: normal-mode dispatch needs at least "
                                             "one token per shard. Pad"):
            _dispatch(mesh, buf, *_good(0), layout=layout, capacity=capacity)


def test_dispatch_rejects_bad_capacity_and_layout(mesh, buf):
    with pytest.raises(ValueError, match="capacity=0 must be a positive int"):
        _dispatch(mesh, buf, *_good(), capacity=0)
    for capacity in (64.0, True, "64"):
        with pytest.raises(TypeError, match="capacity=.* must be a Python int"):
            _dispatch(mesh, buf, *_good(), capacity=capacity)
    with pytest.raises(ValueError, match="layout='token'"):
        _dispatch(mesh, buf, *_good(), layout="token")


@pytest.mark.parametrize("change, error, message", [
    (lambda q, s: (q, s, s), ValueError, "got a tuple of 3 items"),
    (lambda q, s: (q.astype(jnp.bfloat16), s), TypeError, "supported: float8_e4m3fn"),
    (lambda q, s: (q, s[:, :0]), ValueError, "FP8 scales must be float32 \\(8, 1\\)"),
    (lambda q, s: (q, s.astype(jnp.bfloat16)), ValueError, "FP8 scales must be float32"),
])
def test_dispatch_rejects_bad_fp8_tuples(mesh, buf, change, error, message):
    with pytest.raises(error, match=message):
        run_sharded(mesh, lambda x, i, w: buf.dispatch(change(*jax_ep.quantize_fp8(x)), i, w)
                    .recv_topk_idx, *_good())


def _fp8_loss(mesh, buf, fp8, layout="rank"):
    """(x, topk_weights) -> a loss through dispatch's recv_x and recv_topk_weights."""
    x, idx, _ = _distinct()

    def body(x, i, w):
        out = buf.dispatch(jax_ep.quantize_fp8(x) if fp8 else x, i, w, layout=layout)
        rows = jax_ep.dequantize_fp8(*out.recv_x) if fp8 else out.recv_x
        return (rows.sum() + (out.recv_topk_weights ** 2).sum())[None]

    fn = jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep"))
    return lambda x, w: fn(x, idx, w).sum(), x


@pytest.mark.parametrize("layout", ["rank", "expert"])
def test_fp8_dispatch_gradient(mesh, buf, layout):
    """jax.grad reaching an FP8 x raises at trace time; the topk_weights gradient works and
    equals the bf16/f32 path's."""
    w = _distinct()[2]
    loss, x = _fp8_loss(mesh, buf, True, layout)
    with pytest.raises(TypeError, match="dispatch with an FP8 x .* is not differentiable in x: "
                                        "jax.grad reached the FP8 tuple"):
        jax.jit(jax.grad(loss))(x, w)
    loss32, _ = _fp8_loss(mesh, buf, False, layout)
    dw, want = jax.jit(lambda x, w: (jax.grad(loss, argnums=1)(x, w),
                                     jax.grad(loss32, argnums=1)(x, w)))(x, w)
    np.testing.assert_array_equal(np.asarray(dw), np.asarray(want))
    routed = np.asarray(_distinct()[1]) >= 0
    np.testing.assert_allclose(np.asarray(dw)[routed], 2 * np.asarray(w)[routed], rtol=1e-6)


def test_nan_and_inf_pass_through(mesh, buf):
    """Values are moved, never inspected: only the rows of the token holding NaN / Inf and
    its combined output carry them."""
    x, idx, w = _good()
    x = x.at[3, 5].set(jnp.nan).at[T + 1, 7].set(jnp.inf)
    body = lambda x, i, w: (_round_trip(buf, "rank")(x, i, w),  # noqa: E731
                            _round_trip(buf, "expert")(x, i, w))
    for out in run_sharded(mesh, body, x, idx, w, out_specs=(P("ep"), P("ep"))):
        out = np.asarray(out)
        bad = ~np.isfinite(out)
        assert np.isnan(out[3, 5]) and np.isinf(out[T + 1, 7])
        assert bad.sum() == 2
        np.testing.assert_allclose(out[~bad], np.asarray(x)[~bad], rtol=1e-6)


def test_negative_weights_pass_through(mesh, buf):
    x, idx, w = _distinct()
    w = -w
    recv_w, recv_i = run_sharded(mesh, lambda x, i, w: (lambda o: (o.recv_topk_weights,
                                                                   o.recv_topk_idx))(
        buf.dispatch(x, i, w)), x, idx, w, out_specs=(P("ep"), P("ep")))
    recv_w = np.asarray(recv_w)
    assert (recv_w[np.asarray(recv_i) >= 0] < 0).all() and set(np.unique(recv_w)) >= {0.0}


def _ll_round_trip(buf):
    def body(x, i, w):
        out = buf.low_latency_dispatch(x, i)
        return buf.low_latency_combine(out.recv_x, i, w, out.handle)
    return body


@pytest.mark.parametrize("layout", ["rank", "expert", "low_latency"])
def test_repeated_experts_documented_behaviour(mesh, buf, layout):
    """A token naming expert 3 in both slots (outside the normal-mode contract): one row per
    (token, rank) / (token, expert) with both slots' ids and weights; the topk_weights
    gradient reaches every slot in the rank layout and in low latency, only the first slot
    in the expert layout (docs/bad_input.md). check_topk_idx finds it."""
    x = _good()[0]
    idx = jnp.full((R * T, K), 3, jnp.int32)
    w = jnp.asarray(np.random.default_rng(2).random((R * T, K)), jnp.float32)
    body = _ll_round_trip(buf) if layout == "low_latency" else _round_trip(buf, layout)

    def loss(w):
        fn = jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep"))
        return fn(x, idx, w).sum()

    value, dw = jax.jit(jax.value_and_grad(loss))(w)
    want = (np.asarray(x) * np.asarray(w).sum(1, keepdims=True)).sum()
    np.testing.assert_allclose(float(value), want, rtol=1e-5)  # both weights count
    row_sums = np.asarray(x).sum(1)
    np.testing.assert_allclose(np.asarray(dw)[:, 0], row_sums, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw)[:, 1], 0.0 if layout == "expert" else row_sums,
                               rtol=1e-4, atol=1e-5)
    assert not bool(check_topk_idx(idx, E))


# ------------------------------------------------------------------ combine
def test_combine_rejects_a_bias_of_the_wrong_shape(mesh, buf):
    def body(x, i, w):
        out = buf.dispatch(x, i, w)
        return buf.combine(out.recv_x, out.handle, bias=x[:1])
    with pytest.raises(ValueError, match="bias must be \\[8, 128\\]"):
        run_sharded(mesh, body, *_good())


@pytest.mark.parametrize("bias, error, message", [
    (lambda x: 0.0, TypeError, "bias must be a \\[8, 128\\] array \\(or None\\), got float; for a "
                               "constant, pass jnp.full"),
    (lambda x: x.astype(jnp.int32), TypeError, "bias has dtype int32; supported: bfloat16, "
                                               "float32"),
    (lambda x: x.astype(jnp.float16), TypeError, "bias has dtype float16"),
])
def test_combine_rejects_a_bias_of_the_wrong_type(mesh, buf, bias, error, message):
    def body(x, i, w):
        out = buf.dispatch(x, i, w)
        return buf.combine(out.recv_x, out.handle, bias=bias(x))
    with pytest.raises(error, match=message):
        run_sharded(mesh, body, *_good())


def test_combine_casts_a_bfloat16_bias(mesh, buf):
    def body(x, i, w):
        out = buf.dispatch(x, i, w)
        return (buf.combine(out.recv_x, out.handle, bias=x.astype(jnp.bfloat16)),
                buf.combine(out.recv_x, out.handle, bias=x.astype(jnp.bfloat16).astype(x.dtype)))
    got, want = run_sharded(mesh, body, *_good(), out_specs=(P("ep"), P("ep")))
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("layout", ["rank", "expert"])
def test_combine_rejects_more_rows_after_drops(mesh, buf, layout):
    """capacity=5 drops rows; the default-capacity rows do not fit the handle."""
    def body(x, i, w):
        full = buf.dispatch(x, i, w, layout=layout)
        dropped = buf.dispatch(x, i, w, layout=layout, capacity=5)
        return buf.combine(full.recv_x, dropped.handle)
    with pytest.raises(ValueError, match=f"x has {R * T * (1 if layout == 'rank' else K)} rows but "
                                         f"the dispatch that made the handle returned 5 rows"):
        run_sharded(mesh, body, *_good())


def test_combine_rejects_a_low_latency_handle(mesh, buf):
    def body(x, i, w):
        out = buf.dispatch(x, i, w)
        return buf.combine(out.recv_x, buf.low_latency_dispatch(x, i).handle)
    with pytest.raises(ValueError, match="handle must be a jax_ep.Handle, got LowLatencyHandle"):
        run_sharded(mesh, body, *_good())


def test_combine_reads_same_count_rows_in_the_handles_layout(mesh, buf):
    """Not detectable: rank-layout rows with an expert-layout handle of the same capacity
    are read as expert-layout rows (documented: rows must be recv_x's, in its order)."""
    def body(x, i, w):
        rank = buf.dispatch(x, i, w, capacity=R * T * K)
        expert = buf.dispatch(x, i, w, layout="expert", capacity=R * T * K)
        return buf.combine(rank.recv_x, expert.handle), buf.combine(expert.recv_x, expert.handle)
    x, i, w = _distinct()
    mixed, right = run_sharded(mesh, body, x, i, w, out_specs=(P("ep"), P("ep")))
    assert not np.allclose(np.asarray(mixed), np.asarray(right))


# ------------------------------------------------------------------ low latency
def test_low_latency_default_m_is_the_token_count(mesh):
    """A Buffer of max_tokens_per_rank=4096: 8 tokens give recv_x [L, R * 8, H], not
    [L, R * 4096, H]; an explicit M still works, and every variant combines alike."""
    big = jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="reference")
    x, idx, w = _distinct()

    def body(x, i, w):
        fused = big.low_latency_dispatch(x, i)
        hooked = big.low_latency_dispatch_recv(big.low_latency_dispatch_send(x, i))
        wide = big.low_latency_dispatch(x, i, max_tokens_per_rank=2 * T)
        assert fused.recv_x.shape == hooked.recv_x.shape == (L, R * T, H)
        assert fused.handle.row_of_slot.shape == (R, T, K) and fused.handle.num_tokens == T
        assert hooked.handle.num_tokens == T and wide.handle.num_tokens == T
        assert wide.recv_x.shape == (L, R * 2 * T, H)
        return (big.low_latency_combine(fused.recv_x, i, w, fused.handle),
                big.low_latency_combine_recv(big.low_latency_combine_send(
                    hooked.recv_x, i, w, hooked.handle)),
                big.low_latency_combine(wide.recv_x, i, w, wide.handle))

    a, b, c = (np.asarray(o) for o in run_sharded(mesh, body, x, idx, w,
                                                 out_specs=(P("ep"),) * 3))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(max_tokens_per_rank=8.0), TypeError, "max_tokens_per_rank=8.0 .* must be a Python int"),
    (dict(max_tokens_per_rank=True), TypeError, "max_tokens_per_rank=True .* must be a Python int"),
    (dict(max_tokens_per_rank=0), ValueError, "max_tokens_per_rank=0 must be a positive int"),
    (dict(max_tokens_per_rank=4), ValueError, "x has 8 tokens, more than max_tokens_per_rank=4"),
    (dict(max_tokens_per_rank=16), ValueError, "max_tokens_per_rank=16 exceeds the Buffer's"),
    (dict(fp8="no"), TypeError, "fp8='no' must be True or False"),
    (dict(mask=1), TypeError, "mask=1 must be True or False"),
    (dict(round_scale=True), ValueError, "round_scale=True only applies with fp8=True"),
])
@pytest.mark.parametrize("hook", [False, True])
def test_low_latency_dispatch_rejects_bad_options(mesh, buf, kwargs, error, message, hook):
    op = buf.low_latency_dispatch_send if hook else buf.low_latency_dispatch
    with pytest.raises(error, match=message):
        run_sharded(mesh, lambda x, i: jax.tree.leaves(op(x, i, **kwargs))[0], *_good()[:2])


@pytest.mark.parametrize("num_tokens, message", [
    (0, "x has 0 tokens: low-latency ops need at least one token per rank; pad"),
    (2 * T, "x has 16 tokens but the Buffer takes at most max_tokens_per_rank=8"),
])
def test_low_latency_dispatch_rejects_token_counts(mesh, buf, num_tokens, message):
    with pytest.raises(ValueError, match=message):
        run_sharded(mesh, lambda x, i: buf.low_latency_dispatch(x, i).recv_x,
                    *_good(num_tokens)[:2])


def _capped(mesh, cap, max_tokens_per_rank=T):
    return jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="reference",
                         max_tokens_per_rank=max_tokens_per_rank,
                         low_latency_max_tokens_per_rank=cap)


@pytest.mark.parametrize("op", [op for op in _ops(None) if op.startswith("low_latency_")])
def test_low_latency_ops_of_a_buffer_made_without_them_raise(mesh, op):
    """low_latency_max_tokens_per_rank=0: every low-latency op, receives of hand-made pending
    values included, raises at trace time."""
    no_ll = _capped(mesh, 0)
    with pytest.raises(ValueError, match=f"Buffer.{op}: this Buffer was made with "
                                         "low_latency_max_tokens_per_rank=0, so it runs no "
                                         "low-latency ops. Make the Buffer with a positive "
                                         "low_latency_max_tokens_per_rank"):
        run_sharded(mesh, _ops(no_ll)[op], *_good())


def test_normal_mode_of_a_buffer_made_without_low_latency_ops(mesh, buf):
    no_ll = _capped(mesh, 0)
    got = run_sharded(mesh, _round_trip(no_ll), *_good())
    np.testing.assert_array_equal(np.asarray(got), np.asarray(run_sharded(mesh, _round_trip(buf),
                                                                          *_good())))


@pytest.mark.parametrize("hook", [False, True])
def test_low_latency_ops_are_capped_by_low_latency_max_tokens_per_rank(mesh, hook):
    """A Buffer of max_tokens_per_rank=2T, low_latency_max_tokens_per_rank=T: low-latency ops
    take at most T tokens and M <= T; dispatch still takes 2T tokens."""
    capped = _capped(mesh, T, max_tokens_per_rank=2 * T)
    op = capped.low_latency_dispatch_send if hook else capped.low_latency_dispatch
    run = lambda num_tokens, **kw: run_sharded(  # noqa: E731
        mesh, lambda x, i: jax.tree.leaves(op(x, i, **kw))[0], *_good(num_tokens)[:2])
    run(T)
    run(T // 2, max_tokens_per_rank=T)
    with pytest.raises(ValueError, match=f"x has {2 * T} tokens but the Buffer takes at most "
                                         f"low_latency_max_tokens_per_rank={T} per rank; make "
                                         "the Buffer with a larger "
                                         "low_latency_max_tokens_per_rank"):
        run(2 * T)
    with pytest.raises(ValueError, match=f"max_tokens_per_rank={T + 1} exceeds the Buffer's "
                                         f"low_latency_max_tokens_per_rank={T}"):
        run(T, max_tokens_per_rank=T + 1)
    _dispatch(mesh, capped, *_good(2 * T))


@pytest.mark.parametrize("hook", [False, True])
def test_low_latency_combine_refuses_a_handle_above_the_cap(mesh, hook):
    """A hand-made handle whose M exceeds low_latency_max_tokens_per_rank (one of the Buffer's
    own dispatches cannot make one)."""
    capped = _capped(mesh, T // 2)
    op = capped.low_latency_combine_send if hook else capped.low_latency_combine

    def body(x, i, w):
        handle = jax_ep.LowLatencyHandle(jnp.zeros((R, T, K), jnp.int32), buffer_id=capped.id)
        return jax.tree.leaves(op(jnp.zeros((L, R * T, H), jnp.float32), i, w, handle))[0]
    with pytest.raises(ValueError, match=f"the handle was made for max_tokens_per_rank={T}, "
                                         "more than the Buffer's "
                                         f"low_latency_max_tokens_per_rank={T // 2}"):
        run_sharded(mesh, body, *_good())


def test_low_latency_fp8_gradient_raises(mesh, buf):
    x, idx, _ = _distinct()

    def loss(x):
        def body(x, i):
            out = buf.low_latency_dispatch(x, i, fp8=True)
            return jax_ep.dequantize_fp8(out.recv_x, out.recv_scales).sum()[None]
        return jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 2, out_specs=P("ep"))(
            x, idx).sum()
    with pytest.raises(TypeError, match="low_latency_dispatch with fp8=True is not "
                                        "differentiable: jax.grad reached its x"):
        jax.jit(jax.grad(loss))(x)
    assert np.isfinite(float(jax.jit(loss)(x)))


def _hooked_loss(mesh, buf, fp8=False):
    x, idx, w = _distinct()

    def body(x, i, w):
        out = buf.low_latency_dispatch_recv(buf.low_latency_dispatch_send(x, i, fp8=fp8))
        rows = jax_ep.dequantize_fp8(out.recv_x, out.recv_scales) if fp8 else out.recv_x
        return buf.low_latency_combine_recv(
            buf.low_latency_combine_send(rows, i, w, out.handle))
    fn = jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep"))
    return lambda x, w: fn(x, idx, w).sum(), x, w


def test_hooked_halves_under_grad(mesh, monkeypatch):
    """The reference backend differentiates its hooked halves as plain JAX (not with fp8);
    on another backend (custom calls without a derivative) jax.grad raises at trace time."""
    buf = jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="reference",
                        max_tokens_per_rank=T)
    loss, x, w = _hooked_loss(mesh, buf)
    jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    loss8, _, _ = _hooked_loss(mesh, buf, fp8=True)
    with pytest.raises(TypeError, match="low_latency_dispatch_send with fp8=True is not "
                                        "differentiable.*low_latency_dispatch with fp8=False"):
        jax.jit(jax.grad(loss8))(x, w)
    monkeypatch.setattr(buf._backend, "name", "cuda")
    with pytest.raises(TypeError, match="low_latency_dispatch_send on the cuda backend is not "
                                        "differentiable.*use the fused op "
                                        "\\(low_latency_dispatch\\)"):
        jax.jit(jax.grad(loss))(x, w)
    with pytest.raises(TypeError, match="low_latency_combine_send on the cuda backend is not "
                                        "differentiable"):
        jax.jit(jax.grad(loss, argnums=1))(x, w)
    jax.jit(loss)(x, w)  # the forward is unaffected


def test_low_latency_combine_rejects_a_wrong_layout(mesh, buf):
    def body(x, i, w):
        out = buf.low_latency_dispatch(x, i)
        return buf.low_latency_combine(out.recv_x[:, :1], i, w, out.handle)
    with pytest.raises(ValueError, match="local experts, R \\* max_tokens_per_rank, hidden"):
        run_sharded(mesh, body, *_good())


@pytest.mark.parametrize("change, error, message", [
    (lambda i, w: (i[:4], w[:4]), ValueError,
     "topk_idx has shape \\(4, 2\\) but the handle was made for top-k 2 and 8 tokens"),
    (lambda i, w: (i[:, :1], w[:, :1]), ValueError, "made for top-k 2 and 8 tokens"),
    (lambda i, w: (i[None], w[None]), ValueError, "topk_idx must be int32 \\[num_tokens, top_k\\]"),
    (lambda i, w: (i, w[:, :1]), ValueError, "topk_weights has shape \\(8, 1\\)"),
    (lambda i, w: (i, w.astype(jnp.bfloat16)), TypeError, "topk_weights must be float32"),
])
@pytest.mark.parametrize("hook", [False, True])
def test_low_latency_combine_rejects_another_topk(mesh, buf, change, error, message, hook):
    op = buf.low_latency_combine_send if hook else buf.low_latency_combine

    def body(x, i, w):
        out = buf.low_latency_dispatch(x, i)
        return jax.tree.leaves(op(out.recv_x, *change(i, w), out.handle))[0]
    with pytest.raises(error, match=message):
        run_sharded(mesh, body, *_good())


def test_low_latency_combine_rejects_bad_x_handle_and_mask(mesh, buf):
    def call(**kw):
        def body(x, i, w):
            out = buf.low_latency_dispatch(x, i)
            args = dict(x=out.recv_x, handle=out.handle, mask=False)
            args.update({k: f(out, x, i) for k, f in kw.items()})
            return buf.low_latency_combine(args["x"], i, w, args["handle"], mask=args["mask"])
        return run_sharded(mesh, body, *_good())
    with pytest.raises(TypeError, match="x has dtype float16; supported: bfloat16, float32"):
        call(x=lambda o, x, i: o.recv_x.astype(jnp.float16))
    with pytest.raises(TypeError, match="x must be an array"):
        call(x=lambda o, x, i: 0.0)
    with pytest.raises(ValueError, match="handle must be a jax_ep.LowLatencyHandle, got Handle"):
        call(handle=lambda o, x, i: buf.dispatch(x, i, jnp.ones(i.shape, jnp.float32)).handle)
    with pytest.raises(TypeError, match="mask='yes' must be True or False"):
        call(mask=lambda o, x, i: "yes")


def test_receives_check_the_pending_value(mesh, buf):
    other = jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="reference",
                          max_tokens_per_rank=T)

    def body(recv, send):
        def fn(x, i, w):
            return jax.tree.leaves(recv(send(x, i, w)))[0]
        return fn
    dispatch_send = lambda x, i, w: buf.low_latency_dispatch_send(x, i)  # noqa: E731
    cases = [
        (buf.low_latency_combine_recv, dispatch_send,
         "pass the LowLatencyPending returned by this Buffer's low_latency_combine_send"),
        (buf.low_latency_dispatch_recv, lambda x, i, w: (x, i),
         "pass the LowLatencyPending returned by this Buffer's low_latency_dispatch_send"),
        (other.low_latency_dispatch_recv, dispatch_send,
         f"this pending op was sent by Buffer {buf.id}; receive it on that Buffer"),
    ]
    for recv, send, message in cases:
        with pytest.raises(ValueError, match=message):
            run_sharded(mesh, body(recv, send), *_good())


def test_a_pending_received_twice_is_not_detected_at_trace_time(mesh, buf):
    """Documented: the reference backend returns the same results again (the CUDA backend
    skips the second receive and records the failure for Buffer.check)."""
    def body(x, i, w):
        pending = buf.low_latency_dispatch_send(x, i)
        return (buf.low_latency_dispatch_recv(pending).recv_x,
                buf.low_latency_dispatch_recv(pending).recv_x)
    a, b = run_sharded(mesh, body, *_good(), out_specs=(P("ep"), P("ep")))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ check_topk_idx
def test_check_topk_idx(mesh, buf):
    idx = np.asarray(_distinct()[1])
    cases = {"valid": idx, "too large": idx.copy(), "below -1": idx.copy(), "repeated": idx.copy()}
    cases["too large"][5, 0] = E
    cases["below -1"][9, 1] = -2
    cases["repeated"][T + 2] = 7
    want = {"valid": True, "too large": False, "below -1": False, "repeated": False}
    for name, value in cases.items():
        got = run_sharded(mesh, lambda i: buf.check_topk_idx(i)[None], jnp.asarray(value))
        assert bool(np.asarray(got).all()) == want[name], name
        assert bool(check_topk_idx(value, E)) == want[name], name  # global, outside shard_map
    assert bool(check_topk_idx(cases["repeated"], E, distinct=False))
    assert bool(check_topk_idx(np.zeros((0, K), np.int32), E))
    with pytest.raises(TypeError, match="num_experts=16.0 .* must be a Python int"):
        check_topk_idx(idx, 16.0)
    with pytest.raises(TypeError, match="topk_idx must be an integer array"):
        check_topk_idx(idx.astype(np.float32), E)


def test_check_topk_idx_with_checkify(mesh, buf):
    def body(i):
        checkify.check(buf.check_topk_idx(i), "topk_idx: ids outside [0, E) or repeated")
        return i
    fn = checkify.checkify(jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"),
                                                 out_specs=P("ep"))))
    idx = _distinct()[1]
    err, _ = fn(idx)
    assert err.get() is None
    err, _ = fn(idx.at[T + 3, 1].set(E + 5))
    assert "topk_idx: ids outside" in err.get()


def test_region_bytes_sizes_must_be_ints():
    with pytest.raises(TypeError, match="hidden=7168.0 .* must be a Python int"):
        jax_ep.region_bytes(8, num_experts=256, hidden=7168.0)


def test_region_bytes_nodes_must_divide_the_ranks():
    with pytest.raises(ValueError, match="num_ranks_per_node=3 must divide num_ranks=8"):
        jax_ep.region_bytes(8, num_experts=256, hidden=7168, num_ranks_per_node=3)


@pytest.mark.parametrize("value, error, message", [
    (128.0, TypeError, "low_latency_max_tokens_per_rank=128.0 .* must be a Python int"),
    (-1, ValueError, "low_latency_max_tokens_per_rank=-1 must be 0 or a positive int"),
    (8192, ValueError, "low_latency_max_tokens_per_rank=8192 exceeds max_tokens_per_rank=4096"),
])
def test_region_bytes_checks_low_latency_max_tokens_per_rank(value, error, message):
    with pytest.raises(error, match=message):
        jax_ep.region_bytes(16, num_experts=256, hidden=7168, max_tokens_per_rank=4096,
                            low_latency_max_tokens_per_rank=value, num_ranks_per_node=8)
