"""Per-kernel GPU times of jax_ep ops from a jax.profiler (CUPTI) trace.

    python scripts/profile_ops.py [--tokens 4096] [--hidden 7168] [--num-sms 48]
                                  [--ops both|dispatch|low_latency|hook] [--bf16] [--out DIR]
                                  [--num-ranks-per-node G]
    python -m jax_ep.launch -n 4 -- scripts/profile_ops.py --num-ranks-per-node 2  # internode


Runs `iters` back-to-back dispatches (and combines, with --ops both; low-latency FP8 (or bf16)
dispatch + combine with --ops low_latency) inside one jit under
jax.profiler.trace, then prints for every jax_ep kernel its median latency on the GPU that
started it last (waiting for no late peer) and the median start skew between GPUs, and for
every GPU the count and median/total duration of its busiest kernels (which include waiting
for the slowest GPU), and the span of the loop against the time kernels were running.
--ops hook: hooked FP8 dispatches, each with a shared-expert matmul x @ W [H, --matmul-ffn]
pinned between send and receive (jax_ep.overlap); also prints, for every GPU, the kernels
running during one middle iteration with their start times (from the iteration's send; one
clock for all GPUs) and streams, to see what overlaps.
With one process per GPU (jax_ep.launch), every process traces and reports its own GPU
(skew 0: one GPU per trace); --num-ranks-per-node splits the ranks into virtual nodes, so
the internode kernels are the ones profiled."""

import argparse
import collections
import glob
import gzip
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_ep
import jax_ep.launch
from jax_ep.demo import random_routing


def kernel_name(name):
    """A trace event's kernel name, short: the demangled name cut to 70 characters, or for a
    mangled one (CUPTI names the internode kernels, which sit in an anonymous namespace,
    "__nv_static_..._ZN6jax_ep..._18plan_totals_kernelE...") its namespace and function,
    e.g. "jax_ep::plan_totals_kernel", with "<>" for a template."""
    z = name.find("_ZN")
    if z < 0:
        return name[:70]
    parts, i = [], z + 3
    while i < len(name) and name[i].isdigit():
        j = i
        while name[j].isdigit():
            j += 1
        parts.append(name[j:j + int(name[i:j])])
        i = j + int(name[i:j])
    short = "::".join(p for p in parts if not p.startswith("_GLOBAL__N"))
    return short + ("<>" if name[i:i + 1] == "I" else "") if short else name[:70]


