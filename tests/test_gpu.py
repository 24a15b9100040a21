"""The CUDA backend against the reference backend, on random data, on local GPUs.

Run on a GPU machine with `python -m pytest -m gpu tests/test_gpu.py` (scripts/gpu_suite.sh).
Data movement is exact and both backends sum in float32 in the same order, so outputs are
compared for equality, the combine's too (tests/test_gpu_hardening.py checks it bit for bit).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import jax_ep
from conftest import run_sharded
from helpers import inputs

pytestmark = pytest.mark.gpu


def _gpus():
    return [d for d in jax.devices() if d.platform == "gpu"]


def _mesh(num_ranks, shape=None, names=("ep",)):
    gpus = _gpus()
    if len(gpus) < num_ranks:
        pytest.skip(f"needs {num_ranks} GPUs, found {len(gpus)}")
    return Mesh(np.array(gpus[:num_ranks]).reshape(shape or (num_ranks,)), names)


_buffers = {}


def _pair(num_ranks, hidden, num_experts, max_tokens=4096):
    """(cuda Buffer, reference Buffer) on the first num_ranks GPUs, cached across tests."""
    key = (num_ranks, hidden, num_experts, max_tokens)
    if key not in _buffers:
        mesh = _mesh(num_ranks)
        _buffers[key] = (mesh,
                         jax_ep.Buffer(mesh, "ep", num_experts=num_experts, hidden=hidden,
                                       backend="cuda", max_tokens_per_rank=max_tokens),
                         jax_ep.Buffer(mesh, "ep", num_experts=num_experts, hidden=hidden,
                                       backend="reference", max_tokens_per_rank=max_tokens))
    return _buffers[key]


def _round_trip(buf, mesh, x, idx, w, y_scale, bias, layout, capacity):
    """dispatch -> (rows * y_scale) -> combine(bias); every output and handle array."""
    def body(x, idx, w, bias):
        out = buf.dispatch(x, idx, w, layout=layout, capacity=capacity)
        y = (out.recv_x.astype(jnp.float32) * y_scale).astype(x.dtype)
        combined = buf.combine(y, out.handle, bias=bias)
        return (out.recv_x, out.recv_topk_idx, out.recv_topk_weights, out.num_recv_tokens[None],
                out.num_recv_tokens_per_expert, out.num_dropped[None], out.handle.send_pos,
                out.handle.num_tokens_matrix, out.handle.pair_expert_rows, combined)
    return [np.asarray(o.astype(jnp.float32) if o.dtype == jnp.bfloat16 else o)
            for o in run_sharded(mesh, body, x, idx, w, bias, out_specs=(P("ep"),) * 10)]


def _compare(got, want):
    names = ("recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens",
             "num_recv_tokens_per_expert", "num_dropped", "send_pos", "num_tokens_matrix",
             "pair_expert_rows")
    for name, g, v in zip(names, got, want):
        np.testing.assert_array_equal(g, v, err_msg=name)
    np.testing.assert_array_equal(got[9], want[9], err_msg="combine")


CASES = [  # (ranks, tokens, hidden, experts, topk)
    (2, 127, 2048, 8, 2),
    (2, 1, 4096, 64, 8),
    (4, 127, 7168, 256, 8),
    (4, 4096, 7168, 256, 8),
    (4, 4096, 2048, 64, 1),
    (4, 1, 2048, 8, 2),
    (2, 4096, 4096, 256, 8),
    (8, 4096, 7168, 256, 8),  # EP8: skipped below 8 GPUs
    (8, 127, 2048, 64, 4),
]


@pytest.mark.parametrize("layout", ["rank", "expert"])
@pytest.mark.parametrize("num_ranks, num_tokens, hidden, num_experts, topk", CASES)
def test_cuda_matches_reference(num_ranks, num_tokens, hidden, num_experts, topk, layout):
    mesh, cuda, ref = _pair(num_ranks, hidden, num_experts)
    rng = np.random.default_rng(num_tokens + hidden + topk)
    x, idx, w = inputs(rng, num_ranks, num_tokens, hidden, num_experts, topk, jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16)
    capacity = num_ranks * num_tokens  # rank layout: the worst case, every token to every rank
    if layout == "expert":
        # The most (token, expert) pairs a rank receives plus 256 padding rows (compared too),
        # at most the worst case R*T*min(topk, E/R): that is 3.8 GB per GPU at EP8, copied to
        # the host twice, minutes of a test for nothing more checked.
        sel = np.asarray(idx)
        pairs = np.bincount(sel[sel >= 0] // (num_experts // num_ranks), minlength=num_ranks)
        capacity = min(int(pairs.max()) + 256, capacity * min(topk, num_experts // num_ranks))
    got = _round_trip(cuda, mesh, x, idx, w, 0.5, bias, layout, capacity)
    want = _round_trip(ref, mesh, x, idx, w, 0.5, bias, layout, capacity)
    _compare(got, want)


@pytest.mark.parametrize("layout", ["rank", "expert"])
def test_skewed_routing_and_overflow(layout):
    """Every token to expert 0 (rank 0 gets everything, others nothing), -1 slots, and a
    capacity far below the need: drops are counted, nothing else changes."""
    mesh, cuda, ref = _pair(4, 2048, 64)
    rng = np.random.default_rng(5)
    x, idx, w = inputs(rng, 4, 300, 2048, 64, 4, jnp.bfloat16)
    idx = np.asarray(idx).copy()
    idx[:, 0] = 0
    idx[:, 1:] = -1
    idx[::5, 0] = -1
    bias = jnp.zeros(x.shape, jnp.bfloat16)
    got = _round_trip(cuda, mesh, x, jnp.asarray(idx), w, 1.0, bias, layout, 500)
    want = _round_trip(ref, mesh, x, jnp.asarray(idx), w, 1.0, bias, layout, 500)
    _compare(got, want)
    assert got[5].reshape(-1)[0] == 4 * 240 - 500


def test_float32_and_fp8_inputs():
    mesh, cuda, ref = _pair(4, 4096, 64)
    rng = np.random.default_rng(6)
    x, idx, w = inputs(rng, 4, 127, 4096, 64, 4, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    for layout in ("rank", "expert"):
        _compare(_round_trip(cuda, mesh, x, idx, w, 2.0, bias, layout, 4 * 127 * 4),
                 _round_trip(ref, mesh, x, idx, w, 2.0, bias, layout, 4 * 127 * 4))
    q, s = jax_ep.quantize_fp8(x)

    def body(buf):
        def f(q, s, idx, w):
            out = buf.dispatch((q, s), idx, w)
            return out.recv_x[0].astype(jnp.float32), out.recv_x[1], out.recv_topk_idx
        return [np.asarray(a) for a in run_sharded(mesh, f, q, s, idx, w, out_specs=(P("ep"),) * 3)]
    for g, v in zip(body(cuda), body(ref)):
        np.testing.assert_array_equal(g, v)


@pytest.mark.parametrize("layout", ["rank", "expert"])
def test_gradients_match_reference(layout):
    from jax_ep.demo import moe_layer
    mesh, cuda, ref = _pair(4, 2048, 64)
    rng = np.random.default_rng(7)
    x, idx, w = inputs(rng, 4, 256, 2048, 64, 4, jnp.bfloat16)
    w_all = jnp.asarray(rng.standard_normal((64, 2048, 2048)) / np.sqrt(2048), jnp.bfloat16)

    def grads(buf):
        def loss(x, w, w_all):
            fn = jax.shard_map(lambda x, i, w, we: moe_layer(buf, x, i, w, we, layout=layout),
                               mesh=mesh, in_specs=(P("ep"),) * 4, out_specs=P("ep"))
            return (fn(x, idx, w, w_all).astype(jnp.float32) ** 2).sum()
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, w_all)

    for g, v in zip(grads(cuda), grads(ref)):
        g, v = np.asarray(g, np.float32), np.asarray(v, np.float32)
        assert np.linalg.norm(g - v) <= 1e-2 * np.linalg.norm(v)


def test_thousand_back_to_back_calls_with_changing_routing():
    """Epochs, barriers and staging reuse survive many calls; inside one jit, around psum."""
    mesh, cuda, ref = _pair(4, 2048, 64, max_tokens=256)
    rng = np.random.default_rng(8)
    xs, idxs, ws = zip(*[inputs(rng, 4, 256, 2048, 64, 4, jnp.bfloat16) for _ in range(10)])
    xs, idxs, ws = jnp.stack(xs, 1), jnp.stack(idxs, 1), jnp.stack(ws, 1)  # [R*T, 10, ...]

    def body(buf, reps):
        def f(xs, idxs, ws):
            def step(acc, i):
                x, idx, w = xs[:, i % 10], idxs[:, i % 10], ws[:, i % 10]
                out = buf.dispatch(x, idx, w)
                y = buf.combine(out.recv_x, out.handle)
                total = jax.lax.psum(out.num_recv_tokens, "ep")
                return acc + y.astype(jnp.float32) * (total > 0), None
            acc, _ = jax.lax.scan(step, jnp.zeros_like(xs[:, 0], jnp.float32), jnp.arange(reps))
            return acc
        return np.asarray(run_sharded(mesh, f, xs, idxs, ws))
    ten = body(cuda, 10)
    # The reference's bf16 combine feeds float32 sums in the same program: XLA may skip its
    # rounding to bf16 there (xla_allow_excess_precision), so the sums differ in low bits.
    np.testing.assert_allclose(ten, body(ref, 10), rtol=2e-2, atol=1e-1)
    thousand = body(cuda, 1000)
    cuda.check()
    np.testing.assert_allclose(thousand, ten * 100, rtol=1e-4, atol=1e-3)


def test_dp_ep_mesh_on_four_gpus():
    mesh = _mesh(4, (2, 2), ("dp", "ep"))
    cuda = jax_ep.Buffer(mesh, "ep", num_experts=16, hidden=2048, backend="cuda",
                         max_tokens_per_rank=128)
    ref = jax_ep.Buffer(mesh, "ep", num_experts=16, hidden=2048, backend="reference")
    rng = np.random.default_rng(9)
    x, idx, w = inputs(rng, 4, 128, 2048, 16, 4, jnp.bfloat16)
    spec = P(("dp", "ep"))

    def run(buf):
        def f(x, idx, w):
            out = buf.dispatch(x, idx, w)
            return out.recv_x, buf.combine(out.recv_x, out.handle)
        return [np.asarray(a.astype(jnp.float32))
                for a in run_sharded(mesh, f, x, idx, w, in_specs=(spec,) * 3, out_specs=(spec, spec))]
    for g, v in zip(run(cuda), run(ref)):
        np.testing.assert_array_equal(g, v)


def test_layout_matches_reference():
    mesh, cuda, ref = _pair(4, 2048, 256)
    rng = np.random.default_rng(10)
    _, idx, _ = inputs(rng, 4, 4096, 128, 256, 8)

    def run(buf):
        def f(idx):
            lay = buf.get_dispatch_layout(idx)
            return (lay.num_tokens_per_rank[None], lay.num_tokens_per_rdma_rank[None],
                    lay.num_tokens_per_expert[None], lay.is_token_in_rank)
        return [np.asarray(a) for a in run_sharded(mesh, f, idx, out_specs=(P("ep"),) * 4)]
    for g, v in zip(run(cuda), run(ref)):
        np.testing.assert_array_equal(g, v)


def _poisoned(a):
    """A failed call's output: every element all-ones bits (NaN floats, -1 integers)."""
    a = np.asarray(a)
    return bool(np.all(np.isnan(a))) if np.issubdtype(a.dtype, np.floating) else bool(np.all(a == -1))


