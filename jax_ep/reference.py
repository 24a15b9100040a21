"""Pure-JAX reference backend: the oracle for every GPU test and a benchmark baseline.

Every function runs per shard inside `shard_map` over `config.axis_name` and follows
docs/design.md exactly. Data moves with capacity-padded `jax.lax.all_to_all` (which, unlike
`ragged_all_to_all`, runs on every platform): each rank sends a `[R, T, ...]` block, row `j`
of block `r` being its `j`-th token for rank `r`. Everything is deterministic; sums run in
float32 in a fixed order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jax_ep.types import DispatchLayout, EPConfig, Handle, LowLatencyHandle

FP8_BLOCK = 128
FP8_E4M3_MAX = 448.0


# ----------------------------------------------------------------------------- layout
def get_dispatch_layout(topk_idx: jax.Array, config: EPConfig) -> DispatchLayout:
    """topk_idx int32 [T, K] -> DispatchLayout (see types.DispatchLayout)."""
    num_tokens, _ = topk_idx.shape
    valid = topk_idx >= 0
    rank_of_slot = jnp.where(valid, topk_idx // config.num_local_experts, -1)
    ranks = jnp.arange(config.num_ranks, dtype=jnp.int32)
    is_token_in_rank = (rank_of_slot[:, :, None] == ranks).any(axis=1)
    is_token_in_node = is_token_in_rank.reshape(
        num_tokens, config.num_nodes, config.num_ranks_per_node).any(axis=2)
    num_tokens_per_expert = jnp.zeros(config.num_experts, jnp.int32).at[
        jnp.where(valid, topk_idx, config.num_experts)].add(1, mode="drop")
    return DispatchLayout(
        num_tokens_per_rank=is_token_in_rank.sum(0, dtype=jnp.int32),
        num_tokens_per_rdma_rank=is_token_in_node.sum(0, dtype=jnp.int32),
        num_tokens_per_expert=num_tokens_per_expert,
        is_token_in_rank=is_token_in_rank,
    )


def _send_pos(is_token_in_rank: jax.Array) -> jax.Array:
    """bool [T, R] -> int32 [T, R]: exclusive prefix count along tokens, -1 if not sent."""
    counts = jnp.cumsum(is_token_in_rank.astype(jnp.int32), axis=0) - 1
    return jnp.where(is_token_in_rank, counts, -1)


# ------------------------------------------------------------------ pair movement
def _recv_offsets(num_tokens_matrix: jax.Array, me: jax.Array):
    """Exclusive prefix over sources of the tokens received by `me`, and their total."""
    recv_counts = num_tokens_matrix[:, me]
    return jnp.cumsum(recv_counts) - recv_counts, recv_counts.sum()


def _pair_source(num_tokens_matrix, me, num_tokens):
    """For every pair p in [0, R*T): flat index s*T + j into the received blocks, or -1."""
    num_ranks = num_tokens_matrix.shape[0]
    offsets, num_pairs = _recv_offsets(num_tokens_matrix, me)
    pairs = jnp.arange(num_ranks * num_tokens, dtype=jnp.int32)
    source = jnp.searchsorted(offsets, pairs, side="right").astype(jnp.int32) - 1
    flat = source * num_tokens + pairs - offsets[source]
    return jnp.where(pairs < num_pairs, flat, -1), num_pairs


def _gather_rows(values: jax.Array, index: jax.Array) -> jax.Array:
    """values[index] with index -1 (or out of range) giving zero rows."""
    safe = jnp.clip(index, 0, values.shape[0] - 1)
    mask = (index >= 0) & (index < values.shape[0])
    rows = values[safe]
    return jnp.where(mask.reshape(mask.shape + (1,) * (rows.ndim - mask.ndim)), rows, 0)


def to_pairs(values, send_pos, num_tokens_matrix, config: EPConfig):
    """Source rows -> receiver pairs. values [T, ...] -> [P, ...] (zero past num_pairs)."""
    num_tokens = send_pos.shape[0]
    num_ranks = config.num_ranks
    me = lax.axis_index(config.axis_name)
    token_ids = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32)[:, None], send_pos.shape)
    rank_ids = jnp.broadcast_to(jnp.arange(num_ranks, dtype=jnp.int32)[None, :], send_pos.shape)
    token_of_slot = jnp.full((num_ranks, num_tokens), -1, jnp.int32).at[
        rank_ids, jnp.where(send_pos >= 0, send_pos, num_tokens)].set(token_ids, mode="drop")
    send = _gather_rows(values, token_of_slot.reshape(-1))
    recv = lax.all_to_all(send, config.axis_name, 0, 0, tiled=True)
    pair_source, _ = _pair_source(num_tokens_matrix, me, num_tokens)
    return _gather_rows(recv, pair_source)


def from_pairs(pair_values, send_pos, num_tokens_matrix, config: EPConfig):
    """Receiver pairs -> source. pair_values [P, ...] -> [R, T, ...]: entry (r, t) is what
    rank r sent back for token t (zero where t was not sent to r)."""
    num_tokens = send_pos.shape[0]
    num_ranks = config.num_ranks
    me = lax.axis_index(config.axis_name)
    offsets, _ = _recv_offsets(num_tokens_matrix, me)
    slots = jnp.arange(num_tokens, dtype=jnp.int32)
    recv_counts = num_tokens_matrix[:, me]
    pair_of_slot = jnp.where(slots[None, :] < recv_counts[:, None],
                             offsets[:, None] + slots[None, :], -1)
    back = _gather_rows(pair_values, pair_of_slot.reshape(-1))
    got = lax.all_to_all(back, config.axis_name, 0, 0, tiled=True)
    got = got.reshape((num_ranks, num_tokens) + got.shape[1:])
    rank_ids = jnp.arange(num_ranks, dtype=jnp.int32)[None, :]
    flat = jnp.where(send_pos >= 0, rank_ids * num_tokens + send_pos, -1)  # [T, R]
    per_rank = _gather_rows(got.reshape((num_ranks * num_tokens,) + got.shape[2:]), flat.T.reshape(-1))
    return per_rank.reshape((num_ranks, num_tokens) + got.shape[2:])


# ------------------------------------------------------------------ rows <-> pairs
def _local_topk(topk_idx, config: EPConfig):
    """Global expert ids -> this rank's local ids, -1 where not local."""
    me = lax.axis_index(config.axis_name)
    local = topk_idx - me * config.num_local_experts
    is_local = (topk_idx >= 0) & (local >= 0) & (local < config.num_local_experts)
    return jnp.where(is_local, local, -1)


