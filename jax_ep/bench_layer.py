"""Benchmark: a whole SwiGLU MoE layer, forward + backward, jax_ep against pure-JAX EP layers.

    python -m jax_ep.bench layer [--tokens 4096] [--hidden 7168 4096] [--experts 256 64]
                                 [--ffn 2048] [--topk 8] [--iters 3] [--impls ...]
                                 [--plot docs/layer_bench.png] [--json PATH] [--no-breakdown]
    python -m jax_ep.bench_layer ...            (the same)

Every local GPU is one rank of one EP mesh axis (without GPUs: 8 virtual CPU devices and tiny
shapes, which only checks that it runs). Configurations are (H, E) pairs from --hidden and
--experts (zipped); T tokens per GPU, FFN width F, top-K, bfloat16. One step is the layer's
forward and its backward: the output y and the gradients with respect to x and every weight
(router, w_gate_up, w_down), for the cotangent ct of y (loss = sum(y * ct)) plus 0.01 * the
load-balancing loss and 0.001 * the z-loss.

Implementations, all in one run on the same data:
  jax_ep       jax_ep.moe with the CUDA Buffer (dispatch/combine kernels) and
               grouped_matmul(impl="auto") (Mosaic kernels on Hopper). Without GPUs: the
               reference Buffer, so it only runs.
  reference    jax_ep.moe with the reference Buffer (capacity-padded jax.lax.all_to_all)
               and grouped_matmul(impl="xla") = jax.lax.ragged_dot. Dropless.
  ragged_a2a   MaxText-style dropless: sort (token, expert) selections by expert,
               jax.lax.ragged_all_to_all to the experts' ranks (counts exchanged with
               all_gather), regroup by local expert, ragged_dot SwiGLU, unsort,
               ragged_all_to_all back, weighted sum. GPU only (XLA:CPU has no
               ragged_all_to_all); checked against `reference` at small shapes first.
  capacity     GShard/Switch: capacity ceil(cf * T * K / E) slots per expert per source
               rank (cf = --capacity-factor, 1.25), positions by a cumulative sum over the
               one-hot expert mask (first choices of all tokens first), selections past
               capacity dropped; tokens gathered into [E, cap, H], jax.lax.all_to_all to
               [L, R * cap, H], batched einsum SwiGLU, all_to_all back, weighted sum.

XLA's ragged_dot on GPU works densely over the groups (its backward holds float32 [L, C,
max(H, 2F)]: 60 GiB at E=256, H=7168 on 4 GPUs, where it fails in autotuning after ~90 s of
compiling), so `reference` and `ragged_a2a` are skipped, with a note, where that exceeds half
the GPU's memory (--force-ragged-dot runs them anyway). --no-check-vma runs every shard_map
with check_vma=False (a workaround for a custom VJP that drops the varying-axis type).

Routing is realistic, not uniform: the router is random normal (std 1/sqrt(H)) and the
tokens x = noise + skew * m share one random direction m, so every expert gets its own bias
(--skew 0.15: the busiest expert gets ~2x the mean load at E=256); with iid tokens and a
random router every expert would get nearly the same load. The dropless implementations use
one dispatch capacity C per configuration (--capacity: "measured" = the most rows any rank
receives on this data + 2%, rounded up to 256; "worst" = moe's default T * R * min(K, L)).

Timing. Every timed quantity is a function fn(inputs) -> outputs run n times inside one
jitted `lax.fori_loop`; n is a traced argument (one compile serves every n). Each iteration
reads the inputs of the previous one after an in-place update of one element of every input
by eps * (a scalar from the previous outputs), where eps = 0 is a runtime argument: the
values never change, but XLA cannot prove it, so it can neither hoist anything out of the
loop (loop-invariant code motion: for example a backward that depends only on a fixed
cotangent, or a weight-only transpose) nor merge iterations, and the iterations run one
after another as consecutive layers would. Every output is a loop-carried value returned by
the call, so nothing is dead code: y is returned, not only the gradients (a plain jax.grad
lets XLA drop the layer's last forward ops). A time is the marginal cost of one iteration,
(median t(2n) - median t(n)) / n, as in jax_ep.bench: that cancels the fixed cost of a call
(launch on every GPU, copying the inputs into the loop's buffers, zero-filling the outputs).
n is chosen so that one call of n iterations takes at least --min-time seconds; a while loop
with a traced trip count costs a few microseconds of host round trip per iteration, which is
small against the millisecond-scale steps timed here. This keeps memory at one layer's
activations (a Python-unrolled n-and-2n scheme would need 3n copies of every gradient) and
suits the slow baselines (ragged_dot layers take 0.1-1 s; n = 1 for them).

Breakdown (jax_ep and reference): the parts of the layer timed alone, forward + backward,
with the same loop: router + top-k (+ aux losses), dispatch (backward: combine), expert MLP
(two grouped matmuls + SwiGLU: 3 matmuls forward, 6 backward), combine (backward: cached
dispatch), shared expert when --shared-ffn > 0. "whole / sum of parts" (target <= 1.25)
shows what running them together costs or saves.

Grouped matmul alone (device 0, its routed group sizes from this run's routing): the gate_up
and down matmuls of the layer against a dense batched einsum [L, ceil(M/L), K] x [L, K, N]
of the same FLOPs, forward and forward + backward (y, dx, dw), TF/s and the ratio (target:
grouped matmul >= 85% of einsum).

Output: a table on stdout, a PNG bar chart (--plot), and every number as JSON (--json).
A failing implementation prints an error row; the others still run (exit status 0 unless
--strict).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

from jax_ep.demo import _configure_cpu_devices

EP = "ep"
IMPLS = ("jax_ep", "reference", "ragged_a2a", "capacity")
LABELS = {
    "jax_ep": "jax_ep (CUDA EP + Mosaic gmm)",
    "reference": "reference + ragged_dot",
    "ragged_a2a": "ragged_all_to_all + ragged_dot",
    "capacity": "capacity factor {cf} (drops)",
}
AUX_WEIGHT, Z_WEIGHT = 1e-2, 1e-3
GPU_DEFAULT_CONFIGS = ((7168, 256), (4096, 64))
CPU_DEFAULT_CONFIGS = ((256, 32), (128, 16))


SHARD_MAP_OPTIONS = {}  # {"check_vma": False} with --no-check-vma


def shard_map(f, **kwargs):
    """jax.shard_map with this run's options (--no-check-vma)."""
    import jax
    return jax.shard_map(f, **kwargs, **SHARD_MAP_OPTIONS)


# ============================================================================ timing loop
def _scalar_of(tree):
    """float32 sum of the first element of every leaf (an O(1) function of all outputs)."""
    import jax
    import jax.numpy as jnp
    total = jnp.float32(0)
    for leaf in jax.tree.leaves(tree):
        total = total + leaf[(0,) * leaf.ndim].astype(jnp.float32)
    return total


def _nudge(inputs, outputs, eps):
    """inputs with element [0, ..., 0] of every leaf increased by eps * scalar(outputs) (in
    place; eps is 0 at run time, so the values stay, but XLA cannot know)."""
    import jax
    import jax.numpy as jnp
    delta = jnp.where(eps != 0, eps * _scalar_of(outputs), jnp.float32(0))
    return jax.tree.map(lambda a: a.at[(0,) * a.ndim].add(delta.astype(a.dtype)), inputs)


