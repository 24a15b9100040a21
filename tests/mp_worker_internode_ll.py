"""One process of tests/test_gpu_internode_low_latency.py: the low-latency ops of an internode
Buffer (one GPU per process, jax.distributed, NVSHMEM between "virtual nodes" of this host).

    python tests/mp_worker_internode_ll.py --rank I --num N --port P [--num-ranks-per-node G]

The EP ranks are split into nodes of G GPUs (default N // 2, so 2 nodes; 1 with an odd N,
i.e. N nodes). For every case (T tokens per rank, H, top-k, E, dtype, FP8 with or without
round_scale, M = T or larger, fused or hooked) it runs low_latency_dispatch (and, without
FP8, low_latency_combine of the received rows scaled per expert) with the CUDA and the
reference backends on the same random routing (-1 and repeated experts included) and checks
this process's shard:
  - recv_count and row_of_slot equal the reference's;
  - the received rows (and FP8 scales) equal a numpy oracle bit for bit (FP8: the documented
    cast, computed with ml_dtypes), and the reference's rows (bf16/f32 exactly);
  - combine equals a numpy oracle of the documented order bit for bit (each holder: fp32 sum
    of w_k * row_k in slot order, cast; the token's rank: fp32 sum of the holders' rows in
    ascending rank, cast), and the reference within a rounding step;
  - the hooked halves equal the fused op;
then 50 back-to-back round trips with changing routing, issued without waiting, each checked.
Then the low-latency cap (check_low_latency_cap): a Buffer whose low-latency staging holds 32
tokens per rank (low_latency_max_tokens_per_rank=32 < max_tokens_per_rank) gives the same
results; one made with 0 (no low-latency staging) runs the normal mode and refuses a
low-latency op in Python.
Last, the last rank goes silent (check_silent_rank): the others' ops with mask=True mask it,
without mask they fail naming it.
Prints progress; exits 1 at the first mismatch, 0 ("worker I: ok") when all match.
"""

import jax
import jax.numpy as jnp
import jax_ep
import ml_dtypes
import numpy as np
from jax._src import distributed
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import mp_common
from mp_common import (check_silent_rank_results, local, silent_rank_round_trip,
                       unmasked_recv_count)

MAX_TOKENS = 128  # the Buffers' max_tokens_per_rank


def routing(rng, num_ranks, num_tokens, num_topk, num_experts):
    """topk_idx [R*T, K] int32: uniform experts (repeats possible), 1/8 of the slots -1."""
    idx = rng.integers(0, num_experts, (num_ranks * num_tokens, num_topk)).astype(np.int32)
    idx[rng.random(idx.shape) < 1 / 8] = -1
    return idx


def expert_factor(num_experts):
    """float32 [E]: the factor the test's "expert" scales its rows by, 2^-(e % 3) (exact)."""
    return (2.0 ** -(np.arange(num_experts) % 3)).astype(np.float32)


def quantize(x, round_scale):
    """numpy FP8 cast (e4m3, one scale per 128 channels, rounded to nearest even from float32):
    x [..., H] -> (float32 of the FP8 values [..., H], scales float32 [..., H / 128])."""
    blocks = x.astype(np.float32).reshape(x.shape[:-1] + (-1, 128))
    scale = np.maximum(np.abs(blocks).max(-1), np.float32(1e-4)) * np.float32(1.0 / 448.0)
    if round_scale:
        mantissa, exponent = np.frexp(scale)
        scale = np.ldexp(np.float32(1.0), np.where(mantissa == 0.5, exponent - 1, exponent)).astype(np.float32)
    q = (blocks / scale[..., None]).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return q.reshape(x.shape), scale.astype(np.float32)