def _first_occurrence(local_idx):
    """bool [P, K]: slot k holds a local expert not already held by an earlier slot."""
    num_slots = local_idx.shape[1]
    earlier = jnp.tril(jnp.ones((num_slots, num_slots), bool), k=-1)  # [k, k'] k' < k
    same = local_idx[:, :, None] == local_idx[:, None, :]
    repeated = (same & earlier[None]).any(axis=2)
    return (local_idx >= 0) & ~repeated


def _expert_rows(pair_local_idx, num_pairs, capacity, config: EPConfig):
    """Expert-layout placement of pairs.

    Returns pair_expert_rows int32 [P, K] and rows_per_expert int32 [L] (before capacity).
    """
    num_local = config.num_local_experts
    num_pair_slots = pair_local_idx.shape[0]
    is_pair = jnp.arange(num_pair_slots) < num_pairs
    first = _first_occurrence(pair_local_idx) & is_pair[:, None]
    experts = jnp.arange(num_local, dtype=jnp.int32)
    has_expert = ((pair_local_idx[:, :, None] == experts) & first[:, :, None]).any(axis=1)  # [P, L]
    rows_per_expert = has_expert.sum(0, dtype=jnp.int32)
    expert_offset = jnp.cumsum(rows_per_expert) - rows_per_expert
    rank_in_expert = jnp.cumsum(has_expert.astype(jnp.int32), axis=0) - 1
    row_of_expert = expert_offset[None, :] + rank_in_expert  # [P, L]
    safe_local = jnp.clip(pair_local_idx, 0, num_local - 1)
    rows = jnp.take_along_axis(row_of_expert, safe_local, axis=1)
    pair_expert_rows = jnp.where(first & (rows < capacity), rows, -1).astype(jnp.int32)
    return pair_expert_rows, rows_per_expert


