"""The Buffer's contract with its caller and its backend: what a Handle records and what
combine checks with it, the Buffer lifecycle (close, context manager, timeout_s), and the
Backend protocol that every op goes through."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_ep
from conftest import cpu_mesh, run_sharded
from jax_ep.backend import Backend, ReferenceBackend

R, H, E, K, T = 4, 128, 16, 2, 8
L = E // R


@pytest.fixture(scope="module")
def mesh():
    return cpu_mesh((R,), ("ep",))


def _buffer(mesh, **kwargs):
    return jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="reference",
                         max_tokens_per_rank=T, **kwargs)


@pytest.fixture(scope="module")
def buf(mesh):
    return _buffer(mesh)


def _inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((R * T, H)), jnp.float32)
    idx = jnp.asarray(np.argsort(rng.random((R * T, E)), axis=1)[:, :K].astype(np.int32))
    w = jnp.asarray(rng.random((R * T, K)), jnp.float32)
    return x, idx, w


# ------------------------------------------------------------------ the handle
@pytest.mark.parametrize("layout, capacity, want", [
    ("rank", None, T * R), ("expert", None, T * R * min(K, L)), ("rank", 5, 5),
    ("expert", 7, 7)])
def test_handle_records_capacity_layout_and_buffer(mesh, buf, layout, capacity, want):
    handle = run_sharded(mesh, lambda x, i, w: buf.dispatch(
        x, i, w, layout=layout, capacity=capacity).handle, *_inputs())
    assert isinstance(handle, jax_ep.Handle)
    assert (handle.capacity, handle.layout, handle.buffer_id) == (want, layout, buf.id)
    assert len(jax.tree.leaves(handle)) == 3  # the arrays; the rest is static metadata


def test_handle_passes_between_jitted_functions(mesh, buf):
    """A Handle returned by one jit(shard_map) is a valid input of another (as the
    benchmarks use it) and gives the same combine as one function doing both."""
    def dispatch(x, i, w):
        out = buf.dispatch(x, i, w, layout="expert")
        return out.recv_x, out.handle

    def round_trip(x, i, w):
        return buf.combine(*dispatch(x, i, w))

    recv_x, handle = run_sharded(mesh, dispatch, *_inputs(), out_specs=(P("ep"), P("ep")))
    assert handle.layout == "expert" and handle.buffer_id == buf.id
    apart = run_sharded(mesh, buf.combine, recv_x, handle)
    together = run_sharded(mesh, round_trip, *_inputs())
    np.testing.assert_array_equal(np.asarray(apart), np.asarray(together))


@pytest.mark.parametrize("layout", ["rank", "expert"])
def test_combine_rejects_the_wrong_row_count(mesh, buf, layout):
    def body(x, i, w):
        out = buf.dispatch(x, i, w, layout=layout, capacity=20)
        return buf.combine(out.recv_x[:16], out.handle)
    with pytest.raises(ValueError, match=f"x has 16 rows but the dispatch that made the handle "
                                         f"returned 20 rows \\({layout} layout, capacity=20\\)"):
        run_sharded(mesh, body, *_inputs())


def test_combine_rejects_rank_layout_rows_for_an_expert_handle(mesh, buf):
    """The default capacities differ: T * R rows (rank) vs T * R * min(K, L) (expert)."""
    def body(x, i, w):
        rank_rows = buf.dispatch(x, i, w).recv_x
        return buf.combine(rank_rows, buf.dispatch(x, i, w, layout="expert").handle)
    with pytest.raises(ValueError, match=f"x has {T * R} rows .* returned {T * R * min(K, L)} rows "
                                         "\\(expert layout"):
        run_sharded(mesh, body, *_inputs())


def test_combine_rejects_a_handle_of_another_buffer(mesh, buf):
    other = _buffer(mesh)
    assert other.id != buf.id

    def body(x, i, w):
        out = buf.dispatch(x, i, w)
        return other.combine(out.recv_x, out.handle)
    with pytest.raises(ValueError, match=f"made by the dispatch of Buffer {buf.id}, but combine "
                                         f"was called on Buffer {other.id}"):
        run_sharded(mesh, body, *_inputs())


def test_combine_rejects_what_is_not_a_handle(mesh, buf):
    def body(x, i, w):
        out = buf.dispatch(x, i, w)
        h = out.handle
        return buf.combine(out.recv_x, (h.send_pos, h.num_tokens_matrix, h.pair_expert_rows))
    with pytest.raises(ValueError, match="handle must be a jax_ep.Handle, got tuple"):
        run_sharded(mesh, body, *_inputs())


def test_low_latency_combine_rejects_a_handle_of_another_buffer(mesh, buf):
    other = _buffer(mesh)

    def body(x, i, w):
        out = buf.low_latency_dispatch(x, i)
        assert out.handle.buffer_id == buf.id
        return other.low_latency_combine(out.recv_x, i, w, out.handle)
    with pytest.raises(ValueError, match=f"made by the low_latency_dispatch of Buffer {buf.id}"):
        run_sharded(mesh, body, *_inputs())


# ------------------------------------------------------------------ lifecycle
def test_buffer_ids_are_unique_and_increasing(mesh):
    ids = [_buffer(mesh).id for _ in range(3)]
    assert ids == sorted(set(ids))


def _every_op(buf):
    """Each public op of `buf`, called eagerly on well-formed per-shard operands."""
    x, idx, w = (a[:T] for a in _inputs())
    handle = jax_ep.Handle(jnp.zeros((T, R), jnp.int32), jnp.zeros((R, R), jnp.int32),
                           jnp.zeros((0, K), jnp.int32), capacity=T * R, layout="rank",
                           buffer_id=buf.id)
    ll_handle = jax_ep.LowLatencyHandle(jnp.zeros((R, T, K), jnp.int32), buffer_id=buf.id)
    return {
        "get_dispatch_layout": lambda: buf.get_dispatch_layout(idx),
        "dispatch": lambda: buf.dispatch(x, idx, w),
        "combine": lambda: buf.combine(jnp.zeros((T * R, H)), handle),
        "low_latency_dispatch": lambda: buf.low_latency_dispatch(x, idx),
        "low_latency_combine": lambda: buf.low_latency_combine(jnp.zeros((L, R * T, H)), idx, w,
                                                               ll_handle),
        "check": buf.check,
    }


def test_close_is_idempotent_and_later_ops_raise(mesh, monkeypatch):
    buf = _buffer(mesh)
    closes = []
    monkeypatch.setattr(buf._backend, "close", lambda: closes.append(1))
    assert not buf.closed
    buf.close()
    buf.close()
    assert buf.closed and closes == [1]
    for op in _every_op(buf).values():
        with pytest.raises(RuntimeError, match="Buffer is closed"):
            op()
    with pytest.raises(RuntimeError, match="Buffer is closed"):
        with buf:
            pass


def test_context_manager_closes(mesh):
    with _buffer(mesh) as buf:
        assert not buf.closed
        assert run_sharded(mesh, lambda x, i, w: buf.dispatch(x, i, w).recv_x,
                           *_inputs()).shape == (R * T * R, H)
    assert buf.closed
    with pytest.raises(RuntimeError, match="Buffer is closed"):
        buf.dispatch(*(a[:T] for a in _inputs()))


def test_context_manager_closes_when_the_block_raises(mesh):
    with pytest.raises(KeyError):
        with _buffer(mesh) as buf:
            raise KeyError("inside")
    assert buf.closed


def test_timeout_default_is_300_seconds():
    assert inspect.signature(jax_ep.Buffer).parameters["timeout_s"].default == 300.0


@pytest.mark.parametrize("timeout_s, error, message", [
    ("30", TypeError, "must be a number of seconds"),
    (None, TypeError, "must be a number of seconds"),
    (True, TypeError, "must be a number of seconds"),
    (0, ValueError, "must be a positive finite number of seconds"),
    (-1.0, ValueError, "must be a positive finite number of seconds"),
    (float("inf"), ValueError, "must be a positive finite number of seconds"),
    (float("nan"), ValueError, "must be a positive finite number of seconds"),
])
def test_timeout_must_be_a_positive_finite_number(mesh, timeout_s, error, message):
    with pytest.raises(error, match=message):
        _buffer(mesh, timeout_s=timeout_s)


@pytest.mark.parametrize("timeout_s", [1, 2.5, np.float32(10)])
def test_timeout_accepts_positive_numbers(mesh, timeout_s):
    _buffer(mesh, timeout_s=timeout_s).close()


def test_check_raises_the_backend_error(mesh, monkeypatch):
    buf = _buffer(mesh)
    buf.check()
    monkeypatch.setattr(buf._backend, "take_error", lambda: "a peer timed out")
    with pytest.raises(RuntimeError, match="jax_ep: a peer timed out"):
        buf.check()


# ------------------------------------------------------------------ the backend protocol
def _methods(cls):
    return {name for name, value in vars(cls).items()
            if callable(value) and not name.startswith("_")}


def test_reference_backend_implements_exactly_the_protocol(buf):
    protocol = _methods(Backend)
    assert protocol == {"get_dispatch_layout", "dispatch", "combine", "cached_dispatch",
                        "combine_topk_weights_grad", "dispatch_send", "dispatch_recv",
                        "combine_send", "combine_recv", "low_latency_dispatch",
                        "low_latency_dispatch_send", "low_latency_dispatch_recv",
                        "low_latency_combine", "low_latency_combine_send",
                        "low_latency_combine_recv", "masked_ranks", "take_error", "close"}
    assert _methods(ReferenceBackend) == protocol
    backend = ReferenceBackend(buf.config, buffer_id=buf.id)
    assert isinstance(backend, Backend)  # every method and attribute (name, config, buffer_id)
    for name in protocol:
        parameters = lambda cls: list(inspect.signature(getattr(cls, name)).parameters)  # noqa: E731
        assert parameters(ReferenceBackend) == parameters(Backend), name
        assert getattr(Backend, name).__doc__, f"Backend.{name} needs a docstring"
    assert backend.take_error() == ""


def test_cuda_backend_implements_exactly_the_protocol():
    from jax_ep.cuda_backend import CudaBackend
    protocol = _methods(Backend)
    assert _methods(CudaBackend) == protocol
    for name in protocol:
        parameters = lambda cls: list(inspect.signature(getattr(cls, name)).parameters)  # noqa: E731
        assert parameters(CudaBackend) == parameters(Backend), name


def test_every_op_goes_through_the_backend(mesh, monkeypatch):
    """Forward, both gradients (x and topk_weights), the hooked normal mode, low latency
    (fused and hooked),
    masked_ranks, check and close each call the backend method of the same name."""
    buf = _buffer(mesh)
    called = set()
    for name in _methods(Backend):
        method = getattr(buf._backend, name)
        monkeypatch.setattr(buf._backend, name,
                            lambda *a, name=name, method=method: called.add(name) or method(*a))

    def body(x, i, w):
        buf.get_dispatch_layout(i)
        out = buf.dispatch(x, i, w, layout="expert")
        y = buf.combine(out.recv_x * out.recv_topk_weights.sum(-1, keepdims=True), out.handle)
        ll = buf.low_latency_dispatch(x, i)
        y = y + buf.low_latency_combine(ll.recv_x, i, w, ll.handle)
        hooked = buf.dispatch_recv(buf.dispatch_send(x, i, w))
        y = y + buf.combine_recv(buf.combine_send(hooked.recv_x, hooked.handle))
        ll = buf.low_latency_dispatch_recv(buf.low_latency_dispatch_send(x, i))
        return y + buf.low_latency_combine_recv(
            buf.low_latency_combine_send(ll.recv_x, i, w, ll.handle))

    def loss(x, w, i):
        return jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep"))(
            x, i, w).sum()

    x, idx, w = (jax.device_put(a, NamedSharding(mesh, P("ep"))) for a in _inputs())
    jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w, idx)
    buf.check()
    assert buf.masked_ranks() == []
    buf.close()
    assert called == _methods(Backend)


# ------------------------------------------------------------------ the hooked normal mode
@pytest.mark.parametrize("layout", ["rank", "expert"])
@pytest.mark.parametrize("fp8", [False, True])
def test_hooked_dispatch_and_combine_equal_the_fused_ops(mesh, buf, layout, fp8):
    """dispatch_send -> (other work) -> dispatch_recv returns what dispatch returns, handle
    included, and combine_send -> combine_recv what combine returns (bias too)."""
    def run(hooked):
        def body(x, i, w):
            if fp8:
                x = jax_ep.quantize_fp8(x)
            if hooked:
                pending = buf.dispatch_send(x, i, w, layout=layout, capacity=20)
                pending, extra = jax_ep.overlap(pending, jnp.sin, w)
                out = buf.dispatch_recv(pending)
            else:
                out, extra = buf.dispatch(x, i, w, layout=layout, capacity=20), jnp.sin(w)
            rows = out.recv_x[0].astype(jnp.float32) if fp8 else out.recv_x
            bias = jnp.ones((T, H), jnp.float32)
            if hooked:
                y = buf.combine_recv(buf.combine_send(rows, out.handle, bias=bias))
            else:
                y = buf.combine(rows, out.handle, bias=bias)
            return (rows, out.recv_topk_idx, out.recv_topk_weights, out.num_recv_tokens[None],
                    out.num_recv_tokens_per_expert, out.num_dropped[None], out.handle.send_pos,
                    out.handle.pair_expert_rows, y, extra)
        return run_sharded(mesh, body, *_inputs())

    for got, want in zip(run(True), run(False)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_hooked_halves_check_their_pending(mesh, buf):
    x, i, w = _inputs()
    other = _buffer(mesh)

    def receive_on(receiver, op):
        def body(x, i, w):
            pending = buf.dispatch_send(x, i, w)
            if op == "combine":
                return receiver.combine_recv(pending)
            return receiver.dispatch_recv(pending).recv_x
        return body

    with pytest.raises(ValueError, match="Pending returned by this Buffer's combine_send"):
        run_sharded(mesh, receive_on(buf, "combine"), x, i, w)
    with pytest.raises(ValueError, match=f"sent by Buffer {buf.id}; receive it on that Buffer"):
        run_sharded(mesh, receive_on(other, "dispatch"), x, i, w)

    def low_latency_pending(x, i, w):
        return buf.dispatch_recv(buf.low_latency_dispatch_send(x, i)).recv_x
    with pytest.raises(ValueError, match="Pending returned by this Buffer's dispatch_send"):
        run_sharded(mesh, low_latency_pending, x, i, w)
    other.close()


def test_hooked_halves_under_grad(mesh, monkeypatch):
    """The reference backend's hooked halves differentiate as plain JAX and agree with the
    fused ops' gradients; a backend whose halves are custom calls raises at trace time."""
    buf = _buffer(mesh)
    x, idx, w = (jax.device_put(a, NamedSharding(mesh, P("ep"))) for a in _inputs())

    def loss(hooked):
        def body(x, i, w):
            if hooked:
                out = buf.dispatch_recv(buf.dispatch_send(x, i, w, layout="expert"))
                rows = out.recv_x * out.recv_topk_weights.sum(-1, keepdims=True)
                return buf.combine_recv(buf.combine_send(rows, out.handle))
            out = buf.dispatch(x, i, w, layout="expert")
            rows = out.recv_x * out.recv_topk_weights.sum(-1, keepdims=True)
            return buf.combine(rows, out.handle)
        fn = jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep"))
        return lambda x, w: (fn(x, idx, w) ** 2).sum()

    got = jax.jit(jax.grad(loss(True), argnums=(0, 1)))(x, w)
    want = jax.jit(jax.grad(loss(False), argnums=(0, 1)))(x, w)
    for g, v in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(v), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(buf._backend, "name", "cuda")
    with pytest.raises(TypeError, match="dispatch_send on the cuda backend is not "
                                        "differentiable.*use the fused op \\(dispatch\\)"):
        jax.jit(jax.grad(loss(True)))(x, w)
    with pytest.raises(TypeError, match="combine_send on the cuda backend is not differentiable"):
        def combine_loss(x, w):
            def body(x, i, w):
                out = jax.lax.stop_gradient(buf.dispatch(x, i, w))
                return buf.combine_recv(buf.combine_send(out.recv_x * x.sum(), out.handle))
            fn = jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep"))
            return fn(x, idx, w).sum()
        jax.jit(jax.grad(combine_loss))(x, w)
    buf.close()