def across_gpus(kernels_by_gpu):
    """Per jax_ep kernel, its k-th launches on every GPU side by side (one clock for all GPUs):
    {name: (n, median skew, median latency)}. skew: last start - first start, how long the
    first GPU's kernel waits for the last one to begin; latency: the duration on the GPU
    that started last, which waits for no late peer, so it is the op's own latency (the
    per-GPU medians include the skew). kernels_by_gpu: {gpu: [trace event]}, events with
    "name", "ts" and "dur" in us."""
    per_name = collections.defaultdict(list)
    for evs in kernels_by_gpu.values():
        launches = collections.defaultdict(list)
        for e in sorted(evs, key=lambda e: e["ts"]):
            if "jax_ep" in e["name"]:
                launches[kernel_name(e["name"])].append(e)
        for name, es in launches.items():
            per_name[name].append(es)
    out = {}
    for name, gpus in sorted(per_name.items()):
        if len(gpus) != len(kernels_by_gpu):
            continue
        n = min(len(es) for es in gpus)
        skews, latencies = [], []
        for k in range(n):
            ks = [es[k] for es in gpus]
            last = max(ks, key=lambda e: e["ts"])
            skews.append(last["ts"] - min(e["ts"] for e in ks))
            latencies.append(last["dur"])
        out[name] = (n, statistics.median(skews), statistics.median(latencies))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--num-sms", type=int, default=48,
                    help="SMs of the kernels (num_sms and low_latency_num_sms)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--ops", choices=["both", "dispatch", "low_latency", "hook"], default="both",
                    help="dispatch + combine pairs, dispatches alone, low-latency pairs, or "
                         "hooked low-latency dispatches around a matmul")
    ap.add_argument("--matmul-ffn", type=int, default=17536, help="--ops hook: the matmul's F (0: none)")
    ap.add_argument("--bf16", action="store_true",
                    help="low-latency dispatch in bf16 (default: FP8, dequantized before combine)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp") + "/trace")
    ap.add_argument("--num-ranks-per-node", type=int, default=None,
                    help="internode Buffer with virtual nodes of this many GPUs (one process "
                         "per GPU)")
    args = ap.parse_args()
    jax_ep.launch.initialize()  # under jax_ep.launch: jax.distributed; alone: nothing
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("ep",))
    r, t, h = len(devices), args.tokens, args.hidden
    buf = jax_ep.Buffer(mesh, "ep", num_experts=256, hidden=h, backend="cuda",
                        max_tokens_per_rank=t, num_sms=args.num_sms,
                        low_latency_num_sms=args.num_sms,
                        num_ranks_per_node=args.num_ranks_per_node)
    rng = np.random.default_rng(0)
    sharding = NamedSharding(mesh, P("ep"))
    shard = lambda a: jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])  # noqa: E731
    x = shard(jnp.asarray(rng.standard_normal((r * t, h)), jnp.bfloat16))
    idx = shard(jnp.asarray(random_routing(rng, r * t, 256, 8)))
    w = shard(jnp.asarray(rng.random((r * t, 8)), jnp.float32))
    if args.ops == "hook" and args.matmul_ffn:
        w = shard(jnp.asarray(rng.standard_normal((r * h, args.matmul_ffn)) * h ** -0.5,
                              jnp.bfloat16))

    def body(x, idx, w):
        outs = []
        for i in range(args.iters):
            xi = jax.lax.optimization_barrier((x, jnp.int32(i)))[0]
            if args.ops == "hook":
                if outs:  # each send after the previous receive (else XLA may hoist sends)
                    xi = jax.lax.optimization_barrier((xi, outs[-1]))[0]
                pending = buf.low_latency_dispatch_send(xi, idx, fp8=True)
                if args.matmul_ffn:
                    pending, shared = jax_ep.overlap(pending, jnp.dot, xi, w)
                out = buf.low_latency_dispatch_recv(pending)
                outs.append(out.recv_x.astype(jnp.bfloat16)[0, :t] + (
                    shared[:, :h] if args.matmul_ffn else 0))
                continue
            if args.ops == "low_latency":
                out = buf.low_latency_dispatch(xi, idx, fp8=not args.bf16)
                y = (out.recv_x if args.bf16 else
                     jax_ep.dequantize_fp8(out.recv_x, out.recv_scales, jnp.bfloat16))
                outs.append(buf.low_latency_combine(y, idx, w, out.handle))
                continue
            out = buf.dispatch(xi, idx, w)
            outs.append(out.recv_x if args.ops == "dispatch" else buf.combine(out.recv_x, out.handle))
        return tuple(outs)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3,
                              out_specs=(P("ep"),) * args.iters))
    jax.block_until_ready(f(x, idx, w))
    jax.block_until_ready(f(x, idx, w))
    out_dir = (args.out if jax.process_count() == 1
               else os.path.join(args.out, f"process{jax.process_index()}"))
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
        jax.block_until_ready(f(x, idx, w))
    buf.check()
    paths = glob.glob(os.path.join(out_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(sorted(paths)[-1]) as fh:
        events = json.load(fh)["traceEvents"]
    names = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    pnames = {e["pid"]: e["args"]["name"] for e in events
              if e.get("ph") == "M" and e.get("name") == "process_name"}
    kernels = [e for e in events if e.get("ph") == "X" and "dur" in e]
    by_pid = collections.defaultdict(list)
    for e in kernels:
        by_pid[pnames.get(e["pid"], str(e["pid"]))].append(e)
    gpus = {pid: evs for pid, evs in by_pid.items() if "GPU" in pid or "gpu" in pid}
    print("== across GPUs: each launch on the GPU that started it last (its latency) and how "
          "late that was (skew)")
    for name, (n, skew, latency) in across_gpus(gpus).items():
        print(f"  {n:4d} x median latency {latency:9.1f} us  skew {skew:8.1f} us  {name}")
    for pid, evs in sorted(gpus.items()):
        print(f"== {pid}")
        stats = collections.defaultdict(list)
        for e in evs:
            stats[kernel_name(e["name"])].append(e["dur"])
        for name, durs in sorted(stats.items(), key=lambda kv: -sum(kv[1]))[:12]:
            print(f"  {len(durs):4d} x median {statistics.median(durs):9.1f} us  total "
                  f"{sum(durs):10.1f} us  {name}")
        evs = sorted(evs, key=lambda e: e["ts"])
        span = evs[-1]["ts"] + evs[-1]["dur"] - evs[0]["ts"]
        busy = sum(e["dur"] for e in evs)
        print(f"  span {span:.1f} us, kernels busy {busy:.1f} us, per iteration {span / args.iters:.1f} us")
        # One middle iteration, from the start of one op's first kernel to the next's.
        if args.ops == "hook":
            # Launches alternate send, receive: the sends are every other one.
            firsts = [e for e in evs if "low_latency_dispatch_kernel" in e["name"]][::2]
        else:
            ours = [e for e in evs if "jax_ep" in e["name"]]
            firsts = [e for e in ours if e["name"] == ours[0]["name"]]
            firsts = firsts[::len(firsts) // args.iters] if len(firsts) >= args.iters else []
        if len(firsts) >= 3:
            start, end = firsts[len(firsts) // 2]["ts"], firsts[len(firsts) // 2 + 1]["ts"]
            print(f"  kernels running during one iteration (us from its first kernel's start "
                  f"at {start:.1f}; stream = trace thread):")
            for e in evs:
                if e["ts"] < end and e["ts"] + e["dur"] > start:
                    print(f"    {e['ts'] - start:8.1f} +{e['dur']:7.1f}  "
                          f"{names.get((e['pid'], e.get('tid')), e.get('tid'))!s:>24.24s}  "
                          f"{kernel_name(e['name'])}")


if __name__ == "__main__":
    main()
