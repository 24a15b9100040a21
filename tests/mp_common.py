"""What the one-process-per-GPU test workers (tests/mp_worker.py,
tests/mp_worker_internode_ll.py) share: their command line, jax.distributed's start, and how
they end ("worker I: ok", or the traceback, "worker I: FAILED" and exit 1 at once, without
waiting for the other processes at jax.distributed's shutdown barrier), a shard as numpy, and
the silent-rank check of the low-latency ops (mask=True and without)."""

import argparse
import faulthandler
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P


def parse_args(add_arguments=None):
    """--rank I (process index = EP rank = GPU), --num N (processes), --port P (coordinator
    on 127.0.0.1), --num-ranks-per-node G (None: `ranks_per_node` decides), and what
    add_arguments(parser) adds."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True, help="process index = EP rank = GPU")
    parser.add_argument("--num", type=int, required=True, help="number of processes")
    parser.add_argument("--port", type=int, required=True, help="coordinator port on 127.0.0.1")
    parser.add_argument("--num-ranks-per-node", type=int, default=None,
                        help="GPUs per virtual node of an internode Buffer (default: half of "
                             "them; 1 with an odd number)")
    if add_arguments is not None:
        add_arguments(parser)
    return parser.parse_args()


def ranks_per_node(args):
    """--num-ranks-per-node, or N / 2 (2 virtual nodes), or 1 with an odd N."""
    return args.num_ranks_per_node or (args.num // 2 if args.num % 2 == 0 else 1)


def run(args, body):
    """Start jax.distributed as process args.rank of args.num on GPU args.rank, run body(),
    and end as the module docstring says."""
    faulthandler.enable()
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                               num_processes=args.num, process_id=args.rank,
                               local_device_ids=[args.rank],
                               # after a peer died, exit without waiting 300 s for it
                               shutdown_timeout_seconds=10)
    try:
        body()
    except BaseException:
        traceback.print_exc()
        print(f"worker {args.rank}: FAILED", flush=True)
        sys.stderr.flush()
        os._exit(1)
    print(f"worker {args.rank}: ok", flush=True)


def local(array):
    """This process's shard of a global array, as numpy (bf16 widened to float32)."""
    (shard,) = array.addressable_shards
    data = np.asarray(shard.data)
    return data.astype(np.float32) if data.dtype == jnp.bfloat16 else data


def silent_rank_round_trip(buf, mesh, hook):
    """jit-able global (x, topk_idx, topk_weights) -> (recv_count, row_of_slot, combined f32):
    low-latency dispatch (bf16), then combine of the received rows, both with mask=True."""
    def body(x, idx, w):
        if hook:
            out = buf.low_latency_dispatch_recv(buf.low_latency_dispatch_send(x, idx, mask=True))
            combined = buf.low_latency_combine_recv(
                buf.low_latency_combine_send(out.recv_x, idx, w, out.handle, mask=True))
        else:
            out = buf.low_latency_dispatch(x, idx, mask=True)
            combined = buf.low_latency_combine(out.recv_x, idx, w, out.handle, mask=True)
        return out.recv_count, out.handle.row_of_slot, combined.astype(jnp.float32)
    return jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=(P("ep"),) * 3)


def unmasked_recv_count(buf, mesh):
    """jit-ed global (x, topk_idx) -> recv_count of a low-latency dispatch without mask."""
    return jax.jit(jax.shard_map(lambda x, i: buf.low_latency_dispatch(x, i).recv_count,
                                 mesh=mesh, in_specs=(P("ep"),) * 2, out_specs=P("ep")))


def check_silent_rank_results(runs, args, unmasked, masking, failing, *, silent, want_count,
                              want, op, rewait_limit_s=None):
    """On a live rank, with `silent` never running: each (name, f) of `runs` (silent-rank round
    trips on `masking`, fused then hooked) leaves the silent rank out (recv_count ==
    want_count, its slots of row_of_slot -1, combined ~ want); `masking` reports it once for
    `op` and check() passes; `unmasked` (on `failing`) poisons its recv_count and
    failing.check() names `op` and the rank. rewait_limit_s: the hooked run (after the fused
    one masked the rank) must take less than this (None: not timed)."""
    me = jax.process_index()
    for name, f in runs:
        print(f"silent rank {silent}, mask=True, {name}", flush=True)
        start = time.monotonic()
        count, slots, combined = jax.block_until_ready(f(*args))
        elapsed = time.monotonic() - start
        print(f"  took {elapsed:.1f} s", flush=True)
        np.testing.assert_array_equal(local(count), want_count, err_msg=f"{name}: recv_count")
        assert np.all(local(slots)[silent] == -1), f"{name}: rows from the silent rank"
        np.testing.assert_allclose(local(combined), want, rtol=2 ** -7, atol=2e-2,
                                   err_msg=f"{name}: combine without the silent rank")
        if name == "hooked" and rewait_limit_s is not None:
            assert elapsed < rewait_limit_s, f"the masked rank was waited for again ({elapsed:.1f} s)"
    assert masking.masked_ranks() == [(me, silent, op, 1)], masking.masked_ranks()
    masking.check()  # masking is not a failure
    print(f"silent rank {silent}, mask=False", flush=True)
    assert np.all(local(unmasked(*args[:2])) == -1), "a failed op's recv_count is poisoned"
    try:
        failing.check()
        raise AssertionError("Buffer.check() must report the silent rank")
    except RuntimeError as err:
        assert op in str(err) and f"rank {silent}" in str(err), err
