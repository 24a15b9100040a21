"""Soak: many iterations of every mode with changing routing and sizes, every Nth result
checked against the reference backend, GPU and host memory printed and required to stay flat.

    python scripts/soak.py --iters 10000                      # one process, every local GPU
    python -m jax_ep.launch -n 4 -- scripts/soak.py --iters 10000 --num-ranks-per-node 2

Modes: "normal" (dispatch + combine, both layouts, a bias), "low_latency" (fused
low-latency dispatch + weighted combine), "hook" (the same, hooked send/receive), and with
--num-ranks-per-node G < R (one process per GPU only) "internode" (normal mode over NVSHMEM).
Iteration i draws its inputs inside the jitted step from a key folded with i (routing:
distinct random experts per token, 1/8 of the slots -1, every 7th iteration all tokens to
one expert), and cycles through three token counts (three compiled programs per mode). Every
--check-every iterations the reference backend runs the same step and the outputs must be
equal (normal mode bit for bit; the low-latency combine within one bf16 ulp). Memory is
read once every program ran (warm) and at the end: GPU memory (nvidia-smi, this process's
GPUs) must not grow by more than 256 MiB, host RSS by more than 512 MiB (both also printed
every --memory-every iterations). Exit code 1 on a mismatch or growth.
"""

import argparse
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_ep
import jax_ep.launch

HIDDEN, NUM_EXPERTS, TOPK = 2048, 64, 8


def make_inputs(key, num_tokens, axis):
    """Per shard, inside shard_map: x [T, H] bf16, topk_idx [T, K] int32, weights [T, K]."""
    key = jax.random.fold_in(key, jax.lax.axis_index(axis))
    kx, ki, kh, kw = jax.random.split(key, 4)
    x = jax.random.normal(kx, (num_tokens, HIDDEN), jnp.bfloat16)
    scores = jax.random.uniform(ki, (num_tokens, NUM_EXPERTS))
    idx = jax.lax.top_k(scores, TOPK)[1].astype(jnp.int32)
    idx = jnp.where(jax.random.uniform(kh, idx.shape) < 1 / 8, -1, idx)
    w = jax.random.uniform(kw, (num_tokens, TOPK), jnp.float32)
    return x, idx, w


def step_fn(buf, mesh, mode, num_tokens):
    """jit(shard_map(...)): (key uint32 [2], all_to_one bool []) -> outputs (P("ep"))."""
    def body(key, all_to_one):
        x, idx, w = make_inputs(key, num_tokens, "ep")
        idx = jnp.where(all_to_one & (idx >= 0), 3, idx)
        if mode in ("normal", "internode"):
            outs = []
            for layout in ("rank", "expert"):
                out = buf.dispatch(x, idx, w, layout=layout)
                y = (out.recv_x.astype(jnp.float32) * 0.5).astype(x.dtype)
                outs += [out.recv_x, out.num_recv_tokens[None], out.num_dropped[None],
                         buf.combine(y, out.handle, bias=x)]
            return tuple(outs)
        if mode == "hook":
            out = buf.low_latency_dispatch_recv(buf.low_latency_dispatch_send(x, idx))
        else:
            out = buf.low_latency_dispatch(x, idx)
        valid = jnp.arange(out.recv_x.shape[1])[None, :, None] < out.recv_count[:, None, None]
        recv_x = jnp.where(valid, out.recv_x, 0)  # rows past recv_count are unspecified
        y = (recv_x.astype(jnp.float32) * 0.5).astype(x.dtype)
        if mode == "hook":
            combined = buf.low_latency_combine_recv(
                buf.low_latency_combine_send(y, idx, w, out.handle))
        else:
            combined = buf.low_latency_combine(y, idx, w, out.handle)
        return recv_x, out.recv_count, combined
    num_outs = 8 if mode in ("normal", "internode") else 3
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P()),
                                 out_specs=(P("ep"),) * num_outs))


def replicated(mesh, value):
    """A numpy value as a global array replicated over the mesh (every process passes it)."""
    return jax.make_array_from_callback(value.shape, NamedSharding(mesh, P()), lambda _: value)


def local(array):
    return np.concatenate([np.asarray(s.data.astype(jnp.float32) if s.data.dtype == jnp.bfloat16
                                      else s.data) for s in array.addressable_shards])


