"""Low-latency mode: the CUDA kernels against the reference backend, on random data, on local
GPUs (one process driving them; tests/mp_worker.py covers one process per GPU).

Run on a GPU machine with `python -m pytest -m gpu tests/test_gpu_low_latency.py`
(scripts/gpu_suite.sh). Rows move exactly (FP8 is cast with the same arithmetic), so
dispatch outputs are compared for equality on the rows the contract defines (rows past
recv_count are unspecified); the combine within one bf16 ulp (see _compare).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import jax_ep
from conftest import run_sharded
from helpers import routing

pytestmark = pytest.mark.gpu


def _gpus():
    return [d for d in jax.devices() if d.platform == "gpu"]


def _mesh(num_ranks):
    gpus = _gpus()
    if len(gpus) < num_ranks:
        pytest.skip(f"needs {num_ranks} GPUs, found {len(gpus)}")
    return Mesh(np.array(gpus[:num_ranks]), ("ep",))


_buffers = {}


def _pair(num_ranks, hidden, num_experts, max_tokens=256):
    key = (num_ranks, hidden, num_experts, max_tokens)
    if key not in _buffers:
        mesh = _mesh(num_ranks)
        _buffers[key] = (mesh, *(jax_ep.Buffer(mesh, "ep", num_experts=num_experts, hidden=hidden,
                                               backend=b, max_tokens_per_rank=max_tokens,
                                               timeout_s=60.0)
                                 for b in ("cuda", "reference")))
    return _buffers[key]


def _inputs(rng, num_ranks, num_tokens, hidden, num_experts, topk, dtype=jnp.bfloat16,
            distinct=True):
    total = num_ranks * num_tokens
    x = jnp.asarray(rng.standard_normal((total, hidden)), dtype)
    if distinct:
        idx = routing(rng, total, num_experts, topk)
    else:  # repeated experts in a token and out-of-range ids too
        idx = rng.integers(-1, num_experts + 2, (total, topk)).astype(np.int32)
    w = rng.random((total, topk)).astype(np.float32)
    return x, jnp.asarray(idx), jnp.asarray(w)


def _round_trip(buf, mesh, x, idx, w, m, fp8, hook, round_scale=False):
    """dispatch -> rows * 1.5 (dequantized with fp8) -> combine; every output, fused or hooked."""
    def body(x, idx, w):
        kw = dict(max_tokens_per_rank=m, fp8=fp8, round_scale=round_scale)
        if hook:
            out = buf.low_latency_dispatch_recv(buf.low_latency_dispatch_send(x, idx, **kw))
        else:
            out = buf.low_latency_dispatch(x, idx, **kw)
        rows = out.recv_x.astype(jnp.float32)
        if fp8:
            rows = jax_ep.dequantize_fp8(out.recv_x, out.recv_scales)
        y = (rows * 1.5).astype(x.dtype)
        if hook:
            combined = buf.low_latency_combine_recv(
                buf.low_latency_combine_send(y, idx, w, out.handle))
        else:
            combined = buf.low_latency_combine(y, idx, w, out.handle)
        scales = out.recv_scales if fp8 else jnp.zeros((1,), jnp.float32)
        return (out.recv_x.astype(jnp.float32), scales, out.recv_count,
                out.handle.row_of_slot, combined.astype(jnp.float32))
    outs = run_sharded(mesh, body, x, idx, w, out_specs=(P("ep"),) * 5)
    return [np.asarray(o) for o in outs]


def _valid_rows(recv_count, num_ranks):
    """bool [R * L, R * M]: rows the contract defines (row < recv_count of its expert)."""
    counts = recv_count.reshape(-1)
    return lambda rows_per_expert: np.arange(rows_per_expert)[None, :] < counts[:, None]


def _compare(got, want, num_ranks, num_local):
    recv_x, scales, count, slots, combined = got
    w_recv_x, w_scales, w_count, w_slots, w_combined = want
    np.testing.assert_array_equal(count, w_count, err_msg="recv_count")
    np.testing.assert_array_equal(slots, w_slots, err_msg="row_of_slot")
    rows = recv_x.shape[1]
    valid = _valid_rows(count, num_ranks)(rows)  # [R * L, R * M]
    got_rows, want_rows = recv_x[valid], w_recv_x[valid]
    if scales.ndim == 3:
        # XLA:GPU (the reference here) rounds some ties between FP8 subnormals (multiples of
        # 2^-9 below 2^-6) away from the even neighbour; the kernels round to nearest even,
        # as XLA:CPU and ml_dtypes do. Everything else is bit-exact.
        subnormal = (np.abs(want_rows) < 2 ** -6) & (np.abs(got_rows - want_rows) <= 2 ** -9)
        got_rows = np.where(subnormal, want_rows, got_rows)
    np.testing.assert_array_equal(got_rows, want_rows, err_msg="recv_x")
    if scales.ndim == 3:
        np.testing.assert_array_equal(scales[valid], w_scales[valid], err_msg="recv_scales")
    # Within one bf16 ulp: the reference computes y = rows * 1.5 and its combine in one XLA
    # program, which may skip rounding y to bf16 (xla_allow_excess_precision), and with FP8 the
    # rows differ where those ties did. tests/test_gpu_hardening.py checks the combine bit for
    # bit on inputs that are exact in bf16.
    np.testing.assert_allclose(combined, w_combined, rtol=2 ** -6, atol=1e-2, err_msg="combine")


CASES = [  # (ranks, tokens, hidden, top-k, experts, fp8)
    (4, 128, 7168, 8, 256, False),
    (4, 128, 7168, 8, 256, True),
    (2, 1, 2048, 1, 8, False),
    (4, 17, 4096, 8, 64, True),
    (2, 256, 4096, 8, 64, False),
    (4, 256, 2048, 1, 256, True),
    (4, 17, 2048, 8, 8, False),
    (8, 128, 7168, 8, 256, True),  # EP8: skipped below 8 GPUs
    (8, 17, 4096, 8, 64, False),
]


@pytest.mark.parametrize("num_ranks,num_tokens,hidden,topk,num_experts,fp8", CASES)
@pytest.mark.parametrize("hook", [False, True])
def test_cuda_matches_reference(num_ranks, num_tokens, hidden, topk, num_experts, fp8, hook):
    mesh, cuda, ref = _pair(num_ranks, hidden, num_experts)
    rng = np.random.default_rng(num_tokens * 7 + topk + hook)
    x, idx, w = _inputs(rng, num_ranks, num_tokens, hidden, num_experts, topk)
    m = max(num_tokens, 128)
    _compare(_round_trip(cuda, mesh, x, idx, w, m, fp8, hook),
             _round_trip(ref, mesh, x, idx, w, m, fp8, False),
             num_ranks, num_experts // num_ranks)
    cuda.check()


@pytest.mark.parametrize("fp8,round_scale", [(False, False), (True, True)])
def test_float32_repeated_and_out_of_range_experts(fp8, round_scale):
    mesh, cuda, ref = _pair(4, 2048, 16)
    rng = np.random.default_rng(5)
    x, idx, w = _inputs(rng, 4, 33, 2048, 16, 6, jnp.float32, distinct=False)
    _compare(_round_trip(cuda, mesh, x, idx, w, 64, fp8, False, round_scale),
             _round_trip(ref, mesh, x, idx, w, 64, fp8, False, round_scale), 4, 4)


def test_hooked_results_are_identical_to_fused():
    mesh, cuda, _ = _pair(4, 4096, 64)
    rng = np.random.default_rng(6)
    x, idx, w = _inputs(rng, 4, 64, 4096, 64, 8)
    fused = _round_trip(cuda, mesh, x, idx, w, 128, True, False)
    hooked = _round_trip(cuda, mesh, x, idx, w, 128, True, True)
    valid = _valid_rows(fused[2], 4)(fused[0].shape[1])
    np.testing.assert_array_equal(hooked[0][valid], fused[0][valid])
    for g, v in zip(hooked[2:], fused[2:]):
        np.testing.assert_array_equal(g, v)


def test_two_sends_in_flight_received_in_order():
    """Two micro-batches: send A, send B, receive A, receive B (the double-batch overlap)."""
    mesh, cuda, ref = _pair(4, 2048, 32)
    rng = np.random.default_rng(7)
    xa, ia, _ = _inputs(rng, 4, 16, 2048, 32, 4)
    xb, ib, _ = _inputs(rng, 4, 16, 2048, 32, 4)

    def body(buf, hook):
        def f(xa, ia, xb, ib):
            if hook:
                pa = buf.low_latency_dispatch_send(xa, ia, max_tokens_per_rank=16)
                pb = buf.low_latency_dispatch_send(xb, ib, max_tokens_per_rank=16)
                a, b = buf.low_latency_dispatch_recv(pa), buf.low_latency_dispatch_recv(pb)
            else:
                a = buf.low_latency_dispatch(xa, ia, max_tokens_per_rank=16)
                b = buf.low_latency_dispatch(xb, ib, max_tokens_per_rank=16)
            return a.recv_count, b.recv_count, a.handle.row_of_slot, b.handle.row_of_slot
        return [np.asarray(o) for o in run_sharded(mesh, f, xa, ia, xb, ib, out_specs=(P("ep"),) * 4)]
    for g, v in zip(body(cuda, True), body(ref, False)):
        np.testing.assert_array_equal(g, v)
    cuda.check()


def test_command_buffers_give_identical_results():
    mesh, cuda, _ = _pair(4, 7168, 256)
    rng = np.random.default_rng(8)
    x, idx, w = _inputs(rng, 4, 128, 7168, 256, 8)

    def body(x, idx, w):
        out = cuda.low_latency_dispatch(x, idx, max_tokens_per_rank=128, fp8=True)
        y = jax_ep.dequantize_fp8(out.recv_x, out.recv_scales, jnp.bfloat16)
        pending = cuda.low_latency_combine_send(y, idx, w, out.handle)
        return out.recv_count, out.handle.row_of_slot, cuda.low_latency_combine_recv(pending)
    f = jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=(P("ep"),) * 3)
    plain = jax.jit(f, compiler_options={"xla_gpu_enable_command_buffer": ""})
    graphs = jax.jit(f, compiler_options={"xla_gpu_enable_command_buffer": "FUSION,CUSTOM_CALL",
                                          "xla_gpu_graph_min_graph_size": 1})
    want = [np.asarray(a.astype(jnp.float32)) for a in plain(x, idx, w)]
    for _ in range(3):
        for g, v in zip(graphs(x, idx, w), want):
            np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), v)
    cuda.check()


def test_thousand_back_to_back_calls_with_changing_routing():
    """1000 dispatch + combine round trips in one jitted loop, the routing rolled by one
    expert every step: the sum of the outputs matches the reference's."""
    mesh, cuda, ref = _pair(4, 2048, 32)
    rng = np.random.default_rng(9)
    x, idx, w = _inputs(rng, 4, 8, 2048, 32, 4)

    def run(buf, steps):
        def body(x, idx, w):
            def step(i, acc):
                i_idx = jnp.where(idx >= 0, (idx + i) % 32, -1)
                out = buf.low_latency_dispatch(x, i_idx, max_tokens_per_rank=8)
                return acc + buf.low_latency_combine(out.recv_x, i_idx, w, out.handle).astype(jnp.float32)
            return jax.lax.fori_loop(0, steps, step, jnp.zeros_like(x, jnp.float32))
        return np.asarray(run_sharded(mesh, body, x, idx, w))
    got, want = run(cuda, 1000), run(ref, 1000)
    assert np.linalg.norm(got - want) <= 1e-2 * np.linalg.norm(want)
    cuda.check()