def make_runner(fn, out_shardings=None):
    """jit(run(n, eps, inputs)): n iterations of outputs = fn(*inputs) with each iteration's
    inputs depending on the previous outputs (see the module docstring). Returns the last
    outputs. out_shardings: a pytree of shardings like fn's outputs (for the loop's initial
    zero outputs), or None on a single device."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def run(n, eps, inputs):
        shapes = jax.eval_shape(fn, *inputs)

        def zeros(s, sharding=None):
            z = jnp.zeros(s.shape, s.dtype)
            return z if sharding is None else lax.with_sharding_constraint(z, sharding)

        if out_shardings is None:
            out0 = jax.tree.map(zeros, shapes)
        else:  # out_shardings may be a prefix (one sharding for a whole subtree)
            out0 = jax.tree.map(lambda sh, sub: jax.tree.map(lambda s: zeros(s, sh), sub),
                                out_shardings, shapes)

        def body(_, carry):
            inp, _ = carry
            out = fn(*inp)
            return _nudge(inp, out, eps), out

        return lax.fori_loop(0, n, body, (tuple(inputs), out0))[1]

    return jax.jit(run)


def measure(fn, inputs, out_shardings=None, *, repeats, min_time, max_n, keep=None):
    """Marginal seconds of one fn(*inputs), forward and backward as fn defines.

    Returns a dict: time_s, n, t_n / t_2n (call times), compile_s, and `kept` = keep(outputs
    of the first call) (small host values, e.g. statistics)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    run = make_runner(fn, out_shardings)
    eps = jnp.float32(0)

    def call(n):
        start = time.perf_counter()
        out = run(jnp.int32(n), eps, inputs)
        jax.block_until_ready(out)
        return time.perf_counter() - start, out

    first_s, out = call(1)  # compiles
    kept = None if keep is None else jax.tree.map(np.asarray, keep(out))
    del out
    est, out = call(1)
    del out
    n = int(min(max_n, max(1, math.ceil(min_time / max(est, 1e-9)))))
    t_n, t_2n = [], []
    for _ in range(repeats):
        t_n.append(call(n)[0])
        t_2n.append(call(2 * n)[0])
    med_n, med_2n = statistics.median(t_n), statistics.median(t_2n)
    marginal = (med_2n - med_n) / n
    note = ""
    if marginal <= 0.1 * med_2n / (2 * n):  # noise larger than the work: report the plain mean
        marginal, note = med_2n / (2 * n), "fixed cost not removed (noisy)"
    return {"time_s": marginal, "n": n, "t_n": t_n, "t_2n": t_2n, "compile_s": first_s - est,
            "note": note, "kept": kept}


# ============================================================================ layers
def _route(x, router, top_k):
    """moe's router (softmax) and its aux / z losses, per shard."""
    from jax_ep.moe import route, router_losses

    idx, weights, logits, probs = route(x, router, top_k=top_k)
    _, aux, z = router_losses(idx, logits, probs)
    return idx, weights, aux, z


def _excl_cumsum(a, axis=0):
    import jax.numpy as jnp
    return (jnp.cumsum(a, axis=axis) - a).astype(jnp.int32)


def _stats(dropped, selections):
    import jax.numpy as jnp
    return {"dropped": jnp.reshape(dropped, (1,)).astype(jnp.int32),
            "selections": jnp.full((1,), selections, jnp.int32)}


def moe_layer(buf, *, top_k, capacity, matmul_impl):
    """Per shard: (x, params) -> (y, aux [1], z [1], stats) with jax_ep.moe."""
    from jax_ep.moe import moe

    def layer(x, params):
        out = moe(buf, x, params, top_k=top_k, capacity=capacity, matmul_impl=matmul_impl)
        return (out.y, out.aux_loss.reshape(1), out.z_loss.reshape(1),
                _stats(out.num_dropped, x.shape[0] * top_k))
    return layer


def ragged_a2a_layer(*, num_ranks, num_experts, top_k, capacity):
    """Per shard MaxText-style dropless layer over jax.lax.ragged_all_to_all (see the module
    docstring). capacity: rows of the receive buffer (>= the most rows any rank receives)."""
    import jax.numpy as jnp
    from jax import lax
    from jax_ep.grouped_matmul import grouped_matmul
    from jax_ep.moe import shared_expert, swiglu

    num_local = num_experts // num_ranks

    def layer(x, params):
        num_tokens, hidden = x.shape
        idx, weights, aux, z = _route(x, params.router, top_k)
        me = lax.axis_index(EP)
        # Sort this rank's (token, expert) selections by expert: send blocks by rank.
        flat_expert = idx.reshape(-1)
        order = jnp.argsort(flat_expert, stable=True)
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
        send = x[order // top_k]                                        # [T*K, H]
        counts = jnp.zeros(num_experts, jnp.int32).at[flat_expert].add(1)
        per = lax.all_gather(counts, EP).reshape(num_ranks, num_ranks, num_local)  # [src, dst, l]
        matrix = per.sum(-1)                                            # [src, dst]
        send_sizes = matrix[me]
        recv_sizes = matrix[:, me]
        recv = lax.ragged_all_to_all(
            send, jnp.zeros((capacity, hidden), x.dtype), _excl_cumsum(send_sizes),
            send_sizes, _excl_cumsum(matrix, axis=0)[me], recv_sizes, axis_name=EP)
        # Received rows: by source rank, then local expert. Regroup by local expert.
        recv_counts = per[:, me, :].reshape(-1)                         # [(src, l)]
        ends = jnp.cumsum(recv_counts)
        rows = jnp.arange(capacity, dtype=jnp.int32)
        segment = jnp.searchsorted(ends, rows, side="right")
        local = jnp.where(rows < ends[-1], segment % num_local, num_local)
        order2 = jnp.argsort(local, stable=True)
        inverse2 = jnp.zeros_like(order2).at[order2].set(jnp.arange(capacity, dtype=order2.dtype))
        group_sizes = per[:, me, :].sum(0).astype(jnp.int32)            # [L]
        h = grouped_matmul(recv[order2], params.w_gate_up.astype(x.dtype), group_sizes, impl="xla")
        act = swiglu(h).astype(x.dtype)
        out = grouped_matmul(act, params.w_down.astype(x.dtype), group_sizes, impl="xla")
        back = lax.ragged_all_to_all(
            out[inverse2], jnp.zeros((num_tokens * top_k, hidden), x.dtype),
            _excl_cumsum(recv_sizes), recv_sizes, _excl_cumsum(matrix, axis=1)[:, me],
            send_sizes, axis_name=EP)
        per_slot = back[inverse].reshape(num_tokens, top_k, hidden).astype(jnp.float32)
        y = (per_slot * weights[:, :, None]).sum(1)
        shared = shared_expert(x, params)
        if shared is not None:
            y = y + shared
        return y.astype(x.dtype), aux.reshape(1), z.reshape(1), _stats(0, num_tokens * top_k)
    return layer


def capacity_slots(num_tokens, num_experts, top_k, factor):
    return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


def capacity_layer(*, num_ranks, num_experts, top_k, factor):
    """Per shard GShard/Switch capacity-factor layer (see the module docstring)."""
    import jax.numpy as jnp
    from jax import lax
    from jax_ep.moe import shared_expert, swiglu

    num_local = num_experts // num_ranks

    def layer(x, params):
        num_tokens, hidden = x.shape
        cap = capacity_slots(num_tokens, num_experts, top_k, factor)
        idx, weights, aux, z = _route(x, params.router, top_k)
        # Slot positions: cumulative count over the one-hot mask, choice-major (all tokens'
        # first choices before any second choice), as GShard.
        expert_km = idx.T.reshape(-1)                                   # [K*T]
        onehot = (expert_km[:, None] == jnp.arange(num_experts, dtype=jnp.int32)).astype(jnp.int32)
        position = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), expert_km[:, None], 1)[:, 0] - 1
        keep = position < cap
        slot = jnp.where(keep, expert_km * cap + position, num_experts * cap)  # [K*T]
        token_km = jnp.tile(jnp.arange(num_tokens, dtype=jnp.int32), top_k)
        slot_token = jnp.full(num_experts * cap, num_tokens, jnp.int32).at[slot].set(
            token_km, mode="drop")
        disp = jnp.take(x, slot_token, axis=0, mode="fill", fill_value=0)  # [E*cap, H]
        recv = lax.all_to_all(disp.reshape(num_ranks, num_local * cap, hidden), EP, 0, 0,
                              tiled=True)                               # [src, L*cap, H]
        xe = recv.reshape(num_ranks, num_local, cap, hidden).transpose(1, 0, 2, 3).reshape(
            num_local, num_ranks * cap, hidden)
        h = jnp.einsum("lch,lhf->lcf", xe, params.w_gate_up.astype(x.dtype),
                       preferred_element_type=jnp.float32)
        act = swiglu(h).astype(x.dtype)
        out = jnp.einsum("lcf,lfh->lch", act, params.w_down.astype(x.dtype),
                         preferred_element_type=jnp.float32).astype(x.dtype)
        out = out.reshape(num_local, num_ranks, cap, hidden).transpose(1, 0, 2, 3).reshape(
            num_ranks, num_local * cap, hidden)
        back = lax.all_to_all(out, EP, 0, 0, tiled=True).reshape(num_experts * cap, hidden)
        per_slot = jnp.take(back, slot, axis=0, mode="fill", fill_value=0)  # [K*T, H]
        per_slot = per_slot.reshape(top_k, num_tokens, hidden).astype(jnp.float32)
        y = (per_slot * weights.T[:, :, None]).sum(0)
        shared = shared_expert(x, params)
        if shared is not None:
            y = y + shared
        dropped = jnp.sum(~keep)
        return y.astype(x.dtype), aux.reshape(1), z.reshape(1), _stats(dropped, num_tokens * top_k)
    return layer