def _row_pairs(pair_expert_rows, capacity):
    """Inverse of pair_expert_rows: for each of the C rows, (pair index, slot), or -1."""
    num_pairs, num_slots = pair_expert_rows.shape
    pair_ids = jnp.broadcast_to(jnp.arange(num_pairs, dtype=jnp.int32)[:, None], pair_expert_rows.shape)
    slot_ids = jnp.broadcast_to(jnp.arange(num_slots, dtype=jnp.int32)[None, :], pair_expert_rows.shape)
    target = jnp.where(pair_expert_rows >= 0, pair_expert_rows, capacity)
    row_pair = jnp.full(capacity, -1, jnp.int32).at[target].set(pair_ids, mode="drop")
    row_slot = jnp.full(capacity, -1, jnp.int32).at[target].set(slot_ids, mode="drop")
    return row_pair, row_slot


def _pairs_to_rows(pair_values, pair_expert_rows, num_pairs, capacity, expert_layout):
    """[P, ...] pair values -> [C, ...] output rows (zero where no row)."""
    if expert_layout:
        row_pair, _ = _row_pairs(pair_expert_rows, capacity)
        return _gather_rows(pair_values, row_pair)
    rows = jnp.arange(capacity, dtype=jnp.int32)
    return _gather_rows(pair_values, jnp.where(rows < num_pairs, rows, -1))


def _rank_layout_rows(num_pair_slots, num_pairs, capacity):
    """Rank layout: row p holds pair p; -1 for pairs that were not received or dropped."""
    pairs = jnp.arange(num_pair_slots, dtype=jnp.int32)
    return jnp.where((pairs < num_pairs) & (pairs < capacity), pairs, -1)


def _num_pairs(num_tokens_matrix, config):
    return num_tokens_matrix[:, lax.axis_index(config.axis_name)].sum()


# ------------------------------------------------------------------ dispatch / combine
def dispatch(x, x_scales, topk_idx, topk_weights, *, capacity: int, expert_layout: bool,
             config: EPConfig, buffer_id: int):
    """Normal dispatch. x [T, H] (bf16/f32/fp8), x_scales f32 [T, H/128] or None,
    topk_idx int32 [T, K], topk_weights f32 [T, K].

    Returns (recv_x, recv_x_scales or None, recv_topk_idx, recv_topk_weights,
    num_recv_tokens, num_recv_tokens_per_expert, num_dropped, Handle); the Handle records
    `capacity`, the layout and `buffer_id` (the `Buffer.id` it belongs to)."""
    layout = get_dispatch_layout(topk_idx, config)
    send_pos = _send_pos(layout.is_token_in_rank)
    num_tokens_matrix = lax.all_gather(layout.num_tokens_per_rank, config.axis_name)
    num_pairs = _num_pairs(num_tokens_matrix, config)

    move = lambda v: to_pairs(v, send_pos, num_tokens_matrix, config)  # noqa: E731
    pair_x = move(x)
    pair_scales = None if x_scales is None else move(x_scales)
    pair_topk = move(topk_idx + 1) - 1  # zero rows must read as -1
    pair_weights = move(topk_weights)
    pair_local = _local_topk(pair_topk, config)

    num_local = config.num_local_experts
    experts = jnp.arange(num_local, dtype=jnp.int32)
    if expert_layout:
        pair_expert_rows, rows_per_expert = _expert_rows(pair_local, num_pairs, capacity, config)
        row_pair, row_slot = _row_pairs(pair_expert_rows, capacity)
        row_local = _gather_rows(pair_local + 1, row_pair) - 1
        row_expert = jnp.take_along_axis(row_local, jnp.clip(row_slot, 0)[:, None], axis=1)[:, 0]
        row_expert = jnp.where(row_slot >= 0, row_expert, -1)
        recv_topk_idx = jnp.where(row_local == row_expert[:, None], row_local, -1)
        num_rows = rows_per_expert.sum()
        expert_offset = jnp.cumsum(rows_per_expert) - rows_per_expert
        num_recv_tokens_per_expert = jnp.clip(
            jnp.minimum(rows_per_expert, capacity - expert_offset), 0).astype(jnp.int32)
    else:
        pair_expert_rows = jnp.zeros((0, topk_idx.shape[1]), jnp.int32)
        row_pair = jnp.where(jnp.arange(capacity) < num_pairs, jnp.arange(capacity), -1)
        recv_topk_idx = _gather_rows(pair_local + 1, row_pair) - 1
        num_rows = num_pairs
        num_recv_tokens_per_expert = (recv_topk_idx[:, :, None] == experts).any(1).sum(
            0, dtype=jnp.int32)

    recv_x = _gather_rows(pair_x, row_pair)
    recv_x_scales = None if pair_scales is None else _gather_rows(pair_scales, row_pair)
    recv_topk_weights = jnp.where(recv_topk_idx >= 0, _gather_rows(pair_weights, row_pair), 0.0)
    num_recv_tokens = jnp.minimum(num_rows, capacity).astype(jnp.int32)
    num_dropped = jnp.maximum(num_rows - capacity, 0).astype(jnp.int32)
    handle = Handle(send_pos, num_tokens_matrix, pair_expert_rows, capacity=capacity,
                    layout="expert" if expert_layout else "rank", buffer_id=buffer_id)
    return (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights.astype(jnp.float32),
            num_recv_tokens, num_recv_tokens_per_expert, num_dropped, handle)