def test_hook_schedule_puts_compute_between_send_and_receive():
    """In the compiled program, a matmul pinned with jax_ep.overlap runs between the send
    and the receive of a hooked dispatch."""
    mesh, cuda, _ = _pair(2, 4096, 16)

    def body(x, idx, a):
        pending = cuda.low_latency_dispatch_send(x, idx, max_tokens_per_rank=64)
        pending, shared = jax_ep.overlap(  # e.g. the shared expert
            pending, lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32), a)
        out = cuda.low_latency_dispatch_recv(pending)
        return out.recv_count, shared
    rng = np.random.default_rng(10)
    x, idx, _ = _inputs(rng, 2, 64, 4096, 16, 4)
    a = jnp.asarray(rng.standard_normal((2 * 1024, 1024)), jnp.bfloat16)
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=(P("ep"),) * 2))
    text = f.lower(x, idx, a).compile().as_text()
    entry = text[text.index("ENTRY"):]
    send = entry.index("jax_ep_low_latency_dispatch_send")
    recv = entry.index("jax_ep_low_latency_dispatch_recv")
    gemm = min(i for i in (entry.find("__cublas"), entry.find("gemm"), entry.find(" dot("))
               if i >= 0)
    assert send < gemm < recv, entry[:4000]


def _poisoned(a):
    a = np.asarray(a)
    return bool(np.all(np.isnan(a))) if np.issubdtype(a.dtype, np.floating) else bool(np.all(a == -1))


