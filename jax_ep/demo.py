"""Main job: an expert-parallel MoE layer, forward and backward, checked against a dense
single-device computation.

    python -m jax_ep.demo [--tokens 128] [--hidden 256] [--experts 32] [--topk 4]

With GPUs it runs on all local GPUs with the CUDA backend; with none it runs the reference
backend on 8 virtual CPU devices. It prints what ran, on which backend, and how long it took,
and exits non-zero if the result disagrees with the dense computation.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _configure_cpu_devices(count: int = 8) -> None:
    """Give XLA:CPU `count` virtual devices (only effective before JAX starts)."""
    flag = f"--xla_force_host_platform_device_count={count}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


def moe_layer(buf, x, topk_idx, topk_weights, w_experts, *, layout="expert", capacity=None):
    """One MoE feed-forward per shard: dispatch, one linear map per local expert, weighted
    combine. x [T, H], topk_idx int32 [T, K], topk_weights f32 [T, K], w_experts [L, H, H]
    (this rank's experts). Returns [T, H]."""
    import jax
    import jax.numpy as jnp

    out = buf.dispatch(x, topk_idx, topk_weights, layout=layout, capacity=capacity)
    if layout == "expert":
        h = jax.lax.ragged_dot(out.recv_x, w_experts, out.num_recv_tokens_per_expert,
                               preferred_element_type=jnp.float32)
        y = h * out.recv_topk_weights.sum(-1, keepdims=True)
    else:  # rank layout: a row may hold several local experts
        per_expert = jnp.einsum("ch,lhd->cld", out.recv_x, w_experts,
                                preferred_element_type=jnp.float32)
        slot_out = jnp.take_along_axis(
            per_expert, jnp.clip(out.recv_topk_idx, 0)[:, :, None], axis=1)  # [C, K, H]
        y = (slot_out * out.recv_topk_weights[:, :, None]).sum(1)
    return buf.combine(y.astype(x.dtype), out.handle)


def dense_moe(x, topk_idx, topk_weights, w_all):
    """The same layer on one device: out[t] = sum_k w[t, k] * x[t] @ W[topk_idx[t, k]]."""
    import jax
    import jax.numpy as jnp

    gates = (jax.nn.one_hot(topk_idx, w_all.shape[0]) * topk_weights[:, :, None]).sum(1)  # [T, E]
    per_expert = jnp.einsum("th,ehd->ted", x.astype(jnp.float32), w_all.astype(jnp.float32))
    return jnp.einsum("ted,te->td", per_expert, gates).astype(x.dtype)


def random_routing(rng, num_tokens, num_experts, topk):
    """int32 [T, K] distinct experts per token, with about 1 in 16 slots set to -1."""
    import numpy as np

    scores = rng.random((num_tokens, num_experts))
    idx = np.argsort(scores, axis=1)[:, :topk].astype(np.int32)
    idx[rng.random(idx.shape) < 1 / 16] = -1
    return idx


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="tokens per device")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--backend", default="auto", choices=("auto", "cuda", "reference"))
    args = parser.parse_args(argv)

    _configure_cpu_devices()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jax_ep

    devices = jax.devices()
    if devices[0].platform != "gpu":
        devices = jax.devices("cpu")
    num_ranks = len(devices)
    mesh = Mesh(np.array(devices), ("ep",))
    buf = jax_ep.Buffer(mesh, "ep", num_experts=args.experts, hidden=args.hidden,
                        backend=args.backend, max_tokens_per_rank=args.tokens)
    dtype = jnp.bfloat16 if buf.backend == "cuda" else jnp.float32
    print(f"jax_ep {jax_ep.__version__}: MoE layer on {num_ranks} x {devices[0].device_kind} "
          f"({devices[0].platform}), backend={buf.backend}, jax {jax.__version__}")
    print(f"  tokens/device={args.tokens} hidden={args.hidden} experts={args.experts} "
          f"top-k={args.topk} dtype={jnp.dtype(dtype).name}")

    rng = np.random.default_rng(0)
    total = args.tokens * num_ranks
    x = jnp.asarray(rng.standard_normal((total, args.hidden)), dtype)
    topk_idx = jnp.asarray(random_routing(rng, total, args.experts, args.topk))
    topk_weights = jnp.asarray(rng.random((total, args.topk)), jnp.float32)
    w_all = jnp.asarray(rng.standard_normal((args.experts, args.hidden, args.hidden))
                        / np.sqrt(args.hidden), dtype)

    shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("ep")))  # noqa: E731
    args_ep = tuple(shard(a) for a in (x, topk_idx, topk_weights, w_all))

    def loss_ep(x, topk_idx, topk_weights, w_experts):
        out = jax.shard_map(
            lambda *a: moe_layer(buf, *a), mesh=mesh,
            in_specs=(P("ep"),) * 4, out_specs=P("ep"))(x, topk_idx, topk_weights, w_experts)
        return (out.astype(jnp.float32) ** 2).sum(), out

    def loss_dense(x, topk_idx, topk_weights, w_all):
        out = dense_moe(x, topk_idx, topk_weights, w_all)
        return (out.astype(jnp.float32) ** 2).sum(), out

    step = jax.jit(jax.value_and_grad(loss_ep, argnums=(0, 2, 3), has_aux=True))
    start = time.perf_counter()
    (_, out), grads = jax.block_until_ready(step(*args_ep))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        jax.block_until_ready(step(*args_ep))
        times.append(time.perf_counter() - start)

    cpu = jax.devices("cpu")[0]
    dense_args = tuple(jax.device_put(np.asarray(a), cpu) for a in (x, topk_idx, topk_weights, w_all))
    (_, out_ref), grads_ref = jax.jit(
        jax.value_and_grad(loss_dense, argnums=(0, 2, 3), has_aux=True))(*dense_args)

    tol = 3e-2 if dtype == jnp.bfloat16 else 1e-4
    ok = True
    for name, got, want in [("out", out, out_ref), ("d x", grads[0], grads_ref[0]),
                            ("d topk_weights", grads[1], grads_ref[1]),
                            ("d w_experts", grads[2], grads_ref[2])]:
        got = np.asarray(got, np.float32)
        want = np.asarray(want, np.float32)
        err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
        ok &= bool(err < tol)
        print(f"  {name:15s} relative error vs dense {err:.2e} ({'ok' if err < tol else 'FAIL'})")
    print(f"  forward+backward step: {np.median(times) * 1e3:.2f} ms median of {args.iters} "
          f"(first call with compile {compile_s:.2f} s)")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
