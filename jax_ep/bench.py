"""Benchmark: jax_ep dispatch/combine against the jax.lax baselines, same run, same shapes.

    python -m jax_ep.bench [--tokens 4096] [--hidden 7168] [--topk 8] [--experts 256]
                           [--num-sms 24 48 64] [--iters 10]
    python -m jax_ep.bench layer [...]   the MoE layer benchmark (jax_ep/bench_layer.py)
    python -m jax_ep.bench decode [...]  the low-latency (decode) benchmark (jax_ep/bench_decode.py)

Uses every local GPU as one EP group (8 virtual CPU devices and small shapes without GPUs,
which only checks that it runs). Bandwidth uses DeepEP's accounting: received rows x H x
bytes per element / time, local rows included, per GPU. A time is the marginal cost of one
op: one jitted call runs n back-to-back ops, each on its own operands; the median wall time
of the call with n = 2 * iters minus that with n = iters, divided by iters. That cancels the
fixed cost of launching a jitted call on every GPU and keeps each op's whole work (our
dispatch includes its layout and count exchange).

Internode (one process per GPU; the GPUs split into nodes of G, NVSHMEM between them):

    python -m jax_ep.launch -n 4 -- -m jax_ep.bench --num-ranks-per-node 2 [...]

adds the row "jax_ep cuda internode" (the internode kernels) before the intranode one (CUDA
IPC between the processes), each followed by a line on its network (RDMA) leg in DeepEP's
accounting (token x node pairs x H x bytes / time, the token's own node included; the row's
own figure is the NVLink leg's), a line on the internode hook (dispatch_send, a dense matmul,
dispatch_recv against the fused dispatch, then the matmul) and a line on the low-latency ops
at T=128 (internode and intranode Buffers); a last line gives internode / intranode
bandwidth at each SM count. The reference then sums combine in the internode order.

Rows:
  jax_ep cuda (num_sms=N)  our kernels
  reference                the pure-JAX backend (capacity-padded jax.lax.all_to_all)
  ragged_all_to_all        MaxText-style dispatch/combine with jax.lax.ragged_all_to_all
  all_to_all only          one capacity-padded jax.lax.all_to_all of [R*T, H], nothing else
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

from jax_ep.bench_layer import _commit
from jax_ep.demo import _configure_cpu_devices, random_routing


def _timed(fn, args, repeats=7):
    """Median wall seconds of fn(*args), after one warm-up call."""
    import jax
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def node_pairs_per_gpu(in_rank, tokens_per_rank, ranks_per_node):
    """Mean (token, node) pairs a GPU sends over the network leg, DeepEP's RDMA accounting:
    for each of its tokens the nodes holding one of the token's ranks, its own node included.
    in_rank: bool [R * T, R] (token of rank t // T goes to rank r)."""
    total, num_ranks = in_rank.shape
    in_node = in_rank.reshape(total, num_ranks // ranks_per_node, ranks_per_node).any(-1)
    return float(in_node.sum() / (total // tokens_per_rank))


def ragged_dispatch_combine(axis_name, num_ranks, num_experts):
    """MaxText-style EP with jax.lax.ragged_all_to_all (rank layout, DeepEP's row order).

    Returns (dispatch(x, topk_idx) -> (recv [T*R, H], aux), combine(y, aux) -> [T, H])."""
    import jax.numpy as jnp
    from jax import lax

    num_local = num_experts // num_ranks

    def dispatch(x, topk_idx):
        num_tokens = x.shape[0]
        valid = topk_idx >= 0
        ranks = jnp.arange(num_ranks)
        in_rank = ((jnp.where(valid, topk_idx // num_local, -1)[:, :, None] == ranks).any(1))
        counts = in_rank.sum(0).astype(jnp.int32)  # [R]
        # Sort (token, rank) pairs by destination rank, then token.
        key = jnp.where(in_rank.T, ranks[:, None] * num_tokens + jnp.arange(num_tokens), 1 << 30)
        order = jnp.argsort(key.reshape(-1))  # [R*T]
        send_tokens = order % num_tokens
        send = x[send_tokens]
        matrix = lax.all_gather(counts, axis_name)  # [src, dst]
        me = lax.axis_index(axis_name)
        input_offsets = (jnp.cumsum(counts) - counts).astype(jnp.int32)
        recv_sizes = matrix[:, me]
        output_offsets = (jnp.cumsum(matrix, axis=0) - matrix)[me].astype(jnp.int32)
        out = jnp.zeros((num_ranks * num_tokens, x.shape[1]), x.dtype)
        recv = lax.ragged_all_to_all(send, out, input_offsets, counts, output_offsets,
                                     recv_sizes, axis_name=axis_name)
        return recv, (send_tokens, counts, matrix)

    def combine(y, aux):
        send_tokens, counts, matrix = aux
        me = lax.axis_index(axis_name)
        num_tokens = send_tokens.shape[0] // num_ranks
        recv_sizes = matrix[:, me]
        block_offsets = (jnp.cumsum(recv_sizes) - recv_sizes).astype(jnp.int32)
        # Source s's block goes back to where s's send block for `me` started.
        return_offsets = (jnp.cumsum(matrix, axis=1) - matrix)[:, me].astype(jnp.int32)
        out = jnp.zeros((num_ranks * num_tokens, y.shape[1]), y.dtype)
        back = lax.ragged_all_to_all(y, out, block_offsets, recv_sizes, return_offsets, counts,
                                     axis_name=axis_name)
        valid = jnp.arange(num_ranks * num_tokens) < counts.sum()
        contrib = jnp.where(valid[:, None], back, 0).astype(jnp.float32)
        return jnp.zeros((num_tokens, y.shape[1]), jnp.float32).at[send_tokens].add(
            contrib).astype(y.dtype)

    return dispatch, combine


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "layer":
        from jax_ep import bench_layer
        return bench_layer.main(argv[1:])
    if argv and argv[0] == "decode":
        from jax_ep import bench_decode
        return bench_decode.main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per GPU")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--num-sms", type=int, nargs="+", default=[24, 48, 64])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--num-ranks-per-node", type=int, default=None,
                        help="internode: GPUs per node (< the GPUs; one process per GPU, "
                             "through python -m jax_ep.launch)")
    args = parser.parse_args(argv)

    from jax_ep import launch
    if not launch.initialize():
        _configure_cpu_devices()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jax_ep

    devices = jax.devices()
    on_gpu = devices[0].platform == "gpu"
    if not on_gpu:
        devices = jax.devices("cpu")
        args.tokens, args.hidden, args.iters = min(args.tokens, 64), min(args.hidden, 256), 2
    num_ranks = len(devices)
    mesh = Mesh(np.array(devices), ("ep",))
    dtype = jnp.bfloat16
    T, H = args.tokens, args.hidden
    rng = np.random.default_rng(0)
    total = T * num_ranks
    x = np.asarray(rng.standard_normal((total, H))).astype(dtype)
    idx_np = random_routing(rng, total, args.experts, args.topk)
    topk_weights = rng.random((total, args.topk)).astype(np.float32)
    sharding = NamedSharding(mesh, P("ep"))
    # Every process holds the same arrays and contributes its shards.
    shard = lambda a: jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])  # noqa: E731
    x, topk_idx, topk_weights = shard(x), shard(idx_np), shard(topk_weights)
    xq, xscale = jax.jit(jax.shard_map(jax_ep.quantize_fp8, mesh=mesh, in_specs=P("ep"),
                                   out_specs=(P("ep"), P("ep"))))(x)

    # Received rows per GPU (rank layout): the accounting base of every row below.
    in_rank = np.zeros((total, num_ranks), bool)
    for k in range(args.topk):
        valid = idx_np[:, k] >= 0
        in_rank[np.nonzero(valid)[0], idx_np[valid, k] // (args.experts // num_ranks)] = True
    recv_rows = in_rank.reshape(num_ranks, T, num_ranks).sum((0, 1))  # per destination
    capacity = int(recv_rows.max())
    mean_rows = float(recv_rows.mean())
    gbytes = lambda rows, elem: rows * H * elem / 1e9  # noqa: E731

    def sharded(fn, n_in, n_out=None):
        out_specs = P("ep") if n_out is None else (P("ep"),) * n_out
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("ep"),) * n_in, out_specs=out_specs))

    num_variants = 2 * args.iters

    def variants(*arrays):
        """2 * iters different copies of each per-shard array (rows rolled by i), made once.
        Each repeated op gets its own operands and returns its whole result, so XLA can
        neither merge the repeats (it merges identical collectives even behind an
        optimization barrier) nor drop any of their work."""
        fn = lambda *a: tuple(jnp.roll(v, i, axis=0) for v in a for i in range(num_variants))  # noqa: E731
        out = sharded(fn, len(arrays), len(arrays) * num_variants)(*arrays)
        return [out[j * num_variants:(j + 1) * num_variants] for j in range(len(arrays))]

    xs, = variants(x)
    xqs, xss = variants(xq, xscale)

    def time_repeats(op, operand_lists, fixed, outputs=1, chained=False):
        """Marginal seconds of one op(*operands_i, *fixed): calls of n = iters and n = 2 *
        iters ops (operands i < n) in one jit, (t(2 * iters) - t(iters)) / iters. op returns
        one array, or a tuple of `outputs` arrays. chained: op i's operands wait for op i - 1's
        results (hooked ops: XLA must not move a send ahead of the previous receive)."""
        n_lists = len(operand_lists)

        def call_time(n):
            def f(*a):
                fixed_args = a[n_lists * n:]
                results = []
                for i in range(n):
                    operands = tuple(a[j * n + i] for j in range(n_lists))
                    if chained and results:
                        operands, _ = jax.lax.optimization_barrier((operands, results[-1]))
                    results.append(op(*operands, *fixed_args))
                return tuple(r for res in results for r in (res if outputs > 1 else (res,)))
            flat = [v for lst in operand_lists for v in lst[:n]]
            return _timed(sharded(f, len(flat) + len(fixed), n * outputs), (*flat, *fixed))
        t_short = call_time(args.iters)
        return (call_time(2 * args.iters) - t_short) / args.iters

    def measure_buffer(buf):
        t_disp = time_repeats(lambda x, i, w: buf.dispatch(x, i, w, capacity=capacity).recv_x,
                              [xs], (topk_idx, topk_weights))
        t_fp8 = time_repeats(lambda q, s, i, w: buf.dispatch((q, s), i, w, capacity=capacity).recv_x[0],
                             [xqs, xss], (topk_idx, topk_weights))
        def dispatch_once(x, i, w):
            out = buf.dispatch(x, i, w, capacity=capacity)
            return out.recv_x, out.handle
        recv_x, handle = sharded(dispatch_once, 3, 2)(x, topk_idx, topk_weights)
        ys, = variants(recv_x)
        t_comb = time_repeats(lambda y, h: buf.combine(y, h), [ys], (handle,))
        return t_disp, t_comb, t_fp8

    commit = _commit()
    flags = os.environ.get("XLA_FLAGS", "")
    graphs = ("on: custom calls captured in CUDA graphs" if "CUSTOM_CALL" in flags
              else "off" if "--xla_gpu_enable_command_buffer=" in flags else "XLA's default")
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    say(f"\njax_ep.bench  {datetime.date.today()}  commit {commit}  jax {jax.__version__}  "
          f"command buffers: {graphs}")
    say(f"{num_ranks} x {devices[0].device_kind}; T={T}/GPU H={H} top-{args.topk} "
          f"E={args.experts} bf16; received rows/GPU mean {mean_rows:.0f} (capacity {capacity})")
    say("bandwidth = received rows x H x bytes / time (DeepEP's accounting), per GPU\n")
    header = (f"{'implementation':26s} {'SMs':>4s} {'dispatch us':>12s} {'GB/s':>7s} "
              f"{'combine us':>11s} {'GB/s':>7s} {'fp8 disp us':>12s} {'GB/s':>7s}")
    say(header)
    say("-" * len(header))
    fp8_elem = 1 + 4 / 128
    rows = []  # (name, sms, dispatch s, combine s, fp8 dispatch s)

    def add_row(row):
        name, sms, td, tc, tf = row
        rows.append(row)
        say(f"{name:26s} {str(sms):>4s} {td * 1e6:12.1f} {gbytes(mean_rows, 2) / td:7.1f} "
            f"{tc * 1e6:11.1f} {gbytes(mean_rows, 2) / tc:7.1f} {tf * 1e6:12.1f} "
            f"{gbytes(mean_rows, fp8_elem) / tf:7.1f}", flush=True)

    ll_tokens = min(128, T)

    def measure_low_latency(buf, label):
        """Low-latency ops at T = 128 tokens per GPU (the first 128 of each shard's tokens):
        marginal us of a bf16 dispatch, an FP8 dispatch and a bf16 combine."""
        def dispatch(x, i, fp8):
            return buf.low_latency_dispatch(x[:ll_tokens], i[:ll_tokens], fp8=fp8).recv_x
        t_bf16 = time_repeats(lambda x, i: dispatch(x, i, False), [xs], (topk_idx,))
        t_fp8 = time_repeats(lambda x, i: dispatch(x, i, True), [xs], (topk_idx,))
        def dispatch_once(x, i):
            out = buf.low_latency_dispatch(x[:ll_tokens], i[:ll_tokens])
            return out.recv_x, out.handle
        recv_x, handle = sharded(dispatch_once, 2, 2)(x, topk_idx)
        rows, = variants(recv_x)
        t_comb = time_repeats(
            lambda y, i, w, h: buf.low_latency_combine(y, i[:ll_tokens], w[:ll_tokens], h),
            [rows], (topk_idx, topk_weights, handle))
        say(f"  low-latency, T={ll_tokens}/GPU, {label}: dispatch bf16 {t_bf16 * 1e6:.1f} us, "
            f"FP8 {t_fp8 * 1e6:.1f} us, combine bf16 {t_comb * 1e6:.1f} us", flush=True)

    def measure_hook(buf, sms):
        """The internode hook against the fused ops, with a dense matmul x [T, H] @ w [H, H]
        as the independent compute: (a) fused op then matmul, (b) send, matmul, receive,
        (c) matmul alone, (d) the fused op alone, (e) send then receive, nothing between.
        hidden = (a - b) / min(c, d): the share of the shorter one that overlapped."""
        dense = shard((rng.standard_normal((num_ranks * H, H), dtype=np.float32) / np.sqrt(H)).astype(dtype))
        matmul = lambda x, w: x @ w  # noqa: E731
        def dispatch_hooked(x, i, w, dense, between):
            pending = buf.dispatch_send(x, i, w, capacity=capacity)
            if between:
                pending, y = jax_ep.overlap(pending, matmul, x, dense)
                return buf.dispatch_recv(pending).recv_x, y
            return buf.dispatch_recv(pending).recv_x
        def dispatch_fused(x, i, w, dense):
            return buf.dispatch(x, i, w, capacity=capacity).recv_x, matmul(x, dense)
        t = {"c": time_repeats(matmul, [xs], (dense,))}
        t["a"] = time_repeats(dispatch_fused, [xs], (topk_idx, topk_weights, dense), outputs=2)
        t["b"] = time_repeats(lambda *a: dispatch_hooked(*a, True), [xs],
                              (topk_idx, topk_weights, dense), outputs=2, chained=True)
        t["d"] = time_repeats(lambda x, i, w: buf.dispatch(x, i, w, capacity=capacity).recv_x,
                              [xs], (topk_idx, topk_weights))
        t["e"] = time_repeats(lambda *a: dispatch_hooked(*a, False), [xs],
                              (topk_idx, topk_weights, dense), chained=True)
        hidden = (t["a"] - t["b"]) / min(t["c"], t["d"])
        say(f"  hook, dispatch, {sms} SMs: (a) fused+matmul {t['a'] * 1e6:.1f} us, (b) send|matmul|"
            f"recv {t['b'] * 1e6:.1f} us, (c) matmul {t['c'] * 1e6:.1f} us, (d) fused "
            f"{t['d'] * 1e6:.1f} us, (e) send+recv {t['e'] * 1e6:.1f} us; hidden "
            f"{100 * hidden:.0f} %", flush=True)

    per_node = args.num_ranks_per_node
    if on_gpu and per_node is not None and per_node < num_ranks:
        pairs = node_pairs_per_gpu(in_rank, T, per_node)
        for sms in args.num_sms:
            buf = jax_ep.Buffer(mesh, "ep", num_experts=args.experts, hidden=H, backend="cuda",
                                max_tokens_per_rank=T, num_sms=sms, num_ranks_per_node=per_node)
            times = measure_buffer(buf)
            add_row((f"jax_ep cuda internode {num_ranks // per_node}x{per_node}", sms) + times)
            say(f"  network leg, {sms} SMs (token x node pairs: {pairs:.0f}/GPU): dispatch "
                f"{gbytes(pairs, 2) / times[0]:.1f} GB/s, combine {gbytes(pairs, 2) / times[1]:.1f} "
                f"GB/s, FP8 dispatch {gbytes(pairs, fp8_elem) / times[2]:.1f} GB/s", flush=True)
            measure_hook(buf, sms)
            measure_low_latency(buf, f"internode, {sms} SMs")
            buf.check()
            buf.close()
    if on_gpu:
        for sms in args.num_sms:
            buf = jax_ep.Buffer(mesh, "ep", num_experts=args.experts, hidden=H, backend="cuda",
                                max_tokens_per_rank=T, num_sms=sms)
            add_row(("jax_ep cuda", sms) + measure_buffer(buf))
            if per_node is not None and per_node < num_ranks:  # the same run's one-host figure
                measure_low_latency(buf, f"intranode, {sms} SMs")
    if not args.skip_baselines or not on_gpu:
        ref = jax_ep.Buffer(mesh, "ep", num_experts=args.experts, hidden=H, backend="reference",
                            max_tokens_per_rank=T, num_ranks_per_node=per_node)
        add_row(("reference (all_to_all)", "-") + measure_buffer(ref))
        # ragged_all_to_all does not run on XLA:CPU, and XLA refuses it between processes
        # (no NCCL fallback unless a flag allows it).
        if on_gpu and jax.process_count() == 1:
            rdisp, rcomb = ragged_dispatch_combine("ep", num_ranks, args.experts)
            t_d = time_repeats(lambda x, i: rdisp(x, i)[0], [xs], (topk_idx,))
            out = sharded(lambda x, i: (rdisp(x, i)[0],) + rdisp(x, i)[1], 2, 4)(x, topk_idx)
            recv, aux = out[0], out[1:]
            recvs, = variants(recv)
            t_c = time_repeats(lambda y, *a: rcomb(y, a), [recvs], tuple(aux))
            add_row(("ragged_all_to_all", "-", t_d, t_c, float("nan")))

        bufs, = variants(sharded(lambda x: jnp.tile(x, (num_ranks, 1)), 1)(x))
        t_a2a = time_repeats(lambda b: jax.lax.all_to_all(b, "ep", 0, 0, tiled=True), [bufs], ())
        add_row(("all_to_all only [R*T,H]", "-", t_a2a, t_a2a, float("nan")))

    for sms in args.num_sms:
        inter = [r for r in rows if r[0].startswith("jax_ep cuda internode") and r[1] == sms]
        intra = [r for r in rows if r[0] == "jax_ep cuda" and r[1] == sms]
        if inter and intra:
            (_, _, *t_inter), (_, _, *t_intra) = inter[0], intra[0]
            ratios = ", ".join(f"{op} {100 * b / a:.0f} %" for op, a, b in
                               zip(("dispatch", "combine", "FP8 dispatch"), t_inter, t_intra))
            say(f"internode / intranode bandwidth, {sms} SMs, this run: {ratios}")
    ours = [r for r in rows if r[0].startswith("jax_ep")]
    base = [r for r in rows if not r[0].startswith("jax_ep") and not r[0].startswith("all_to_all only")]
    if ours and base:
        best_ours = min(r[2] + r[3] for r in ours)
        best_base = min(r[2] + r[3] for r in base)
        say(f"\ndispatch+combine: best jax_ep {best_ours * 1e6:.1f} us, best jax.lax baseline "
              f"{best_base * 1e6:.1f} us, speed-up {best_base / best_ours:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