def test_a_rank_that_never_answers_is_masked_or_reported():
    """Rank 1 of a 2-rank Buffer never runs: with mask=True rank 0 masks it, reports it in
    masked_ranks() and keeps decoding without it (its own tokens only, the next call without
    waiting); without mask the op fails with poisoned outputs and an error naming op and rank."""
    gpus = _gpus()
    if len(gpus) < 2:
        pytest.skip("needs 2 GPUs")
    alone = Mesh(np.array(gpus[:1]), ("ep",))
    rng = np.random.default_rng(11)
    x, idx, w = (a[:16] for a in _inputs(rng, 1, 16, 2048, 8, 4))
    idx = jnp.asarray(routing(rng, 16, 8, 4, empty_fraction=0))

    def make():
        return jax_ep.Buffer(Mesh(np.array(gpus[:2]), ("ep",)), "ep", num_experts=8, hidden=2048,
                             backend="cuda", max_tokens_per_rank=16, timeout_s=2.0)

    def compiled(buf, mask):  # through the backend: the Buffer refuses a 1-rank shard_map
        def f(x, i, w):
            recv_x, _, recv_count, handle = buf._backend.low_latency_dispatch(x, i, 16, False,
                                                                              False, mask)
            y = buf._backend.low_latency_combine(recv_x, i, w, handle, mask)
            return recv_count, handle.row_of_slot, y.astype(jnp.float32)
        f = jax.jit(jax.shard_map(f, mesh=alone, in_specs=(P("ep"),) * 3, out_specs=(P("ep"),) * 3))
        return lambda: [np.asarray(o) for o in f(x, idx, w)]

    buf = make()
    run = compiled(buf, True)
    count, slots, y = run()
    assert buf.masked_ranks() == [(0, 1, "low-latency dispatch", 1)]
    buf.check()  # masking is not a failure
    mine = np.asarray(idx) < 4  # rank 0 holds experts 0..3
    np.testing.assert_array_equal(count, np.bincount(np.asarray(idx)[mine], minlength=4))
    assert np.all(slots[1] == -1)  # nothing from rank 1
    want = (np.asarray(x.astype(jnp.float32)) * (np.asarray(w) * mine).sum(1, keepdims=True))
    np.testing.assert_allclose(y, want, rtol=2 ** -7, atol=2e-2)
    start = time.monotonic()
    run()
    assert time.monotonic() - start < 1.5, "a masked rank must not be waited for again"
    buf.close()

    buf = make()
    count, slots, y = compiled(buf, False)()
    assert _poisoned(count) and _poisoned(slots) and _poisoned(y)
    with pytest.raises(RuntimeError, match="low-latency dispatch.*rank 1"):
        buf.check()
    buf.close()