def combine_oracle(me, x_all, idx_all, w_all, factor, num_local, num_ranks, dtype):
    """out [T, H] of rank me: each holder r sums fl(w_k * y_k) over its slots in slot order in
    float32 (y_k = x * factor[expert], exact) and casts to dtype; rank me sums the holders' rows
    in ascending rank in float32 and casts."""
    x, idx, w = x_all[me].astype(np.float32), idx_all[me], w_all[me]
    out = np.zeros(x.shape, np.float32)
    for r in range(num_ranks):
        partial = np.zeros(x.shape, np.float32)
        for k in range(idx.shape[1]):
            e = idx[:, k]
            held = (e >= 0) & (e // num_local == r)
            y = (x * factor[np.clip(e, 0, None)][:, None]).astype(dtype).astype(np.float32)
            term = np.where(held[:, None], w[:, k:k + 1] * y, np.float32(0))
            partial = np.where(held[:, None], partial + term, partial)
        out = out + partial.astype(dtype).astype(np.float32)
    return out.astype(dtype).astype(np.float32)


def round_trip(buf, mesh, *, m, fp8, round_scale, hook):
    """jit-able global (x, topk_idx, topk_weights, factor) -> (recv_x f32, recv_scales,
    recv_count, row_of_slot[, combined f32]): dispatch, then (without FP8) combine of the
    received rows scaled by their expert's factor."""
    def body(x, idx, w, factor):
        kw = dict(max_tokens_per_rank=m, fp8=fp8, round_scale=round_scale)
        if hook:
            out = buf.low_latency_dispatch_recv(buf.low_latency_dispatch_send(x, idx, **kw))
        else:
            out = buf.low_latency_dispatch(x, idx, **kw)
        # Without FP8 a [L, 1, 1] placeholder (varying, as every output of the shard).
        scales = out.recv_scales if fp8 else jnp.zeros_like(out.recv_count, jnp.float32)[:, None, None]
        res = (out.recv_x.astype(jnp.float32), scales, out.recv_count, out.handle.row_of_slot)
        if fp8:
            return res
        y = (out.recv_x.astype(jnp.float32) * factor[:, None, None]).astype(x.dtype)
        if hook:
            combined = buf.low_latency_combine_recv(buf.low_latency_combine_send(y, idx, w, out.handle))
        else:
            combined = buf.low_latency_combine(y, idx, w, out.handle)
        return res + (combined.astype(jnp.float32),)
    outs = 4 if fp8 else 5
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 4,
                                 out_specs=(P("ep"),) * outs))


