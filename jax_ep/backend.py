"""The backend interface of `jax_ep.Buffer`, and the pure-JAX `ReferenceBackend`.

A backend is made eagerly (outside jit) for one Buffer and provides the per-shard
operations the Buffer runs: every op below runs per shard inside `shard_map` over
`config.axis_name`, on per-shard shapes, and follows docs/design.md exactly. The Buffer
validates every operand before it calls a backend, so a backend may assume well-formed
input. Backends: `ReferenceBackend` (here, any platform) and `jax_ep.cuda_backend.CudaBackend`.

Notation: `R` ranks, `E` experts, `L = E / R` local experts, `T` tokens, `H` hidden,
`K` top-k, `C` capacity, `P = R * T` pairs, `M` max tokens per rank (low latency).
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import jax

from jax_ep import reference
from jax_ep.types import (DispatchLayout, EPConfig, Handle, LowLatencyHandle, LowLatencyPending,
                          Pending)


@runtime_checkable
class Backend(Protocol):
    """Every per-shard op a backend provides.

    Attributes:
      name: "reference" or "cuda" (`Buffer.backend`).
      config: the EPConfig of the Buffer.
      buffer_id: `Buffer.id` of the Buffer that owns the backend. The backend stamps it into
        every Handle and LowLatencyHandle it makes, so that a Buffer accepts only its own.
    """

    name: str
    config: EPConfig
    buffer_id: int

    def get_dispatch_layout(self, topk_idx: jax.Array) -> DispatchLayout:
        """topk_idx int32 [T, K] (global expert ids, -1 = none) -> DispatchLayout:
        num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank int32 [R / ranks_per_node],
        num_tokens_per_expert int32 [E], is_token_in_rank bool [T, R]."""
        ...

    def dispatch(self, x: jax.Array, x_scales: Optional[jax.Array], topk_idx: jax.Array,
                 topk_weights: jax.Array, capacity: int, expert_layout: bool) -> tuple:
        """Send every token to the ranks holding its top-k experts.

        Args:
          x: [T, H] bfloat16, float32 or float8_e4m3fn.
          x_scales: float32 [T, H / 128] when x is float8_e4m3fn, else None.
          topk_idx: int32 [T, K] global expert ids, -1 for an empty slot.
          topk_weights: float32 [T, K].
          capacity: C, rows of the outputs (a positive int).
          expert_layout: rows grouped by local expert (True) or by source rank (False).

        Returns the 8-tuple (recv_x [C, H] x.dtype, recv_x_scales float32 [C, H / 128] or
        None, recv_topk_idx int32 [C, K], recv_topk_weights float32 [C, K], num_recv_tokens
        int32 [], num_recv_tokens_per_expert int32 [L], num_dropped int32 [], handle Handle
        with capacity=C, layout "expert" or "rank", buffer_id=self.buffer_id).
        """
        ...

    def combine(self, y: jax.Array, handle: Handle, bias: Optional[jax.Array],
                expert_layout: bool) -> jax.Array:
        """y [C, H] bfloat16 or float32 (rows as the dispatch that made handle), bias [T, H]
        y.dtype or None, expert_layout = (handle.layout == "expert") -> [T, H] y.dtype:
        out[t] = bias[t] + sum over the ranks holding t, in ascending rank order, in float32."""
        ...

    def cached_dispatch(self, g: jax.Array, handle: Handle, capacity: int,
                        expert_layout: bool) -> jax.Array:
        """Combine's backward: g [T, H] bfloat16 or float32 -> [C, H] g.dtype (C = capacity),
        g[t] sent to every row the dispatch that made handle filled with t; other rows zero."""
        ...

    def combine_topk_weights_grad(self, ct_recv_topk_weights: jax.Array,
                                  recv_topk_idx: jax.Array, handle: Handle,
                                  expert_layout: bool) -> jax.Array:
        """Dispatch's top-k weight gradient: ct_recv_topk_weights float32 [C, K] (cotangent
        of recv_topk_weights), recv_topk_idx int32 [C, K] -> float32 [T, K], the cotangent
        of topk_weights (entry [t, k] is the cotangent at the row holding slot k of t)."""
        ...

    def dispatch_send(self, x: jax.Array, x_scales: Optional[jax.Array], topk_idx: jax.Array,
                      topk_weights: jax.Array, capacity: int, expert_layout: bool) -> Pending:
        """The send half of dispatch (same arguments): a Pending with op="dispatch" for
        dispatch_recv. A backend whose op leaves nothing in flight to overlap may run the
        fused op here and carry its results (`fused_dispatch_send` below)."""
        ...

    def dispatch_recv(self, pending: Pending) -> tuple:
        """The receive half: dispatch's 8-tuple, identical to the fused op's."""
        ...

    def combine_send(self, y: jax.Array, handle: Handle, bias: Optional[jax.Array],
                     expert_layout: bool) -> Pending:
        """The send half of combine (same arguments): a Pending with op="combine"."""
        ...

    def combine_recv(self, pending: Pending) -> jax.Array:
        """The receive half: combine's [T, H] result, identical to the fused op's."""
        ...

    def low_latency_dispatch(self, x: jax.Array, topk_idx: jax.Array, max_tokens_per_rank: int,
                             fp8: bool, round_scale: bool, mask: bool) -> tuple:
        """Decode-time dispatch. x [T, H] bfloat16 or float32, topk_idx int32 [T, K],
        max_tokens_per_rank M >= T, fp8: cast x to float8_e4m3fn with one float32 scale per
        128 channels (round_scale: powers of two), mask: a peer that does not answer in time
        is masked and treated as sending nothing instead of failing the op.

        Returns the 4-tuple (recv_x [L, R * M, H] x.dtype, or float8_e4m3fn with fp8,
        recv_scales float32 [L, R * M, H / 128] with fp8 else None, recv_count int32 [L],
        handle LowLatencyHandle with buffer_id=self.buffer_id)."""
        ...

    def low_latency_dispatch_send(self, x: jax.Array, topk_idx: jax.Array,
                                  max_tokens_per_rank: int, fp8: bool, round_scale: bool,
                                  mask: bool) -> LowLatencyPending:
        """The send half of low_latency_dispatch (same arguments): a LowLatencyPending with
        op="dispatch" for low_latency_dispatch_recv."""
        ...

    def low_latency_dispatch_recv(self, pending: LowLatencyPending) -> tuple:
        """The receive half: low_latency_dispatch's 4-tuple, identical to the fused op's."""
        ...

    def low_latency_combine(self, x: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array,
                            handle: LowLatencyHandle, mask: bool) -> jax.Array:
        """x [L, R * M, H] bfloat16 or float32 (laid out as low_latency_dispatch's recv_x),
        topk_idx int32 [T, K], topk_weights float32 [T, K] -> [T, H] x.dtype. Every rank
        holding experts of token t sums topk_weights[t, k] * x[row of slot k] over its slots
        in float32 in slot order and casts to x.dtype; out[t] = cast(the sum of those rows in
        ascending rank order, in float32)."""
        ...

    def low_latency_combine_send(self, x: jax.Array, topk_idx: jax.Array,
                                 topk_weights: jax.Array, handle: LowLatencyHandle,
                                 mask: bool) -> LowLatencyPending:
        """The send half of low_latency_combine: a LowLatencyPending with op="combine"."""
        ...

    def low_latency_combine_recv(self, pending: LowLatencyPending) -> jax.Array:
        """The receive half: low_latency_combine's [T, H] result, identical to the fused
        op's."""
        ...

    def masked_ranks(self) -> list:
        """Peers that low-latency ops with mask=True masked: a list of (EP rank that masked,
        masked EP rank, op name, op number); [] when none."""
        ...

    def take_error(self) -> str:
        """The first failure recorded by this backend's kernels (e.g. a peer timeout), or ""
        when nothing failed."""
        ...

    def close(self) -> None:
        """Release the backend's resources. `Buffer.close` calls it exactly once."""
        ...


class ReferenceBackend:
    """The pure-JAX reference functions (jax_ep/reference.py) as a Backend; see `Backend`
    for every method's shapes and dtypes. Runs on every JAX platform."""

    name = "reference"

    def __init__(self, config: EPConfig, buffer_id: int):
        self.config = config
        self.buffer_id = buffer_id

    def get_dispatch_layout(self, topk_idx):
        return reference.get_dispatch_layout(topk_idx, self.config)

    def dispatch(self, x, x_scales, topk_idx, topk_weights, capacity, expert_layout):
        return reference.dispatch(x, x_scales, topk_idx, topk_weights, capacity=capacity,
                                  expert_layout=expert_layout, config=self.config,
                                  buffer_id=self.buffer_id)

    def combine(self, y, handle, bias, expert_layout):
        return reference.combine(y, handle, bias, expert_layout=expert_layout, config=self.config)

    def cached_dispatch(self, g, handle, capacity, expert_layout):
        return reference.cached_dispatch(g, handle, capacity=capacity,
                                         expert_layout=expert_layout, config=self.config)

    def combine_topk_weights_grad(self, ct_recv_topk_weights, recv_topk_idx, handle,
                                  expert_layout):
        return reference.combine_topk_weights_grad(ct_recv_topk_weights, recv_topk_idx, handle,
                                                   expert_layout=expert_layout,
                                                   config=self.config)

    # Hooked ops: the send does all the work (pure JAX has nothing to overlap) and the pending
    # value carries the results.
    def dispatch_send(self, x, x_scales, topk_idx, topk_weights, capacity, expert_layout):
        return fused_dispatch_send(self, x, x_scales, topk_idx, topk_weights, capacity,
                                   expert_layout)

    def dispatch_recv(self, pending):
        return fused_dispatch_recv(self, pending)

    def combine_send(self, y, handle, bias, expert_layout):
        return fused_combine_send(self, y, handle, bias, expert_layout)

    def combine_recv(self, pending):
        return pending.arrays[0]

    def low_latency_dispatch(self, x, topk_idx, max_tokens_per_rank, fp8, round_scale, mask):
        return reference.low_latency_dispatch(x, topk_idx, max_tokens_per_rank=max_tokens_per_rank,
                                              fp8=fp8, round_scale=round_scale,
                                              config=self.config, buffer_id=self.buffer_id)

    def low_latency_dispatch_send(self, x, topk_idx, max_tokens_per_rank, fp8, round_scale, mask):
        recv_x, recv_scales, recv_count, handle = self.low_latency_dispatch(
            x, topk_idx, max_tokens_per_rank, fp8, round_scale, mask)
        return LowLatencyPending((recv_x, recv_scales, recv_count, handle.row_of_slot),
                                 op="dispatch", buffer_id=self.buffer_id, info=())

    def low_latency_dispatch_recv(self, pending):
        recv_x, recv_scales, recv_count, row_of_slot = pending.arrays
        return recv_x, recv_scales, recv_count, LowLatencyHandle(row_of_slot, self.buffer_id)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, mask):
        return reference.low_latency_combine(x, topk_idx, topk_weights, handle, config=self.config)

    def low_latency_combine_send(self, x, topk_idx, topk_weights, handle, mask):
        out = self.low_latency_combine(x, topk_idx, topk_weights, handle, mask)
        return LowLatencyPending((out,), op="combine", buffer_id=self.buffer_id, info=())

    def low_latency_combine_recv(self, pending):
        return pending.arrays[0]

    def masked_ranks(self) -> list:
        """Always []: pure JAX waits for no peer."""
        return []

    def take_error(self) -> str:
        """Always "": pure JAX records no failures (an error raises at once)."""
        return ""

    def close(self) -> None:
        """Nothing to release: the reference backend holds no resources of its own."""