def test_missing_peer_times_out_with_an_error_and_the_process_stays_usable():
    """A rank whose peer never joins gives up after timeout_s: its outputs are poisoned (NaN,
    -1), Buffer.check() names the op and the rank (GPU 1 runs nothing: GPU 0 runs its shard
    as a program of its own, through the Buffer's backend), the next call fails (or, replayed from a
    command buffer, is poisoned too), and other Buffers keep working."""
    gpus = _gpus()
    if len(gpus) < 2:
        pytest.skip("needs 2 GPUs")
    pair_mesh = Mesh(np.array(gpus[:2]), ("ep",))
    buf = jax_ep.Buffer(pair_mesh, "ep", num_experts=8, hidden=2048, backend="cuda",
                        max_tokens_per_rank=16, timeout_s=2.0)
    alone = Mesh(np.array(gpus[:1]), ("ep",))  # rank 1 never runs the op
    rng = np.random.default_rng(11)
    x, idx, w = (a[:16] for a in inputs(rng, 1, 16, 2048, 8, 2, jnp.bfloat16))

    def run():  # the Buffer's backend directly: Buffer.dispatch refuses a 1-rank shard_map
        def f(x, i, w):
            recv_x, _, recv_idx, _, num_recv, *_ = buf._backend.dispatch(x, None, i, w, 32, False)
            return recv_x, num_recv[None], recv_idx
        return run_sharded(alone, f, x, idx, w, out_specs=(P("ep"),) * 3)
    recv_x, num_recv, recv_idx = run()
    assert _poisoned(recv_x.astype(jnp.float32)) and _poisoned(num_recv) and _poisoned(recv_idx)
    with pytest.raises(RuntimeError, match="dispatch.*rank 1"):
        buf.check()
    try:  # the error surfaces when the result is read
        assert _poisoned(run()[1])
    except jax.errors.JaxRuntimeError as err:  # the handler's error, without command buffers
        assert "dispatch" in str(err) and "rank 1" in str(err)
    mesh, cuda, ref = _pair(2, 2048, 8, max_tokens=16)
    x, idx, w = inputs(rng, 2, 16, 2048, 8, 2, jnp.bfloat16)
    bias = jnp.zeros(x.shape, jnp.bfloat16)
    _compare(_round_trip(cuda, mesh, x, idx, w, 1.0, bias, "rank", 32),
             _round_trip(ref, mesh, x, idx, w, 1.0, bias, "rank", 32))


