"""Benchmark: low-latency (decode) dispatch/combine, jax_ep against pure-JAX baselines, same run.

    python -m jax_ep.bench decode [--tokens 128] [--hidden 7168] [--topk 8] [--experts 256]
                                  [--num-sms 48 96] [--iters 100] [--layers 8]
                                  [--expert-ffn 2048] [--overlap-ffn F] [--json PATH]
                                  [--sections latency overlap decode]
    python -m jax_ep.bench_decode ...           (the same)

Every local GPU is one rank of one EP mesh axis (without GPUs: 8 virtual CPU devices, the
reference and jax.lax rows only, and tiny shapes, T <= 8, H <= 256, E <= 16, K <= 4,
F_e <= 128, 2 layers, n <= 2, which only checks that it runs). T tokens per GPU, M =
max_tokens_per_rank = T, R ranks, L = E / R local experts; the low-latency layout is
[L, R * M, H] per GPU. bfloat16 tokens, random top-K routing with distinct experts (about 1
in 16 slots empty, `jax_ep.demo.random_routing`).

1. Latency, microseconds per op: dispatch (bf16), dispatch (FP8), combine (bf16, weighted),
   and the round trip dispatch (bf16) -> combine of the received rows, for
     jax_ep cuda (num_sms=N)   our kernels with low_latency_num_sms=N, at every --num-sms
     reference (all_gather)    the reference backend: all_gather of x and topk_idx, local
                               gather into [L, R * M, H]; combine: weighted per-rank sums,
                               jax.lax.all_to_all back
     jax.lax all_to_all (C=c)  `lax_low_latency`: one capacity-padded jax.lax.all_to_all per
                               direction (rows, ids and weights packed as bytes), C = the
                               most tokens one rank sends another on this data (the best
                               capacity a static-shape baseline could have, no drops)
   "vs" is (best baseline time) / (this time), per column: > 1 is faster than the faster of
   the reference and jax.lax rows.
   A time is the marginal cost of one op, (median t(2n) - median t(n)) / n with n = --iters
   (as in jax_ep.bench): one jitted call runs n ops one after another, each op's inputs
   nudged by eps * (an element of every output of the op before) with eps = 0 passed at run
   time (`jax_ep.bench_layer._nudge`): the values stay, but XLA can neither merge the ops nor
   drop any of their work, and each op waits for the one before, so the ops do not overlap
   (a latency, not a throughput). The large combine input [L, R * M, H] is not nudged (the
   nudge would copy it); its ids, weights and handle are.

2. Hook overlap (FP8 dispatch, as decode uses): a shared-expert matmul x [T, H] @ W [H, F]
   (bf16, independent of the dispatch) with
     (a) the fused low_latency_dispatch, then the matmul
     (b) low_latency_dispatch_send -> matmul (jax_ep.overlap) -> low_latency_dispatch_recv
     (c) the matmul alone
     (d) the fused dispatch alone
   hidden = (a - b) / min(c, d): the share of the shorter of transfer and matmul that the
   hook hides (1 = perfect overlap). F = --overlap-ffn, or by default chosen so that (c) is
   about (d) of the first row: the matmul is timed at F = 4H and F scaled by (d) / (c) (at
   decode sizes it reads W, so its time grows with F), rounded to a multiple of 128 and
   clamped to [128, 16H]. Marginal times as in 1.

3. Decode step: --layers MoE layers, each low_latency_dispatch (FP8) -> dequantize -> rows past
   recv_count set to zero -> expert MLP silu(rows @ W1) @ W2 batched over the local experts
   (einsum on the [L, R * M, H] layout, W1 [L, H, F_e], W2 [L, F_e, H], F_e = --expert-ffn)
   -> low_latency_combine, added to the hidden state; each layer has its own routing and
   gate weights. All layers share one layer's expert weights (8 layers of their own at
   H=7168, F_e=2048 would be 15 GB per GPU on 8 GPUs, 30 GB on 4; one layer's are 1.9 / 3.8
   GB, and each layer still reads all of them). Time: median wall time of a whole jitted call
   of one step (--iters calls), not marginal: a decode step pays its launch cost. On GPU the
   same function is compiled twice, with XLA command buffers (CUDA graphs) off
   ({"xla_gpu_enable_command_buffer": ""}) and on for fusions and custom calls
   ({"xla_gpu_enable_command_buffer": "FUSION,CUSTOM_CALL", "xla_gpu_graph_min_graph_size":
   1}); on CPU once, without compiler options. Rows: jax_ep cuda at every --num-sms and the
   reference backend.

Sections 1 and 2 compile with XLA's settings of this process (XLA_FLAGS; the header says
whether command buffers are on). A measurement that fails prints an error in its cell; the
others still run, and the exit status is 1. --json PATH writes every number.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import traceback

from jax_ep.bench import _timed
from jax_ep.bench_layer import _commit, _error, _nudge
from jax_ep.demo import _configure_cpu_devices, random_routing

EP = "ep"
COMMAND_BUFFERS = {
    "off": {"xla_gpu_enable_command_buffer": ""},
    "on": {"xla_gpu_enable_command_buffer": "FUSION,CUSTOM_CALL",
           "xla_gpu_graph_min_graph_size": 1},
}
LATENCY_OPS = ("dispatch", "fp8 dispatch", "combine", "round trip")


# ============================================================================ jax.lax baseline
def _pack(arrays):
    """Arrays [N, ...] of any dtypes -> uint8 [N, B]: each row's bytes side by side."""
    from jax import lax
    import jax.numpy as jnp
    return jnp.concatenate([lax.bitcast_convert_type(a, jnp.uint8).reshape(a.shape[0], -1)
                            for a in arrays], axis=1)


