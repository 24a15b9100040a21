// Intranode dispatch, combine and cached dispatch between the GPUs of one NVLink domain,
// through the transport (cuda/transport.cuh). Every op is ONE kernel of num_sms blocks of
// kThreads threads, half of them in each role. The protocol that lets consecutive ops run
// without an all-rank barrier (op numbers, tags, staging double-buffered by parity,
// acknowledgements, failures) is in cuda/region.h and cuda/common.cuh.
//
// dispatch_kernel
//   senders (the first half of the blocks):
//     1. count: tiles of kLayoutTileTokens tokens, strided over the sender blocks; per tile,
//        send_pos[t, r] and expert_rank[t, k] relative to the tile (warp ballots and a
//        shared [warp][expert] mask table) and the tile's totals (tile_counts).
//     2. the last sender block to finish counting waits until every peer finished op n - 2,
//        turns the tiles' totals into offsets and releases the other senders; then it writes
//        this rank's totals into every peer's count slot and announces the op.
//     3. send: a warp per token (strided over the sender warps) loads the row once and
//        stores it into the staging row [me][send_pos[t, r]] of every destination r != me,
//        with the top-k slots and FP8 scales; the row it stages for itself carries the token
//        index instead of the data. Then the warp releases the rows' headers with the tag.
//   receivers: wait for every source's announcement, derive the receive offsets (and the
//     expert layout's first rows) from the count slots, then copy rows in arrival order (a
//     warp serves one source and walks its rows, the warps of a source taking turns) into
//     recv_x: rank layout row p = recv_offset[s] + j; expert layout one row per distinct
//     local expert of the pair. Their own rows come straight from x. Rows past the received
//     ones are zero (-1 top-k ids).
// combine_kernel
//   holders: a warp per chunk of (up to) kRowsPerRelease pairs of one source builds each
//     pair's value (y[p], or the fp32 sum of its expert rows cast to y's dtype, or zero if
//     dropped) in the source's combine staging row, then releases the chunk's headers. In
//     the rank layout they skip their own tokens: the reducers read those rows of y directly.
//   reducers: a warp per token; lane r waits for the row from rank r; the warp sums bias +
//     rows in ascending r in fp32 and writes out[t].
// cached_dispatch_kernel: dispatch's send and receive with the handle's positions.
#include "cuda/common.cuh"