def test_ops_issued_in_a_different_order_are_detected():
    """GPU 0 runs a dispatch while GPU 1 runs a combine as the same operation: both fail at
    once with an order error (not a timeout) instead of mixing data."""
    gpus = _gpus()
    if len(gpus) < 2:
        pytest.skip("needs 2 GPUs")
    buf = jax_ep.Buffer(Mesh(np.array(gpus[:2]), ("ep",)), "ep", num_experts=8, hidden=2048,
                        backend="cuda", max_tokens_per_rank=16, timeout_s=120.0)
    rng = np.random.default_rng(12)
    x, idx, w = (a[:16] for a in inputs(rng, 1, 16, 2048, 8, 2, jnp.bfloat16))
    # Everything GPU 1 needs is placed there first: GPU 0's stream is busy with the dispatch.
    on_1 = lambda a: jax.device_put(np.asarray(a), gpus[1])  # noqa: E731
    handle = jax_ep.Handle(on_1(np.full((16, 2), -1, np.int32)), on_1(np.zeros((2, 2), np.int32)),
                           on_1(np.zeros((0, 2), np.int32)), capacity=32, layout="rank",
                           buffer_id=buf.id)
    y = on_1(np.ones((32, 2048), jnp.bfloat16))
    on = [Mesh(np.array([g]), ("ep",)) for g in gpus[:2]]
    start = time.monotonic()
    backend = buf._backend  # each GPU's shard as a program of its own (a broken caller)
    dispatched = run_sharded(on[0], lambda x, i, w: backend.dispatch(x, None, i, w, 32, False)[0],
                             x, idx, w)
    combined = jax.jit(jax.shard_map(lambda y: backend.combine(y, handle, None, False), mesh=on[1],
                                     in_specs=P("ep"), out_specs=P("ep")))(y)
    jax.block_until_ready((dispatched, combined))
    assert time.monotonic() - start < 60, "an order mismatch must not wait for the time limit"
    assert _poisoned(dispatched.astype(jnp.float32)) and _poisoned(combined.astype(jnp.float32))
    with pytest.raises(RuntimeError, match="ran a (combine|dispatch) as operation #1"):
        buf.check()


