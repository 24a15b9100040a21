"""CUDA backend: JAX primitives (`jax.ffi.ffi_call`) over the handlers in ffi/.

Each method builds the result types from the per-shard operands (so they stay varying
inside `shard_map`) and calls one FFI target of docs/design.md's contract. Resources are
created eagerly by `CudaBackend.create`, never inside a handler.
"""

from __future__ import annotations

import itertools
import threading

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep.types import DispatchLayout, EPConfig, Handle

try:  # a top-level module, so a source checkout on sys.path still finds the build
    import jax_ep_cuda as _cuda
    _IMPORT_ERROR = None
except ImportError as err:  # built without nvcc
    _cuda = None
    _IMPORT_ERROR = err

_registered = False
_register_lock = threading.Lock()
_buffer_ids = itertools.count(1)
MAX_TOPK = 16  # top-k slots the CUDA buffers are sized for


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
        """Allocate the buffers of every EP group of `mesh` and register the handlers."""
        if jax.process_count() > 1:
            raise NotImplementedError(
                "backend='cuda' currently runs one process driving all local GPUs; with "
                "jax.distributed (one process per GPU) use backend='reference' for now.")
        for device in mesh.devices.flat:
            if device.process_index != jax.process_index():
                raise ValueError("every device of the mesh must be local to this process.")
        register_targets()
        buffer_id = next(_buffer_ids)
        for group in _groups(mesh, config.axis_name):
            _cuda.create_group(buffer_id, [int(d.local_hardware_id) for d in group],
                               config.max_tokens_per_rank, config.hidden, max_topk=MAX_TOPK,
                               num_experts=config.num_experts, timeout_s=float(timeout_s))
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
        if x_scales is None:
            x_scales = jnp.zeros((num_tokens, 0), jnp.float32)
        scale_cols = x_scales.shape[1]
        num_pairs = c.num_ranks * num_tokens if expert_layout else 0
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
        if not expert_layout:  # a fresh constant: XLA:GPU crashed compiling gradients that kept
            pair_expert_rows = jnp.zeros((0, num_slots), jnp.int32)  # the zero-size result alive
        return (recv_x, recv_x_scales if scale_cols else None, recv_topk_idx, recv_topk_weights,
                num_recv_tokens, num_recv_tokens_per_expert, num_dropped,
                Handle(send_pos, num_tokens_matrix, pair_expert_rows))

    def combine(self, y, handle: Handle, bias, expert_layout):
        num_tokens = handle.send_pos.shape[0]
        if bias is None:
            bias = jnp.zeros((0, y.shape[1]), y.dtype)
        return jax.ffi.ffi_call(
            "jax_ep_combine", _like(y, (num_tokens, y.shape[1]), y.dtype), has_side_effect=True)(
            y, handle.send_pos, handle.num_tokens_matrix, handle.pair_expert_rows, bias,
            buffer_id=np.int64(self.buffer_id), expert_layout=bool(expert_layout),
            num_sms=np.int64(self.config.num_sms))

    def cached_dispatch(self, g, handle: Handle, capacity, expert_layout):
        return jax.ffi.ffi_call(
            "jax_ep_cached_dispatch", _like(g, (capacity, g.shape[1]), g.dtype),
            has_side_effect=True)(
            g, handle.send_pos, handle.num_tokens_matrix, handle.pair_expert_rows,
            buffer_id=np.int64(self.buffer_id), expert_layout=bool(expert_layout),
            num_sms=np.int64(self.config.num_sms))
