"""Bad input raises an error that says what to change."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ep
from conftest import cpu_mesh, run_sharded

R, H, E, K, T = 4, 128, 16, 2, 8


@pytest.fixture(scope="module")
def mesh():
    return cpu_mesh((R,), ("ep",))


@pytest.fixture(scope="module")
def buf(mesh):
    return jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="reference",
                         max_tokens_per_rank=T)


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


def _dispatch(mesh, buf, x, idx, w, **kwargs):
    return run_sharded(mesh, lambda x, i, w: buf.dispatch(x, i, w, **kwargs).recv_x, x, idx, w)


def _good():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((R * T, H)), jnp.float32)
    idx = jnp.asarray(np.tile(np.arange(K, dtype=np.int32), (R * T, 1)))
    w = jnp.ones((R * T, K), jnp.float32) * 0.5
    return x, idx, w


@pytest.mark.parametrize("change, message", [
    (lambda x, i, w: (x.astype(jnp.float16), i, w), "dtype float16; supported: bfloat16, float32"),
    (lambda x, i, w: (x[:, :64], i, w), "hidden size 64 but the Buffer was made with hidden=128"),
    (lambda x, i, w: (x, i.astype(jnp.float32), w), "topk_idx must be int32"),
    (lambda x, i, w: (x, i[:, :1], w), "topk_weights has shape .* they must match"),
    (lambda x, i, w: (x, i, w.astype(jnp.bfloat16)), "topk_weights must be float32"),
    (lambda x, i, w: (x, i[: R * (T - 1)], w[: R * (T - 1)]), "has 7 tokens but x has 8"),
])
def test_dispatch_rejects_bad_operands(mesh, buf, change, message):
    with pytest.raises((TypeError, ValueError), match=message):
        _dispatch(mesh, buf, *change(*_good()))


def test_dispatch_rejects_more_tokens_than_the_buffer_holds(mesh):
    small = jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, backend="reference",
                          max_tokens_per_rank=4)
    with pytest.raises(ValueError, match="exceed max_tokens_per_rank=4"):
        _dispatch(mesh, small, *_good())


def test_dispatch_rejects_bad_capacity_and_layout(mesh, buf):
    with pytest.raises(ValueError, match="capacity=0 must be a positive int"):
        _dispatch(mesh, buf, *_good(), capacity=0)
    with pytest.raises(ValueError, match="layout='token'"):
        _dispatch(mesh, buf, *_good(), layout="token")


def test_combine_rejects_a_bias_of_the_wrong_shape(mesh, buf):
    def body(x, i, w):
        out = buf.dispatch(x, i, w)
        return buf.combine(out.recv_x, out.handle, bias=x[:1])
    with pytest.raises(ValueError, match="bias must be \\[8, 128\\]"):
        run_sharded(mesh, body, *_good())


def test_low_latency_combine_rejects_a_wrong_layout(mesh, buf):
    def body(x, i, w):
        out = buf.low_latency_dispatch(x, i)
        return buf.low_latency_combine(out.recv_x[:, :1], i, w, out.handle)
    with pytest.raises(ValueError, match="local experts, R \\* max_tokens_per_rank, hidden"):
        run_sharded(mesh, body, *_good())
