"""A plain NumPy statement of docs/design.md, written with loops, independent of jax_ep.

Arrays are global: x [R, T, H], topk_idx [R, T, K], topk_weights [R, T, K].
"""

import numpy as np


def local_experts_of(topk_row, rank, num_local):
    """Distinct local expert ids of one token at `rank`, in slot order."""
    seen = []
    for e in topk_row:
        if e >= 0 and e // num_local == rank and e - rank * num_local not in seen:
            seen.append(int(e - rank * num_local))
    return seen


def pairs_of(topk_idx, rank, num_local):
    """(source, token) pairs received by `rank`, in DeepEP's order."""
    num_ranks, num_tokens, _ = topk_idx.shape
    return [(s, t) for s in range(num_ranks) for t in range(num_tokens)
            if local_experts_of(topk_idx[s, t], rank, num_local)]


def dispatch(x, topk_idx, topk_weights, num_experts, capacity, layout):
    """Per receiving rank: dict of recv_x, recv_topk_idx, recv_topk_weights,
    num_recv_tokens, num_recv_tokens_per_expert, num_dropped, rows (list of (s, t, e))."""
    num_ranks, _, hidden = x.shape
    num_slots = topk_idx.shape[2]
    num_local = num_experts // num_ranks
    results = []
    for r in range(num_ranks):
        pairs = pairs_of(topk_idx, r, num_local)
        if layout == "rank":
            rows = [(s, t, None) for s, t in pairs]
        else:
            rows = [(s, t, e) for e in range(num_local) for s, t in pairs
                    if e in local_experts_of(topk_idx[s, t], r, num_local)]
        kept = rows[:capacity]
        recv_x = np.zeros((capacity, hidden), x.dtype)
        recv_idx = np.full((capacity, num_slots), -1, np.int32)
        recv_w = np.zeros((capacity, num_slots), np.float32)
        per_expert = np.zeros(num_local, np.int32)
        for i, (s, t, e) in enumerate(kept):
            recv_x[i] = x[s, t]
            for k in range(num_slots):
                g = topk_idx[s, t, k]
                local = g - r * num_local
                if g >= 0 and 0 <= local < num_local and (e is None or local == e):
                    recv_idx[i, k] = local
                    recv_w[i, k] = topk_weights[s, t, k]
            for e2 in range(num_local):
                if (e is None and e2 in recv_idx[i]) or e == e2:
                    per_expert[e2] += 1
        results.append(dict(recv_x=recv_x, recv_topk_idx=recv_idx, recv_topk_weights=recv_w,
                            num_recv_tokens=len(kept), num_recv_tokens_per_expert=per_expert,
                            num_dropped=len(rows) - len(kept), rows=kept))
    return results


def combine(y, dispatched, num_tokens, bias=None):
    """y [R, C, H] expert outputs laid out as `dispatched` -> out [R, T, H] in float64."""
    num_ranks, _, hidden = y.shape
    out = np.zeros((num_ranks, num_tokens, hidden))
    if bias is not None:
        out += bias
    for r in range(num_ranks):
        for i, (s, t, _) in enumerate(dispatched[r]["rows"]):
            out[s, t] += y[r, i]
    return out