def check_outputs(tag, got, want, me, x_all, idx_all, w_all, factor, *, num_ranks, num_local,
                  num_tokens, m, fp8, round_scale, dtype):
    """Compares this shard of `got` (CUDA) with `want` (reference) and the numpy oracles."""
    recv_x, scales, count, slots = (local(a) for a in got[:4])
    np.testing.assert_array_equal(count, local(want[2]), err_msg=f"{tag}: recv_count")
    np.testing.assert_array_equal(slots, local(want[3]), err_msg=f"{tag}: row_of_slot")
    hidden = recv_x.shape[-1]
    # Rows: flat row f = row_of_slot[s, t, k] >= 0 holds token t of source s.
    s, t, k = np.nonzero(slots >= 0)
    flat = slots[s, t, k]
    src = x_all[s, t].astype(np.float32)
    rows = recv_x.reshape(-1, hidden)
    if fp8:
        q, sc = quantize(x_all, round_scale)
        np.testing.assert_array_equal(rows[flat], q[s, t], err_msg=f"{tag}: FP8 rows vs the oracle")
        np.testing.assert_array_equal(scales.reshape(-1, hidden // 128)[flat], sc[s, t],
                                      err_msg=f"{tag}: FP8 scales vs the oracle")
        mismatch = np.mean(rows[flat] != local(want[0]).reshape(-1, hidden)[flat]) if len(flat) else 0.0
        # XLA:GPU rounds some FP8 subnormal ties unlike ml_dtypes (docs/design.md, "FP8").
        assert mismatch < 1e-3, f"{tag}: {mismatch:.2%} of the FP8 values differ from the reference"
    else:
        np.testing.assert_array_equal(rows[flat], src, err_msg=f"{tag}: rows vs the oracle")
        valid = np.arange(rows.shape[0] // num_local)[None, :] < count[:, None]
        np.testing.assert_array_equal(recv_x[valid], local(want[0])[valid], err_msg=f"{tag}: rows vs reference")
        combined = local(got[4])
        oracle = combine_oracle(me, x_all, idx_all, w_all, factor, num_local, num_ranks, dtype)
        np.testing.assert_array_equal(combined, oracle, err_msg=f"{tag}: combine vs the oracle")
        np.testing.assert_allclose(combined, local(want[4]), rtol=2 ** -6, atol=1e-3,
                                   err_msg=f"{tag}: combine vs reference")
    assert len(np.unique(flat)) == int(count.sum()), f"{tag}: rows received != recv_count"


def run_cases(mesh, me, num_ranks, per_node):
    sharding = NamedSharding(mesh, P("ep"))
    put = lambda a: jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])  # noqa: E731
    rng = np.random.default_rng(0)
    # (H, E, top-k, token counts)
    configs = [(2048, 8, 1, (1, 17, 128)), (2048, 64, 8, (17, 128)), (7168, 64, 8, (17, 128))]
    for hidden, num_experts, num_topk, token_counts in configs:
        num_local = num_experts // num_ranks
        make = lambda backend: jax_ep.Buffer(  # noqa: E731
            mesh, "ep", num_experts=num_experts, hidden=hidden, backend=backend,
            max_tokens_per_rank=MAX_TOKENS, num_ranks_per_node=per_node)
        cuda, ref = make("cuda"), make("reference")
        factor = expert_factor(num_experts)
        for num_tokens in token_counts:
            x_bf16 = rng.standard_normal((num_ranks * num_tokens, hidden)).astype(jnp.bfloat16)
            idx = routing(rng, num_ranks, num_tokens, num_topk, num_experts)
            w = rng.random((num_ranks * num_tokens, num_topk)).astype(np.float32)
            # (dtype, fp8, round_scale, M)
            cases = [(jnp.bfloat16, False, False, num_tokens), (jnp.bfloat16, True, False, num_tokens)]
            if num_tokens == 17:
                cases += [(jnp.bfloat16, True, True, num_tokens), (jnp.float32, False, False, MAX_TOKENS),
                          (jnp.bfloat16, False, False, MAX_TOKENS)]
            for dtype, fp8, round_scale, m in cases:
                x = x_bf16.astype(dtype)
                args = [put(a) for a in (x, idx, w, factor)]
                shapes = (lambda a: a.reshape(num_ranks, num_tokens, *a.shape[1:]))  # noqa: E731
                want = round_trip(ref, mesh, m=m, fp8=fp8, round_scale=round_scale, hook=False)(*args)
                fused = None
                for hook in (False, True):
                    tag = (f"H={hidden} E={num_experts} top-{num_topk} T={num_tokens} M={m} "
                           f"{jnp.dtype(dtype).name} fp8={fp8} round_scale={round_scale} hook={hook}")
                    print(tag, flush=True)
                    got = jax.block_until_ready(
                        round_trip(cuda, mesh, m=m, fp8=fp8, round_scale=round_scale, hook=hook)(*args))
                    cuda.check()
                    check_outputs(tag, got, want, me, shapes(x), shapes(idx), shapes(w), factor,
                                  num_ranks=num_ranks, num_local=num_local, num_tokens=num_tokens,
                                  m=m, fp8=fp8, round_scale=round_scale, dtype=np.dtype(dtype))
                    if fused is None:
                        fused = got
                    else:  # the hooked halves give the fused op's results
                        count = local(got[2])
                        valid = np.arange(local(got[0]).shape[1])[None, :] < count[:, None]
                        for name, g, f in zip(("recv_x", "recv_scales", "recv_count", "row_of_slot",
                                               "combined"), got, fused):
                            g, f = local(g), local(f)
                            if name in ("recv_x", "recv_scales") and g.ndim == 3 and g.shape[-1] > 1:
                                g, f = g[valid], f[valid]
                            np.testing.assert_array_equal(g, f, err_msg=f"{tag}: hooked != fused: {name}")
        if hidden == 2048 and num_experts == 64:
            back_to_back(cuda, ref, mesh, me, put, rng, num_ranks, num_experts, num_topk, factor)
        cuda.check()
        cuda.close()
        ref.close()


