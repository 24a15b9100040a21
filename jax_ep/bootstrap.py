"""Process bootstrap of the CUDA backend with one process per GPU (jax.distributed).

The GPUs of one EP group are on one host; each process allocates the staging region of its
own devices (`create_local`) and maps the other processes' regions through CUDA IPC handles
exchanged in the jax.distributed key-value store (`connect_peers`). This module does that
exchange and the matching teardown:

- `connect_processes`: check that every process created the Buffer with the same arguments,
  check that every EP group is on one host, allocate, exchange the handles, connect, and
  wait until every process of the mesh is connected.
- `close_processes`: unmap the peers' regions, wait until every process did, then free this
  process's regions (a region is never freed while a peer still maps it).
- `register_buffer` / `unregister_buffer`: the Buffers still open when the process exits are
  closed by an `atexit` handler (`close_registered_buffers`).

Every function takes the key-value client (`jax._src.distributed.global_state.client`) and
the CUDA extension module (`jax_ep_cuda`) as arguments, so that tests can pass fakes.

Keys of Buffer `b` in the key-value store: `jax_ep/{b}/config/{process}` (configuration and
host name, JSON), `jax_ep/{b}/{group}/{rank}` (CUDA IPC handle; `group` joins the global ids
of the group's devices, e.g. "0-1-2-3"); barriers `jax_ep/{b}/connected/{processes}` and
`jax_ep/{b}/closed/{processes}` (`processes` joins the process indices, e.g. "0-1-2-3").
"""

from __future__ import annotations

import atexit
import json
import socket
import threading
import time
import warnings

EXIT_TIMEOUT_S = 10.0  # how long closing the open Buffers at process exit waits for peers, in all

FAILED_CLOSE_TIMEOUT_S = 2.0  # a close's wait for peers once an op of this process failed
_open_buffers = {}  # buffer_id -> arguments of close_processes, in creation order
_open_lock = threading.Lock()
_failure_seen = False  # an op of a Buffer of this process failed (a peer timed out, ...)


def record_failure():
    """Note that an op of this process failed (`CudaBackend.take_error` found an error): a
    peer may be dead, so closing a Buffer waits for peers only FAILED_CLOSE_TIMEOUT_S from now
    on. (JAX's coordination service ends every process about heartbeat_timeout_seconds, 100 s
    by default, after a peer died: a long wait would not end cleanly.)"""
    global _failure_seen
    _failure_seen = True


def close_timeout(timeout_s: float) -> float:
    """`timeout_s`, or FAILED_CLOSE_TIMEOUT_S if smaller and `record_failure` was called."""
    return min(timeout_s, FAILED_CLOSE_TIMEOUT_S) if _failure_seen else timeout_s
_atexit_registered = False


def _configuration(groups, axis_name, sizes):
    """What must be equal in every process for one Buffer (JSON-compatible values)."""
    import jax_ep  # not at the top: jax_ep/__init__.py imports buffer -> cuda_backend -> here
    return {
        "jax_ep_version": jax_ep.__version__,
        "axis_name": axis_name,
        "num_groups": len(groups),
        "num_ranks": len(groups[0]),
        "ep_groups": [[int(d.id) for d in group] for group in groups],
        **sizes,
    }


def publish_configuration(client, buffer_id, process_index, config, host=None):
    """Publishes this process's configuration of Buffer `buffer_id` and its host name under
    `jax_ep/{buffer_id}/config/{process_index}` (read back by `_read_configurations`)."""
    record = {"config": config, "host": host if host is not None else socket.gethostname()}
    client.key_value_set(f"jax_ep/{buffer_id}/config/{process_index}", json.dumps(record))


def _read_configurations(client, buffer_id, processes, timeout_s):
    """{process: published record} for every process of `processes`, waiting at most
    `timeout_s` in all; RuntimeError naming the processes that did not publish."""
    deadline = time.monotonic() + timeout_s
    records, missing, last_error = {}, [], None
    for p in processes:
        remaining_ms = max(int((deadline - time.monotonic()) * 1000), 1)
        try:
            records[p] = json.loads(
                client.blocking_key_value_get(f"jax_ep/{buffer_id}/config/{p}", remaining_ms))
        except Exception as err:  # the client raises on timeout
            missing.append(p)
            last_error = err
    if missing:
        raise RuntimeError(
            f"Buffer {buffer_id}: process(es) {', '.join(map(str, missing))} of the mesh did not "
            f"create Buffer {buffer_id} within {timeout_s} s. Every process of the mesh must "
            "create the same Buffers, in the same order; a process that failed or exited earlier "
            "says why in its own log.") from last_error
    return records


def _check_configurations(buffer_id, process_index, records):
    """ValueError naming every field in which another process's record differs from ours."""
    mine = records[process_index]["config"]
    differences = []
    for p, record in sorted(records.items()):
        theirs = record["config"]
        for field in sorted(set(mine) | set(theirs)):
            if theirs.get(field) != mine.get(field):
                differences.append(
                    f"process {p} created Buffer {buffer_id} with {field}={theirs.get(field)!r} "
                    f"but process {process_index} with {field}={mine.get(field)!r}")
    if differences:
        raise ValueError("; ".join(differences) + "; every process must create its Buffers with "
                         "the same arguments, in the same order.")