namespace jax_ep {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kTileWarps = kLayoutTileTokens / kWarpSize;
constexpr int kSendUnroll = 4;    // dispatch senders: 16-byte loads in flight per lane
constexpr int kHoldUnroll = 4;    // combine holders (rank layout), likewise
constexpr int kRecvUnroll = 8;    // receivers copying staging rows
constexpr int kReduceUnroll = 2;  // combine reducers
constexpr int kRowsPerRelease = 4;  // combine holder rows per system-scope release
constexpr int kSumRows = 4;       // expert-layout holders: rows summed per batch of loads
constexpr int kSumUnroll = 2;

// A block's role: the first num_first blocks of the grid take the first role (send, hold).
struct Role {
  bool first;
  int warp_id;    // among the warps of its role
  int num_warps;  // of its role
};
__device__ __forceinline__ Role role_of(int num_first) {
  Role r;
  r.first = static_cast<int>(blockIdx.x) < num_first;
  const int block = r.first ? blockIdx.x : blockIdx.x - num_first;
  r.warp_id = block * kWarps + threadIdx.x / kWarpSize;
  r.num_warps = (r.first ? num_first : gridDim.x - num_first) * kWarps;
  return r;
}

// recv_offset[s] = sum_{s' < s} num_tokens_matrix[s', me], recv_offset[R] = num_pairs.
__device__ __forceinline__ void load_recv_offset(const int* num_tokens_matrix, int num_ranks,
                                                 int me, int* recv_offset) {
  int offset = 0;
  for (int s = 0; s < num_ranks; ++s) {
    recv_offset[s] = offset;
    offset += num_tokens_matrix[s * num_ranks + me];
  }
  recv_offset[num_ranks] = offset;
}

// Pairs in arrival order: senders go through their tokens in order, so a warp serves one
// source rank and walks that source's rows in chunks of up to `max_chunk` rows, the warps of
// a source taking turns; every source's rows are consumed as they come in. A source with
// fewer rows than its warps can take in whole chunks gets smaller ones (down to one row), so
// that few tokens spread over every warp: there latency decides, not the cost of a chunk.
// Sources are 0 .. R-1 but `skip` (-1: none). Calls fn(s, j, n) for rows j .. j + n - 1 of
// source s (n <= max_chunk), whose pairs are p = recv_offset[s] + j ...; stops the warp when
// fn returns false.
template <typename Fn>
__device__ __forceinline__ void for_each_pair_chunk(const int* recv_offset, int num_ranks,
                                                    int skip, const Role& role, int max_chunk,
                                                    Fn fn) {
  const int num_sources = skip >= 0 ? num_ranks - 1 : num_ranks;
  if (num_sources == 0) return;
  const int warps_per_source = role.num_warps / num_sources;
  if (role.warp_id >= warps_per_source * num_sources) return;
  const int i = role.warp_id % num_sources;
  const int s = skip >= 0 && i >= skip ? i + 1 : i;
  const int count = recv_offset[s + 1] - recv_offset[s];
  const int chunk = max(1, min(max_chunk, (count + warps_per_source - 1) / warps_per_source));
  for (int j = role.warp_id / num_sources * chunk; j < count; j += warps_per_source * chunk) {
    if (!fn(s, j, min(chunk, count - j))) break;
  }
}

// The same, one pair at a time: fn(s, j, p).
template <typename Fn>
__device__ __forceinline__ void for_each_pair(const int* recv_offset, int num_ranks,
                                              const Role& role, Fn fn) {
  for_each_pair_chunk(recv_offset, num_ranks, -1, role, 1,
                      [&](int s, int j, int) { return fn(s, j, recv_offset[s] + j); });
}

// Threads 0 .. R-1 wait until every peer finished op n - 2; false (on every thread) if one
// did not in time.
__device__ __forceinline__ bool wait_peers_done(const GroupView& g, const OpContext& c) {
  __shared__ int s_ok;
  if (threadIdx.x == 0) s_ok = 1;
  __syncthreads();
  if (threadIdx.x < g.num_ranks && !wait_peer_done(g, c, threadIdx.x)) s_ok = 0;
  __syncthreads();
  return s_ok != 0;
}

// ---------------------------------------------------------------------------------------
// Dispatch: counting (senders)
// ---------------------------------------------------------------------------------------
// Tile `tile` of kLayoutTileTokens tokens, a thread per token (threads past the tile idle):
// send_pos[t, r] = t's position among the tile's tokens sent to rank r (-1: none);
// expert_rank[t, k] = t's position among the tile's tokens selecting expert topk_idx[t, k]
// (first slot of each distinct expert, else -1); tile_row = the tile's
// [tokens per rank (kMaxRanks slots) | tokens per expert].
// Shared memory: expert_mask [kTileWarps][num_experts].
__device__ void count_tile(const GroupView& g, const DispatchArgs& a, int tile,
                           unsigned* expert_mask, int* expert_rank, int* tile_row) {
  __shared__ int warp_rank_offset[kTileWarps][kMaxRanks];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int num_experts = a.num_experts, num_ranks = g.num_ranks, num_topk = a.num_topk;
  const int experts_per_rank = num_experts / num_ranks;
  const bool token_thread = threadIdx.x < kLayoutTileTokens;
  const int t = tile * kLayoutTileTokens + threadIdx.x;
  const bool valid = token_thread && t < a.num_tokens;
  const int* idx = a.topk_idx + at(t, num_topk, 0);
  for (int i = threadIdx.x; i < kTileWarps * num_experts; i += blockDim.x) expert_mask[i] = 0;
  __syncthreads();

  // Ranks of this token, and one mask bit per distinct expert; first_slots: bit k set when
  // slot k holds a valid expert that no earlier slot holds.
  unsigned rank_mask = 0, first_slots = 0;
  if (valid) {
    for (int k = 0; k < num_topk; ++k) {
      const int e = __ldg(idx + k);
      if (e < 0 || e >= num_experts) continue;
      bool first = true;
      for (int j = 0; j < k; ++j) first &= __ldg(idx + j) != e;
      if (!first) continue;
      first_slots |= 1u << k;
      rank_mask |= 1u << (e / experts_per_rank);
      atomicOr(&expert_mask[warp * num_experts + e], 1u << lane);
    }
  }
  int rank_in_warp[kMaxRanks];
  if (token_thread) {  // whole warps
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
      if (r < num_ranks) {
        const unsigned ballot = __ballot_sync(kFullMask, (rank_mask >> r) & 1u);
        rank_in_warp[r] = __popc(ballot & lanemask_lt());
        if (lane == 0) warp_rank_offset[warp][r] = __popc(ballot);
      }
    }
  }
  __syncthreads();

  // Position of each expert slot inside its warp (the warp offsets are added below).
  if (valid) {
    for (int k = 0; k < num_topk; ++k) {
      const int pos = (first_slots >> k) & 1u
                          ? __popc(expert_mask[warp * num_experts + __ldg(idx + k)] & lanemask_lt())
                          : -1;
      expert_rank[at(t, num_topk, k)] = pos;
    }
  }
  __syncthreads();

  // Warp counts -> offsets inside the tile (in place); the tile's totals go to tile_row.
  if (threadIdx.x < num_ranks) {
    int run = 0;
    for (int w = 0; w < kTileWarps; ++w) {
      const int n = warp_rank_offset[w][threadIdx.x];
      warp_rank_offset[w][threadIdx.x] = run;
      run += n;
    }
    tile_row[threadIdx.x] = run;
  }
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    int run = 0;
    for (int w = 0; w < kTileWarps; ++w) {
      const int n = __popc(expert_mask[w * num_experts + e]);
      expert_mask[w * num_experts + e] = static_cast<unsigned>(run);
      run += n;
    }
    tile_row[kMaxRanks + e] = run;
  }
  __syncthreads();

  if (valid) {
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
      if (r < num_ranks) {
        a.send_pos[at(t, num_ranks, r)] =
            (rank_mask >> r) & 1u ? warp_rank_offset[warp][r] + rank_in_warp[r] : -1;
      }
    }
    for (unsigned m = first_slots; m != 0; m &= m - 1) {
      const int k = __ffs(m) - 1;
      expert_rank[at(t, num_topk, k)] += static_cast<int>(expert_mask[warp * num_experts + __ldg(idx + k)]);
    }
  }
  __syncthreads();  // the next tile reuses the shared tables
}