def back_to_back(cuda, ref, mesh, me, put, rng, num_ranks, num_experts, num_topk, factor):
    """50 round trips with changing routing, fused and hooked in turn, issued without waiting
    for any (consecutive ops reuse the staging of their parity), then each checked."""
    num_tokens, hidden, num_local = 128, 2048, num_experts // num_ranks
    print("50 back-to-back round trips with changing routing", flush=True)
    steps = [round_trip(cuda, mesh, m=num_tokens, fp8=False, round_scale=False, hook=h) for h in (False, True)]
    want_step = round_trip(ref, mesh, m=num_tokens, fp8=False, round_scale=False, hook=False)
    x = rng.standard_normal((num_ranks * num_tokens, hidden)).astype(jnp.bfloat16)
    w = rng.random((num_ranks * num_tokens, num_topk)).astype(np.float32)
    idxs = [routing(rng, num_ranks, num_tokens, num_topk, num_experts) for _ in range(50)]
    xa, wa, fa = put(x), put(w), put(factor)
    results = [steps[i % 2](xa, put(idx), wa, fa) for i, idx in enumerate(idxs)]
    jax.block_until_ready(results)
    cuda.check()
    reshape = lambda a: a.reshape(num_ranks, num_tokens, *a.shape[1:])  # noqa: E731
    for i, (idx, got) in enumerate(zip(idxs, results)):
        want = want_step(xa, put(idx), wa, fa)
        check_outputs(f"back-to-back call {i}", got, want, me, reshape(x), reshape(idx), reshape(w),
                      factor, num_ranks=num_ranks, num_local=num_local, num_tokens=num_tokens,
                      m=num_tokens, fp8=False, round_scale=False, dtype=np.dtype(jnp.bfloat16))


def check_low_latency_cap(mesh, me, num_ranks, per_node):
    """low_latency_max_tokens_per_rank sizes the low-latency staging (the kernels index it by
    its M, not max_tokens_per_rank): T = 17 and 32 with M = T and M = 32, fused and hooked, on a
    Buffer capped at 32 match the reference and the oracles. A Buffer made with 0 has no
    low-latency staging: its dispatch and combine match the reference; a low-latency op raises
    a ValueError at trace time. (The handler's own refusal is not run here: a failed custom
    call leaves JAX's runtime token failed, and JAX's exit hook raises it again, which holds
    this process back from the distributed shutdown.)"""
    sharding = NamedSharding(mesh, P("ep"))
    put = lambda a: jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])  # noqa: E731
    rng = np.random.default_rng(3)
    cap, hidden, num_experts, num_topk = 32, 2048, 64, 8
    num_local = num_experts // num_ranks
    make = lambda backend, low_latency_cap: jax_ep.Buffer(  # noqa: E731
        mesh, "ep", num_experts=num_experts, hidden=hidden, backend=backend,
        max_tokens_per_rank=MAX_TOKENS, low_latency_max_tokens_per_rank=low_latency_cap,
        num_ranks_per_node=per_node)
    capped, ref = make("cuda", cap), make("reference", cap)
    factor = expert_factor(num_experts)
    for num_tokens in (17, cap):
        x = rng.standard_normal((num_ranks * num_tokens, hidden)).astype(jnp.bfloat16)
        idx = routing(rng, num_ranks, num_tokens, num_topk, num_experts)
        w = rng.random((num_ranks * num_tokens, num_topk)).astype(np.float32)
        args = [put(a) for a in (x, idx, w, factor)]
        shapes = lambda a: a.reshape(num_ranks, num_tokens, *a.shape[1:])  # noqa: E731
        for m in sorted({num_tokens, cap}):
            want = round_trip(ref, mesh, m=m, fp8=False, round_scale=False, hook=False)(*args)
            for hook in (False, True):
                tag = f"low_latency_max_tokens_per_rank={cap} T={num_tokens} M={m} hook={hook}"
                print(tag, flush=True)
                got = jax.block_until_ready(
                    round_trip(capped, mesh, m=m, fp8=False, round_scale=False, hook=hook)(*args))
                capped.check()
                check_outputs(tag, got, want, me, shapes(x), shapes(idx), shapes(w), factor,
                              num_ranks=num_ranks, num_local=num_local, num_tokens=num_tokens,
                              m=m, fp8=False, round_scale=False, dtype=np.dtype(jnp.bfloat16))
    capped.close()
    ref.close()

    print("low_latency_max_tokens_per_rank=0", flush=True)
    no_ll, ref = make("cuda", 0), make("reference", 0)
    num_tokens = 32
    x = put(rng.standard_normal((num_ranks * num_tokens, hidden)).astype(jnp.bfloat16))
    idx = put(routing(rng, num_ranks, num_tokens, num_topk, num_experts))
    w = put(rng.random((num_ranks * num_tokens, num_topk)).astype(np.float32))

    def normal_round_trip(buf):
        def body(x, idx, w):
            out = buf.dispatch(x, idx, w)
            return buf.combine(out.recv_x, out.handle).astype(jnp.float32)
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep")))
    got = jax.block_until_ready(normal_round_trip(no_ll)(x, idx, w))
    no_ll.check()
    np.testing.assert_array_equal(local(got), local(normal_round_trip(ref)(x, idx, w)),
                                  err_msg="low_latency_max_tokens_per_rank=0: normal mode")

    def ll_dispatch(dispatch):
        return jax.jit(jax.shard_map(lambda x, idx: dispatch(x, idx)[0], mesh=mesh,
                                     in_specs=(P("ep"),) * 2, out_specs=P("ep")))
    try:
        ll_dispatch(no_ll.low_latency_dispatch)(x, idx)
    except ValueError as err:
        assert "made with low_latency_max_tokens_per_rank=0" in str(err), err
    else:
        raise AssertionError("low_latency_max_tokens_per_rank=0: low_latency_dispatch ran")
    no_ll.check()
    no_ll.close()
    ref.close()