def _unpack(packed, like):
    """Inverse of `_pack`: packed uint8 [N, B], like = [(row shape, dtype)] per array ->
    list of arrays [N, *row shape]."""
    from jax import lax
    import jax.numpy as jnp
    out, start = [], 0
    for shape, dtype in like:
        itemsize = jnp.dtype(dtype).itemsize
        size = math.prod(shape) * itemsize
        part = packed[:, start:start + size].reshape(
            (packed.shape[0], *shape) + ((itemsize,) if itemsize > 1 else ()))
        out.append(lax.bitcast_convert_type(part, dtype))
        start += size
    return out


def lax_low_latency(axis_name, num_ranks, num_experts, capacity):
    """The plain jax.lax baseline of low-latency dispatch / combine: one capacity-padded
    jax.lax.all_to_all per direction. Per shard (inside shard_map over `axis_name`); C =
    capacity, the most tokens one rank may send to another (more are dropped).

    Returns (dispatch, combine):
      dispatch(x [T, H] bf16, topk_idx int32 [T, K], topk_weights f32 [T, K], fp8) ->
        (recv_x, recv_count int32 [L], aux): recv_x bf16 [L, R * C, H], or with fp8 a tuple
        (float8_e4m3fn [L, R * C, H], f32 scales [L, R * C, H / 128], `jax_ep.quantize_fp8`);
        rows past recv_count are zero. Rank s sends rank d, in token order, the tokens that
        select one of d's experts, with their top-k ids and weights, all packed as bytes in
        one [R * C, B] buffer; the receiver copies each received token into the rows of
        the local experts it selects (grouped by source rank, then source token, like
        low_latency_dispatch).
      combine(y [L, R * C, H] bf16, aux) -> [T, H]: the receiver sums w_k * y[row of slot k]
        over each received token's local slots in float32 (slot order), sends the bf16 sums
        back with one all_to_all, and the source adds them in ascending rank order in
        float32 (the arithmetic of low_latency_combine).
    aux = (send_slot int32 [T, R]: token t's row in the send buffer for rank d, R * C if
    none; row_of_slot int32 [R * C, K]: each received slot's row in y viewed as
    [L * R * C, H], L * R * C if not here; recv_weights f32 [R * C, K]).
    """
    import jax.numpy as jnp
    from jax import lax

    from jax_ep.reference import quantize_fp8

    num_local = num_experts // num_ranks
    rows_per_expert = num_ranks * capacity
    num_rows = num_local * rows_per_expert

    def dispatch(x, topk_idx, topk_weights, fp8):
        num_tokens, num_slots = topk_idx.shape
        valid = (topk_idx >= 0) & (topk_idx < num_experts)
        ranks = jnp.arange(num_ranks, dtype=jnp.int32)
        in_rank = (jnp.where(valid, topk_idx // num_local, -1)[:, :, None] == ranks).any(1)
        pos = jnp.cumsum(in_rank, axis=0, dtype=jnp.int32) - 1  # [T, R] place in d's block
        fits = in_rank & (pos < capacity)
        send_slot = jnp.where(fits, ranks * capacity + pos, rows_per_expert)  # [T, R]
        tokens = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32)[:, None], in_rank.shape)
        token_of_slot = jnp.full((rows_per_expert,), num_tokens, jnp.int32).at[
            send_slot.reshape(-1)].set(tokens.reshape(-1), mode="drop")  # T: empty slot
        take = lambda a, fill: a.at[token_of_slot].get(mode="fill", fill_value=fill)  # noqa: E731
        rows = quantize_fp8(x) if fp8 else (x,)
        send = _pack([take(r, 0) for r in rows] + [take(topk_idx, -1), take(topk_weights, 0)])
        recv = lax.all_to_all(send, axis_name, 0, 0, tiled=True)  # [R * C, B], by source
        like = [(r.shape[1:], r.dtype) for r in rows] + [((num_slots,), jnp.int32),
                                                         ((num_slots,), jnp.float32)]
        *recv_rows, recv_idx, recv_weights = _unpack(recv, like)

        local = recv_idx - lax.axis_index(axis_name) * num_local
        local = jnp.where((recv_idx >= 0) & (local >= 0) & (local < num_local), local, -1)
        experts = jnp.arange(num_local, dtype=jnp.int32)
        has_expert = (local[:, :, None] == experts).any(1)  # [R * C, L]
        rank_in_expert = jnp.cumsum(has_expert, axis=0, dtype=jnp.int32) - 1
        row_of_slot = jnp.where(local >= 0, local * rows_per_expert + jnp.take_along_axis(
            rank_in_expert, jnp.clip(local, 0), axis=1), num_rows)  # [R * C, K]
        target = jnp.where(has_expert, experts * rows_per_expert + rank_in_expert, num_rows)
        received = jnp.broadcast_to(jnp.arange(rows_per_expert, dtype=jnp.int32)[:, None],
                                    target.shape)
        source_of_row = jnp.full((num_rows,), rows_per_expert, jnp.int32).at[
            target.reshape(-1)].set(received.reshape(-1), mode="drop")
        out = [r.at[source_of_row].get(mode="fill", fill_value=0).reshape(
            num_local, rows_per_expert, -1) for r in recv_rows]
        recv_count = has_expert.sum(0, dtype=jnp.int32)
        return (tuple(out) if fp8 else out[0]), recv_count, (send_slot, row_of_slot, recv_weights)

    def combine(y, aux):
        send_slot, row_of_slot, recv_weights = aux
        y_rows = y.reshape(num_rows, y.shape[-1])
        partial = jnp.zeros((rows_per_expert, y.shape[-1]), jnp.float32)
        for k in range(row_of_slot.shape[1]):
            rows = y_rows.at[row_of_slot[:, k]].get(mode="fill", fill_value=0)
            weight = jnp.where(row_of_slot[:, k] < num_rows, recv_weights[:, k], 0.0)
            partial = partial + weight[:, None] * rows.astype(jnp.float32)
        back = lax.all_to_all(partial.astype(y.dtype), axis_name, 0, 0, tiled=True)
        out = jnp.zeros((send_slot.shape[0], y.shape[-1]), jnp.float32)
        for d in range(num_ranks):
            out = out + back.at[send_slot[:, d]].get(mode="fill", fill_value=0).astype(jnp.float32)
        return out.astype(y.dtype)

    return dispatch, combine


