"""Bootstrap of the internode mode: NVSHMEM over the jax.distributed key-value store.

A Buffer whose EP axis spans several nodes (`num_ranks_per_node < R`, so `num_nodes > 1`)
runs the internode kernels of `jax_ep._nvshmem`: tokens cross between nodes over NVSHMEM
(RDMA between hosts; NVLink P2P between the "virtual nodes" of one host) and fan out inside
a node over NVLink. NVSHMEM binds one PE to one process and one GPU, so every process of the
program drives exactly one GPU of the mesh (`python -m jax_ep.launch`, or one process per
GPU under Slurm) and NVSHMEM's PE is `jax.process_index()`.

- `initialize_nvshmem`: once per process. The process of PE 0 makes NVSHMEM's unique id and
  publishes it under `jax_ep/nvshmem/unique_id`; every process then initialises NVSHMEM with
  it (no MPI). `NVSHMEM_SYMMETRIC_SIZE` is set before, unless the user set it, to fit the
  first Buffer twice over.
- `connect`: check that every process made the Buffer with the same configuration
  (`bootstrap`'s check), then allocate this rank's symmetric region (collective: every
  process, in Buffer order).
- `close`: free it again (collective too), after a barrier with a time limit; when a process
  does not reach the barrier (it died or failed), the region is left allocated instead of
  waiting forever in NVSHMEM.
- `shutdown` (at process exit): close the Buffers still open, then finalise NVSHMEM, again
  only once every process got there.

NVSHMEM's own NCCL teams are turned off (`NVSHMEM_DISABLE_NCCL=1`, unless the user set it):
jax_ep uses no NVSHMEM collective beyond barriers and allocation, and NCCL's set-up costs
memory and start-up time in every process.

Every function takes the key-value client and the extension module as arguments, so that
tests can pass fakes.
"""

from __future__ import annotations

import atexit
import os
import time
import warnings

from jax_ep import bootstrap

UNIQUE_ID_KEY = "jax_ep/nvshmem/unique_id"
FINALIZE_BARRIER = "jax_ep/nvshmem/finalize"
_initialized = False
# (client, nvshmem, process_index, num_processes) while NVSHMEM is up, for `shutdown`.
_session = None
_open_buffers = set()  # ids of the internode Buffers connected and not closed yet


def symmetric_size(region_bytes: int) -> int:
    """NVSHMEM_SYMMETRIC_SIZE (bytes) set when the user did not: room for two Buffers like
    the first one, plus NVSHMEM's own allocations."""
    return 2 * region_bytes + (512 << 20)


def check_process_model(groups, process_index: int, num_processes: int, num_ranks_per_node: int):
    """ValueError unless every process of the program holds exactly one device of the mesh.

    groups: the EP groups, device lists in rank order (devices have `process_index`)."""
    devices = [d for group in groups for d in group]
    per_process = {}
    for d in devices:
        per_process.setdefault(d.process_index, []).append(d)
    crowded = {p: len(ds) for p, ds in per_process.items() if len(ds) > 1}
    if crowded:
        raise ValueError(
            f"num_ranks_per_node={num_ranks_per_node} makes this an internode Buffer, which runs "
            "one process per GPU (NVSHMEM binds one GPU to each process), but process(es) "
            + ", ".join(f"{p} (with {n} GPUs)" for p, n in sorted(crowded.items()))
            + " drive several GPUs of the mesh. Start one process per GPU "
            "(python -m jax_ep.launch -n GPUS -- script.py), or leave num_ranks_per_node at its "
            "default on one host.")
    missing = sorted(set(range(num_processes)) - set(per_process))
    if missing:
        raise ValueError(
            f"process(es) {missing} hold no device of the mesh; an internode Buffer's mesh must "
            "cover every process of the program (NVSHMEM's memory is allocated by all of them).")


def puts_setting() -> str:
    """JAX_EP_INTERNODE_PUTS, "0" when unset. "1": the network legs send every row by NVSHMEM
    put with a signal, even to a peer NVSHMEM maps (the path of a real network; the GPU tests
    use it to cover that path on one host); "0": they write straight into mapped peers.
    ValueError for another value. Part of the configuration every process must share."""
    value = os.environ.get("JAX_EP_INTERNODE_PUTS", "0")
    if value not in ("0", "1"):
        raise ValueError(f"JAX_EP_INTERNODE_PUTS={value!r} must be 1 (the network legs by NVSHMEM "
                         "puts only) or 0 (the default: write straight into peers that NVSHMEM "
                         "maps), or unset.")
    return value


def initialize_nvshmem(client, nvshmem, process_index: int, num_processes: int, ordinal: int,
                       region_bytes: int, timeout_s: float):
    """Initialise NVSHMEM once in this process (PE = process_index)."""
    global _initialized, _session
    if _initialized:
        return
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(symmetric_size(region_bytes)))
    os.environ.setdefault("NVSHMEM_DISABLE_NCCL", "1")
    if process_index == 0:
        client.key_value_set_bytes(UNIQUE_ID_KEY, nvshmem.unique_id())
    try:
        unique_id = client.blocking_key_value_get_bytes(UNIQUE_ID_KEY, int(timeout_s * 1000))
    except Exception as err:  # the client raises on timeout
        raise RuntimeError(f"process 0 did not publish NVSHMEM's unique id within {timeout_s} s; "
                           "it failed or did not create the internode Buffer (see its log).") from err
    nvshmem.initialize(process_index, num_processes, unique_id, ordinal)
    _initialized = True
    _session = (client, nvshmem, process_index, num_processes)
    # After jax's own exit handler was registered (jax.distributed is up), so it runs before.
    atexit.register(shutdown)