def layer_step(mesh, specs, layer):
    """Global fn(x, params, ct) -> (y, dx, dparams, stats): the layer's forward and backward."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    sharded = shard_map(layer, mesh=mesh, in_specs=(P(EP), specs),
                            out_specs=(P(EP), P(EP), P(EP), P(EP)))

    def fn(x, params, ct):
        def f(x, params):
            y, aux, z, stats = sharded(x, params)
            return (y, aux, z), stats
        (y, aux, z), vjp, stats = jax.vjp(f, x, params, has_aux=True)
        dx, dparams = vjp((ct, jnp.full_like(aux, AUX_WEIGHT), jnp.full_like(z, Z_WEIGHT)))
        return y, dx, dparams, stats
    return fn


# ============================================================================ parts
def part_steps(mesh, specs, buf, *, top_k, capacity, matmul_impl, shared):
    """{part name: builder(data) -> (fn, inputs, out_shardings)} for the breakdown."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jax_ep.grouped_matmul import grouped_matmul
    from jax_ep.moe import shared_expert as dense_shared_expert, swiglu

    ep = NamedSharding(mesh, P(EP))
    rep = NamedSharding(mesh, P())
    smap = functools.partial(shard_map, mesh=mesh)

    def router(d):
        f = smap(lambda x, r: (lambda i, w, a, z: (w, a.reshape(1), z.reshape(1)))(
            *_route(x, r, top_k)), in_specs=(P(EP), P()), out_specs=(P(EP), P(EP), P(EP)))

        def fn(x, r, ct_w):
            (w, aux, z), vjp = jax.vjp(f, x, r)
            dx, dr = vjp((ct_w, jnp.full_like(aux, AUX_WEIGHT), jnp.full_like(z, Z_WEIGHT)))
            return w, aux, z, dx, dr
        return fn, (d["x"], d["params"].router, d["ct_w"]), (ep, ep, ep, ep, rep)

    def dispatch(d):
        def per_shard(x, idx, w):
            out = buf.dispatch(x, idx, w, layout="expert", capacity=capacity)
            return out.recv_x, out.recv_topk_weights
        f = smap(per_shard, in_specs=(P(EP),) * 3, out_specs=(P(EP), P(EP)))

        def fn(x, idx, w, ct_x, ct_w):
            (rx, rw), vjp = jax.vjp(lambda x, w: f(x, idx, w), x, w)
            dx, dw = vjp((ct_x, ct_w))
            return rx, rw, dx, dw
        return fn, (d["x"], d["idx"], d["w"], d["ct_recv"], d["ct_recv_w"]), (ep,) * 4

    def experts(d):
        def per_shard(rx, gs, w1, w2, roww):
            h = grouped_matmul(rx, w1.astype(rx.dtype), gs, impl=matmul_impl)
            act = (swiglu(h) * roww).astype(rx.dtype)
            return grouped_matmul(act, w2.astype(rx.dtype), gs, impl=matmul_impl)
        f = smap(per_shard, in_specs=(P(EP),) * 5, out_specs=P(EP))

        def fn(rx, gs, w1, w2, roww, ct):
            out, vjp = jax.vjp(lambda rx, w1, w2, roww: f(rx, gs, w1, w2, roww), rx, w1, w2, roww)
            return (out,) + vjp(ct)
        p = d["params"]
        inputs = (d["recv_x"], d["group_sizes"], p.w_gate_up, p.w_down, d["row_weight"], d["ct_recv"])
        return fn, inputs, (ep, ep, p.w_gate_up.sharding, p.w_down.sharding, ep)

    def combine(d):
        f = smap(buf.combine, in_specs=(P(EP), P(EP)), out_specs=P(EP))

        def fn(rows, handle, ct):
            y, vjp = jax.vjp(lambda rows: f(rows, handle), rows)
            return (y,) + vjp(ct)
        return fn, (d["recv_x"], d["handle"], d["ct"]), (ep, ep)

    def shared_expert(d):
        f = smap(lambda x, s1, s2: dense_shared_expert(x, type(d["params"])(
            None, None, None, s1, s2)).astype(x.dtype), in_specs=(P(EP), P(), P()), out_specs=P(EP))

        def fn(x, s1, s2, ct):
            y, vjp = jax.vjp(f, x, s1, s2)
            return (y,) + vjp(ct)
        p = d["params"]
        return fn, (d["x"], p.shared_gate_up, p.shared_down, d["ct"]), (ep, ep, rep, rep)

    parts = {"router + top-k": router, "dispatch (bwd: combine)": dispatch,
             "expert MLP (2 gmm + SwiGLU)": experts, "combine (bwd: cached dispatch)": combine}
    if shared:
        parts["shared expert (dense)"] = shared_expert
    return parts


