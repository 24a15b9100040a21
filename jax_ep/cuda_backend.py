"""CUDA backend: JAX primitives (`jax.ffi.ffi_call`) over the handlers in ffi/.

Each method builds the result types from the per-shard operands (so they stay varying
inside `shard_map`) and calls one FFI target of docs/design.md's contract. Resources are
created eagerly by `CudaBackend.create`, never inside a handler.
"""

from __future__ import annotations

import itertools
import socket
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import distributed

from jax_ep.types import DispatchLayout, EPConfig, Handle

try:  # a top-level module, so a source checkout on sys.path still finds the build
    import jax_ep_cuda as _cuda
    _IMPORT_ERROR = None
except ImportError as err:  # built without nvcc
    _cuda = None
    _IMPORT_ERROR = err

_registered = False
_register_lock = threading.Lock()
_buffer_ids = itertools.count(1)  # advances identically in every process (see CudaBackend.create)
MAX_TOPK = 16  # top-k slots the CUDA buffers are sized for
CONNECT_TIMEOUT_S = 300.0  # how long creating a Buffer waits for the other processes


def is_available() -> bool:
    """True when the CUDA extension (module jax_ep_cuda) was built and imports."""
    return _cuda is not None


def unavailable_reason() -> str:
    return f"jax_ep_cuda failed to import: {_IMPORT_ERROR}" if _IMPORT_ERROR else ""


def register_targets() -> None:
    """Register every FFI handler of the extension with XLA (idempotent)."""
    global _registered
    with _register_lock:
        if _registered:
            return
        for name, capsule in _cuda.registrations().items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA", api_version=1)
        _registered = True


def _groups(mesh, axis_name):
    """Device lists, one per EP group, each in EP rank order along `axis_name`."""
    axis = list(mesh.axis_names).index(axis_name)
    devices = np.moveaxis(mesh.devices, axis, -1)
    return devices.reshape(-1, devices.shape[-1])


def _connect_processes(buffer_id, mesh, groups, axis_name, sizes):
    """One process per GPU (jax.distributed), intranode: connect the EP groups over CUDA IPC.

    For every EP group with a device in this process: `create_local` on each such device,
    publish its 64-byte CUDA IPC handle under `jax_ep/{buffer_id}/{group}/{rank}` in the
    jax.distributed key-value store (`group` joins the global ids of the group's devices, e.g.
    "0-1-2-3"), read every rank's handle, `connect_peers`. Then a barrier over the processes of
    the mesh, so that no rank runs an operation before every peer mapped its memory. Every
    rank of a group must be on one host: each process publishes its host name under
    `jax_ep/{buffer_id}/host/{process}`.

    Args:
      groups: [num_groups, R] devices, each row in EP rank order (from `_groups`).
      sizes: create_local's keyword arguments max_tokens, hidden, max_topk, num_experts,
        timeout_s.
    """
    client = distributed.global_state.client
    me = jax.process_index()
    processes = sorted({d.process_index for d in mesh.devices.flat})
    if me not in processes:
        return
    prefix = f"jax_ep/{buffer_id}"
    timeout_ms = int(CONNECT_TIMEOUT_S * 1000)
    client.key_value_set(f"{prefix}/host/{me}", socket.gethostname())
    local_groups = [(index, group, "-".join(str(d.id) for d in group))
                    for index, group in enumerate(groups)
                    if any(d.process_index == me for d in group)]
    for index, group, _ in local_groups:
        hosts = {p: client.blocking_key_value_get(f"{prefix}/host/{p}", timeout_ms)
                 for p in sorted({d.process_index for d in group})}
        if len(set(hosts.values())) > 1:
            where = ", ".join(f"process {p} on {h}" for p, h in hosts.items())
            raise NotImplementedError(
                f"EP group {index} of mesh axis {axis_name!r} spans several hosts ({where}); "
                "backend='cuda' connects the ranks of a group through CUDA IPC within one host "
                "only (internode is not supported yet). Make the EP axis cover GPUs of one host, "
                "e.g. a mesh (hosts, gpus_per_host) with the EP axis inner, or use "
                "backend='reference'.")

    created = False
    try:
        for index, group, name in local_groups:
            for rank, device in enumerate(group):
                if device.process_index == me:
                    handle = _cuda.create_local(buffer_id, index, int(device.local_hardware_id),
                                                rank, len(group), **sizes)
                    created = True
                    client.key_value_set_bytes(f"{prefix}/{name}/{rank}", handle)
        for index, group, name in local_groups:
            handles = [client.blocking_key_value_get_bytes(f"{prefix}/{name}/{rank}", timeout_ms)
                       for rank in range(len(group))]
            local_ordinals = [int(d.local_hardware_id) if d.process_index == me else -1
                              for d in group]
            for ordinal in local_ordinals:
                if ordinal >= 0:
                    _cuda.connect_peers(buffer_id, ordinal, handles, local_ordinals)
        barrier = f"{prefix}/connected/" + "-".join(str(p) for p in processes)
        client.wait_at_barrier(barrier, timeout_ms, processes)
    except Exception:
        if created:  # free what this process allocated
            _cuda.destroy(buffer_id)
        raise