// Run by the last sender block to finish counting, once every peer finished op n - 2: tile
// totals -> exclusive offsets over the tiles (in place; the senders add them), then
// ctl->counted releases the other senders, and only then (off their path) this rank's totals
// go into every peer's count slot, followed by the announcement. Returns false if a peer did
// not finish op n - 2 in time (counted is set all the same: the senders see the failure).
__device__ bool publish_counts(const GroupView& g, const DispatchArgs& a, const OpContext& c,
                               int num_tiles) {
  __shared__ int s_totals[kMaxRanks + kMaxExperts];  // [ranks | experts] of this rank
  const int num_cols = g.num_ranks + a.num_experts;
  auto col_of = [&](int i) { return i < g.num_ranks ? i : kMaxRanks + i - g.num_ranks; };
  const bool peers_ready = wait_peers_done(g, c);
  if (peers_ready) {
    const int stride = g.layout.count_stride;
    int* tile_counts = local_array<int>(g, g.layout.tile_counts);
    for (int i = threadIdx.x; i < num_cols; i += blockDim.x) {
      int run = 0;
      for (int tile = 0; tile < num_tiles; ++tile) {
        int* count = tile_counts + at(tile, stride, col_of(i));
        const int n = __ldcg(count);
        *count = run;
        run += n;
      }
      s_totals[i] = run;
    }
  }
  __threadfence();  // the offsets, before the signal that lets the other senders read them
  __syncthreads();
  if (threadIdx.x == 0) store_release_gpu(&control_of(g, g.rank)->counted, c.n);
  if (!peers_ready) return false;
  for (int i = threadIdx.x; i < num_cols; i += blockDim.x) {
    for (int peer = 0; peer < g.num_ranks; ++peer) {
      count_slot(g, peer, c.parity, g.rank)[col_of(i)] = s_totals[i];
    }
  }
  __threadfence_system();
  __syncthreads();
  announce_op(g, c);
  return true;
}

// ---------------------------------------------------------------------------------------
// Dispatch: sending
// ---------------------------------------------------------------------------------------
__device__ void dispatch_send(const GroupView& g, const DispatchArgs& a, const OpContext& c,
                              int num_senders, const Role& role, unsigned* expert_mask) {
  __shared__ int s_last, s_ok;
  Control* ctl = control_of(g, g.rank);
  const int num_ranks = g.num_ranks, me = g.rank, num_topk = a.num_topk;
  const int stride = g.layout.count_stride;
  const int lane = threadIdx.x % kWarpSize;
  int* tile_counts = local_array<int>(g, g.layout.tile_counts);
  int* expert_rank = local_array<int>(g, g.layout.expert_rank);
  const int num_tiles = (a.num_tokens + kLayoutTileTokens - 1) / kLayoutTileTokens;

  for (int tile = blockIdx.x; tile < num_tiles; tile += num_senders) {
    count_tile(g, a, tile, expert_mask, expert_rank, tile_counts + at(tile, stride, 0));
  }
  __threadfence();  // this block's counts before the count that tells the last block
  __syncthreads();
  if (threadIdx.x == 0) {
    s_last = atomicAdd(&ctl->senders_counted, 1u) == static_cast<unsigned>(num_senders - 1);
    s_ok = 1;
  }
  __syncthreads();
  if (s_last) {
    if (threadIdx.x == 0) ctl->senders_counted = 0;
    __threadfence();
    const bool published = publish_counts(g, a, c, num_tiles);
    if (threadIdx.x == 0) s_ok = published;
  } else if (threadIdx.x == 0) {
    const unsigned long long start = globaltimer_ns();
    while (load_acquire_gpu(&ctl->counted) < c.n) {
      if (aborted(g)) break;
      if (globaltimer_ns() - start > g.timeout_ns) {
        report_failure(g, c, kFailTimeout, me, 0);
        break;
      }
    }
    s_ok = !aborted(g);
  }
  __syncthreads();
  if (!s_ok) return;

  const int num_vecs = a.hidden_bytes / 16;
  for (int t = role.warp_id; t < a.num_tokens; t += role.num_warps) {
    // Positions count from the token's tile: add the tile's offsets (and store the final
    // send_pos, an output of the op).
    const int* tile_offset = tile_counts + at(t / kLayoutTileTokens, stride, 0);
    int pos = -1;
    if (lane < num_ranks) {
      pos = __ldcg(&a.send_pos[at(t, num_ranks, lane)]);
      if (pos >= 0) {
        pos += __ldcg(&tile_offset[lane]);
        a.send_pos[at(t, num_ranks, lane)] = pos;
      }
    }
    const unsigned dst_mask = __ballot_sync(kFullMask, pos >= 0);
    char* row = pos >= 0 ? dispatch_row(g, lane, c.parity, me, pos) : nullptr;

    int idx = -1, rank_in_expert = -1;
    float weight = 0.f;
    if (lane < num_topk) {
      idx = a.topk_idx[at(t, num_topk, lane)];
      weight = a.topk_weights[at(t, num_topk, lane)];
      if (a.expert_layout) {
        rank_in_expert = __ldcg(&expert_rank[at(t, num_topk, lane)]);
        if (rank_in_expert >= 0) rank_in_expert += __ldcg(&tile_offset[kMaxRanks + idx]);
      }
    }
    for (unsigned m = dst_mask; m != 0; m &= m - 1) {
      const int d = __ffs(m) - 1;
      char* dst = reinterpret_cast<char*>(
          __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(row), d));
      int* meta = reinterpret_cast<int*>(dst + kRowHeaderBytes);
      if (lane < num_topk) {
        meta[lane] = idx;
        meta[g.max_topk + lane] = __float_as_int(weight);
        meta[2 * g.max_topk + lane] = rank_in_expert;
      }
      if (d == me) {
        if (lane == 0) *row_token(dst) = t;
      } else {
        float* scales = reinterpret_cast<float*>(dst + g.layout.dispatch_scales);
        for (int i = lane; i < a.num_scales; i += kWarpSize) scales[i] = a.x_scales[at(t, a.num_scales, i)];
      }
    }
    const int4* src = reinterpret_cast<const int4*>(static_cast<const char*>(a.x) +
                                                    at(t, a.hidden_bytes, 0));
    warp_copy_row<kSendUnroll, true>(
        src, row == nullptr ? nullptr : reinterpret_cast<int4*>(row + g.layout.dispatch_data),
        dst_mask & ~(1u << me), num_vecs, lane);
    __syncwarp();
    if (row != nullptr) signal(row_flag(row), c.tag);
  }
}