def combine_pair_values(y, handle: Handle, *, expert_layout: bool, config: EPConfig):
    """Holder side of combine: y [C, H] -> one value per pair [P, H] in y.dtype."""
    num_pairs = _num_pairs(handle.num_tokens_matrix, config)
    capacity = y.shape[0]
    num_pair_slots = config.num_ranks * handle.send_pos.shape[0]
    if expert_layout:
        acc = jnp.zeros((num_pair_slots, y.shape[1]), jnp.float32)
        for k in range(handle.pair_expert_rows.shape[1]):
            acc = acc + _gather_rows(y, handle.pair_expert_rows[:, k]).astype(jnp.float32)
        return acc.astype(y.dtype)
    return _gather_rows(y, _rank_layout_rows(num_pair_slots, num_pairs, capacity))


def combine(y, handle: Handle, bias, *, expert_layout: bool, config: EPConfig):
    """Combine. y [C, H] (bf16/f32), bias [T, H] or None -> out [T, H] y.dtype."""
    pair_values = combine_pair_values(y, handle, expert_layout=expert_layout, config=config)
    per_rank = from_pairs(pair_values, handle.send_pos, handle.num_tokens_matrix, config)
    if config.num_nodes > 1:
        return _combine_hierarchical(per_rank, handle.send_pos, bias, config).astype(y.dtype)
    acc = jnp.zeros(per_rank.shape[1:], jnp.float32)
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    for r in range(config.num_ranks):
        acc = acc + per_rank[r].astype(jnp.float32)
    return acc.astype(y.dtype)


def _combine_hierarchical(per_rank, send_pos, bias, config: EPConfig):
    """Internode combine order (num_nodes > 1), in float32: each node's partial sum starts at
    0 and adds the values of its ranks that got the token, in ascending rank, and is rounded
    to per_rank's dtype (what crosses the network); then acc = bias (0 without) plus, in
    ascending node, the partial of every node the token went to. Returns float32 [T, H]."""
    group = config.num_ranks_per_node
    finfo = jnp.finfo(per_rank.dtype)
    sent = (send_pos >= 0)[:, :, None]  # [T, R, 1]
    acc = (jnp.zeros(per_rank.shape[1:], jnp.float32) if bias is None
           else bias.astype(jnp.float32))
    for m in range(config.num_nodes):
        partial = jnp.zeros(per_rank.shape[1:], jnp.float32)
        for g in range(group):
            r = m * group + g
            partial = jnp.where(sent[:, r], partial + per_rank[r].astype(jnp.float32), partial)
        # Rounded to per_rank's dtype as an explicit op: XLA may drop a convert pair
        # f32 -> bf16 -> f32 (xla_allow_excess_precision), reduce_precision it keeps.
        partial = lax.reduce_precision(partial, exponent_bits=finfo.nexp,
                                       mantissa_bits=finfo.nmant)
        in_node = sent[:, m * group:(m + 1) * group].any(axis=1)
        acc = jnp.where(in_node, acc + partial, acc)
    return acc