def _check_hosts(axis_name, local_groups, records):
    """NotImplementedError if an EP group with a device in this process spans several hosts."""
    for index, group, _ in local_groups:
        hosts = {p: records[p]["host"] for p in sorted({d.process_index for d in group})}
        if len(set(hosts.values())) > 1:
            where = ", ".join(f"process {p} on {h}" for p, h in hosts.items())
            raise NotImplementedError(
                f"EP group {index} of mesh axis {axis_name!r} spans several hosts ({where}); "
                "backend='cuda' connects the ranks of a group through CUDA IPC within one host "
                "only (internode is not supported yet). Make the EP axis cover GPUs of one host, "
                "e.g. a mesh (hosts, gpus_per_host) with the EP axis inner, or use "
                "backend='reference'.")


def connect_processes(client, cuda, buffer_id, process_index, groups, axis_name, sizes,
                      timeout_s=300.0, host=None, *, low_latency_max_tokens):
    """Create and connect this process's part of Buffer `buffer_id` over CUDA IPC.

    1. Publish this process's configuration of the Buffer (jax_ep version, `axis_name`, the
       number of groups, ranks per group, the global device ids of every group in rank order,
       `sizes`, `low_latency_max_tokens`) and host name under
       `jax_ep/{buffer_id}/config/{process_index}`, then read every process's of the mesh. A
       process that has no device in the mesh publishes and returns.
    2. ValueError if any field differs (naming the field, both values and both processes);
       NotImplementedError if an EP group with a device in this process spans several hosts.
    3. For every EP group with a device in this process: `cuda.create_local` on each such
       device, publish its handle under `jax_ep/{buffer_id}/{group}/{rank}`; then read every
       rank's handle and `cuda.connect_peers` each local device.
    4. Barrier over the processes of the mesh, so that no rank runs an operation before every
       peer mapped its memory.
    If a step fails after this process allocated, it closes its mappings
    (`cuda.close_peers`) and frees its regions (`cuda.destroy`) before re-raising.

    Args:
      client: the jax.distributed key-value client
        (`jax._src.distributed.global_state.client`).
      cuda: the CUDA extension module (`jax_ep_cuda`): `create_local`, `connect_peers`,
        `close_peers`, `destroy`.
      buffer_id: the Buffer's id, equal in every process (every process creates its Buffers
        in the same order); it names the Buffer's keys and barriers.
      process_index: this process's index (`jax.process_index()`).
      groups: the EP groups of the mesh, one sequence of devices per group in EP-rank order
        (rows of `cuda_backend._groups`); a device has `id` (global), `process_index` and
        `local_hardware_id` (the CUDA ordinal in its process), like a jax Device.
      axis_name: the mesh axis of the EP groups (compared between processes, and named in
        errors).
      sizes: `create_local`'s keyword arguments max_tokens, hidden, max_topk, num_experts,
        timeout_s (compared between processes).
      timeout_s: how long each wait for the other processes lasts (configurations, handles,
        barrier), in seconds.
      host: this process's host name; None: `socket.gethostname()`.
      low_latency_max_tokens: the Buffer's cap on the tokens per rank of a low-latency op (0:
        none run); compared between processes only (the low-latency ops share the staging).

    Returns:
      The sorted process indices of the mesh, to pass to `close_processes` and
      `register_buffer`; [] when this process has no device in the mesh (nothing was created).

    Raises:
      ValueError: the processes created the Buffer with different arguments.
      NotImplementedError: an EP group with a device in this process spans several hosts.
      RuntimeError: a process of the mesh did not publish its configuration, a handle or reach
        the barrier within `timeout_s`.
    """
    prefix = f"jax_ep/{buffer_id}"
    timeout_ms = int(timeout_s * 1000)
    config = dict(_configuration(groups, axis_name, sizes),
                  low_latency_max_tokens=low_latency_max_tokens)
    publish_configuration(client, buffer_id, process_index, config, host)
    processes = sorted({d.process_index for group in groups for d in group})
    if process_index not in processes:
        return []
    records = _read_configurations(client, buffer_id, processes, timeout_s)
    _check_configurations(buffer_id, process_index, records)
    local_groups = [(index, group, "-".join(str(d.id) for d in group))
                    for index, group in enumerate(groups)
                    if any(d.process_index == process_index for d in group)]
    _check_hosts(axis_name, local_groups, records)

    created = False
    try:
        for index, group, name in local_groups:
            for rank, device in enumerate(group):
                if device.process_index == process_index:
                    handle = cuda.create_local(buffer_id, index, int(device.local_hardware_id),
                                               rank, len(group), **sizes)
                    created = True
                    client.key_value_set_bytes(f"{prefix}/{name}/{rank}", handle)
        for index, group, name in local_groups:
            handles = []
            for rank, device in enumerate(group):
                try:
                    handles.append(client.blocking_key_value_get_bytes(f"{prefix}/{name}/{rank}",
                                                                       timeout_ms))
                except Exception as err:  # the client raises on timeout
                    raise RuntimeError(
                        f"Buffer {buffer_id}: process {device.process_index} did not publish the "
                        f"CUDA IPC handle of rank {rank} of EP group {index} within {timeout_s} "
                        "s; it failed while allocating or exited (see its log).") from err
            local_ordinals = [int(d.local_hardware_id) if d.process_index == process_index else -1
                              for d in group]
            for ordinal in local_ordinals:
                if ordinal >= 0:
                    cuda.connect_peers(buffer_id, ordinal, handles, local_ordinals)
        barrier = f"{prefix}/connected/" + "-".join(map(str, processes))
        try:
            client.wait_at_barrier(barrier, timeout_ms, processes)
        except Exception as err:  # the client raises on timeout
            raise RuntimeError(
                f"Buffer {buffer_id}: not every process of {processes} connected within "
                f"{timeout_s} s; one failed while connecting or exited (see its log).") from err
    except BaseException:
        if created:  # free what this process allocated
            try:
                cuda.close_peers(buffer_id)
            finally:
                cuda.destroy(buffer_id)
        raise
    return processes