def connect(client, nvshmem, buffer_id, process_index, num_processes, groups, axis_name, sizes,
            num_ranks_per_node, timeout_s):
    """Create this process's rank of internode Buffer `buffer_id`.

    groups: EP groups (device lists in rank order); sizes: max_tokens, low_latency_max_tokens
    (the low-latency staging's tokens per rank; 0: none allocated), hidden, max_topk,
    num_experts, timeout_s. Raises ValueError for a wrong process model or a configuration
    that differs between processes."""
    check_process_model(groups, process_index, num_processes, num_ranks_per_node)
    puts = puts_setting()
    config = dict(bootstrap._configuration(groups, axis_name, sizes),
                  num_ranks_per_node=num_ranks_per_node, mode="internode", internode_puts=puts)
    bootstrap.publish_configuration(client, buffer_id, process_index, config)
    records = bootstrap._read_configurations(client, buffer_id, list(range(num_processes)), timeout_s)
    bootstrap._check_configurations(buffer_id, process_index, records)
    group, rank = next((g, r) for g in groups for r, d in enumerate(g)
                       if d.process_index == process_index)
    device = group[rank]
    region = nvshmem.region_bytes(len(group), num_ranks_per_node, sizes["max_tokens"],
                                  sizes["low_latency_max_tokens"], sizes["hidden"],
                                  sizes["max_topk"], sizes["num_experts"])
    initialize_nvshmem(client, nvshmem, process_index, num_processes,
                       int(device.local_hardware_id), region, timeout_s)
    nvshmem.create_group(buffer_id, int(device.local_hardware_id), rank, len(group),
                         num_ranks_per_node, [int(d.process_index) for d in group], **sizes,
                         puts_only=puts == "1")
    _open_buffers.add(buffer_id)


def close(client, nvshmem, buffer_id, process_index: int, num_processes: int,
          timeout_s: float) -> bool:
    """Close this process's rank of internode Buffer `buffer_id`, which `connect` created.

    Freeing NVSHMEM memory is collective over every process and has no time limit: a dead or
    failed peer would hang it. So every process first meets at a barrier of the key-value
    store (`jax_ep/{buffer_id}/internode_closed`) that gives up after `timeout_s` (at most
    FAILED_CLOSE_TIMEOUT_S once an op of this process failed, `bootstrap.close_timeout`).
    All arrived: free the region. Otherwise: warn and leave the region allocated until the
    process exits (the barrier fails in every process alike, so none of them frees).
    Returns whether the region was freed."""
    _open_buffers.discard(buffer_id)
    timeout_s = bootstrap.close_timeout(timeout_s)
    try:
        client.wait_at_barrier(f"jax_ep/{buffer_id}/internode_closed",
                               max(int(timeout_s * 1000), 1), list(range(num_processes)))
    except Exception as err:  # the client raises on timeout or a dead process
        warnings.warn(
            f"jax_ep internode Buffer {buffer_id}: not every process closed it within {timeout_s} "
            f"s ({err}); its NVSHMEM memory stays allocated in process {process_index} until "
            "exit (freeing it would wait for the missing processes forever). Every process must "
            "close its internode Buffers in the same order.", RuntimeWarning, stacklevel=3)
        nvshmem.destroy(buffer_id, free_region=False)
        return False
    nvshmem.destroy(buffer_id, free_region=True)
    return True


def shutdown(timeout_s: float = bootstrap.EXIT_TIMEOUT_S) -> bool:
    """The exit handler `initialize_nvshmem` registers: close the internode Buffers still
    open (newest first, as in every process), then finalise NVSHMEM (collective) once every
    process reached the barrier `jax_ep/nvshmem/finalize`. The barriers share `timeout_s`
    seconds in all. When a Buffer could not be freed or a process does not arrive (it died,
    or failed), NVSHMEM is left as it is for the process's end, with a warning. Returns
    whether NVSHMEM was finalised."""
    global _session
    if _session is None:
        return False
    client, nvshmem, process_index, num_processes = _session
    deadline = time.monotonic() + timeout_s
    left = lambda: max(deadline - time.monotonic(), 0.001)  # noqa: E731
    freed = [close(client, nvshmem, buffer_id, process_index, num_processes, left())
             for buffer_id in sorted(_open_buffers, reverse=True)]
    if not all(freed):
        return False
    timeout_s = bootstrap.close_timeout(left())
    try:
        client.wait_at_barrier(FINALIZE_BARRIER, max(int(timeout_s * 1000), 1),
                               list(range(num_processes)))
    except Exception as err:  # the client raises on timeout or a dead process
        warnings.warn(f"jax_ep: not every process reached NVSHMEM's finalisation within "
                      f"{timeout_s:.1f} s ({err}); process {process_index} exits without it.",
                      RuntimeWarning, stacklevel=2)
        return False
    _session = None
    return nvshmem.finalize()
