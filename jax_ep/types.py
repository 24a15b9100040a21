"""Result and handle types shared by every backend.

The results are NamedTuples and the handles are dataclasses registered as pytrees (arrays as
leaves, the rest as static metadata), so all pass through `jax.jit`, `shard_map` and
`jax.grad` unchanged. Shapes are per shard (per EP rank): `R` ranks,
`E` experts, `L = E // R` local experts, `T` tokens, `H` hidden, `K` top-k,
`C` capacity, `P = R * T` pairs; docs/design.md defines every array precisely.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax


@dataclasses.dataclass(frozen=True)
class EPConfig:
    """Static description of one expert-parallel group (hashable, safe as a jit static)."""

    axis_name: str
    num_ranks: int
    num_experts: int
    hidden: int
    num_ranks_per_node: int
    max_tokens_per_rank: int
    num_sms: int
    low_latency_num_sms: Optional[int] = None  # None: the CUDA backend's default
    # None: max_tokens_per_rank; 0: the Buffer runs no low-latency ops.
    low_latency_max_tokens_per_rank: Optional[int] = None

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def low_latency_max_tokens(self) -> int:
        """The most tokens per rank (T, and M) of a low-latency op; 0: none run."""
        if self.low_latency_max_tokens_per_rank is None:
            return self.max_tokens_per_rank
        return self.low_latency_max_tokens_per_rank

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.num_ranks_per_node


class DispatchLayout(NamedTuple):
    """`Buffer.get_dispatch_layout` result.

    num_tokens_per_rank:      int32 [R]      tokens this rank sends to each rank.
    num_tokens_per_rdma_rank: int32 [nodes]  tokens this rank sends to each node.
    num_tokens_per_expert:    int32 [E]      (token, slot) selections of each expert.
    is_token_in_rank:         bool  [T, R]   token t goes to rank r.
    """

    num_tokens_per_rank: jax.Array
    num_tokens_per_rdma_rank: jax.Array
    num_tokens_per_expert: jax.Array
    is_token_in_rank: jax.Array


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["send_pos", "num_tokens_matrix", "pair_expert_rows"],
                   meta_fields=["capacity", "layout", "buffer_id"])
@dataclasses.dataclass(frozen=True)
class Handle:
    """What combine needs to send rows back (docs/design.md, "Handle").

    Arrays (pytree leaves):
    send_pos:          int32 [T, R]          index of token t among this rank's tokens sent
                                             to rank r, or -1.
    num_tokens_matrix: int32 [R, R]          tokens rank s sends to rank r (same everywhere).
    pair_expert_rows:  int32 [P, K] / [0, K] expert layout: row of slot k of pair p, or -1.

    Static metadata (part of the pytree structure, so it survives jit and shard_map):
    capacity:  int  C, the rows of the dispatch output; combine takes exactly C rows.
    layout:    str  "rank" or "expert", the dispatch's layout; combine reads rows in it.
    buffer_id: int  `Buffer.id` of the Buffer whose dispatch made the handle; only that
                    Buffer's combine accepts it.
    """

    send_pos: jax.Array
    num_tokens_matrix: jax.Array
    pair_expert_rows: jax.Array
    capacity: int
    layout: str
    buffer_id: int


class DispatchOutput(NamedTuple):
    """`Buffer.dispatch` result.

    recv_x:                     [C, H] x.dtype, or a tuple (float8_e4m3fn [C, H],
                                float32 [C, H // 128]) when x was an FP8 tuple.
    recv_topk_idx:              int32 [C, K]   local expert ids, -1 where not this rank's
                                               (expert layout: not this row's) expert.
    recv_topk_weights:          float32 [C, K] weights, 0 where recv_topk_idx is -1.
    num_recv_tokens:            int32 []       valid rows (the rest are zero).
    num_recv_tokens_per_expert: int32 [L]      rows per local expert (expert layout: group
                                               sizes for `jax.lax.ragged_dot`).
    handle:                     Handle         pass to `Buffer.combine`.
    num_dropped:                int32 []       rows that did not fit in the capacity.
    """

    recv_x: object
    recv_topk_idx: jax.Array
    recv_topk_weights: jax.Array
    num_recv_tokens: jax.Array
    num_recv_tokens_per_expert: jax.Array
    handle: Handle
    num_dropped: jax.Array


@functools.partial(jax.tree_util.register_dataclass, data_fields=["row_of_slot"],
                   meta_fields=["buffer_id", "num_tokens"])
@dataclasses.dataclass(frozen=True)
class LowLatencyHandle:
    """What `low_latency_combine` needs.

    row_of_slot: int32 [R, M, K]  (pytree leaf) for slot k of token t of source s: its row in
                                  this rank's recv_x viewed as [L * R * M, H], or -1 if not
                                  local.
    buffer_id:   int              (static) `Buffer.id` of the Buffer whose
                                  low_latency_dispatch made the handle.
    num_tokens:  int or None      (static) T, the tokens of that dispatch (the Buffer records
                                  it; None: unknown, then combine accepts up to M tokens).
    """

    row_of_slot: jax.Array
    buffer_id: int
    num_tokens: Optional[int] = None


class LowLatencyDispatchOutput(NamedTuple):
    """`Buffer.low_latency_dispatch` result (M = its max_tokens_per_rank, by default T).

    recv_x:      [L, R * M, H] x.dtype, or float8_e4m3fn with fp8=True. Rows of expert e
                 are grouped by source rank, then source token; rows >= recv_count[e] are
                 unspecified (the CUDA backend does not spend time zeroing them; the
                 reference backend zeroes them): mask them before reducing over rows.
    recv_scales: float32 [L, R * M, H // 128] with fp8=True, else None.
    recv_count:  int32 [L] rows received per local expert.
    handle:      LowLatencyHandle.
    """

    recv_x: jax.Array
    recv_scales: Optional[jax.Array]
    recv_count: jax.Array
    handle: LowLatencyHandle


@functools.partial(jax.tree_util.register_dataclass, data_fields=["arrays"],
                   meta_fields=["op", "buffer_id", "info"])
@dataclasses.dataclass(frozen=True)
class LowLatencyPending:
    """A hooked low-latency op in flight: returned by `Buffer.low_latency_dispatch_send` /
    `low_latency_combine_send`, consumed once by the matching `..._recv`.

    arrays:    tuple of arrays (pytree leaves), the backend's own: the CUDA backend's first is
               int32 [2], the op's number in device memory, which makes the receive depend
               on the send; the reference backend carries the finished results.
    op:        str  "dispatch" or "combine".
    buffer_id: int  `Buffer.id` of the Buffer that sent it.
    info:      tuple of (name, value) pairs (static): what the receive needs to build its
               results (shapes, dtypes, options); `Buffer.low_latency_dispatch_send` adds
               ("jax_ep.num_tokens", T) for the handle, and removes it before the backend's
               receive.
    """

    arrays: tuple
    op: str
    buffer_id: int
    info: tuple

    def get(self, name):
        return dict(self.info)[name]



@functools.partial(jax.tree_util.register_dataclass, data_fields=["arrays"],
                   meta_fields=["op", "buffer_id", "info"])
@dataclasses.dataclass(frozen=True)
class Pending:
    """A hooked normal-mode op in flight: returned by `Buffer.dispatch_send` /
    `Buffer.combine_send`, consumed once by the matching `dispatch_recv` / `combine_recv`.

    arrays:    tuple of arrays (pytree leaves), the backend's own: the CUDA backend's first is
               int32 [2], the op's number and code in device memory, which makes the receive
               depend on the send; the reference backend carries the finished results.
    op:        str  "dispatch" or "combine".
    buffer_id: int  `Buffer.id` of the Buffer that sent it.
    info:      tuple of (name, value) pairs (static): what the receive needs to build its
               results (capacity, layout, shapes, dtypes).
    """

    arrays: tuple
    op: str
    buffer_id: int
    info: tuple

    def get(self, name):
        return dict(self.info)[name]