def test_command_buffers_give_identical_results():
    """The same jitted round trip compiled without and with XLA command buffers (CUDA graphs,
    custom calls captured), replayed several times: bit-identical outputs."""
    mesh, cuda, _ = _pair(4, 4096, 64)
    rng = np.random.default_rng(13)
    x, idx, w = inputs(rng, 4, 127, 4096, 64, 4, jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16)

    def body(x, idx, w, bias):
        out = cuda.dispatch(x, idx, w, layout="expert")
        return out.recv_x, out.num_recv_tokens_per_expert, cuda.combine(out.recv_x, out.handle, bias=bias)
    f = jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 4, out_specs=(P("ep"),) * 3)
    plain = jax.jit(f, compiler_options={"xla_gpu_enable_command_buffer": ""})
    graphs = jax.jit(f, compiler_options={"xla_gpu_enable_command_buffer": "FUSION,CUSTOM_CALL",
                                          "xla_gpu_graph_min_graph_size": 1})
    want = [np.asarray(a.astype(jnp.float32)) for a in plain(x, idx, w, bias)]
    for _ in range(3):
        got = [np.asarray(a.astype(jnp.float32)) for a in graphs(x, idx, w, bias)]
        for g, v in zip(got, want):
            np.testing.assert_array_equal(g, v)
    cuda.check()