def _like(x, shape, dtype):
    """Result type with x's sharding/varying metadata (needed inside shard_map)."""
    return jax.typeof(x).update(shape=tuple(shape), dtype=jnp.dtype(dtype))


class CudaBackend:
    """Per-shard JAX functions backed by jax_ep's CUDA kernels."""

    name = "cuda"

    def __init__(self, config: EPConfig, buffer_id: int):
        self.config = config
        self.buffer_id = buffer_id

    @classmethod
    def create(cls, mesh, config: EPConfig, timeout_s: float) -> "CudaBackend":
        """Allocate and connect the buffers of every EP group of `mesh` that has a device in
        this process, and register the handlers.

        A mesh whose devices are all in this process (one process driving all local GPUs):
        `create_group` per EP group (peer access). A mesh over several processes (e.g. one
        process per GPU with `jax.distributed`): CUDA IPC between the processes of one host,
        see `_connect_processes`.

        `buffer_id` comes from a per-process counter. Every process must create its Buffers in
        the same order (as every JAX multi-process program runs the same code), so that one
        Buffer has the same `buffer_id` everywhere: it names the Buffer's keys in the
        jax.distributed key-value store.
        """
        register_targets()
        buffer_id = next(_buffer_ids)
        groups = _groups(mesh, config.axis_name)
        sizes = dict(max_tokens=config.max_tokens_per_rank, hidden=config.hidden,
                     max_topk=MAX_TOPK, num_experts=config.num_experts, timeout_s=float(timeout_s))
        if all(d.process_index == jax.process_index() for d in mesh.devices.flat):
            created = False
            try:
                for group in groups:
                    _cuda.create_group(buffer_id, [int(d.local_hardware_id) for d in group],
                                       **sizes)
                    created = True
            except Exception:
                if created:  # free the groups made before the one that failed
                    _cuda.destroy(buffer_id)
                raise
        else:
            _connect_processes(buffer_id, mesh, groups, config.axis_name, sizes)
        return cls(config, buffer_id)

    def take_error(self) -> str:
        """The first peer timeout a kernel recorded for this buffer, or ""."""
        return _cuda.take_error(self.buffer_id)

    # ---------------------------------------------------------------- ops
    def get_dispatch_layout(self, topk_idx):
        c = self.config
        num_tokens = topk_idx.shape[0]
        outs = jax.ffi.ffi_call("jax_ep_get_dispatch_layout", (
            _like(topk_idx, (c.num_ranks,), jnp.int32),
            _like(topk_idx, (c.num_nodes,), jnp.int32),
            _like(topk_idx, (c.num_experts,), jnp.int32),
            _like(topk_idx, (num_tokens, c.num_ranks), jnp.bool_),
        ))(topk_idx, num_experts=np.int64(c.num_experts), num_ranks=np.int64(c.num_ranks),
           num_ranks_per_node=np.int64(c.num_ranks_per_node))
        return DispatchLayout(*outs)

    def dispatch(self, x, x_scales, topk_idx, topk_weights, capacity, expert_layout):
        c = self.config
        num_tokens, num_slots = topk_idx.shape
        if num_slots > MAX_TOPK:
            raise ValueError(f"top-k = {num_slots} exceeds the {MAX_TOPK} slots the CUDA buffers "
                             "hold; route each token to at most 16 experts.")
        if x_scales is None:
            x_scales = jnp.zeros((num_tokens, 0), jnp.float32)
        scale_cols = x_scales.shape[1]
        # Rank layout: a [1, K] placeholder; XLA:GPU crashed compiling gradients whose custom
        # calls had zero-size operands.
        num_pairs = c.num_ranks * num_tokens if expert_layout else 1
        outs = jax.ffi.ffi_call("jax_ep_dispatch", (
            _like(x, (capacity, c.hidden), x.dtype),
            _like(x, (capacity, scale_cols), jnp.float32),
            _like(x, (capacity, num_slots), jnp.int32),
            _like(x, (capacity, num_slots), jnp.float32),
            _like(x, (), jnp.int32),
            _like(x, (c.num_local_experts,), jnp.int32),
            _like(x, (), jnp.int32),
            _like(x, (num_tokens, c.num_ranks), jnp.int32),
            _like(x, (c.num_ranks, c.num_ranks), jnp.int32),
            _like(x, (num_pairs, num_slots), jnp.int32),
        ), has_side_effect=True)(
            x, x_scales, topk_idx, topk_weights, buffer_id=np.int64(self.buffer_id),
            num_experts=np.int64(c.num_experts), capacity=np.int64(capacity),
            expert_layout=bool(expert_layout), num_sms=np.int64(c.num_sms))
        (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, num_recv_tokens,
         num_recv_tokens_per_expert, num_dropped, send_pos, num_tokens_matrix,
         pair_expert_rows) = outs
        if not expert_layout:  # the Handle's rank-layout form (docs/design.md)
            pair_expert_rows = jnp.zeros((0, num_slots), jnp.int32)
        return (recv_x, recv_x_scales if scale_cols else None, recv_topk_idx, recv_topk_weights,
                num_recv_tokens, num_recv_tokens_per_expert, num_dropped,
                Handle(send_pos, num_tokens_matrix, pair_expert_rows))

    @staticmethod
    def _pair_expert_rows_operand(handle: Handle, expert_layout):
        """The FFI operand: the handle's array, or the [1, K] rank-layout placeholder."""
        if expert_layout:
            return handle.pair_expert_rows
        return jnp.full((1, handle.pair_expert_rows.shape[1]), -1, jnp.int32)

    def combine(self, y, handle: Handle, bias, expert_layout):
        num_tokens = handle.send_pos.shape[0]
        if bias is None:
            bias = jnp.zeros((0, y.shape[1]), y.dtype)
        return jax.ffi.ffi_call(
            "jax_ep_combine", _like(y, (num_tokens, y.shape[1]), y.dtype), has_side_effect=True)(
            y, handle.send_pos, handle.num_tokens_matrix,
            self._pair_expert_rows_operand(handle, expert_layout), bias,
            buffer_id=np.int64(self.buffer_id), expert_layout=bool(expert_layout),
            num_sms=np.int64(self.config.num_sms))

    def cached_dispatch(self, g, handle: Handle, capacity, expert_layout):
        return jax.ffi.ffi_call(
            "jax_ep_cached_dispatch", _like(g, (capacity, g.shape[1]), g.dtype),
            has_side_effect=True)(
            g, handle.send_pos, handle.num_tokens_matrix,
            self._pair_expert_rows_operand(handle, expert_layout),
            buffer_id=np.int64(self.buffer_id), expert_layout=bool(expert_layout),
            num_sms=np.int64(self.config.num_sms))