# ------------------------------------------------------------------ hooks without a split
# For a backend whose op leaves nothing in flight to overlap (pure JAX; the one-host NVLink
# kernels, whose warps copy every row themselves): the send half runs the fused op and the
# Pending carries its results, which the receive half returns. Results are the fused op's.
def fused_dispatch_send(backend, x, x_scales, topk_idx, topk_weights, capacity,
                        expert_layout) -> Pending:
    """backend.dispatch's results as a Pending (op="dispatch") for fused_dispatch_recv."""
    *outs, handle = backend.dispatch(x, x_scales, topk_idx, topk_weights, capacity, expert_layout)
    arrays = (*outs, handle.send_pos, handle.num_tokens_matrix, handle.pair_expert_rows)
    return Pending(arrays, op="dispatch", buffer_id=backend.buffer_id,
                   info=(("capacity", handle.capacity), ("layout", handle.layout)))


def fused_dispatch_recv(backend, pending: Pending) -> tuple:
    """The dispatch 8-tuple that fused_dispatch_send carried."""
    *outs, send_pos, num_tokens_matrix, pair_expert_rows = pending.arrays
    return (*outs, Handle(send_pos, num_tokens_matrix, pair_expert_rows,
                          capacity=pending.get("capacity"), layout=pending.get("layout"),
                          buffer_id=backend.buffer_id))


def fused_combine_send(backend, y, handle, bias, expert_layout) -> Pending:
    """backend.combine's result as a Pending (op="combine"); the receive returns arrays[0]."""
    return Pending((backend.combine(y, handle, bias, expert_layout),), op="combine",
                   buffer_id=backend.buffer_id, info=())
