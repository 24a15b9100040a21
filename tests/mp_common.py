"""What the one-process-per-GPU test workers (tests/mp_worker.py,
tests/mp_worker_internode_ll.py) share: their command line, jax.distributed's start, and how
they end ("worker I: ok", or the traceback, "worker I: FAILED" and exit 1 at once, without
waiting for the other processes at jax.distributed's shutdown barrier)."""

import argparse
import faulthandler
import os
import sys
import traceback

import jax


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