def test_a_third_send_in_flight_is_an_error():
    mesh, _, _ = _pair(2, 2048, 8)
    buf = jax_ep.Buffer(mesh, "ep", num_experts=8, hidden=2048, backend="cuda",
                        max_tokens_per_rank=16, timeout_s=5.0)
    rng = np.random.default_rng(12)
    x, idx, _ = _inputs(rng, 2, 16, 2048, 8, 2)

    def f(x, i):
        pending = [buf.low_latency_dispatch_send(x, i) for _ in range(3)]
        return [buf.low_latency_dispatch_recv(p).recv_count for p in pending]
    message = "broke the rules of hooked low-latency ops"
    try:  # poisoned outputs, or the error of the handlers that run after the failure
        assert _poisoned(run_sharded(mesh, f, x, idx, out_specs=[P("ep")] * 3)[2])
    except jax.errors.JaxRuntimeError as err:
        assert message in str(err)
    with pytest.raises(RuntimeError, match=message):
        buf.check()
    buf.close()


def test_region_bytes_tells_the_buffer_size():
    size = jax_ep.region_bytes(8, num_experts=256, hidden=7168, max_tokens_per_rank=128)
    assert 0 < size < 2 ** 30
    assert jax_ep.region_bytes(8, num_experts=256, hidden=7168, max_tokens_per_rank=256) > size
