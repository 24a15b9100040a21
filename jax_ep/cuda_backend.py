"""CUDA backend: JAX primitives (`jax.ffi.ffi_call`) over the handlers in ffi/.

Each method builds the result types from the per-shard operands (so they stay varying
inside `shard_map`) and calls one FFI target of docs/design.md's contract. Resources are
created eagerly by `CudaBackend.create`, never inside a handler.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import distributed

from jax_ep import bootstrap, internode, reference
from jax_ep.backend import fused_combine_send, fused_dispatch_recv, fused_dispatch_send
from jax_ep.types import (DispatchLayout, EPConfig, Handle, LowLatencyHandle, LowLatencyPending,
                          Pending)

try:  # built inside the package by scikit-build-core when nvcc is found
    from jax_ep import _cuda
    _IMPORT_ERROR = None
except ImportError as err:  # built without nvcc
    _cuda = None
    _IMPORT_ERROR = err

_registered = False
_internode_registered = False
_register_lock = threading.Lock()
MAX_TOPK = 16  # top-k slots the CUDA buffers are sized for
CLOSE_TIMEOUT_S = 60.0  # how long closing a Buffer waits for the other processes
LOW_LATENCY_DISPATCH_MAX_SMEM = 200 * 1024  # kMaxLowLatencyDispatchSmem (cuda/kernels.h)
# Blocks (one per SM) of the low-latency kernels by default: faster than 48 on 2 and 4 x H200
# (docs/benchmarks.md), and it leaves SMs free for XLA's work beside a hooked send.
DEFAULT_LOW_LATENCY_NUM_SMS = 96


def default_low_latency_num_sms() -> int:
    """DEFAULT_LOW_LATENCY_NUM_SMS, or the SM count of this process's smallest GPU when that is
    lower (every block of a low-latency kernel must be resident at once)."""
    counts = [getattr(d, "core_count", None) for d in jax.local_devices() if d.platform == "gpu"]
    return min([DEFAULT_LOW_LATENCY_NUM_SMS, *(c for c in counts if c)])


def is_available() -> bool:
    """True when the CUDA extension (module jax_ep._cuda) was built and imports."""
    return _cuda is not None


def unavailable_reason() -> str:
    return f"jax_ep._cuda failed to import: {_IMPORT_ERROR}" if _IMPORT_ERROR else ""


def register_targets() -> None:
    """Register the handlers' state type, then every FFI target of the extension, with XLA
    (idempotent). Target names come from the extension (`_cuda.TARGET_*`)."""
    global _registered
    with _register_lock:
        if _registered:
            return
        jax.ffi.register_ffi_type(_cuda.STATE_TYPE_NAME, _cuda.state_type(), platform="CUDA")
        for name, handler in _cuda.targets().items():
            jax.ffi.register_ffi_target(name, handler, platform="CUDA", api_version=1)
        _registered = True


def _internode_module():
    """jax_ep._nvshmem (imported on first use: it loads NVSHMEM), with its state type and
    targets registered."""
    global _internode_registered
    try:
        from jax_ep import _nvshmem
    except ImportError as err:
        raise RuntimeError(
            "this Buffer spans several nodes (num_ranks_per_node < the EP ranks), which needs "
            f"jax_ep's internode module jax_ep._nvshmem, and it does not import ({err}). Install "
            "nvidia-nvshmem-cu13 before installing jax_ep, so that the module is built.") from err
    with _register_lock:
        if not _internode_registered:
            jax.ffi.register_ffi_type(_nvshmem.STATE_TYPE_NAME, _nvshmem.state_type(), platform="CUDA")
            for name, handler in _nvshmem.targets().items():
                jax.ffi.register_ffi_target(name, handler, platform="CUDA", api_version=1)
            _internode_registered = True
    return _nvshmem


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

    def __init__(self, config: EPConfig, buffer_id: int, processes=(), internode=None):
        self.config = config
        self.buffer_id = buffer_id
        self.low_latency_num_sms = config.low_latency_num_sms or default_low_latency_num_sms()
        self._processes = list(processes)  # the mesh's processes (one process per GPU), or []
        self._closed = False
        # Internode Buffers (config.num_nodes > 1) run dispatch, combine and cached dispatch
        # through jax_ep._nvshmem's targets, which take the same operands as _cuda's.
        self._internode = internode
        self._targets = internode if internode is not None else _cuda

    @classmethod
    def create(cls, mesh, config: EPConfig, timeout_s: float, buffer_id: int) -> "CudaBackend":
        """Allocate and connect the buffers of every EP group of `mesh` that has a device in
        this process, and register the handlers.

        A mesh whose devices are all in this process (one process driving all local GPUs):
        `create_group` per EP group (peer access). A mesh over several processes (e.g. one
        process per GPU with `jax.distributed`): CUDA IPC between the processes of one host,
        see `bootstrap.connect_processes` (which also checks that every process made the
        Buffer with the same configuration).

        `buffer_id` is `Buffer.id`, from a per-process counter. Every process must create its
        Buffers in the same order (as every JAX multi-process program runs the same code), so
        that one Buffer has the same id everywhere: it names the Buffer's keys in the
        jax.distributed key-value store and its resources in the extension.
        """
        register_targets()
        groups = _groups(mesh, config.axis_name)
        sizes = dict(max_tokens=config.max_tokens_per_rank, hidden=config.hidden,
                     max_topk=MAX_TOPK, num_experts=config.num_experts, timeout_s=float(timeout_s))
        single_process = all(d.process_index == jax.process_index() for d in mesh.devices.flat)
        if config.num_nodes > 1:
            if single_process:
                raise ValueError(
                    f"num_ranks_per_node={config.num_ranks_per_node} splits the "
                    f"{config.num_ranks} EP ranks into {config.num_nodes} nodes: an internode "
                    "Buffer, which runs one process per GPU (NVSHMEM binds one GPU to each "
                    "process), but this process drives the whole mesh. Start one process per GPU "
                    "(python -m jax_ep.launch -n GPUS -- script.py), or leave num_ranks_per_node "
                    "at its default for one host.")
            nvshmem = _internode_module()
            # The internode low-latency staging is an allocation of its own, sized by its cap.
            internode_sizes = dict(sizes, low_latency_max_tokens=config.low_latency_max_tokens)
            internode.connect(distributed.global_state.client, nvshmem, buffer_id,
                              jax.process_index(), jax.process_count(), [list(g) for g in groups],
                              config.axis_name, internode_sizes, config.num_ranks_per_node,
                              timeout_s)
            return cls(config, buffer_id, internode=nvshmem)
        if single_process:
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
            return cls(config, buffer_id)
        client = distributed.global_state.client
        processes = bootstrap.connect_processes(
            client, _cuda, buffer_id, jax.process_index(), [list(g) for g in groups],
            config.axis_name, sizes, timeout_s,
            low_latency_max_tokens=config.low_latency_max_tokens)
        if processes:
            bootstrap.register_buffer(buffer_id, client, _cuda, jax.process_index(), processes)
        return cls(config, buffer_id, processes)

    def take_error(self) -> str:
        """The first failure (timeout, order mismatch) a kernel recorded for this buffer, or
        ""."""
        if self._closed:
            return ""
        message = self._targets.take_error(self.buffer_id)
        if message:
            bootstrap.record_failure()
        return message

    def close(self) -> None:
        """Free the buffer's device memory. With one process per GPU, every process closes
        its mappings of the others' memory first and frees its own only after all of them
        did (`bootstrap.close_processes`; it waits for them only briefly once an op of this
        process failed). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._internode is not None:
            # Collective: every process closes its Buffers in the same order.
            if self._internode.take_error(self.buffer_id):
                bootstrap.record_failure()  # a failed op: peers may be dead, do not wait long
            internode.close(distributed.global_state.client, self._internode, self.buffer_id,
                            jax.process_index(), jax.process_count(), CLOSE_TIMEOUT_S)
        elif not self._processes:
            _cuda.destroy(self.buffer_id)
        elif bootstrap.unregister_buffer(self.buffer_id):
            if self._targets.take_error(self.buffer_id):
                bootstrap.record_failure()  # a failed op: peers may be dead, do not wait long
            bootstrap.close_processes(distributed.global_state.client, _cuda, self.buffer_id,
                                      jax.process_index(), self._processes, CLOSE_TIMEOUT_S)

    # ---------------------------------------------------------------- ops
    def get_dispatch_layout(self, topk_idx):
        c = self.config
        num_tokens = topk_idx.shape[0]
        outs = jax.ffi.ffi_call(_cuda.TARGET_GET_DISPATCH_LAYOUT, (
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
        outs = jax.ffi.ffi_call(self._targets.TARGET_DISPATCH, (
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
                Handle(send_pos, num_tokens_matrix, pair_expert_rows, capacity=capacity,
                       layout="expert" if expert_layout else "rank", buffer_id=self.buffer_id))

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
            self._targets.TARGET_COMBINE, _like(y, (num_tokens, y.shape[1]), y.dtype), has_side_effect=True)(
            y, handle.send_pos, handle.num_tokens_matrix,
            self._pair_expert_rows_operand(handle, expert_layout), bias,
            buffer_id=np.int64(self.buffer_id), expert_layout=bool(expert_layout),
            num_sms=np.int64(self.config.num_sms))

    def cached_dispatch(self, g, handle: Handle, capacity, expert_layout):
        return jax.ffi.ffi_call(
            self._targets.TARGET_CACHED_DISPATCH, _like(g, (capacity, g.shape[1]), g.dtype),
            has_side_effect=True)(
            g, handle.send_pos, handle.num_tokens_matrix,
            self._pair_expert_rows_operand(handle, expert_layout),
            buffer_id=np.int64(self.buffer_id), expert_layout=bool(expert_layout),
            num_sms=np.int64(self.config.num_sms))

    # ---------------------------------------------------------------- hooked halves
    # Internode Buffers split each op at its network leg (jax_ep._nvshmem's send and receive
    # targets). One-host Buffers have no split: their kernels' warps copy every row over
    # NVLink themselves, so nothing is left in flight; the send half runs the fused op and the
    # receive returns its results (backend.fused_*), so hooked code runs unchanged on one host.
    def dispatch_send(self, x, x_scales, topk_idx, topk_weights, capacity, expert_layout):
        if self._internode is None:
            return fused_dispatch_send(self, x, x_scales, topk_idx, topk_weights, capacity,
                                       expert_layout)
        targets = self._internode
        c = self.config
        num_tokens, num_slots = topk_idx.shape
        if num_slots > MAX_TOPK:
            raise ValueError(f"top-k = {num_slots} exceeds the {MAX_TOPK} slots the CUDA buffers "
                             "hold; route each token to at most 16 experts.")
        fp8 = x_scales is not None
        if not fp8:
            x_scales = jnp.zeros((num_tokens, 0), jnp.float32)
        pending, send_pos = jax.ffi.ffi_call(targets.TARGET_DISPATCH_SEND, (
            _like(x, (2,), jnp.int32),
            _like(x, (num_tokens, c.num_ranks), jnp.int32),
        ), has_side_effect=True)(
            x, x_scales, topk_idx, topk_weights, buffer_id=np.int64(self.buffer_id),
            num_experts=np.int64(c.num_experts), num_sms=np.int64(c.num_sms))
        info = (("capacity", capacity), ("expert_layout", bool(expert_layout)),
                ("num_slots", num_slots), ("dtype", jnp.dtype(x.dtype).name),
                ("scale_cols", x_scales.shape[1]))
        return Pending((pending, send_pos), op="dispatch", buffer_id=self.buffer_id, info=info)

    def dispatch_recv(self, pending):
        if self._internode is None:
            return fused_dispatch_recv(self, pending)
        targets = self._internode
        c = self.config
        op, send_pos = pending.arrays
        capacity, expert_layout = pending.get("capacity"), pending.get("expert_layout")
        num_slots, scale_cols = pending.get("num_slots"), pending.get("scale_cols")
        num_pairs = c.num_ranks * send_pos.shape[0] if expert_layout else 1
        outs = jax.ffi.ffi_call(targets.TARGET_DISPATCH_RECV, (
            _like(op, (capacity, c.hidden), jnp.dtype(pending.get("dtype"))),
            _like(op, (capacity, scale_cols), jnp.float32),
            _like(op, (capacity, num_slots), jnp.int32),
            _like(op, (capacity, num_slots), jnp.float32),
            _like(op, (), jnp.int32),
            _like(op, (c.num_local_experts,), jnp.int32),
            _like(op, (), jnp.int32),
            _like(op, (c.num_ranks, c.num_ranks), jnp.int32),
            _like(op, (num_pairs, num_slots), jnp.int32),
        ), has_side_effect=True)(
            op, send_pos, buffer_id=np.int64(self.buffer_id), capacity=np.int64(capacity),
            expert_layout=bool(expert_layout), num_sms=np.int64(c.num_sms))
        (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, num_recv_tokens,
         num_recv_tokens_per_expert, num_dropped, num_tokens_matrix, pair_expert_rows) = outs
        if not expert_layout:
            pair_expert_rows = jnp.zeros((0, num_slots), jnp.int32)
        return (recv_x, recv_x_scales if scale_cols else None, recv_topk_idx, recv_topk_weights,
                num_recv_tokens, num_recv_tokens_per_expert, num_dropped,
                Handle(send_pos, num_tokens_matrix, pair_expert_rows, capacity=capacity,
                       layout="expert" if expert_layout else "rank", buffer_id=self.buffer_id))

    def combine_send(self, y, handle: Handle, bias, expert_layout):
        if self._internode is None:
            return fused_combine_send(self, y, handle, bias, expert_layout)
        targets = self._internode
        pending = jax.ffi.ffi_call(targets.TARGET_COMBINE_SEND, _like(y, (2,), jnp.int32),
                                   has_side_effect=True)(
            y, handle.send_pos, handle.num_tokens_matrix,
            self._pair_expert_rows_operand(handle, expert_layout),
            buffer_id=np.int64(self.buffer_id), expert_layout=bool(expert_layout),
            num_sms=np.int64(self.config.num_sms))
        if bias is None:
            bias = jnp.zeros((0, y.shape[1]), y.dtype)
        info = (("num_tokens", handle.send_pos.shape[0]), ("dtype", jnp.dtype(y.dtype).name))
        return Pending((pending, bias), op="combine", buffer_id=self.buffer_id, info=info)

    def combine_recv(self, pending):
        if self._internode is None:
            return pending.arrays[0]
        targets = self._internode
        op, bias = pending.arrays
        out_type = _like(op, (pending.get("num_tokens"), self.config.hidden),
                         jnp.dtype(pending.get("dtype")))
        return jax.ffi.ffi_call(targets.TARGET_COMBINE_RECV, out_type, has_side_effect=True)(
            op, bias, buffer_id=np.int64(self.buffer_id), num_sms=np.int64(self.config.num_sms))

    # The top-k weight gradient runs the reference (pure JAX) code: it has no kernel yet.
    def combine_topk_weights_grad(self, ct_recv_topk_weights, recv_topk_idx, handle: Handle,
                                  expert_layout):
        return reference.combine_topk_weights_grad(ct_recv_topk_weights, recv_topk_idx, handle,
                                                   expert_layout=expert_layout, config=self.config)

    # ---------------------------------------------------------------- low latency
    # Internode Buffers run them through jax_ep._nvshmem's targets (self._targets), which take
    # the same operands and attributes as _cuda's.
    def _ll_attrs(self, **extra):
        return dict(buffer_id=np.int64(self.buffer_id),
                    num_experts=np.int64(self.config.num_experts),
                    num_sms=np.int64(self.low_latency_num_sms), **extra)

    def _ll_dispatch_types(self, like, m, hidden, num_slots, dtype, fp8):
        c = self.config
        rows = c.num_ranks * m
        return (_like(like, (c.num_local_experts, rows, hidden), jnp.float8_e4m3fn if fp8 else dtype),
                _like(like, (c.num_local_experts, rows, hidden // 128 if fp8 else 0), jnp.float32),
                _like(like, (c.num_local_experts,), jnp.int32),
                _like(like, (c.num_ranks, m, num_slots), jnp.int32))

    def _ll_dispatch_results(self, outs, fp8):
        recv_x, recv_scales, recv_count, row_of_slot = outs
        return (recv_x, recv_scales if fp8 else None, recv_count,
                LowLatencyHandle(row_of_slot, self.buffer_id))

    def _check_low_latency_tokens(self, num_tokens, num_slots):
        """The dispatch kernel keeps a bit per (expert, token) and the positions of a block's
        tokens in shared memory (cuda/low_latency.cu): at most 200 KiB."""
        c = self.config
        blocks = self.low_latency_num_sms
        smem = ((num_tokens + blocks - 1) // blocks * num_slots
                + c.num_experts * ((num_tokens + 31) // 32)) * 4
        if smem > LOW_LATENCY_DISPATCH_MAX_SMEM:
            raise ValueError(
                f"low_latency_dispatch: {num_tokens} tokens x {c.num_experts} experts need "
                f"{smem} bytes of shared memory per block, more than "
                f"{LOW_LATENCY_DISPATCH_MAX_SMEM}; pass fewer tokens per call (at most about "
                f"{LOW_LATENCY_DISPATCH_MAX_SMEM * 8 // c.num_experts} with {c.num_experts} "
                "experts) or use the normal-mode dispatch.")

    def low_latency_dispatch(self, x, topk_idx, max_tokens_per_rank, fp8, round_scale, mask):
        num_slots = topk_idx.shape[1]
        self._check_low_latency_tokens(x.shape[0], num_slots)
        outs = jax.ffi.ffi_call(
            self._targets.TARGET_LOW_LATENCY_DISPATCH,
            self._ll_dispatch_types(x, max_tokens_per_rank, x.shape[1], num_slots, x.dtype, fp8),
            has_side_effect=True)(
            x, topk_idx, **self._ll_attrs(max_tokens_per_rank=np.int64(max_tokens_per_rank),
                                          round_scale=bool(round_scale), mask=bool(mask)))
        return self._ll_dispatch_results(outs, fp8)

    def low_latency_dispatch_send(self, x, topk_idx, max_tokens_per_rank, fp8, round_scale, mask):
        self._check_low_latency_tokens(x.shape[0], topk_idx.shape[1])
        pending = jax.ffi.ffi_call(
            self._targets.TARGET_LOW_LATENCY_DISPATCH_SEND, _like(x, (2,), jnp.int32),
            has_side_effect=True)(
            x, topk_idx, **self._ll_attrs(max_tokens_per_rank=np.int64(max_tokens_per_rank),
                                          fp8=bool(fp8), round_scale=bool(round_scale),
                                          mask=bool(mask)))
        info = (("num_tokens", x.shape[0]), ("hidden", x.shape[1]), ("num_slots", topk_idx.shape[1]),
                ("dtype", jnp.dtype(x.dtype).name), ("fp8", bool(fp8)),
                ("max_tokens_per_rank", int(max_tokens_per_rank)), ("mask", bool(mask)))
        # The receive takes the send's inputs too: the send reads them on another stream,
        # and XLA must not reuse their memory before the receive (ffi/low_latency.cc).
        return LowLatencyPending((pending, x, topk_idx), op="dispatch", buffer_id=self.buffer_id,
                                 info=info)

    def low_latency_dispatch_recv(self, pending):
        op, x, topk_idx = pending.arrays
        i = dict(pending.info)
        m, fp8 = i["max_tokens_per_rank"], i["fp8"]
        outs = jax.ffi.ffi_call(
            self._targets.TARGET_LOW_LATENCY_DISPATCH_RECV,
            self._ll_dispatch_types(op, m, i["hidden"], i["num_slots"], jnp.dtype(i["dtype"]), fp8),
            has_side_effect=True)(
            op, x, topk_idx, **self._ll_attrs(max_tokens_per_rank=np.int64(m), mask=i["mask"],
                                 num_tokens=np.int64(i["num_tokens"])))
        return self._ll_dispatch_results(outs, fp8)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, mask):
        return jax.ffi.ffi_call(
            self._targets.TARGET_LOW_LATENCY_COMBINE,
            _like(x, (topk_idx.shape[0], x.shape[2]), x.dtype),
            has_side_effect=True)(
            x, topk_idx, topk_weights.astype(jnp.float32), handle.row_of_slot,
            **self._ll_attrs(mask=bool(mask)))

    def low_latency_combine_send(self, x, topk_idx, topk_weights, handle, mask):
        topk_weights = topk_weights.astype(jnp.float32)
        pending = jax.ffi.ffi_call(
            self._targets.TARGET_LOW_LATENCY_COMBINE_SEND, _like(x, (2,), jnp.int32),
            has_side_effect=True)(
            x, topk_weights, handle.row_of_slot,
            **self._ll_attrs(mask=bool(mask)))
        info = (("hidden", x.shape[2]), ("dtype", jnp.dtype(x.dtype).name), ("mask", bool(mask)))
        return LowLatencyPending((pending, topk_idx, x, topk_weights, handle.row_of_slot),
                                 op="combine", buffer_id=self.buffer_id, info=info)

    def low_latency_combine_recv(self, pending):
        op, topk_idx, x, topk_weights, row_of_slot = pending.arrays
        i = dict(pending.info)
        return jax.ffi.ffi_call(
            self._targets.TARGET_LOW_LATENCY_COMBINE_RECV,
            _like(topk_idx, (topk_idx.shape[0], i["hidden"]), jnp.dtype(i["dtype"])),
            has_side_effect=True)(
            op, topk_idx, x, topk_weights, row_of_slot,
            **self._ll_attrs(mask=i["mask"]))

    def masked_ranks(self) -> list:
        if self._closed:
            return []
        return [tuple(r) for r in self._targets.masked_ranks(self.buffer_id)]