def cached_dispatch(g, handle: Handle, *, capacity: int, expert_layout: bool, config: EPConfig):
    """Combine's backward: g [T, H] -> [C, H] rows laid out as the dispatch that made handle."""
    pair_g = to_pairs(g, handle.send_pos, handle.num_tokens_matrix, config)
    num_pairs = _num_pairs(handle.num_tokens_matrix, config)
    return _pairs_to_rows(pair_g, handle.pair_expert_rows, num_pairs, capacity, expert_layout)


def combine_topk_weights_grad(ct_weights, recv_topk_idx, handle: Handle, *, expert_layout: bool,
                              config: EPConfig):
    """Cotangent of recv_topk_weights [C, K] -> cotangent of topk_weights [T, K] (float32).

    Works on a handle from any backend: it only moves [P, K] values with `all_to_all`.
    """
    capacity, num_slots = ct_weights.shape
    num_pairs = _num_pairs(handle.num_tokens_matrix, config)
    num_pair_slots = config.num_ranks * handle.send_pos.shape[0]
    ct_weights = jnp.where(recv_topk_idx >= 0, ct_weights, 0.0).astype(jnp.float32)
    if expert_layout:
        rows = handle.pair_expert_rows
        gathered = _gather_rows(ct_weights, rows.reshape(-1)).reshape(num_pair_slots, num_slots, num_slots)
        pair_ct = jnp.diagonal(gathered, axis1=1, axis2=2)  # slot k of row rows[p, k]
    else:
        pair_ct = _gather_rows(ct_weights, _rank_layout_rows(num_pair_slots, num_pairs, capacity))
    per_rank = from_pairs(pair_ct, handle.send_pos, handle.num_tokens_matrix, config)
    return per_rank.sum(0)


# ------------------------------------------------------------------ low latency
def fp8_scales(amax: jax.Array, round_scale: bool = False) -> jax.Array:
    """float32 amax of 128-channel blocks -> their FP8 scales: max(amax, 1e-4) * float32(1 /
    448) (a product, as XLA rewrites a division by a constant; the CUDA kernels compute the
    same), or with round_scale that scale rounded up to a power of two (exactly, through
    frexp)."""
    scales = jnp.maximum(amax, 1e-4) * jnp.float32(1.0 / FP8_E4M3_MAX)
    if not round_scale:
        return scales
    mantissa, exponent = jnp.frexp(scales)  # scales = mantissa * 2**exponent, mantissa in [0.5, 1)
    return jnp.ldexp(jnp.ones_like(scales), jnp.where(mantissa == 0.5, exponent - 1, exponent))


def quantize_fp8(x: jax.Array, round_scale: bool = False):
    """x [..., H] -> (float8_e4m3fn [..., H], float32 [..., H // 128]): one scale per 128
    channels (`fp8_scales`), values divided by their scale and rounded to nearest."""
    blocks = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // FP8_BLOCK, FP8_BLOCK))
    scales = fp8_scales(jnp.abs(blocks).max(axis=-1), round_scale)
    q = (blocks / scales[..., None]).astype(jnp.float8_e4m3fn)
    return q.reshape(x.shape), scales