def close_processes(client, cuda, buffer_id, process_index, processes, timeout_s):
    """Close this process's part of Buffer `buffer_id`, which `connect_processes` connected.

    `cuda.close_peers` (wait for this process's devices, unmap the other processes' regions),
    then a barrier over `processes` (every peer unmapped this process's regions), then
    `cuda.destroy` (free this process's regions): no region is freed while a peer maps it.
    Every process of the mesh must call it for the Buffer. If the barrier fails (a peer exited
    or failed, or did not close the Buffer within `timeout_s`), this process still frees its
    regions and emits a warning. `destroy` runs even if `close_peers` raises (and the error is
    re-raised), so that the peers do not wait for the timeout.

    Args:
      client: the jax.distributed key-value client.
      cuda: the CUDA extension module (`close_peers`, `destroy`).
      buffer_id: the Buffer's id (names the barrier `jax_ep/{buffer_id}/closed/...`).
      process_index: this process's index (`jax.process_index()`), one of `processes`.
      processes: the process indices of the mesh, as `connect_processes` returned them.
      timeout_s: how long the barrier waits for the other processes, in seconds (at most
        FAILED_CLOSE_TIMEOUT_S after `record_failure`).
    """
    barrier = f"jax_ep/{buffer_id}/closed/" + "-".join(map(str, processes))
    timeout_s = close_timeout(timeout_s)
    try:
        cuda.close_peers(buffer_id)
    finally:
        try:
            client.wait_at_barrier(barrier, max(int(timeout_s * 1000), 1), processes)
        except Exception as err:  # the client raises on timeout
            others = [p for p in processes if p != process_index]
            warnings.warn(
                f"jax_ep Buffer {buffer_id}: process(es) {others} did not confirm within "
                f"{timeout_s} s that they closed their mappings of process {process_index}'s "
                f"memory ({err}); freeing it anyway. A peer still running may fault on it: "
                "every process of the mesh must close the Buffer (or exit, which closes it).",
                RuntimeWarning, stacklevel=2)
        cuda.destroy(buffer_id)


def register_buffer(buffer_id, client, cuda, process_index, processes):
    """Remember an open multi-process Buffer, to close it at process exit if it is still open.

    The first call registers `close_registered_buffers` with `atexit`: after jax imported (so
    the handler runs before jax's own exit handler shuts jax.distributed and the backends
    down). Arguments: those of `close_processes` (except its timeout).
    """
    global _atexit_registered
    with _open_lock:
        if not _atexit_registered:
            atexit.register(close_registered_buffers)
            _atexit_registered = True
        _open_buffers[buffer_id] = (client, cuda, process_index, processes)


def unregister_buffer(buffer_id) -> bool:
    """Forget Buffer `buffer_id` (call it before closing the Buffer with `close_processes`).

    Returns True if it was registered, False if it was not (already closed), so that a
    close can be made idempotent: `if unregister_buffer(b): close_processes(...)`.
    """
    with _open_lock:
        return _open_buffers.pop(buffer_id, None) is not None


def close_registered_buffers(timeout_s=EXIT_TIMEOUT_S):
    """Close every registered Buffer, newest first (the `atexit` handler).

    The barriers of all the Buffers share `timeout_s` seconds in all, so that an exit whose
    peers are gone takes at most about `timeout_s`; a Buffer whose close fails is reported
    with a warning and the others are still closed.
    """
    with _open_lock:
        buffers = list(_open_buffers.items())[::-1]
        _open_buffers.clear()
    deadline = time.monotonic() + timeout_s
    for buffer_id, (client, cuda, process_index, processes) in buffers:
        try:
            close_processes(client, cuda, buffer_id, process_index, processes,
                            max(deadline - time.monotonic(), 0.001))
        except Exception as err:
            warnings.warn(f"jax_ep: closing Buffer {buffer_id} at exit failed: {err}",
                          RuntimeWarning)