@pytest.mark.parametrize("layout", ["rank", "expert"])
def test_hooked_halves_on_one_host_equal_the_fused_ops(layout):
    """dispatch_send / dispatch_recv and combine_send / combine_recv of a one-host Buffer (the
    send half runs the fused op) give the fused ops' outputs bit for bit, handle included."""
    mesh, cuda, _ = _pair(2, 2048, 16)
    rng = np.random.default_rng(14)
    x, idx, w = inputs(rng, 2, 64, 2048, 16, 4, jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16)

    def run(hooked):
        def body(x, idx, w, bias):
            if hooked:
                pending, extra = jax_ep.overlap(cuda.dispatch_send(x, idx, w, layout=layout),
                                                jnp.sin, x)
                out = cuda.dispatch_recv(pending)
                y = cuda.combine_recv(cuda.combine_send(out.recv_x, out.handle, bias=bias))
            else:
                out, extra = cuda.dispatch(x, idx, w, layout=layout), jnp.sin(x)
                y = cuda.combine(out.recv_x, out.handle, bias=bias)
            return (out.recv_x, out.recv_topk_idx, out.recv_topk_weights,
                    out.num_recv_tokens_per_expert, out.handle.send_pos,
                    out.handle.pair_expert_rows, y, extra)
        outs = run_sharded(mesh, body, x, idx, w, bias, out_specs=(P("ep"),) * 8)
        return [np.asarray(o.astype(jnp.float32) if o.dtype == jnp.bfloat16 else o) for o in outs]
    for got, want in zip(run(True), run(False)):
        np.testing.assert_array_equal(got, want)
    cuda.check()