def dequantize_fp8(q: jax.Array, scales: jax.Array, dtype=jnp.float32):
    """Inverse of quantize_fp8 (up to FP8 rounding)."""
    blocks = q.astype(jnp.float32).reshape(q.shape[:-1] + (q.shape[-1] // FP8_BLOCK, FP8_BLOCK))
    return (blocks * scales[..., None]).reshape(q.shape).astype(dtype)


def low_latency_dispatch(x, topk_idx, *, max_tokens_per_rank: int, fp8: bool, config: EPConfig,
                         buffer_id: int, round_scale: bool = False):
    """x [T, H], topk_idx int32 [T, K] -> (recv_x [L, R*M, H], recv_scales or None,
    recv_count int32 [L], LowLatencyHandle stamped with `buffer_id`). Rows past recv_count
    are zero here (the contract leaves them unspecified)."""
    num_tokens, num_slots = topk_idx.shape
    m = max_tokens_per_rank
    num_ranks, num_local = config.num_ranks, config.num_local_experts
    pad = m - num_tokens
    if fp8:
        x_q, scales = quantize_fp8(x, round_scale)
    else:
        x_q, scales = x, None
    x_all = lax.all_gather(jnp.pad(x_q, ((0, pad), (0, 0))), config.axis_name)  # [R, M, H]
    topk_all = lax.all_gather(jnp.pad(topk_idx, ((0, pad), (0, 0)), constant_values=-1),
                              config.axis_name)  # [R, M, K]
    local = _local_topk(topk_all.reshape(num_ranks * m, num_slots), config)
    first = _first_occurrence(local)
    experts = jnp.arange(num_local, dtype=jnp.int32)
    has_expert = ((local[:, :, None] == experts) & first[:, :, None]).any(axis=1)  # [R*M, L]
    rank_in_expert = jnp.cumsum(has_expert.astype(jnp.int32), axis=0) - 1  # (s, t) order
    rows = jnp.take_along_axis(rank_in_expert, jnp.clip(local, 0), axis=1)  # [R*M, K]
    row_of_slot = jnp.where(local >= 0, local * (num_ranks * m) + rows, -1)  # flat [L*R*M]
    # A repeated expert's slots all point at one row; only first slots fill rows.
    sources = jnp.broadcast_to(jnp.arange(num_ranks * m, dtype=jnp.int32)[:, None], local.shape)
    flat_target = jnp.where(first, row_of_slot, num_local * num_ranks * m)
    row_source = jnp.full(num_local * num_ranks * m, -1, jnp.int32).at[flat_target.reshape(-1)].set(
        sources.reshape(-1), mode="drop")
    recv_x = _gather_rows(x_all.reshape(num_ranks * m, -1), row_source)
    recv_x = recv_x.reshape(num_local, num_ranks * m, x.shape[1])
    recv_scales = None
    if fp8:
        scales_all = lax.all_gather(jnp.pad(scales, ((0, pad), (0, 0))), config.axis_name)
        recv_scales = _gather_rows(scales_all.reshape(num_ranks * m, -1), row_source).reshape(
            num_local, num_ranks * m, -1)
    recv_count = has_expert.sum(0, dtype=jnp.int32)
    handle = LowLatencyHandle(row_of_slot.reshape(num_ranks, m, num_slots).astype(jnp.int32),
                              buffer_id=buffer_id)
    return recv_x, recv_scales, recv_count, handle


def low_latency_combine(x, topk_idx, topk_weights, handle: LowLatencyHandle, *, config: EPConfig):
    """x [L, R*M, H] expert outputs, topk_idx [T, K], topk_weights f32 [T, K] -> [T, H].

    Every rank holding experts of token t sums topk_weights[t, k] * x[row of slot k] over its
    slots of t, in float32 in slot order, and casts the sum to x.dtype (one row per (token,
    rank) crosses the network); out[t] = cast(sum of those rows in ascending rank order, in
    float32)."""
    num_tokens, num_slots = topk_idx.shape
    num_ranks, m, _ = handle.row_of_slot.shape
    hidden = x.shape[-1]
    weights_all = lax.all_gather(jnp.pad(topk_weights.astype(jnp.float32),
                                         ((0, m - num_tokens), (0, 0))), config.axis_name)
    rows = handle.row_of_slot.reshape(num_ranks * m, num_slots)
    weights = weights_all.reshape(num_ranks * m, num_slots)
    x_rows = x.reshape(-1, hidden)
    partial = jnp.zeros((num_ranks * m, hidden), jnp.float32)  # [(source, token), H]
    for k in range(num_slots):
        w = jnp.where(rows[:, k] >= 0, weights[:, k], 0.0)
        partial = partial + w[:, None] * _gather_rows(x_rows, rows[:, k]).astype(jnp.float32)
    got = lax.all_to_all(partial.astype(x.dtype), config.axis_name, 0, 0, tiled=True)
    got = got.reshape(num_ranks, m, hidden)[:, :num_tokens].astype(jnp.float32)
    out = jnp.zeros((num_tokens, hidden), jnp.float32)
    for r in range(num_ranks):
        out = out + got[r]
    return out.astype(x.dtype)