// ---------------------------------------------------------------------------------------
// Dispatch: receiving
// ---------------------------------------------------------------------------------------
__device__ void dispatch_recv(const GroupView& g, const DispatchArgs& a, const OpContext& c,
                              const Role& role) {
  __shared__ int s_ok, s_num_rows, s_num_expert_rows;
  __shared__ int s_recv_offset[kMaxRanks + 1];
  __shared__ int s_expert_base[kMaxExperts];   // expert layout: [source][local expert] first row
  __shared__ int s_expert_count[kMaxExperts];  // rank layout: pairs per local expert (this block)
  const int num_ranks = g.num_ranks, me = g.rank, num_topk = a.num_topk;
  const int lane = threadIdx.x % kWarpSize;
  const int experts_per_rank = a.num_experts / num_ranks;
  const int first_expert = me * experts_per_rank;
  Control* ctl = control_of(g, me);
  if (threadIdx.x == 0) s_ok = 1;
  for (int e = threadIdx.x; e < experts_per_rank; e += blockDim.x) s_expert_count[e] = 0;
  __syncthreads();
  if (threadIdx.x < num_ranks &&
      !wait_tag(g, c, &ctl->announce[c.parity][threadIdx.x], threadIdx.x)) {
    s_ok = 0;
  }
  __syncthreads();
  if (!s_ok) return;

  // Source s's totals: count_slot(me, parity, s) = [tokens per rank | tokens per expert].
  auto count = [&](int s, int col) { return __ldcg(count_slot(g, me, c.parity, s) + col); };
  if (threadIdx.x == 0) {
    int offset = 0;
    for (int s = 0; s < num_ranks; ++s) {
      s_recv_offset[s] = offset;
      offset += count(s, me);
    }
    s_recv_offset[num_ranks] = offset;
  }
  if (a.expert_layout) {
    // Local expert e starts at expert_offset[e] (a scan over the experts' totals); inside it,
    // source s starts at expert_offset[e] + sum_{s' < s} (tokens of s' selecting e).
    for (int e = threadIdx.x; e < experts_per_rank; e += blockDim.x) {
      int total = 0;
      for (int s = 0; s < num_ranks; ++s) total += count(s, kMaxRanks + first_expert + e);
      s_expert_base[e] = total;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int run = 0;
      for (int e = 0; e < experts_per_rank; ++e) {
        const int total = s_expert_base[e];
        s_expert_base[e] = run;
        run += total;
      }
      s_num_expert_rows = run;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < experts_per_rank; e += blockDim.x) {
      const int expert_offset = s_expert_base[e];
      int row = expert_offset;
      for (int s = 0; s < num_ranks; ++s) {
        s_expert_count[s * experts_per_rank + e] = row;  // scratch: bases per source
        row += count(s, kMaxRanks + first_expert + e);
      }
      if (role.warp_id < kWarps) {  // the first receiver block writes the group sizes
        a.num_recv_tokens_per_expert[e] = max(0, min(a.capacity - expert_offset, row - expert_offset));
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < num_ranks * experts_per_rank; i += blockDim.x) {
      s_expert_base[i] = s_expert_count[i];
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int wanted = a.expert_layout ? s_num_expert_rows : s_recv_offset[num_ranks];
    s_num_rows = min(wanted, a.capacity);
    if (role.warp_id < kWarps) {
      *a.num_recv_tokens = s_num_rows;
      *a.num_dropped = wanted - s_num_rows;
    }
  }
  if (role.warp_id < kWarps) {
    for (int i = threadIdx.x; i < num_ranks * num_ranks; i += blockDim.x) {
      a.num_tokens_matrix[i] = count(i / num_ranks, i % num_ranks);
    }
  }
  if (!a.expert_layout) {
    for (int e = threadIdx.x; e < experts_per_rank; e += blockDim.x) s_expert_count[e] = 0;
  }
  __syncthreads();
  const int num_rows = s_num_rows;
  const int num_pairs = s_recv_offset[num_ranks];
  const int num_vecs = a.hidden_bytes / 16;

  for_each_pair(s_recv_offset, num_ranks, role, [&](int s, int j, int p) {
    if (!a.expert_layout && p >= a.capacity) return false;
    char* row = dispatch_row(g, me, c.parity, s, j);
    int ok = 1;
    if (lane == 0) ok = wait_tag(g, c, row_flag(row), s);
    if (!__shfl_sync(kFullMask, ok, 0)) return false;

    // Local expert of each slot (-1 if not local) and whether it is the first slot with it.
    const int* meta = reinterpret_cast<const int*>(row + kRowHeaderBytes);
    int e = -1, rank_in_expert = -1;
    float weight = 0.f;
    if (lane < num_topk) {
      const int idx = ld_staging(meta + lane);
      weight = __int_as_float(ld_staging(meta + g.max_topk + lane));
      rank_in_expert = ld_staging(meta + 2 * g.max_topk + lane);
      if (idx >= first_expert && idx < first_expert + experts_per_rank) e = idx - first_expert;
    }
    bool first = e >= 0;
    for (int k = 0; k < num_topk; ++k) {
      const int f = __shfl_sync(kFullMask, e, k);
      if (k < lane && f == e) first = false;
    }
    // A row this rank sent itself: the data and scales are x's row.
    const bool self = s == me;
    const int token = self ? ld_staging(row_token(row)) : 0;
    const float* src_scales = self ? a.x_scales + at(token, a.num_scales, 0)
                                   : reinterpret_cast<const float*>(row + g.layout.dispatch_scales);
    const int4* src = self ? reinterpret_cast<const int4*>(static_cast<const char*>(a.x) +
                                                           at(token, a.hidden_bytes, 0))
                           : reinterpret_cast<const int4*>(row + g.layout.dispatch_data);
    auto copy_row = [&](int4* lane_dst, unsigned dst_mask) {
      if (self) {
        warp_copy_row<kRecvUnroll, true>(src, lane_dst, dst_mask, num_vecs, lane);
      } else {
        warp_copy_row<kRecvUnroll, false>(src, lane_dst, dst_mask, num_vecs, lane);
      }
    };

    if (!a.expert_layout) {
      if (lane < num_topk) {
        a.recv_topk_idx[at(p, num_topk, lane)] = e;
        a.recv_topk_weights[at(p, num_topk, lane)] = e >= 0 ? weight : 0.f;
        if (first) atomicAdd(&s_expert_count[e], 1);
      }
      for (int i = lane; i < a.num_scales; i += kWarpSize) {
        a.recv_x_scales[at(p, a.num_scales, i)] = ld_staging(src_scales + i);
      }
      copy_row(reinterpret_cast<int4*>(static_cast<char*>(a.recv_x) + at(p, a.hidden_bytes, 0)), 1u);
    } else {
      int out_row = -1;
      if (first) {
        out_row = s_expert_base[s * experts_per_rank + e] + rank_in_expert;
        if (out_row >= a.capacity) out_row = -1;
      }
      if (lane < num_topk) a.pair_expert_rows[at(p, num_topk, lane)] = out_row;
      const unsigned dst_mask = __ballot_sync(kFullMask, out_row >= 0);
      for (unsigned m = dst_mask; m != 0; m &= m - 1) {
        const int d = __ffs(m) - 1;
        const int r = __shfl_sync(kFullMask, out_row, d);
        const int row_expert = __shfl_sync(kFullMask, e, d);
        if (lane < num_topk) {
          const bool same = e == row_expert;
          a.recv_topk_idx[at(r, num_topk, lane)] = same ? row_expert : -1;
          a.recv_topk_weights[at(r, num_topk, lane)] = same ? weight : 0.f;
        }
        for (int i = lane; i < a.num_scales; i += kWarpSize) {
          a.recv_x_scales[at(r, a.num_scales, i)] = ld_staging(src_scales + i);
        }
      }
      copy_row(reinterpret_cast<int4*>(static_cast<char*>(a.recv_x) +
                                       at(max(out_row, 0), a.hidden_bytes, 0)),
               dst_mask);
    }
    return true;
  });

  // Rows no pair wrote: zero data, scales and weights, -1 top-k ids.
  for (int r = num_rows + role.warp_id; r < a.capacity; r += role.num_warps) {
    warp_zero_row(reinterpret_cast<int4*>(static_cast<char*>(a.recv_x) + at(r, a.hidden_bytes, 0)),
                  num_vecs, lane);
    for (int i = lane; i < a.num_scales; i += kWarpSize) a.recv_x_scales[at(r, a.num_scales, i)] = 0.f;
    if (lane < num_topk) {
      a.recv_topk_idx[at(r, num_topk, lane)] = -1;
      a.recv_topk_weights[at(r, num_topk, lane)] = 0.f;
    }
  }
  if (a.expert_layout) {
    for (int p = num_pairs + role.warp_id; p < a.num_pair_rows; p += role.num_warps) {
      if (lane < num_topk) a.pair_expert_rows[at(p, num_topk, lane)] = -1;
    }
  } else {
    __syncthreads();
    int* expert_acc = local_array<int>(g, g.layout.expert_acc);
    for (int e = threadIdx.x; e < experts_per_rank; e += blockDim.x) {
      if (s_expert_count[e] != 0) atomicAdd(&expert_acc[e], s_expert_count[e]);
    }
  }
}

Poison dispatch_outputs(const DispatchArgs& a, int num_ranks) {
  const size_t capacity = a.capacity, topk = a.num_topk, tokens = a.num_tokens;
  Poison p{};
  auto add = [&](void* ptr, size_t bytes) {
    p.ptr[p.count] = ptr;
    p.bytes[p.count++] = bytes;
  };
  add(a.recv_x, capacity * a.hidden_bytes);
  add(a.recv_x_scales, capacity * a.num_scales * sizeof(float));
  add(a.recv_topk_idx, capacity * topk * sizeof(int));
  add(a.recv_topk_weights, capacity * topk * sizeof(float));
  add(a.num_recv_tokens, sizeof(int));
  add(a.num_recv_tokens_per_expert, static_cast<size_t>(a.num_experts / num_ranks) * sizeof(int));
  add(a.num_dropped, sizeof(int));
  add(a.send_pos, tokens * num_ranks * sizeof(int));
  add(a.num_tokens_matrix, static_cast<size_t>(num_ranks) * num_ranks * sizeof(int));
  add(a.pair_expert_rows, static_cast<size_t>(a.num_pair_rows) * topk * sizeof(int));
  return p;
}

// Dynamic shared memory: the senders' expert mask table [kTileWarps][num_experts].
__global__ void __launch_bounds__(kThreads, 1)
    dispatch_kernel(GroupView g, DispatchArgs a, int num_senders, Poison poison) {
  extern __shared__ unsigned expert_mask[];
  __shared__ int s_skip;
  const OpContext c = begin_op(g, kOpDispatch);
  if (threadIdx.x == 0) s_skip = must_skip(g, c, 0);
  __syncthreads();
  const Role role = role_of(num_senders);
  if (!s_skip) {
    if (role.first) {
      dispatch_send(g, a, c, num_senders, role, expert_mask);
    } else {
      dispatch_recv(g, a, c, role);
    }
  }
  finish_op(g, c, poison, [&] {
    if (a.expert_layout) return;
    // Rank layout: received pairs per local expert, accumulated by the receiver blocks.
    int* expert_acc = local_array<int>(g, g.layout.expert_acc);
    for (int e = threadIdx.x; e < a.num_experts / g.num_ranks; e += blockDim.x) {
      a.num_recv_tokens_per_expert[e] = __ldcg(&expert_acc[e]);
      expert_acc[e] = 0;
    }
  });
}

// The body of an op whose counts come from the handle (combine, cached dispatch): the first
// num_first blocks run first(c, role, recv_offset), the others second(...); then finish_op.
template <typename First, typename Second>
__device__ __forceinline__ void run_handle_op(const GroupView& g, int op,
                                              const int* num_tokens_matrix, int num_first,
                                              const Poison& poison, First first, Second second) {
  __shared__ int s_skip;
  __shared__ int s_recv_offset[kMaxRanks + 1];
  const OpContext c = begin_op(g, op);
  if (threadIdx.x == 0) {
    s_skip = must_skip(g, c, 0);
    load_recv_offset(num_tokens_matrix, g.num_ranks, g.rank, s_recv_offset);
  }
  __syncthreads();
  const Role role = role_of(num_first);
  if (!s_skip) {
    if (role.first) {
      first(c, role, s_recv_offset);
    } else {
      second(c, role, s_recv_offset);
    }
  }
  finish_op(g, c, poison, [] {});
}

// ---------------------------------------------------------------------------------------
// Combine
// ---------------------------------------------------------------------------------------
// dst = cast(sum over the rows in src_mask, in lane (= slot) order, of y[row]) in fp32;
// zero when src_mask is empty. Lane i holds row index src_row of slot i. The loads of up to
// kSumRows rows are in flight together.
template <typename T>
__device__ __forceinline__ void warp_sum_rows(const int4* y, int src_row, unsigned src_mask,
                                              int4* dst, int num_vecs, int lane) {
  using V = VecTraits<T>;
  for (int base = 0; base < num_vecs; base += kWarpSize * kSumUnroll) {
    float acc[kSumUnroll][V::kElems] = {};
    for (unsigned m = src_mask; m != 0;) {
      int4 v[kSumRows][kSumUnroll];
      unsigned group = 0;
#pragma unroll
      for (int r = 0; r < kSumRows; ++r) {
        if (m == 0) break;
        const int4* src = y + static_cast<size_t>(__shfl_sync(kFullMask, src_row, __ffs(m) - 1)) * num_vecs;
        m &= m - 1;
        group |= 1u << r;
#pragma unroll
        for (int u = 0; u < kSumUnroll; ++u) {
          const int i = base + u * kWarpSize + lane;
          if (i < num_vecs) v[r][u] = ld_nc(src + i);
        }
      }
#pragma unroll
      for (int r = 0; r < kSumRows; ++r) {
        if ((group >> r) & 1u) {
#pragma unroll
          for (int u = 0; u < kSumUnroll; ++u) {
            if (base + u * kWarpSize + lane < num_vecs) V::add(acc[u], v[r][u]);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kSumUnroll; ++u) {
      const int i = base + u * kWarpSize + lane;
      if (i < num_vecs) dst[i] = V::pack(acc[u]);
    }
  }
}

template <typename T>
__device__ void combine_hold(const GroupView& g, const CombineArgs& a, const OpContext& c,
                             const Role& role, const int* recv_offset) {
  if (!wait_peers_done(g, c)) return;
  if (blockIdx.x == 0) announce_op(g, c);
  const int me = g.rank, lane = threadIdx.x % kWarpSize;
  const int num_vecs = a.hidden * static_cast<int>(sizeof(T)) / 16;
  const int4* y = static_cast<const int4*>(a.y);
  // Rank layout: the reducers read this rank's own rows of y directly.
  const int skip = a.expert_layout ? -1 : me;
  for_each_pair_chunk(recv_offset, g.num_ranks, skip, role, kRowsPerRelease,
                      [&](int s, int j0, int n) {
    for (int j = j0; j < j0 + n; ++j) {
      const int p = recv_offset[s] + j;
      int4* dst = reinterpret_cast<int4*>(combine_row(g, s, c.parity, me, j) + g.layout.combine_data);
      if (!a.expert_layout) {
        if (p < a.capacity) {
          warp_copy_row<kHoldUnroll, true>(y + at(p, num_vecs, 0), dst, 1u, num_vecs, lane);
        } else {
          warp_zero_row(dst, num_vecs, lane);
        }
      } else {
        int src_row = lane < a.num_topk ? a.pair_expert_rows[at(p, a.num_topk, lane)] : -1;
        if (src_row >= a.capacity) src_row = -1;  // y has fewer rows than the handle's dispatch
        warp_sum_rows<T>(y, src_row, __ballot_sync(kFullMask, src_row >= 0), dst, num_vecs, lane);
      }
    }
    __syncwarp();
    if (lane < n) signal(row_flag(combine_row(g, s, c.parity, me, j0 + lane)), c.tag);
    return true;
  });
}

template <typename T>
__device__ void combine_reduce(const GroupView& g, const CombineArgs& a, const OpContext& c,
                               const Role& role, const int* recv_offset) {
  const int num_ranks = g.num_ranks, me = g.rank, lane = threadIdx.x % kWarpSize;
  const int num_vecs = a.hidden * static_cast<int>(sizeof(T)) / 16;
  const int4* y = static_cast<const int4*>(a.y);
  for (int t = role.warp_id; t < a.num_tokens; t += role.num_warps) {
    const int pos = lane < num_ranks ? a.send_pos[at(t, num_ranks, lane)] : -1;
    const int4* src = nullptr;
    bool has_row = pos >= 0;
    int ok = 1;
    if (has_row && lane == me && !a.expert_layout) {
      const int p = recv_offset[me] + pos;  // this rank's own row of y (none if dropped)
      has_row = p < a.capacity;
      if (has_row) src = y + at(p, num_vecs, 0);
    } else if (has_row) {
      char* row = combine_row(g, me, c.parity, lane, pos);
      ok = wait_tag(g, c, row_flag(row), lane);
      src = reinterpret_cast<const int4*>(row + g.layout.combine_data);
    }
    if (!__all_sync(kFullMask, ok)) break;
    const int4* bias = a.bias == nullptr ? nullptr
                                         : static_cast<const int4*>(a.bias) + at(t, num_vecs, 0);
    warp_reduce_rows<T, kReduceUnroll>(src, __ballot_sync(kFullMask, has_row), bias,
                        static_cast<int4*>(a.out) + at(t, num_vecs, 0), num_vecs, lane);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    combine_kernel(GroupView g, CombineArgs a, int num_holders, Poison poison) {
  run_handle_op(g, kOpCombine, a.num_tokens_matrix, num_holders, poison,
                [&](const OpContext& c, const Role& role, const int* recv_offset) {
                  combine_hold<T>(g, a, c, role, recv_offset);
                },
                [&](const OpContext& c, const Role& role, const int* recv_offset) {
                  combine_reduce<T>(g, a, c, role, recv_offset);
                });
}

// ---------------------------------------------------------------------------------------
// Cached dispatch
// ---------------------------------------------------------------------------------------
__device__ void cached_dispatch_send(const GroupView& g, const CachedDispatchArgs& a,
                                     const OpContext& c, const Role& role) {
  if (!wait_peers_done(g, c)) return;
  if (blockIdx.x == 0) announce_op(g, c);
  const int num_ranks = g.num_ranks, me = g.rank, lane = threadIdx.x % kWarpSize;
  const int num_vecs = a.hidden_bytes / 16;
  for (int t = role.warp_id; t < a.num_tokens; t += role.num_warps) {
    const int pos = lane < num_ranks ? a.send_pos[at(t, num_ranks, lane)] : -1;
    char* row = pos >= 0 ? dispatch_row(g, lane, c.parity, me, pos) : nullptr;
    if (lane == me && row != nullptr) *row_token(row) = t;
    const int4* src = reinterpret_cast<const int4*>(static_cast<const char*>(a.g) +
                                                    at(t, a.hidden_bytes, 0));
    const unsigned dst_mask = __ballot_sync(kFullMask, pos >= 0) & ~(1u << me);
    warp_copy_row<kSendUnroll, true>(
        src, row == nullptr ? nullptr : reinterpret_cast<int4*>(row + g.layout.dispatch_data),
        dst_mask, num_vecs, lane);
    __syncwarp();
    if (row != nullptr) signal(row_flag(row), c.tag);
  }
}

__device__ void cached_dispatch_recv(const GroupView& g, const CachedDispatchArgs& a,
                                     const OpContext& c, const Role& role,
                                     const int* recv_offset) {
  __shared__ int s_num_rows;
  const int me = g.rank, num_topk = a.num_topk, lane = threadIdx.x % kWarpSize;
  const int num_vecs = a.hidden_bytes / 16;
  const int num_pairs = recv_offset[g.num_ranks];
  // Expert layout: the valid rows are 0 .. (valid entries of pair_expert_rows) - 1.
  if (threadIdx.x == 0) s_num_rows = a.expert_layout ? 0 : min(num_pairs, a.capacity);
  __syncthreads();
  if (a.expert_layout) {
    int n = 0;
    const size_t entries = static_cast<size_t>(a.num_pair_rows) * num_topk;
    for (size_t i = threadIdx.x; i < entries; i += blockDim.x) n += a.pair_expert_rows[i] >= 0;
    if (n != 0) atomicAdd(&s_num_rows, n);
    __syncthreads();
  }
  const int num_rows = s_num_rows;

  for_each_pair(recv_offset, g.num_ranks, role, [&](int s, int j, int p) {
    if (!a.expert_layout && p >= a.capacity) return false;
    // Rank layout: row p (held by lane 0); expert layout: the rows of the pair's slots.
    int out_row = lane == 0 ? p : -1;
    if (a.expert_layout) out_row = lane < num_topk ? a.pair_expert_rows[at(p, num_topk, lane)] : -1;
    if (out_row >= a.capacity) out_row = -1;
    const unsigned dst_mask = __ballot_sync(kFullMask, out_row >= 0);
    if (dst_mask == 0) return true;
    char* row = dispatch_row(g, me, c.parity, s, j);
    int ok = 1;
    if (lane == 0) ok = wait_tag(g, c, row_flag(row), s);
    if (!__shfl_sync(kFullMask, ok, 0)) return false;
    int4* dst = reinterpret_cast<int4*>(static_cast<char*>(a.recv) + at(max(out_row, 0), a.hidden_bytes, 0));
    if (s == me) {  // this rank's own row: straight from g
      const int token = ld_staging(row_token(row));
      warp_copy_row<kRecvUnroll, true>(reinterpret_cast<const int4*>(static_cast<const char*>(a.g) +
                                                                     at(token, a.hidden_bytes, 0)),
                                       dst, dst_mask, num_vecs, lane);
    } else {
      warp_copy_row<kRecvUnroll, false>(reinterpret_cast<const int4*>(row + g.layout.dispatch_data),
                                        dst, dst_mask, num_vecs, lane);
    }
    return true;
  });
  for (int r = num_rows + role.warp_id; r < a.capacity; r += role.num_warps) {
    warp_zero_row(reinterpret_cast<int4*>(static_cast<char*>(a.recv) + at(r, a.hidden_bytes, 0)),
                  num_vecs, lane);
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    cached_dispatch_kernel(GroupView g, CachedDispatchArgs a, int num_senders, Poison poison) {
  run_handle_op(g, kOpCachedDispatch, a.num_tokens_matrix, num_senders, poison,
                [&](const OpContext& c, const Role& role, const int*) {
                  cached_dispatch_send(g, a, c, role);
                },
                [&](const OpContext& c, const Role& role, const int* recv_offset) {
                  cached_dispatch_recv(g, a, c, role, recv_offset);
                });
}

size_t align_up(size_t value, size_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

Poison one_output(void* ptr, size_t bytes) {
  Poison p{};
  p.ptr[0] = ptr;
  p.bytes[0] = bytes;
  p.count = 1;
  return p;
}

}  // namespace

RegionLayout make_region_layout(int num_ranks, int max_tokens, int hidden, int max_topk,
                                int num_experts) {
  constexpr size_t kAlign = 256;
  RegionLayout l{};
  l.count_stride = kMaxRanks + num_experts;
  size_t offset = align_up(sizeof(Control), kAlign);
  l.counts = offset;
  offset = align_up(offset + 2 * kMaxRanks * static_cast<size_t>(l.count_stride) * sizeof(int), kAlign);
  l.expert_rank = offset;
  offset = align_up(offset + static_cast<size_t>(max_tokens) * max_topk * sizeof(int), kAlign);
  l.tile_counts = offset;
  const size_t num_tiles = (static_cast<size_t>(max_tokens) + kLayoutTileTokens - 1) / kLayoutTileTokens;
  offset = align_up(offset + num_tiles * l.count_stride * sizeof(int), kAlign);
  l.expert_acc = offset;
  offset = align_up(offset + kMaxExperts * sizeof(int), kAlign);

  // Staging: [parity][source or holder rank][max_tokens] rows.
  const size_t rows = 2 * static_cast<size_t>(num_ranks) * max_tokens;
  l.dispatch_scales = kRowHeaderBytes + align_up(3 * static_cast<size_t>(max_topk) * sizeof(int), 16);
  l.dispatch_data = align_up(l.dispatch_scales + (static_cast<size_t>(hidden) + 127) / 128 * sizeof(float),
                             kRowDataAlign);
  l.dispatch_row_bytes = l.dispatch_data + align_up(static_cast<size_t>(hidden) * sizeof(float), kRowDataAlign);
  l.dispatch = offset;
  offset = align_up(offset + rows * l.dispatch_row_bytes, kAlign);

  l.combine_data = kRowDataAlign;
  l.combine_row_bytes = l.combine_data + align_up(static_cast<size_t>(hidden) * sizeof(float), kRowDataAlign);
  l.combine = offset;
  offset = align_up(offset + rows * l.combine_row_bytes, kAlign);

  l.weights = offset;
  offset = align_up(offset + 2 * static_cast<size_t>(kMaxRanks) * max_tokens * max_topk *
                                 sizeof(unsigned long long),
                    kAlign);
  l.expert_counts = offset;
  offset = align_up(offset + 2 * static_cast<size_t>(kMaxRanks) * num_experts * sizeof(unsigned long long),
                    kAlign);
  l.total = offset;
  return l;
}

cudaError_t launch_dispatch(const GroupView& g, const DispatchArgs& a, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(kTileWarps) * a.num_experts * sizeof(unsigned);
  dispatch_kernel<<<2 * a.num_channels, kThreads, smem, stream>>>(
      g, a, a.num_channels, dispatch_outputs(a, g.num_ranks));
  return cudaGetLastError();
}

cudaError_t launch_combine(const GroupView& g, const CombineArgs& a, cudaStream_t stream) {
  const size_t out_bytes = static_cast<size_t>(a.num_tokens) * a.hidden * (a.is_bf16 ? 2 : 4);
  const Poison poison = one_output(a.out, out_bytes);
  if (a.is_bf16) {
    combine_kernel<__nv_bfloat16><<<2 * a.num_channels, kThreads, 0, stream>>>(g, a, a.num_channels, poison);
  } else {
    combine_kernel<float><<<2 * a.num_channels, kThreads, 0, stream>>>(g, a, a.num_channels, poison);
  }
  return cudaGetLastError();
}

cudaError_t launch_cached_dispatch(const GroupView& g, const CachedDispatchArgs& a,
                                   cudaStream_t stream) {
  const Poison poison = one_output(a.recv, static_cast<size_t>(a.capacity) * a.hidden_bytes);
  cached_dispatch_kernel<<<2 * a.num_channels, kThreads, 0, stream>>>(g, a, a.num_channels, poison);
  return cudaGetLastError();
}

}  // namespace jax_ep