# ============================================================================ timing
def _chain(op, n):
    """f(eps, fixed, carried) -> the leaves of the n-th of n ops op(*fixed, *carried) run one
    after another: op i + 1's `carried` inputs are op i's nudged by eps * (its outputs)
    (`jax_ep.bench_layer._nudge`; eps = 0 at run time). Ops 2 .. n are a loop with a trip
    count known at compile time, which XLA runs without reading a predicate back to the host
    between iterations, so n can be large enough (hundreds) that a call's launch jitter is
    small against n ops of a few tens of microseconds."""
    import jax

    def f(eps, fixed, carried):
        def step(_, state):
            carried, out = state
            carried = _nudge(carried, out, eps)
            return carried, op(*fixed, *carried)

        out = op(*fixed, *carried)
        _, out = jax.lax.fori_loop(0, n - 1, step, (carried, out))
        return tuple(jax.tree.leaves(out))

    return f


class Bench:
    """The mesh, the data and the timing of this run (see the module docstring)."""

    def __init__(self, args):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        devices = jax.devices()
        self.on_gpu = devices[0].platform == "gpu"
        if not self.on_gpu:
            devices = jax.devices("cpu")
            args.tokens, args.hidden = min(args.tokens, 8), min(args.hidden, 256)
            args.experts, args.topk = min(args.experts, 16), min(args.topk, 4)
            args.iters, args.layers = min(args.iters, 2), min(args.layers, 2)
            args.expert_ffn = min(args.expert_ffn, 128)
        self.args, self.devices, self.num_ranks = args, devices, len(devices)
        self.mesh = Mesh(np.array(devices), (EP,))
        self.sharding = NamedSharding(self.mesh, P(EP))
        self.errors = []
        T, H, K, E, R = args.tokens, args.hidden, args.topk, args.experts, self.num_ranks
        if E % R:
            raise SystemExit(f"--experts {E} must be a multiple of the {R} devices.")
        self.num_local = E // R

        rng = np.random.default_rng(0)
        shard = lambda a: jax.device_put(a, self.sharding)  # noqa: E731
        idx = random_routing(rng, R * T, E, K)
        self.x = shard(jnp.asarray(rng.standard_normal((R * T, H)), jnp.bfloat16))
        self.topk_idx = shard(jnp.asarray(idx))
        self.topk_weights = shard(jnp.asarray(rng.random((R * T, K)), jnp.float32))
        # Decode: routing and gate weights of every layer, [R * T, layers, K].
        self.layer_idx = shard(jnp.asarray(
            random_routing(rng, R * T * args.layers, E, K).reshape(R * T, args.layers, K)))
        self.layer_weights = shard(jnp.asarray(rng.random((R * T, args.layers, K)), jnp.float32))

        # What the routing sends: (token, expert) rows each GPU receives, and the most tokens
        # one rank sends another (the jax.lax baseline's capacity).
        valid = idx >= 0
        dest = np.where(valid, idx // self.num_local, -1).reshape(R, T, K)
        self.rows_per_gpu = np.array([(dest == d).sum() for d in range(R)])
        pair_tokens = np.array([[(dest[s] == d).any(1).sum() for d in range(R)] for s in range(R)])
        self.capacity = max(1, int(pair_tokens.max()))
        self.eps = jnp.float32(0)

    # ---------------------------------------------------------------- helpers
    def sharded(self, fn, compiler_options=None):
        """jit(shard_map(fn)): every argument and result split along its leading axis."""
        import jax
        from jax.sharding import PartitionSpec as P
        mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=P(EP), out_specs=P(EP))
        return jax.jit(mapped, compiler_options=compiler_options)

    def marginal(self, op, fixed, carried):
        """Marginal seconds of one op(*fixed, *carried) (pytrees of per-shard arrays, passed
        sharded along their leading axis): (t(2n) - t(n)) / n over calls of `_chain(op, n)`,
        n = --iters."""
        import jax
        from jax.sharding import PartitionSpec as P
        n = self.args.iters

        def call_time(count):
            fn = jax.jit(jax.shard_map(_chain(op, count), mesh=self.mesh,
                                       in_specs=(P(), P(EP), P(EP)), out_specs=P(EP)))
            return _timed(fn, (self.eps, tuple(fixed), tuple(carried)))

        t_n = call_time(n)
        return (call_time(2 * n) - t_n) / n

    def guarded(self, what, fn, *a, **k):
        """fn(*a, **k), or NaN after printing and recording the error (the other
        measurements still run)."""
        try:
            return fn(*a, **k)
        except Exception as e:  # noqa: BLE001 - one failure must not end the benchmark
            self.errors.append(f"{what}: {_error(e)}")
            print(f"  ERROR in {what}: {_error(e)}", flush=True)
            traceback.print_exc(limit=4, file=sys.stderr)
            return float("nan")

    def measured(self, what, buf, fn):
        """`guarded` fn(), followed by buf.check() for a CUDA Buffer (a kernel that failed
        fails its measurement)."""
        def run():
            result = fn()
            if buf is not None and buf.backend == "cuda":
                buf.check()
            return result
        return self.guarded(what, run)

    def buffers(self):
        """[(label, num_sms or "-", Buffer)]: jax_ep cuda at every --num-sms (GPU only), then
        the reference backend."""
        import jax_ep
        kw = dict(num_experts=self.args.experts, hidden=self.args.hidden,
                  max_tokens_per_rank=self.args.tokens)
        out = []
        if self.on_gpu:
            for sms in self.args.num_sms:
                buf = self.guarded(f"jax_ep cuda Buffer (low_latency_num_sms={sms})",
                                   jax_ep.Buffer, self.mesh, EP, backend="cuda",
                                   low_latency_num_sms=sms, **kw)
                if isinstance(buf, jax_ep.Buffer):
                    out.append(("jax_ep cuda", sms, buf))
        out.append(("reference (all_gather)", "-",
                    jax_ep.Buffer(self.mesh, EP, backend="reference", **kw)))
        return out

    def random_sharded(self, shape, scale, seed):
        """bf16 normal(0, scale) of global `shape`, made on the devices, split on axis 0."""
        import jax
        import jax.numpy as jnp
        make = jax.jit(lambda key: (jax.random.normal(key, shape, jnp.float32) * scale).astype(
            jnp.bfloat16), out_shardings=self.sharding)
        return make(jax.random.key(seed))

    # ---------------------------------------------------------------- 1. latency
    def latency_of_buffer(self, label, buf):
        """{op: seconds} of buf's low-latency ops (LATENCY_OPS)."""
        m = self.args.tokens
        tokens = (self.x, self.topk_idx)

        def dispatch(fp8):
            return lambda x, i: buf.low_latency_dispatch(x, i, max_tokens_per_rank=m, fp8=fp8)

        def combine():  # of this run's received rows, dispatched once before the timing
            def dispatched(x, i):
                d = buf.low_latency_dispatch(x, i, max_tokens_per_rank=m)
                return d.recv_x, d.handle
            recv_x, handle = self.sharded(dispatched)(*tokens)
            return self.marginal(buf.low_latency_combine, (recv_x,),
                                 (self.topk_idx, self.topk_weights, handle))

        def round_trip(x, i, w):
            d = buf.low_latency_dispatch(x, i, max_tokens_per_rank=m)
            return buf.low_latency_combine(d.recv_x, i, w, d.handle)

        runs = {
            "dispatch": lambda: self.marginal(dispatch(False), (), tokens),
            "fp8 dispatch": lambda: self.marginal(dispatch(True), (), tokens),
            "combine": combine,
            "round trip": lambda: self.marginal(round_trip, (),
                                                (*tokens, self.topk_weights)),
        }
        sms = buf.config.low_latency_num_sms
        return {op: self.measured(f"{op}, {label} num_sms={sms}", buf, run)
                for op, run in runs.items()}

    def latency_of_lax(self, label):
        """{op: seconds} of `lax_low_latency` at this run's capacity."""
        dispatch, combine = lax_low_latency(EP, self.num_ranks, self.args.experts, self.capacity)
        tokens = (self.x, self.topk_idx, self.topk_weights)

        def combine_time():  # of this run's received rows, dispatched once before the timing
            def dispatched(x, i, w):
                recv_x, _, aux = dispatch(x, i, w, False)
                return recv_x, aux
            recv_x, aux = self.sharded(dispatched)(*tokens)
            return self.marginal(combine, (recv_x,), (aux,))

        def round_trip(x, i, w):
            recv_x, _, aux = dispatch(x, i, w, False)
            return combine(recv_x, aux)

        runs = {
            "dispatch": lambda: self.marginal(lambda x, i, w: dispatch(x, i, w, False), (), tokens),
            "fp8 dispatch": lambda: self.marginal(lambda x, i, w: dispatch(x, i, w, True), (),
                                                  tokens),
            "combine": combine_time,
            "round trip": lambda: self.marginal(round_trip, (), tokens),
        }
        return {op: self.measured(f"{op}, {label}", None, run) for op, run in runs.items()}

    def latency(self, bufs):
        """[{impl, num_sms, op: seconds for op in LATENCY_OPS}]: every Buffer, then jax.lax."""
        rows = [{"impl": label, "num_sms": sms, **self.latency_of_buffer(label, buf)}
                for label, sms, buf in bufs]
        label = f"jax.lax all_to_all (C={self.capacity})"
        rows.append({"impl": label, "num_sms": "-", **self.latency_of_lax(label)})
        return rows

    # ---------------------------------------------------------------- 2. hook overlap
    def matmul_time(self, w):
        """Marginal seconds of x [T, H] @ w [H, F] (bf16)."""
        import jax.numpy as jnp
        return self.marginal(lambda w, x: jnp.dot(x, w), (w,), (self.x,))

    def overlap(self, bufs):
        """{"ffn": F, "weight_mb", "matmul_s": (c), "rows": [{impl, num_sms, dispatch_s: (d),
        fused_then_matmul_s: (a), hooked_s: (b), hidden}]} (module docstring, section 2)."""
        import jax.numpy as jnp

        import jax_ep
        H, m, R = self.args.hidden, self.args.tokens, self.num_ranks
        ffn, w, matmul_s = self.args.overlap_ffn, None, float("nan")
        rows = []
        for label, sms, buf in bufs:
            what = f"hook overlap, {label} num_sms={buf.config.low_latency_num_sms}"

            def dispatch(x, i):
                return buf.low_latency_dispatch(x, i, max_tokens_per_rank=m, fp8=True)

            def fused(w, x, i):
                return dispatch(x, i), jnp.dot(x, w)

            def hooked(w, x, i):
                pending = buf.low_latency_dispatch_send(x, i, max_tokens_per_rank=m, fp8=True)
                pending, shared = jax_ep.overlap(pending, jnp.dot, x, w)  # pinned in between
                return buf.low_latency_dispatch_recv(pending), shared

            tokens = (self.x, self.topk_idx)
            row = {"impl": label, "num_sms": sms}
            row["dispatch_s"] = self.measured(f"{what} (d)", buf,
                                              lambda: self.marginal(dispatch, (), tokens))
            if w is None:  # the first row sets F (module docstring) and times the matmul
                if ffn is None:
                    probe = self.random_sharded((R * H, 4 * H), H ** -0.5, seed=1)
                    ratio = _ratio(row["dispatch_s"], self.guarded("matmul at F = 4H",
                                                                   self.matmul_time, probe))
                    del probe
                    blocks = 4 * H * (ratio if ratio > 0 else 1) / 128
                    ffn = 128 * int(min(max(round(blocks), 1), 16 * H // 128))
                w = self.random_sharded((R * H, ffn), H ** -0.5, seed=2)
                matmul_s = self.guarded("hook overlap (c)", self.matmul_time, w)
            row["fused_then_matmul_s"] = self.measured(
                f"{what} (a)", buf, lambda: self.marginal(fused, (w,), tokens))
            row["hooked_s"] = self.measured(f"{what} (b)", buf,
                                            lambda: self.marginal(hooked, (w,), tokens))
            c, d = matmul_s, row["dispatch_s"]
            shorter = min(c, d) if math.isfinite(c + d) else math.nan
            row["hidden"] = _ratio(row["fused_then_matmul_s"] - row["hooked_s"], shorter)
            rows.append(row)
        return {"ffn": ffn, "weight_mb": H * ffn * 2 / 1e6, "matmul_s": matmul_s, "rows": rows}

    # ---------------------------------------------------------------- 3. decode step
    def decode_step(self, buf):
        """Per-shard step(x [T, H], layer_idx int32 [T, layers, K], layer_weights f32 [T,
        layers, K], w1 [L, H, F_e], w2 [L, F_e, H]) -> hidden state [T, H] after --layers MoE
        layers (module docstring, section 3)."""
        import jax
        import jax.numpy as jnp
        import jax_ep
        m = self.args.tokens
        rows_per_expert = self.num_ranks * m

        def step(x, layer_idx, layer_weights, w1, w2):
            h = x
            for layer in range(self.args.layers):
                idx, weights = layer_idx[:, layer], layer_weights[:, layer]
                d = buf.low_latency_dispatch(h, idx, max_tokens_per_rank=m, fp8=True)
                rows = jax_ep.dequantize_fp8(d.recv_x, d.recv_scales, jnp.bfloat16)
                valid = jnp.arange(rows_per_expert)[None, :] < d.recv_count[:, None]  # [L, R*M]
                rows = jnp.where(valid[:, :, None], rows, 0)
                act = jax.nn.silu(jnp.einsum("lmh,lhf->lmf", rows, w1,
                                             preferred_element_type=jnp.float32))
                y = jnp.einsum("lmf,lfh->lmh", act.astype(jnp.bfloat16), w2,
                               preferred_element_type=jnp.float32).astype(jnp.bfloat16)
                h = h + buf.low_latency_combine(y, idx, weights, d.handle)
            return h

        return step

    def decode(self, bufs):
        """[{impl, num_sms, "off_s" / "on_s": median seconds per step}] (command buffers off
        and on; on CPU only "off_s", compiled without compiler options)."""
        E, H, F = self.args.experts, self.args.hidden, self.args.expert_ffn
        w1 = self.random_sharded((E, H, F), H ** -0.5, seed=3)
        w2 = self.random_sharded((E, F, H), F ** -0.5, seed=4)
        inputs = (self.x, self.layer_idx, self.layer_weights, w1, w2)
        settings = COMMAND_BUFFERS if self.on_gpu else {"off": None}
        rows = []
        for label, sms, buf in bufs:
            row = {"impl": label, "num_sms": sms}
            for name, options in settings.items():
                fn = self.sharded(self.decode_step(buf), compiler_options=options)
                row[f"{name}_s"] = self.measured(
                    f"decode step, {label} num_sms={buf.config.low_latency_num_sms}, "
                    f"command buffers {name}",
                    buf, lambda fn=fn: _timed(fn, inputs, repeats=self.args.iters))
            rows.append(row)
        return rows

    # ---------------------------------------------------------------- report
    def header(self):
        import jax
        flags = os.environ.get("XLA_FLAGS", "")
        graphs = ("on: custom calls captured in CUDA graphs" if "CUSTOM_CALL" in flags
                  else "off" if "--xla_gpu_enable_command_buffer=" in flags else "XLA's default")
        a, dev = self.args, self.devices[0]
        rows = self.rows_per_gpu
        return [
            f"jax_ep.bench decode  {datetime.datetime.now():%Y-%m-%d %H:%M}  commit {_commit()}  "
            f"jax {jax.__version__}  command buffers (sections 1, 2): {graphs}",
            f"{self.num_ranks} x {dev.device_kind} ({dev.platform}); T={a.tokens}/GPU "
            f"(M={a.tokens}) H={a.hidden} top-{a.topk} E={a.experts} (L={self.num_local}/GPU) "
            f"bf16; received (token, expert) rows/GPU mean {rows.mean():.0f} max {rows.max()}; "
            f"marginal times over n={a.iters} and {2 * a.iters} ops",
        ]


def _us(seconds):
    return seconds * 1e6


def _ratio(num, den):
    """num / den, NaN unless den is positive (timings can fail, or be noise on CPU)."""
    return num / den if den > 0 else float("nan")


def print_latency(rows):
    baselines = [r for r in rows if not r["impl"].startswith("jax_ep")]
    best = {op: min((r[op] for r in baselines if math.isfinite(r[op])), default=float("nan"))
            for op in LATENCY_OPS}
    print("\n1. latency, us per op (marginal); vs = best baseline time / this time (> 1: faster "
          "than the best of reference and jax.lax)")
    head = f"{'implementation':28s} {'SMs':>4s}" + "".join(
        f" {op + ' us':>15s} {'vs':>6s}" for op in LATENCY_OPS)
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = "".join(f" {_us(r[op]):15.1f} {_ratio(best[op], r[op]):6.2f}" for op in LATENCY_OPS)
        print(f"{r['impl']:28s} {str(r['num_sms']):>4s}{cells}")


def print_overlap(res, tokens, hidden):
    print(f"\n2. hook overlap, us (marginal): FP8 dispatch and a shared-expert matmul "
          f"x[{tokens}, {hidden}] @ W[{hidden}, {res['ffn']}] bf16 (W {res['weight_mb']:.1f} MB), "
          f"(c) matmul alone {_us(res['matmul_s']):.1f} us")
    head = (f"{'implementation':28s} {'SMs':>4s} {'(a) fused, mm':>14s} {'(b) send,mm,recv':>17s} "
            f"{'(d) dispatch':>13s} {'hidden (a-b)/min(c,d)':>22s}")
    print(head)
    print("-" * len(head))
    for r in res["rows"]:
        print(f"{r['impl']:28s} {str(r['num_sms']):>4s} {_us(r['fused_then_matmul_s']):14.1f} "
              f"{_us(r['hooked_s']):17.1f} {_us(r['dispatch_s']):13.1f} {r['hidden']:22.0%}")


def print_decode(rows, args, on_gpu):
    settings = ("off", "on") if on_gpu else ("off",)
    ref = next((r for r in rows if r["impl"].startswith("reference")), {})
    print(f"\n3. decode step: {args.layers} layers x (FP8 dispatch -> dequantize -> expert MLP "
          f"[L, R*M, H] x [L, H, {args.expert_ffn}] x [L, {args.expert_ffn}, H] -> combine), "
          "median wall time of a whole call; vs = reference / this, same setting")
    names = {"off": "cmd buffers off" if on_gpu else "no options", "on": "cmd buffers on"}
    head = f"{'implementation':28s} {'SMs':>4s}" + "".join(
        f" {names[s] + ' ms':>19s} {'us/layer':>9s} {'vs':>6s}" for s in settings)
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = ""
        for s in settings:
            t = r[f"{s}_s"]
            cells += (f" {t * 1e3:19.3f} {_us(t) / args.layers:9.1f} "
                      f"{_ratio(ref.get(f'{s}_s', math.nan), t):6.2f}")
        print(f"{r['impl']:28s} {str(r['num_sms']):>4s}{cells}")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m jax_ep.bench decode",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128,
                        help="T, tokens per GPU (also max_tokens_per_rank)")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--num-sms", type=int, nargs="+", default=[48, 96],
                        help="SMs of the CUDA low-latency kernels (low_latency_num_sms), one row "
                             "each")
    parser.add_argument("--iters", type=int, default=100,
                        help="n of the marginal times; calls timed per decode step")
    parser.add_argument("--layers", type=int, default=8, help="MoE layers of a decode step")
    parser.add_argument("--expert-ffn", type=int, default=2048, help="F_e, expert FFN width")
    parser.add_argument("--overlap-ffn", type=int, default=None,
                        help="F of the shared-expert matmul (default: matched to the dispatch)")
    parser.add_argument("--sections", nargs="+", choices=["latency", "overlap", "decode"],
                        default=["latency", "overlap", "decode"], help="what to measure")
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args(argv)
    if any(s < 1 for s in args.num_sms):
        parser.error("--num-sms values must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    _configure_cpu_devices()
    bench = Bench(args)
    header = bench.header()
    print("\n".join(header), flush=True)
    if not bench.on_gpu:
        print("no GPU: 8 virtual CPU devices, tiny shapes, reference and jax.lax rows only "
              "(this only checks that the benchmark runs)", flush=True)
    bufs = bench.buffers()
    latency = overlap = decode = None
    if "latency" in args.sections:
        latency = bench.latency(bufs)
        print_latency(latency)
    if "overlap" in args.sections:
        overlap = bench.overlap(bufs)
        print_overlap(overlap, args.tokens, args.hidden)
    if "decode" in args.sections:
        decode = bench.decode(bufs)
        print_decode(decode, args, bench.on_gpu)
    for _, _, buf in bufs:
        buf.close()
    if args.json:
        meta = {"header": header, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "commit": _commit(), "device_kind": bench.devices[0].device_kind,
                "platform": bench.devices[0].platform, "device_count": bench.num_ranks,
                "lax_capacity": bench.capacity,
                "received_rows_per_gpu": bench.rows_per_gpu.tolist(), "args": vars(args),
                "errors": bench.errors}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "latency": latency, "overlap": overlap, "decode": decode},
                      f, indent=1)
        print(f"\njson: {args.json}")
    if bench.errors:
        print(f"\n{len(bench.errors)} error(s):")
        for e in bench.errors:
            print(f"  {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