def check_silent_rank(mesh, me, num_ranks, per_node):
    """The last rank makes the Buffers and compiles the programs (every process compiles what
    the others run), then runs none of them. On the others (timeout_s = 3 s): a fused round
    trip with mask=True masks it, reports it in masked_ranks() and leaves it out (recv_count
    and the combined rows without its tokens, its slots of row_of_slot -1); the hooked round
    trip after it does not wait for it again; without mask the dispatch fails, with a
    poisoned recv_count and a check() error naming the op and the rank."""
    silent, num_tokens, hidden, num_topk = num_ranks - 1, 32, 2048, 4
    num_experts = 4 * num_ranks
    num_local = num_experts // num_ranks
    client = distributed.global_state.client
    # Together: the Buffers' timeout_s also bounds their creation.
    client.wait_at_barrier("mp_worker_internode_ll/silent_rank", 300_000)
    make = lambda: jax_ep.Buffer(  # noqa: E731
        mesh, "ep", num_experts=num_experts, hidden=hidden, backend="cuda",
        max_tokens_per_rank=MAX_TOKENS, num_ranks_per_node=per_node, timeout_s=3.0)
    masking, failing = make(), make()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((num_ranks * num_tokens, hidden)).astype(jnp.bfloat16)
    idx = routing(rng, num_ranks, num_tokens, num_topk, num_experts)
    w = rng.random((num_ranks * num_tokens, num_topk)).astype(np.float32)
    sharding = NamedSharding(mesh, P("ep"))
    args = [jax.make_array_from_callback(a.shape, sharding, lambda i, a=a: a[i]) for a in (x, idx, w)]
    runs = [(name, jax.jit(silent_rank_round_trip(masking, mesh, hook)).lower(*args).compile())
            for name, hook in (("fused", False), ("hooked", True))]
    unmasked = unmasked_recv_count(failing, mesh).lower(*args[:2]).compile()
    if me != silent:
        mine = slice(me * num_tokens, (me + 1) * num_tokens)
        # One row per (live source token, local expert), repeated experts once.
        rows = {(t, e) for t in range(num_ranks * num_tokens) if t // num_tokens != silent
                for e in idx[t] if e >= 0 and e // num_local == me}
        want_count = np.bincount([e - me * num_local for _, e in rows], minlength=num_local)
        held = (idx[mine] >= 0) & (idx[mine] // num_local != silent)
        want = x[mine].astype(np.float32) * (w[mine] * held).sum(1, keepdims=True)
        check_silent_rank_results(runs, args, unmasked, masking, failing, silent=silent,
                                  want_count=want_count, want=want,
                                  op="internode low-latency dispatch", rewait_limit_s=1.5)
    client.wait_at_barrier("mp_worker_internode_ll/silent_rank_checked", 300_000)
    masking.close()
    failing.close()


def main():
    args = mp_common.parse_args()
    per_node = mp_common.ranks_per_node(args)

    def body():
        mesh = Mesh(np.array(jax.devices()), ("ep",))
        print(f"process {jax.process_index()}: {args.num} ranks, {per_node} per node", flush=True)
        run_cases(mesh, jax.process_index(), args.num, per_node)
        check_low_latency_cap(mesh, jax.process_index(), args.num, per_node)
        check_silent_rank(mesh, jax.process_index(), args.num, per_node)

    mp_common.run(args, body)


if __name__ == "__main__":
    main()