def gpu_memory_mib():
    """MiB used on this process's GPUs (nvidia-smi indices of jax.local_devices())."""
    ids = ",".join(str(d.local_hardware_id) for d in jax.local_devices() if d.platform == "gpu")
    try:
        out = subprocess.run(["nvidia-smi", f"--id={ids}", "--query-gpu=memory.used",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True)
    except FileNotFoundError:  # no NVIDIA driver: a CPU run
        return 0
    return sum(int(v) for v in out.stdout.split()) if out.returncode == 0 else 0


def host_rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return -1


def soak(mode, mesh, args, log):
    num_ranks = mesh.devices.size
    nodes = {} if mode != "internode" else {"num_ranks_per_node": args.num_ranks_per_node}
    make = lambda backend: jax_ep.Buffer(mesh, "ep", num_experts=NUM_EXPERTS, hidden=HIDDEN,  # noqa
                                         backend=backend, max_tokens_per_rank=max(args.tokens),
                                         **nodes)
    cuda, ref = make(args.backend), make("reference")
    steps = {t: (step_fn(cuda, mesh, mode, t), step_fn(ref, mesh, mode, t)) for t in args.tokens}
    base = jax.random.key_data(jax.random.key(1234))
    warm_key = replicated(mesh, np.asarray(base))
    for pair in steps.values():  # compile every program first: memory is read warm
        for fn in pair:
            jax.block_until_ready(fn(warm_key, replicated(mesh, np.asarray(False))))
    warm, checks = (gpu_memory_mib(), host_rss_mib()), 0
    start = time.monotonic()
    for i in range(args.iters):
        num_tokens = args.tokens[i % len(args.tokens)]
        key = jax.random.fold_in(jax.random.wrap_key_data(base), i)
        key, all_to_one = (replicated(mesh, a) for a in (np.asarray(jax.random.key_data(key)),
                                                          np.asarray(i % 7 == 6)))
        got = steps[num_tokens][0](key, all_to_one)
        if i % args.check_every == 0 or i == args.iters - 1:
            want = steps[num_tokens][1](key, all_to_one)
            for n, (g, v) in enumerate(zip(got, want)):
                g, v = local(g), local(v)
                if mode in ("low_latency", "hook") and n == 2:  # combine: one bf16 ulp
                    np.testing.assert_allclose(g, v, rtol=2 ** -7, atol=1e-2,
                                               err_msg=f"{mode} iteration {i}: output {n}")
                else:
                    np.testing.assert_array_equal(g, v, err_msg=f"{mode} iteration {i}: output {n}")
            cuda.check()
            checks += 1
        elif i % 50 == 0:
            jax.block_until_ready(got)  # keep the queue of launched steps short
        if args.memory_every and (i + 1) % args.memory_every == 0:
            jax.block_until_ready(got)
            log(f"{mode}: iteration {i + 1}: GPU memory {gpu_memory_mib()} MiB, host RSS "
                f"{host_rss_mib()} MiB")
    jax.block_until_ready(got)
    cuda.check()
    end = (gpu_memory_mib(), host_rss_mib())
    elapsed = time.monotonic() - start
    log(f"{mode}: {args.iters} iterations (T in {args.tokens}, R={num_ranks}) in {elapsed:.1f} s, "
        f"{checks} checked against the reference: all equal. GPU memory {warm[0]} -> {end[0]} "
        f"MiB, host RSS {warm[1]} -> {end[1]} MiB")
    cuda.close()
    ref.close()
    if end[0] - warm[0] > 256 or end[1] - warm[1] > 512:
        raise AssertionError(f"{mode}: memory grew: GPU {warm[0]} -> {end[0]} MiB, host "
                             f"{warm[1]} -> {end[1]} MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=10_000)
    parser.add_argument("--check-every", type=int, default=100)
    parser.add_argument("--memory-every", type=int, default=1000,
                        help="print GPU memory and host RSS every N iterations (0: never)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 131, 17],
                        help="token counts per rank, cycled")
    parser.add_argument("--modes", nargs="+", default=None,
                        choices=["normal", "low_latency", "hook", "internode"],
                        help="default: normal, low_latency, hook (+ internode with "
                             "--num-ranks-per-node under jax_ep.launch)")
    parser.add_argument("--num-ranks-per-node", type=int, default=None)
    parser.add_argument("--backend", default="cuda",
                        help="the backend soaked (reference: a CPU run of this script)")
    args = parser.parse_args()
    jax_ep.launch.initialize()
    mesh = Mesh(np.array(jax.devices()), ("ep",))
    modes = args.modes or (["normal", "low_latency", "hook"]
                           + (["internode"] if args.num_ranks_per_node else []))
    me = jax.process_index()
    log = lambda line: print(f"[process {me}] {line}", flush=True)  # noqa: E731
    log(f"soak on {mesh.devices.size} devices, {jax.process_count()} process(es): {modes}")
    try:
        for mode in modes:
            soak(mode, mesh, args, log)
    except Exception as err:  # noqa: BLE001 - report and fail the launcher at once
        log(f"FAILED: {type(err).__name__}: {err}")
        sys.stdout.flush()
        os._exit(1)
    log("soak: ok")


if __name__ == "__main__":
    main()
