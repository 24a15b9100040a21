"""Shared input generators and sharded runners for the tests."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from conftest import run_sharded


def routing(rng, num_tokens, num_experts, topk, empty_fraction=1 / 8):
    """int32 [T, K]: distinct experts per token, about `empty_fraction` of slots -1."""
    idx = np.argsort(rng.random((num_tokens, num_experts)), axis=1)[:, :topk].astype(np.int32)
    idx[rng.random(idx.shape) < empty_fraction] = -1
    return idx


def inputs(rng, num_ranks, num_tokens, hidden, num_experts, topk, dtype=np.float32):
    """Global x [R*T, H], topk_idx [R*T, K], topk_weights [R*T, K] (random, never constant)."""
    total = num_ranks * num_tokens
    x = rng.standard_normal((total, hidden)).astype(np.float32)
    idx = routing(rng, total, num_experts, topk)
    w = rng.random((total, topk)).astype(np.float32)
    return jnp.asarray(x, dtype), jnp.asarray(idx), jnp.asarray(w)


def dispatch_all(buf, mesh, x, idx, w, **kwargs):
    """Run buf.dispatch on every rank; returns numpy arrays with a leading [R] axis."""
    num_ranks = buf.num_ranks

    def body(x, idx, w):
        out = buf.dispatch(x, idx, w, **kwargs)
        return (out.recv_x, out.recv_topk_idx, out.recv_topk_weights, out.num_recv_tokens[None],
                out.num_recv_tokens_per_expert, out.num_dropped[None])

    outs = run_sharded(mesh, body, x, idx, w, out_specs=(P("ep"),) * 6)
    names = ("recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens",
             "num_recv_tokens_per_expert", "num_dropped")
    return {n: np.asarray(o.astype(jnp.float32) if o.dtype == jnp.bfloat16 else o).reshape(
        (num_ranks, -1) + o.shape[1:]) for n, o in zip(names, outs)}


def per_rank(a, num_ranks):
    a = np.asarray(a)
    return a.reshape((num_ranks, -1) + a.shape[1:])