def layout(topk_idx, num_ranks, num_experts, ranks_per_node):
    """One rank's layout: (per_rank [R], per_node [nodes], per_expert [E], in_rank [T, R])."""
    num_local = num_experts // num_ranks
    num_tokens = topk_idx.shape[0]
    in_rank = np.zeros((num_tokens, num_ranks), bool)
    per_expert = np.zeros(num_experts, np.int32)
    for t in range(num_tokens):
        for e in topk_idx[t]:
            if e >= 0:
                in_rank[t, e // num_local] = True
                per_expert[e] += 1
    in_node = in_rank.reshape(num_tokens, -1, ranks_per_node).any(-1)
    return in_rank.sum(0), in_node.sum(0), per_expert, in_rank


def combine_exact(y, topk_idx, dispatched, num_experts, ranks_per_node, bias=None):
    """Bit-exact combine (docs/design.md, "Combine"), float32 sums in the specified order.

    y [R, C, H] in the output dtype (bf16 or float32), laid out as `dispatched`; topk_idx
    [R, T, K]; bias [R, T, H] in y's dtype or None -> out [R, T, H] in y's dtype.
    One node (ranks_per_node == R): acc = 0 + bias, then + value_r in ascending r.
    Several nodes: partial_m = 0 + the values of node m's ranks in ascending rank, rounded
    to y's dtype (it crosses the network in it); acc = bias (0 without), then + partial_m in
    ascending m over the nodes the token went to.
    """
    num_ranks, _, hidden = y.shape
    num_tokens = topk_idx.shape[1]
    num_local = num_experts // num_ranks
    dtype = y.dtype
    f32 = np.float32

    def value(r, s, t):
        """What rank r sends back for token t of source s (in y's dtype), or None if not sent."""
        experts = local_experts_of(topk_idx[s, t], r, num_local)
        if not experts:
            return None
        rows = dispatched[r]["rows"]
        if rows and rows[0][2] is None:  # rank layout: the pair's row, zero if dropped
            hits = [i for i, (s2, t2, _) in enumerate(rows) if (s2, t2) == (s, t)]
            return y[r, hits[0]] if hits else np.zeros(hidden, dtype)
        acc = np.zeros(hidden, f32)  # expert layout: its rows in slot order, float32
        for e in experts:
            for i, row in enumerate(rows):
                if row == (s, t, e):
                    acc = acc + y[r, i].astype(f32)
        return acc.astype(dtype)

    out = np.zeros((num_ranks, num_tokens, hidden), dtype)
    for s in range(num_ranks):
        for t in range(num_tokens):
            values = [value(r, s, t) for r in range(num_ranks)]
            if ranks_per_node == num_ranks:
                acc = np.zeros(hidden, f32)
                if bias is not None:
                    acc = acc + bias[s, t].astype(f32)
                for v in values:
                    if v is not None:
                        acc = acc + v.astype(f32)
            else:
                acc = np.zeros(hidden, f32) if bias is None else bias[s, t].astype(f32)
                for m in range(num_ranks // ranks_per_node):
                    node = values[m * ranks_per_node:(m + 1) * ranks_per_node]
                    if all(v is None for v in node):
                        continue
                    partial = np.zeros(hidden, f32)
                    for v in node:
                        if v is not None:
                            partial = partial + v.astype(f32)
                    acc = acc + partial.astype(dtype).astype(f32)  # crosses the network in dtype
            out[s, t] = acc.astype(dtype)
    return out


# ------------------------------------------------------------------ handle and gradients
def handle(topk_idx, dispatched, num_experts, layout):
    """Per rank: the Handle's arrays (docs/design.md, "Handle"): send_pos [T, R] (this rank
    as source), num_tokens_matrix [R, R] (the same everywhere), pair_expert_rows [P, K]
    (expert layout, this rank as receiver; [0, K] in rank layout)."""
    num_ranks, num_tokens, num_slots = topk_idx.shape
    num_local = num_experts // num_ranks
    send_pos = np.full((num_ranks, num_tokens, num_ranks), -1, np.int32)
    matrix = np.zeros((num_ranks, num_ranks), np.int32)
    for s in range(num_ranks):
        for r in range(num_ranks):
            for t in range(num_tokens):
                if local_experts_of(topk_idx[s, t], r, num_local):
                    send_pos[s, t, r] = matrix[s, r]
                    matrix[s, r] += 1
    results = []
    for r in range(num_ranks):
        if layout == "rank":
            rows = np.zeros((0, num_slots), np.int32)
        else:
            rows = np.full((num_ranks * num_tokens, num_slots), -1, np.int32)
            kept = dispatched[r]["rows"]
            for p, (s, t) in enumerate(pairs_of(topk_idx, r, num_local)):
                seen = []
                for k in range(num_slots):
                    g = int(topk_idx[s, t, k])
                    if g >= 0 and g // num_local == r and g not in seen:
                        seen.append(g)
                        if (s, t, g - r * num_local) in kept:
                            rows[p, k] = kept.index((s, t, g - r * num_local))
        results.append(dict(send_pos=send_pos[r], num_tokens_matrix=matrix,
                            pair_expert_rows=rows))
    return results


def dispatch_weights_grad(ct_weights, topk_idx, dispatched, num_experts):
    """Cotangent of recv_topk_weights [R, C, K] -> cotangent of topk_weights [R, T, K]: slot
    k of token t gets the cotangent of the kept row holding it, 0 if dropped or no expert."""
    num_ranks, num_tokens, num_slots = topk_idx.shape
    num_local = num_experts // num_ranks
    out = np.zeros((num_ranks, num_tokens, num_slots), np.float32)
    for r in range(num_ranks):
        for i, (s, t, e) in enumerate(dispatched[r]["rows"]):
            for k in range(num_slots):
                g = topk_idx[s, t, k]
                local = g - r * num_local
                if g >= 0 and 0 <= local < num_local and (e is None or local == e):
                    out[s, t, k] += ct_weights[r, i, k]
    return out


# ------------------------------------------------------------------ low latency
def quantize_fp8(x, round_scale=False):
    """x [..., H] -> (float8_e4m3fn [..., H], float32 [..., H / 128]) as docs/design.md,
    "FP8": per 128 channels scale = max(amax, 1e-4) * float32(1 / 448) (with round_scale:
    rounded up to a power of two), values float32(x) / scale rounded to nearest even."""
    import ml_dtypes
    f32 = np.float32
    blocks = np.asarray(x).astype(f32).reshape(np.shape(x)[:-1] + (-1, 128))
    scales = np.maximum(np.abs(blocks).max(axis=-1), f32(1e-4)) * f32(1 / 448)
    if round_scale:
        mantissa, exponent = np.frexp(scales)
        scales = np.ldexp(f32(1), np.where(mantissa == 0.5, exponent - 1, exponent)).astype(f32)
    q = (blocks / scales[..., None]).astype(ml_dtypes.float8_e4m3fn)
    return q.reshape(np.shape(x)), scales.astype(f32)


def low_latency_rows(topk_idx, num_experts, max_tokens):
    """Per receiving rank r: (row_of_slot [R, M, K], sources): sources[e] lists the (s, t)
    whose slots select r's local expert e, by source rank then token; slot k of (s, t) maps
    to row e * R * M + sources[e].index((s, t)) of recv_x viewed as [L * R * M, H], or -1
    (not r's expert, or an id outside [0, E)). A repeated expert's slots share one row."""
    num_ranks, num_tokens, num_slots = topk_idx.shape
    num_local = num_experts // num_ranks
    results = []
    for r in range(num_ranks):
        row_of_slot = np.full((num_ranks, max_tokens, num_slots), -1, np.int32)
        sources = []
        for e in range(num_local):
            sources.append([])
            for s in range(num_ranks):
                for t in range(num_tokens):
                    slots = [k for k in range(num_slots) if topk_idx[s, t, k] == r * num_local + e]
                    if slots:
                        for k in slots:
                            row_of_slot[s, t, k] = e * num_ranks * max_tokens + len(sources[e])
                        sources[e].append((s, t))
        results.append((row_of_slot, sources))
    return results


def low_latency_dispatch(x, topk_idx, num_experts, max_tokens, fp8=False, round_scale=False):
    """x [R, T, H], topk_idx [R, T, K] -> per receiving rank dict of recv_x [L, R*M, H]
    (x.dtype, or float8_e4m3fn with fp8), recv_scales [L, R*M, H/128] (fp8) or None,
    recv_count [L], row_of_slot [R, M, K]. Rows past recv_count are zero here (unspecified
    by the contract)."""
    num_ranks, _, hidden = x.shape
    num_local = num_experts // num_ranks
    values, scales = quantize_fp8(x, round_scale) if fp8 else (x, None)
    results = []
    for row_of_slot, sources in low_latency_rows(topk_idx, num_experts, max_tokens):
        recv_x = np.zeros((num_local, num_ranks * max_tokens, hidden), values.dtype)
        recv_scales = (np.zeros((num_local, num_ranks * max_tokens, hidden // 128), np.float32)
                       if fp8 else None)
        for e in range(num_local):
            for i, (s, t) in enumerate(sources[e]):
                recv_x[e, i] = values[s, t]
                if fp8:
                    recv_scales[e, i] = scales[s, t]
        results.append(dict(recv_x=recv_x, recv_scales=recv_scales,
                            recv_count=np.array([len(v) for v in sources], np.int32),
                            row_of_slot=row_of_slot))
    return results


def low_latency_combine(y, topk_idx, topk_weights, num_experts, max_tokens):
    """y [R, L, R*M, H] every rank's expert outputs (output dtype, laid out as
    low_latency_dispatch's recv_x) -> out [R, T, H] in y's dtype, bit-exact: each rank r
    holding experts of token t sums float32(w[t, k]) * float32(row of slot k) over its
    slots in slot order in float32 (a separate multiply and add per slot), casts the sum to
    y's dtype; out[t] = the float32 sum of those partials in ascending r, cast."""
    num_ranks, num_tokens, num_slots = topk_idx.shape
    hidden = y.shape[-1]
    dtype, f32 = y.dtype, np.float32
    layouts = low_latency_rows(topk_idx, num_experts, max_tokens)
    out = np.zeros((num_ranks, num_tokens, hidden), dtype)
    for s in range(num_ranks):
        for t in range(num_tokens):
            acc = np.zeros(hidden, f32)
            for r, (row_of_slot, _) in enumerate(layouts):
                rows = y[r].reshape(-1, hidden)
                partial, held = np.zeros(hidden, f32), False
                for k in range(num_slots):
                    row = row_of_slot[s, t, k]
                    if row >= 0:
                        held = True
                        partial = partial + f32(topk_weights[s, t, k]) * rows[row].astype(f32)
                if held:
                    acc = acc + partial.astype(dtype).astype(f32)
            out[s, t] = acc.astype(dtype)
    return out