# ============================================================================ grouped matmul
def gmm_steps(impl):
    """{(pass): fn} for the grouped matmul alone, on one device."""
    import jax
    from jax_ep.grouped_matmul import grouped_matmul

    def fwd(x, w, gs):
        return grouped_matmul(x, w, gs, impl=impl)

    def fwd_bwd(x, w, gs, ct):
        y, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, gs, impl=impl), x, w)
        return (y,) + vjp(ct)
    return fwd, fwd_bwd


def einsum_steps():
    import jax
    import jax.numpy as jnp

    def mm(x, w):
        return jnp.einsum("lmk,lkn->lmn", x, w, preferred_element_type=jnp.float32).astype(x.dtype)

    def fwd(x, w):
        return mm(x, w)

    def fwd_bwd(x, w, ct):
        y, vjp = jax.vjp(mm, x, w)
        return (y,) + vjp(ct)
    return fwd, fwd_bwd


# ============================================================================ main
def _commit():
    """Short commit of the checkout: $JAX_EP_COMMIT, else git in this package's folder, else
    in $OLDPWD or the working folder when they are a jax_ep checkout (scripts/gpu_suite.sh runs
    the installed package from /tmp, right after leaving the checkout)."""
    if os.environ.get("JAX_EP_COMMIT"):
        return os.environ["JAX_EP_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (here, os.environ.get("OLDPWD"), os.getcwd()):
        if not folder or (folder != here and not os.path.isdir(os.path.join(folder, "jax_ep"))):
            continue
        try:
            out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True, cwd=folder, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            return out
    return "?"


def _error(e):
    line = f"{type(e).__name__}: {e}".strip().splitlines()
    return line[0][:300] if line else type(e).__name__


def _configs(args, on_gpu):
    if args.hidden is None and args.experts is None:
        return list(GPU_DEFAULT_CONFIGS if on_gpu else CPU_DEFAULT_CONFIGS)
    hidden = args.hidden or [h for h, _ in (GPU_DEFAULT_CONFIGS if on_gpu else CPU_DEFAULT_CONFIGS)]
    experts = args.experts or [e for _, e in (GPU_DEFAULT_CONFIGS if on_gpu else CPU_DEFAULT_CONFIGS)]
    if len(hidden) == 1:
        hidden = hidden * len(experts)
    if len(experts) == 1:
        experts = experts * len(hidden)
    if len(hidden) != len(experts):
        raise SystemExit(f"--hidden ({len(hidden)} values) and --experts ({len(experts)}) pair up: "
                         "give the same number of values, or one of either.")
    return list(zip(hidden, experts))


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m jax_ep.bench layer",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=None, help="T, tokens per GPU (4096)")
    parser.add_argument("--hidden", type=int, nargs="+", default=None,
                        help="H per configuration (7168 4096), paired with --experts")
    parser.add_argument("--experts", type=int, nargs="+", default=None,
                        help="E per configuration (256 64)")
    parser.add_argument("--ffn", type=int, default=None, help="F, expert FFN width (2048)")
    parser.add_argument("--shared-ffn", type=int, default=0, help="shared expert width (0: none)")
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--iters", type=int, default=3,
                        help="timed calls of n and of 2n iterations each (medians)")
    parser.add_argument("--min-time", type=float, default=0.1,
                        help="seconds one timed call of n iterations should take at least")
    parser.add_argument("--max-n", type=int, default=32)
    parser.add_argument("--capacity", default="measured",
                        help='dropless dispatch rows per rank: "measured", "worst" or a number')
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--skew", type=float, default=0.15,
                        help="weight of the tokens' shared direction (routing imbalance)")
    parser.add_argument("--num-sms", type=int, default=None, help="SMs of the CUDA kernels")
    parser.add_argument("--gmm-impls", nargs="*", default=["auto"],
                        choices=("auto", "mosaic", "xla"),
                        help="grouped_matmul impls timed alone against einsum (none: skip)")
    parser.add_argument("--no-check-vma", action="store_true",
                        help="shard_map(check_vma=False) everywhere (a workaround for ops whose "
                             "custom VJP drops the varying-axis type)")
    parser.add_argument("--force-ragged-dot", action="store_true",
                        help="run the ragged_dot layers even where XLA's dense-over-groups "
                             "ragged_dot needs more than half the GPU memory")
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the small-shape check of every impl against the reference")
    parser.add_argument("--plot", default="docs/layer_bench.png")
    parser.add_argument("--json", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 if any implementation, part or check failed")
    return parser.parse_args(argv)


class Bench:
    def __init__(self, args):
        import jax
        import numpy as np
        from jax.sharding import Mesh

        self.args = args
        self.start = time.perf_counter()
        devices = jax.devices()
        self.on_gpu = devices[0].platform == "gpu"
        if not self.on_gpu:
            devices = jax.devices("cpu")
        self.devices = devices
        self.num_ranks = len(devices)
        self.mesh = Mesh(np.array(devices), (EP,))
        if self.on_gpu:
            self.tokens = args.tokens or 4096
            self.ffn = args.ffn or 2048
        else:  # tiny shapes: only checks that everything runs
            self.tokens = min(args.tokens or 32, 64)
            self.ffn = min(args.ffn or 128, 256)
        self.configs = _configs(args, self.on_gpu)
        self.errors = []
        self.timing = dict(repeats=max(1, args.iters), min_time=args.min_time, max_n=args.max_n)

    # ---------------------------------------------------------------- helpers
    def log(self, msg):
        lead = len(msg) - len(msg.lstrip("\n"))
        print(f"{msg[:lead]}[{time.perf_counter() - self.start:6.1f}s] {msg[lead:]}", flush=True)

    def guarded(self, what, fn, *a, **k):
        try:
            return fn(*a, **k)
        except Exception as e:  # noqa: BLE001 - one failure must not end the benchmark
            self.errors.append(f"{what}: {_error(e)}")
            print(f"  ERROR in {what}: {_error(e)}", flush=True)
            traceback.print_exc(limit=4, file=sys.stderr)
            return {"error": _error(e)}

    def ragged_dot_too_big(self, groups, rows, widths):
        """Why the XLA ragged_dot layers are skipped here, or "". XLA's GPU ragged_dot works
        densely over the groups: its backward holds float32 [groups, rows, max(widths)]
        (64 GB at E=256 on 4 GPUs, H=7168), which fails in autotuning after ~90 s of
        compiling. Skip when that is more than half the GPU's memory."""
        if not self.on_gpu or self.args.force_ragged_dot:
            return ""
        need = groups * rows * max(widths) * 4
        try:
            limit = self.devices[0].memory_stats()["bytes_limit"]
        except Exception:  # noqa: BLE001
            limit = 0
        if limit and need > limit / 2:
            return (f"skipped: XLA's ragged_dot is dense over the {groups} groups on GPU and "
                    f"would need {need / 2**30:.0f} GiB (float32 [{groups}, {rows}, "
                    f"{max(widths)}]) of {limit / 2**30:.0f} GiB; --force-ragged-dot runs it")
        return ""

    def make_buffer(self, kind, hidden, experts, tokens=None):
        import jax_ep
        backend = kind if self.on_gpu else "reference"
        kw = {} if self.args.num_sms is None else {"num_sms": self.args.num_sms}
        return jax_ep.Buffer(self.mesh, EP, num_experts=experts, hidden=hidden, backend=backend,
                             max_tokens_per_rank=tokens or self.tokens, **kw)

    def data(self, hidden, experts, *, tokens=None, ffn=None, seed=0):
        """Global sharded x, ct, params (same for every implementation)."""
        import jax
        import jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P
        from jax_ep.moe import init_moe_params, moe_partition_specs

        tokens = tokens or self.tokens
        ffn = ffn or self.ffn
        total = tokens * self.num_ranks
        ep = NamedSharding(self.mesh, P(EP))
        specs = moe_partition_specs(EP)
        skew = self.args.skew
        init = functools.partial(init_moe_params, hidden=hidden, ffn=ffn, num_experts=experts,
                                 shared_ffn=self.args.shared_ffn)

        def make(key):  # one jitted call: x, ct, params, each made where it lives
            kx, kd, km, kp = jax.random.split(key, 4)
            noise = jax.random.normal(kx, (total, hidden), jnp.float32)
            direction = jax.random.normal(km, (1, hidden), jnp.float32)
            x = (noise + skew * direction).astype(jnp.bfloat16)
            ct = jax.random.normal(kd, (total, hidden), jnp.bfloat16)
            return x, ct, init(kp)

        shapes = jax.eval_shape(make, jax.random.key(0))[2]
        param_shardings = type(shapes)(*[None if leaf is None else NamedSharding(self.mesh, spec)
                                         for leaf, spec in zip(shapes, specs)])
        x, ct, params = jax.jit(make, out_shardings=(ep, ep, param_shardings))(
            jax.random.key(seed))
        return x, ct, params, specs

    def routing(self, x, params, top_k):
        """Global routing (the same per-shard math as moe): host topk_idx [R*T, K]."""
        import jax
        import numpy as np
        from jax.sharding import PartitionSpec as P
        idx = jax.jit(shard_map(lambda x, r: _route(x, r, top_k)[0], mesh=self.mesh,
                                    in_specs=(P(EP), P()), out_specs=P(EP)))(x, params.router)
        return np.asarray(idx)

    # ---------------------------------------------------------------- the check
    def check(self, impls):
        """Forward of every impl against `reference` at small shapes (once)."""
        import jax
        import numpy as np
        from jax.sharding import PartitionSpec as P

        R = self.num_ranks
        hidden, ffn, tokens = 256, 128, 64
        experts = 4 * R
        top_k = min(self.args.topk, experts // 2)
        x, _, params, specs = self.data(hidden, experts, tokens=tokens, ffn=ffn, seed=1)
        worst = tokens * R * min(top_k, experts // R)
        ref_buf = self.make_buffer("reference", hidden, experts, tokens)

        def forward(layer):
            f = shard_map(layer, mesh=self.mesh, in_specs=(P(EP), specs),
                              out_specs=(P(EP), P(EP), P(EP), P(EP)))
            return np.asarray(jax.jit(f)(x, params)[0], np.float32)

        y_ref = forward(moe_layer(ref_buf, top_k=top_k, capacity=None, matmul_impl="xla"))
        scale = float(np.abs(y_ref).max()) or 1.0
        results = {}
        self.log(f"check at small shapes (T={tokens}/rank H={hidden} F={ffn} E={experts} "
                 f"top-{top_k}), forward y against `reference`:")
        for impl in impls:
            if impl == "reference":
                continue
            if impl == "ragged_a2a" and not self.on_gpu:
                self.log(f"  {impl:12s} skipped (ragged_all_to_all does not run on XLA:CPU)")
                continue

            def one(impl=impl):
                if impl == "jax_ep":
                    buf = self.make_buffer("cuda", hidden, experts, tokens)
                    layer = moe_layer(buf, top_k=top_k, capacity=None, matmul_impl="auto")
                elif impl == "ragged_a2a":
                    layer = ragged_a2a_layer(num_ranks=R, num_experts=experts, top_k=top_k,
                                             capacity=worst)
                else:  # capacity factor E / K: one slot per token per expert, nothing drops
                    layer = capacity_layer(num_ranks=R, num_experts=experts, top_k=top_k,
                                           factor=experts / top_k)
                err = float(np.abs(forward(layer) - y_ref).max()) / scale
                ok = err < 3e-2
                if not ok:
                    self.errors.append(f"check {impl}: max error {err:.2e} of max |y|")
                self.log(f"  {impl:12s} max |y - y_ref| / max |y_ref| = {err:.2e} "
                         f"({'ok' if ok else 'MISMATCH'})")
                return {"max_rel_error": err, "ok": ok}
            results[impl] = self.guarded(f"check {impl}", one)
        return results

    # ---------------------------------------------------------------- one configuration
    def run_config(self, hidden, experts):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P

        args = self.args
        R, T, F, K = self.num_ranks, self.tokens, self.ffn, args.topk
        L = experts // R
        res = {"hidden": hidden, "experts": experts, "local_experts": L, "tokens": T, "ffn": F,
               "topk": K, "impls": {}, "breakdown": {}, "gmm": {}}
        self.log(f"\n=== H={hidden} E={experts} ({L}/GPU) F={F} top-{K} T={T}/GPU ===")
        x, ct, params, specs = self.data(hidden, experts, seed=args.seed)
        ep = NamedSharding(self.mesh, P(EP))

        idx = self.routing(x, params, K)
        counts = np.bincount(idx.ravel(), minlength=experts)
        rows = counts.reshape(R, L).sum(1)
        worst = T * R * min(K, L)
        if args.capacity == "worst":
            capacity = worst
        elif args.capacity == "measured":
            capacity = min(worst, -(-math.ceil(rows.max() * 1.02) // 256) * 256)
        else:
            capacity = int(args.capacity)
        cap_slots = capacity_slots(T, experts, K, args.capacity_factor)
        res["routing"] = {
            "rows_per_rank": rows.tolist(), "capacity": capacity, "worst_capacity": worst,
            "expert_load_max_over_mean": float(counts.max() / counts.mean()),
            "expert_load_min_over_mean": float(counts.min() / counts.mean()),
            "rank_load_max_over_mean": float(rows.max() / rows.mean()),
            "capacity_slots_per_expert_per_rank": cap_slots}
        self.log(f"routing: rows/GPU mean {rows.mean():.0f} max {rows.max()} -> dispatch capacity "
                 f"{capacity} rows (worst case {worst}); expert load max/mean "
                 f"{counts.max() / counts.mean():.2f} min/mean {counts.min() / counts.mean():.2f}; "
                 f"capacity-factor slots {cap_slots}/expert/rank")

        # Model FLOPs of the expert matmuls per GPU (forward + backward = 3 x forward).
        res["expert_flops_per_gpu"] = 3 * 2 * T * K * 3 * hidden * F
        grads_sh = (ep, x.sharding, jax.tree.map(lambda a: a.sharding, params), ep)

        too_big = self.ragged_dot_too_big(L, capacity, (hidden, 2 * F))
        bufs = {}
        for impl in args.impls:
            self.log(f"[{impl}] forward + backward")

            def whole(impl=impl):
                if impl == "ragged_a2a" and not self.on_gpu:
                    return {"skipped": "ragged_all_to_all does not run on XLA:CPU"}
                if impl in ("reference", "ragged_a2a") and too_big:
                    self.log(f"  {too_big}")
                    return {"skipped": too_big}
                if impl in ("jax_ep", "reference"):
                    kind = "cuda" if impl == "jax_ep" else "reference"
                    bufs[impl] = buf = self.make_buffer(kind, hidden, experts)
                    layer = moe_layer(buf, top_k=K, capacity=capacity,
                                      matmul_impl="auto" if impl == "jax_ep" else "xla")
                elif impl == "ragged_a2a":
                    layer = ragged_a2a_layer(num_ranks=R, num_experts=experts, top_k=K,
                                             capacity=capacity)
                else:
                    layer = capacity_layer(num_ranks=R, num_experts=experts, top_k=K,
                                           factor=args.capacity_factor)
                fn = layer_step(self.mesh, specs, layer)
                r = measure(fn, (x, params, ct), grads_sh, keep=lambda out: out[3], **self.timing)
                stats = r.pop("kept")
                r["dropped"] = int(stats["dropped"].sum())
                r["selections"] = int(stats["selections"].sum())
                r["drop_rate"] = r["dropped"] / max(r["selections"], 1)
                r["tokens_per_s_per_gpu"] = T / r["time_s"]
                r["tokens_per_s_total"] = R * T / r["time_s"]
                r["expert_tflops_per_gpu"] = res["expert_flops_per_gpu"] / r["time_s"] / 1e12
                self.log(f"  {r['time_s'] * 1e3:.2f} ms (n={r['n']}, compile {r['compile_s']:.1f} s)"
                         + (f", dropped {r['drop_rate']:.2%} of selections" if r["dropped"] else ""))
                return r
            res["impls"][impl] = self.guarded(f"{impl} H={hidden} E={experts}", whole)
            gc.collect()

        if not args.no_breakdown:
            for impl in ("jax_ep", "reference"):
                if impl not in args.impls:
                    continue

                def breakdown(impl=impl):
                    buf = bufs.get(impl) or self.make_buffer(
                        "cuda" if impl == "jax_ep" else "reference", hidden, experts)
                    return self.breakdown(impl, buf, x, ct, params, specs, capacity, K,
                                          skip_experts=too_big if impl == "reference" else "")
                res["breakdown"][impl] = self.guarded(f"{impl} breakdown H={hidden} E={experts}",
                                                      breakdown)
                gc.collect()
        bufs.clear()

        if args.gmm_impls:
            res["gmm"] = self.guarded(f"grouped matmul H={hidden} E={experts}", self.gmm_alone,
                                      counts[:L], hidden, F)
        del x, ct, params
        gc.collect()
        return res

    def breakdown(self, impl, buf, x, ct, params, specs, capacity, top_k, skip_experts=""):
        import jax
        import jax.numpy as jnp
        from jax.sharding import PartitionSpec as P

        self.log(f"[{impl}] breakdown (parts alone, forward + backward)")
        matmul_impl = "auto" if impl == "jax_ep" else "xla"
        # Inputs of the parts: this data's routing and dispatch, and cotangents (one call).
        def per_shard(x, router, key):
            idx, w = _route(x, router, top_k)[:2]
            out = buf.dispatch(x, idx, w, layout="expert", capacity=capacity)
            k1, k2, k3 = jax.random.split(key[0], 3)
            return (idx, w, out.recv_x, out.recv_topk_weights.sum(-1, keepdims=True),
                    out.num_recv_tokens_per_expert, out.handle,
                    jax.random.normal(k1, w.shape, jnp.float32),
                    jax.random.normal(k2, out.recv_x.shape, jnp.bfloat16),
                    jax.random.normal(k3, out.recv_topk_weights.shape, jnp.float32))
        keys = jax.random.split(jax.random.key(7), self.num_ranks)
        idx, w, recv_x, row_w, gs, handle, ct_w, ct_recv, ct_recv_w = jax.jit(shard_map(
            per_shard, mesh=self.mesh, in_specs=(P(EP), P(), P(EP)), out_specs=P(EP)))(
                x, params.router, keys)
        data = {"x": x, "ct": ct, "params": params, "idx": idx, "w": w, "recv_x": recv_x,
                "row_weight": row_w, "group_sizes": gs, "handle": handle, "ct_w": ct_w,
                "ct_recv": ct_recv, "ct_recv_w": ct_recv_w}
        parts = part_steps(self.mesh, specs, buf, top_k=top_k, capacity=capacity,
                           matmul_impl=matmul_impl, shared=params.shared_gate_up is not None)
        out = {}
        for name, build in parts.items():
            if skip_experts and name.startswith("expert MLP"):
                out[name] = {"skipped": skip_experts}
                continue

            def one(build=build):
                fn, inputs, shardings = build(data)
                r = measure(fn, inputs, shardings, **self.timing)
                r.pop("kept")
                return r
            out[name] = self.guarded(f"{impl} part {name!r}", one)
            if "time_s" in out[name]:
                self.log(f"  {name:34s} {out[name]['time_s'] * 1e3:9.3f} ms (n={out[name]['n']})")
        times = [r["time_s"] for r in out.values() if "time_s" in r]
        result = {"parts": out}
        if len(times) == len(out):
            result["sum_of_parts_s"] = sum(times)
        return result

    def gmm_alone(self, group_sizes_np, hidden, ffn):
        """gate_up and down grouped matmuls on device 0 (its routed group sizes) vs einsum."""
        import jax
        import jax.numpy as jnp
        import importlib
        from jax.sharding import SingleDeviceSharding
        gm = importlib.import_module("jax_ep.grouped_matmul")  # the module, not the function

        dev = self.devices[0]
        L = len(group_sizes_np)
        M = int(group_sizes_np.sum())
        rows = max(256, -(-M // 256) * 256)
        per = -(-M // L)
        gs = jax.device_put(jnp.asarray(group_sizes_np, jnp.int32), dev)
        self.log(f"[grouped matmul alone] device 0: M={M} routed rows in {L} groups "
                 f"(sizes {group_sizes_np.min()}..{group_sizes_np.max()}), einsum [{L}, {per}, K]")
        out = {"M": M, "groups": L, "group_size_min": int(group_sizes_np.min()),
               "group_size_max": int(group_sizes_np.max()), "einsum_rows_per_group": per,
               "shapes": {}}
        key = jax.random.key(11)
        for name, k_dim, n_dim in (("gate_up", hidden, 2 * ffn), ("down", ffn, hidden)):
            def make(key, k_dim=k_dim, n_dim=n_dim):
                ks = jax.random.split(key, 5)
                normal = lambda k, shape, scale=1.0: (  # noqa: E731
                    jax.random.normal(k, shape, jnp.float32) * scale).astype(jnp.bfloat16)
                return (normal(ks[0], (L, k_dim, n_dim), 1 / math.sqrt(k_dim)),
                        normal(ks[1], (rows, k_dim)), normal(ks[2], (rows, n_dim)),
                        normal(ks[3], (L, per, k_dim)), normal(ks[4], (L, per, n_dim)))
            w, x, ct, xe, cte = jax.jit(make, out_shardings=SingleDeviceSharding(dev))(
                jax.random.fold_in(key, n_dim))
            flops = 2 * M * k_dim * n_dim
            flops_e = 2 * L * per * k_dim * n_dim
            entry = {"K": k_dim, "N": n_dim, "flops_fwd": flops, "flops_fwd_einsum": flops_e}
            fwd_e, fwd_bwd_e = einsum_steps()
            for pass_name, fn, inputs, mult in (("fwd", fwd_e, (xe, w), 1),
                                                ("fwd+bwd", fwd_bwd_e, (xe, w, cte), 3)):
                r = self.guarded(f"einsum {name} {pass_name}", measure, fn, inputs, **self.timing)
                if "time_s" in r:
                    r.pop("kept")
                    r["tflops"] = mult * flops_e / r["time_s"] / 1e12
                entry[f"einsum {pass_name}"] = r
            for impl in self.args.gmm_impls:
                try:
                    resolved = gm._resolve(impl, x, w)
                except Exception:  # noqa: BLE001
                    resolved = impl
                fwd, fwd_bwd = gmm_steps(impl)
                for pass_name, fn, inputs, mult in (("fwd", fwd, (x, w, gs), 1),
                                                    ("fwd+bwd", fwd_bwd, (x, w, gs, ct), 3)):
                    r = self.guarded(f"gmm[{impl}] {name} {pass_name}", measure, fn, inputs,
                                     **self.timing)
                    if "time_s" in r:
                        r.pop("kept")
                        r["tflops"] = mult * flops / r["time_s"] / 1e12
                        e = entry[f"einsum {pass_name}"]
                        if "tflops" in e:
                            r["ratio_vs_einsum"] = r["tflops"] / e["tflops"]
                    r["resolved_impl"] = resolved
                    entry[f"gmm[{impl}] {pass_name}"] = r
            out["shapes"][name] = entry
            del w, x, ct, xe, cte
            gc.collect()
        return out

    # ---------------------------------------------------------------- report
    def header(self):
        import jax
        dev = self.devices[0]
        return (f"jax_ep.bench layer  {datetime.datetime.now():%Y-%m-%d %H:%M}  commit {_commit()}  "
                f"jax {jax.__version__}  {self.num_ranks} x {dev.device_kind} ({dev.platform})")

    def print_tables(self, meta, results):
        cf = self.args.capacity_factor
        print("\n" + "=" * 100)
        print(meta["header"])
        print(f"T={self.tokens} tokens/GPU, F={self.ffn}, top-{self.args.topk}, bf16, "
              f"shared FFN {self.args.shared_ffn}, skew {self.args.skew}; times: forward + "
              "backward of one layer, marginal cost per iteration (module docstring)")
        for res in results:
            if "error" in res:
                print(f"\nH={res.get('hidden')} E={res.get('experts')}: ERROR {res['error']}")
                continue
            rt = res["routing"]
            print(f"\n--- H={res['hidden']} E={res['experts']} ({res['local_experts']} experts/GPU): "
                  f"routed rows/GPU max {max(rt['rows_per_rank'])} (dispatch capacity "
                  f"{rt['capacity']}), expert load max/mean {rt['expert_load_max_over_mean']:.2f}")
            head = (f"{'implementation':34s} {'fwd+bwd ms':>11s} {'tok/s/GPU':>11s} "
                    f"{'tok/s total':>12s} {'expert TF/s/GPU':>16s} {'t / t(jax_ep)':>14s}  notes")
            print(head)
            print("-" * len(head))
            base = res["impls"].get("jax_ep", {}).get("time_s")
            for impl in self.args.impls:
                r = res["impls"].get(impl, {})
                label = LABELS[impl].format(cf=cf)
                if "time_s" not in r:
                    why = r.get("error") or r.get("skipped") or "not run"
                    print(f"{label:34s} {'-':>11s} {'-':>11s} {'-':>12s} {'-':>16s} {'-':>14s}  "
                          f"{'ERROR: ' if 'error' in r else ''}{why}")
                    continue
                notes = []
                if impl == "jax_ep" and not self.on_gpu:
                    notes.append("reference backend (no GPU)")
                if impl == "capacity" or r.get("dropped"):
                    notes.append(f"drop rate {r['drop_rate']:.2%}")
                if r.get("note"):
                    notes.append(r["note"])
                ratio = f"{r['time_s'] / base:.2f}x" if base else "-"
                print(f"{label:34s} {r['time_s'] * 1e3:11.2f} {_si(r['tokens_per_s_per_gpu']):>11s} "
                      f"{_si(r['tokens_per_s_total']):>12s} {r['expert_tflops_per_gpu']:16.1f} "
                      f"{ratio:>14s}  {'; '.join(notes)}")
            self.print_breakdown(res)
            self.print_gmm(res)

    def print_breakdown(self, res):
        bd = {k: v for k, v in res["breakdown"].items() if "parts" in v}
        if not bd:
            return
        impls = list(bd)
        names = []
        for v in bd.values():
            names += [n for n in v["parts"] if n not in names]
        print(f"\nbreakdown, forward + backward ms (parts timed alone)   "
              + " ".join(f"{i:>10s}" for i in impls))
        for n in names:
            cells = []
            for i in impls:
                p = bd[i]["parts"].get(n, {})
                cells.append(f"{p['time_s'] * 1e3:10.3f}" if "time_s" in p else
                             f"{'skipped' if 'skipped' in p else 'ERROR':>10s}")
            print(f"  {n:52s}" + " ".join(cells))
        rows = [("sum of parts", lambda i: bd[i].get("sum_of_parts_s")),
                ("whole layer", lambda i: res["impls"].get(i, {}).get("time_s"))]
        for label, get in rows:
            print(f"  {label:52s}" + " ".join(
                f"{get(i) * 1e3:10.3f}" if get(i) else f"{'-':>10s}" for i in impls))
        cells = []
        for i in impls:
            s, w = bd[i].get("sum_of_parts_s"), res["impls"].get(i, {}).get("time_s")
            cells.append(f"{w / s:10.2f}" if s and w else f"{'-':>10s}")
        print(f"  {'whole / sum of parts (target <= 1.25)':52s}" + " ".join(cells))

    def print_gmm(self, res):
        g = res.get("gmm") or {}
        if "shapes" not in g:
            if "error" in g:
                print(f"\ngrouped matmul alone: ERROR {g['error']}")
            return
        print(f"\ngrouped matmul alone, device 0: M={g['M']} routed rows in {g['groups']} groups "
              f"({g['group_size_min']}..{g['group_size_max']}); einsum [{g['groups']}, "
              f"{g['einsum_rows_per_group']}, K] x [{g['groups']}, K, N]; target >= 85% of einsum")
        head = (f"  {'matmul':34s} {'pass':8s} {'impl':>14s} {'ms':>9s} {'TF/s':>7s} "
                f"{'einsum ms':>10s} {'TF/s':>7s} {'vs einsum':>10s}")
        print(head)
        for name, e in g["shapes"].items():
            shape = f"{name} [M,{e['K']}]x[{g['groups']},{e['K']},{e['N']}]"
            for pass_name in ("fwd", "fwd+bwd"):
                ein = e.get(f"einsum {pass_name}", {})
                ein_cells = (f"{ein['time_s'] * 1e3:10.3f} {ein['tflops']:7.1f}" if "tflops" in ein
                             else f"{'ERROR':>10s} {'-':>7s}")
                for impl in self.args.gmm_impls:
                    r = e.get(f"gmm[{impl}] {pass_name}", {})
                    label = f"{impl}->{r.get('resolved_impl', '?')}"
                    if "tflops" in r:
                        ratio = f"{r['ratio_vs_einsum']:.0%}" if "ratio_vs_einsum" in r else "-"
                        print(f"  {shape:34s} {pass_name:8s} {label:>14s} {r['time_s'] * 1e3:9.3f} "
                              f"{r['tflops']:7.1f} {ein_cells} {ratio:>10s}")
                    else:
                        print(f"  {shape:34s} {pass_name:8s} {label:>14s} {'ERROR':>9s} {'-':>7s} "
                              f"{ein_cells} {'-':>10s}  {r.get('error', '')}")

    def plot(self, path, meta, results):
        """Top: tokens/s per GPU per implementation; the jax_ep and reference bars are split
        by each part's share of the sum of parts. Bottom: the breakdown as shares of the sum
        of parts (100%), the whole layer as a black line (target: <= 125%)."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        results = [r for r in results if "impls" in r]
        if not results:
            return
        cf = self.args.capacity_factor
        with_bd = any(any("sum_of_parts_s" in v for v in r["breakdown"].values())
                      for r in results)
        nrows = 2 if with_bd else 1
        fig, axes = plt.subplots(nrows, len(results), figsize=(6.5 * len(results), 4.6 * nrows),
                                 squeeze=False)
        colors = {"jax_ep": "#1f77b4", "reference": "#ff7f0e", "ragged_a2a": "#2ca02c",
                  "capacity": "#9467bd"}
        names = []
        for res in results:
            for v in res["breakdown"].values():
                names += [n for n in v.get("parts", {}) if n not in names]
        part_colors = {n: plt.get_cmap("Pastel1")(k) for k, n in enumerate(names)}

        def shares(res, impl):  # only where every part was timed
            if "sum_of_parts_s" not in res["breakdown"].get(impl, {}):
                return {}, 0.0
            parts = res["breakdown"][impl]["parts"]
            times = {n: p["time_s"] for n, p in parts.items() if "time_s" in p}
            total = sum(times.values())
            return ({n: t / total for n, t in times.items()}, total) if total else ({}, 0.0)

        for col, res in enumerate(results):
            ax = axes[0][col]
            impls = list(self.args.impls)
            for j, impl in enumerate(impls):
                r = res["impls"].get(impl, {})
                v = r.get("tokens_per_s_per_gpu", 0.0)
                share, _ = shares(res, impl)
                ax.bar(j, v, color=colors[impl], width=0.7)
                if share and v:  # split into the parts' shares, drawn narrower inside
                    bottom = 0.0
                    for n, f in share.items():
                        ax.bar(j, v * f, bottom=bottom, color=part_colors[n], width=0.4,
                               edgecolor=colors[impl], linewidth=0.5)
                        bottom += v * f
                text = (f"{_si(v)} tok/s\n{r['time_s'] * 1e3:.1f} ms" if v else
                        ("skipped" if "skipped" in r else "error"))
                ax.annotate(text, (j, v), ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                            textcoords="offset points")
            ax.set_xticks(range(len(impls)), [
                LABELS[i].format(cf=cf).replace(" + ", "\n+ ").replace(" (", "\n(")
                for i in impls], fontsize=7)
            ax.set_ylabel("tokens / s per GPU (forward + backward)")
            ax.set_title(f"H={res['hidden']} E={res['experts']} F={res['ffn']} top-{res['topk']}, "
                         f"T={res['tokens']}/GPU, {self.num_ranks} GPUs", fontsize=10)
            ax.margins(y=0.2)
            if nrows == 2:
                ax = axes[1][col]
                bd_impls = [i for i in ("jax_ep", "reference") if shares(res, i)[0]]
                for j, impl in enumerate(bd_impls):
                    share, total = shares(res, impl)
                    bottom = 0.0
                    for n, f in share.items():
                        ax.bar(j, 100 * f, bottom=bottom, color=part_colors[n], width=0.5,
                               label=n if j == 0 else None)
                        if f > 0.06:
                            ax.text(j, bottom + 50 * f, f"{f * total * 1e3:.2f} ms", ha="center",
                                    va="center", fontsize=7)
                        bottom += 100 * f
                    whole = res["impls"].get(impl, {}).get("time_s")
                    label = f"sum {total * 1e3:.2f} ms"
                    if whole:
                        ax.plot([j - 0.35, j + 0.35], [100 * whole / total] * 2, color="black",
                                lw=2, label="whole layer" if j == 0 else None)
                        label += f"\nwhole {whole * 1e3:.2f} ms ({whole / total:.2f}x)"
                    ax.annotate(label, (j, max(100, 100 * (whole or 0) / total)), ha="center",
                                va="bottom", fontsize=7, xytext=(0, 3), textcoords="offset points")
                ax.axhline(125, color="gray", ls="--", lw=1, label="target: whole <= 1.25 x sum")
                ax.set_xticks(range(len(bd_impls)), [LABELS[i] for i in bd_impls], fontsize=7)
                ax.set_xlim(-0.8, max(len(bd_impls), 2) - 0.2)
                ax.set_ylabel("% of the sum of parts (timed alone)")
                ax.set_ylim(0, max(170, *(100 * res["impls"].get(i, {}).get("time_s", 0)
                                          / shares(res, i)[1] + 40 for i in bd_impls)))
                ax.legend(fontsize=7, loc="upper right")
        fig.suptitle(meta["header"], fontsize=9)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _si(v):
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    SHARD_MAP_OPTIONS.clear()
    if args.no_check_vma:
        SHARD_MAP_OPTIONS["check_vma"] = False
    _configure_cpu_devices()
    import jax

    bench = Bench(args)
    meta = {"header": bench.header(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "commit": _commit(), "jax": jax.__version__, "device_kind": bench.devices[0].device_kind,
            "platform": bench.devices[0].platform, "device_count": bench.num_ranks,
            "tokens_per_gpu": bench.tokens, "ffn": bench.ffn, "args": vars(args)}
    bench.log(meta["header"])
    if not bench.on_gpu:
        bench.log("no GPU: 8 virtual CPU devices, tiny shapes, jax_ep on the reference backend "
                  "(this only checks that the benchmark runs)")
    results = []
    if not args.no_check:
        meta["check"] = bench.guarded("check", bench.check, args.impls)
    for hidden, experts in bench.configs:
        results.append(bench.guarded(f"configuration H={hidden} E={experts}", bench.run_config,
                                     hidden, experts))
        if "error" in results[-1]:
            results[-1].update(hidden=hidden, experts=experts)
    meta["errors"] = bench.errors
    bench.guarded("tables", bench.print_tables, meta, results)
    if args.plot:
        if "error" not in (bench.guarded("plot", bench.plot, args.plot, meta, results) or {}):
            print(f"\nplot: {args.plot}")
    if args.json:
        def dump():
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
            print(f"json: {args.json}")
        bench.guarded("json", dump)
    if bench.errors:
        print(f"\n{len(bench.errors)} error(s):")
        for e in bench.errors:
            print(f"  {e}")
    return 1 if (args.strict and bench.errors) else 0


if __name__ == "__main__":
    sys.exit(main())
