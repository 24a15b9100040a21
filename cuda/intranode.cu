// Intranode dispatch, combine and cached dispatch between the GPUs of one process, through
// peer pointers (every device maps every other device's region).
//
// Every operation starts with a group barrier that bumps this device's epoch; nothing is
// written into a peer's region before that peer has finished its previous operation (its
// kernels run in stream order, and it signals the barrier only from the next operation).
// Staging rows carry the epoch that wrote them in a 16-byte header, stored with release
// semantics after the row, so a receiver copies a row as soon as it arrives, and stale rows
// of an earlier operation are never mistaken for new ones.
//
// dispatch_notify_kernel (1 block, 1024 threads): turns the layout kernel's per-tile counts
//   into per-tile offsets, writes this rank's num_tokens_per_rank and num_tokens_per_expert
//   into every peer's count slot (double-buffered by epoch parity), runs the barrier
//   (thread p <-> rank p), then builds num_tokens_matrix, recv_offset, the per-(source,
//   local expert) first rows of the expert layout (one thread per local expert plus a block
//   scan), and the scalar outputs.
// barrier_kernel (1 block, 1024 threads): the barrier alone (combine, cached dispatch);
//   cached dispatch in expert layout also counts the rows it will write.
// dispatch_kernel, cached_dispatch_kernel (num_sms blocks of 16 warps; JAX_EP_SEND_PERCENT
// of them send, default half):
//   senders: a warp per chunk of kTokensPerRelease consecutive source tokens (grid-strided);
//   lanes < R hold a token's send_pos; the warp loads the row once with 16-byte
//   non-coherent loads (several in flight per lane) and stores it into the staging row
//   [me][send_pos[t, r]] of every destination r over NVLink, with top-k slots and FP8
//   scales; after the chunk, lane r releases the row headers of destination r.
//   receivers: a warp per received pair; warp w serves source rank w % R and walks its rows
//   in order, so rows are consumed in the order senders produce them (for_each_pair); lane
//   0 waits for the row header, then the warp copies the row into the rank-layout row p or
//   into every expert-layout row of the pair, rebasing the top-k slots; afterwards the
//   warps fill rows past num_recv_tokens (zero, -1) and pair_expert_rows past num_pairs.
// combine_kernel (num_sms blocks of 16 warps; JAX_EP_HOLD_PERCENT of them hold, default half):
//   holders: a warp per chunk of kRowsPerRelease pairs of one source (for_each_pair_chunk)
//   builds each pair's value (y[p], or the fp32 sum of its expert rows cast to y's dtype, or
//   zero if dropped) and writes it into the source rank's combine staging row
//   [me][p - recv_offset[s]], then releases the chunk's headers.
//   reducers: a warp per source token; lane r waits for the row from rank r; the warp sums
//   bias + rows in ascending r in fp32 and writes out[t].
#include <algorithm>

#include "cuda/common.cuh"

namespace jax_ep {
namespace {

// Tuning knobs (compile-time; scripts/gpu_suite.sh can sweep them with -D flags).
#ifndef JAX_EP_THREADS
#define JAX_EP_THREADS 512
#endif
#ifndef JAX_EP_SEND_UNROLL
#define JAX_EP_SEND_UNROLL 4
#endif
#ifndef JAX_EP_HOLD_UNROLL
#define JAX_EP_HOLD_UNROLL 4
#endif
#ifndef JAX_EP_RECV_UNROLL
#define JAX_EP_RECV_UNROLL 8
#endif
// Tokens a dispatch sender warp stores before it releases their rows, and rows a combine
// holder warp stores before it releases them: one system-scope fence per group.
#ifndef JAX_EP_TOKENS_PER_RELEASE
#define JAX_EP_TOKENS_PER_RELEASE 1
#endif
#ifndef JAX_EP_ROWS_PER_RELEASE
#define JAX_EP_ROWS_PER_RELEASE 4
#endif
// Percent of a kernel's num_sms blocks in its first role (dispatch senders, combine holders).
#ifndef JAX_EP_SEND_PERCENT
#define JAX_EP_SEND_PERCENT 50
#endif
#ifndef JAX_EP_HOLD_PERCENT
#define JAX_EP_HOLD_PERCENT 50
#endif
#ifndef JAX_EP_REDUCE_UNROLL
#define JAX_EP_REDUCE_UNROLL 2
#endif
constexpr int kThreads = JAX_EP_THREADS;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kNotifyThreads = 1024;
constexpr int kSendUnroll = JAX_EP_SEND_UNROLL;  // dispatch senders: 16-byte loads in flight per lane
constexpr int kHoldUnroll = JAX_EP_HOLD_UNROLL;  // combine holders (rank layout), likewise
constexpr int kTokensPerRelease = JAX_EP_TOKENS_PER_RELEASE;
constexpr int kRowsPerRelease = JAX_EP_ROWS_PER_RELEASE;
constexpr int kRecvUnroll = JAX_EP_RECV_UNROLL;
constexpr int kReduceUnroll = JAX_EP_REDUCE_UNROLL;
constexpr int kSumRows = 4;
constexpr int kSumUnroll = 2;

// Exclusive prefix sum over the kNotifyThreads threads of a block; *total gets the sum.
__device__ int block_exclusive_scan(int value, int* s_warp, int* total) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  constexpr int kNumWarps = kNotifyThreads / kWarpSize;
  int inclusive = value;
#pragma unroll
  for (int d = 1; d < kWarpSize; d <<= 1) {
    const int n = __shfl_up_sync(kFullMask, inclusive, d);
    if (lane >= d) inclusive += n;
  }
  if (lane == kWarpSize - 1) s_warp[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int w = lane < kNumWarps ? s_warp[lane] : 0;
    int w_inclusive = w;
#pragma unroll
    for (int d = 1; d < kWarpSize; d <<= 1) {
      const int n = __shfl_up_sync(kFullMask, w_inclusive, d);
      if (lane >= d) w_inclusive += n;
    }
    s_warp[lane] = w_inclusive - w;
    if (lane == kWarpSize - 1) s_warp[kWarpSize] = w_inclusive;
  }
  __syncthreads();
  const int result = s_warp[warp] + inclusive - value;
  *total = s_warp[kWarpSize];
  __syncthreads();
  return result;
}

// Pairs in arrival order: senders go through their tokens in order, so a warp serves one
// source rank (warp_id % R) and walks that source's rows in chunks of `chunk` rows, the
// warps of a source taking turns; every source's rows are consumed as they come in. Calls
// fn(s, j, n) for the chunk of rows j .. j + n - 1 of source s (n <= chunk), whose pairs are
// p = recv_offset[s] + j ...; stops the warp when fn returns false.
template <typename Fn>
__device__ __forceinline__ void for_each_pair_chunk(const int* recv_offset, int num_ranks,
                                                    int warp_id, int num_warps, int chunk, Fn fn) {
  const int warps_per_source = num_warps / num_ranks;
  if (warp_id >= warps_per_source * num_ranks) return;
  const int s = warp_id % num_ranks;
  const int count = recv_offset[s + 1] - recv_offset[s];
  for (int j = warp_id / num_ranks * chunk; j < count; j += warps_per_source * chunk) {
    if (!fn(s, j, min(chunk, count - j))) break;
  }
}

// The same, one pair at a time: fn(s, j, p).
template <typename Fn>
__device__ __forceinline__ void for_each_pair(const int* recv_offset, int num_ranks, int warp_id,
                                              int num_warps, Fn fn) {
  for_each_pair_chunk(recv_offset, num_ranks, warp_id, num_warps, 1,
                      [&](int s, int j, int) { return fn(s, j, recv_offset[s] + j); });
}

// Sender loop of dispatch and cached dispatch: warp warp_id takes chunks of
// kTokensPerRelease consecutive tokens (grid-strided). send(t) stores token t's rows and
// returns this lane's destination row (lane r: the row on rank r, nullptr if none); after a
// chunk, the rows' headers are released with the epoch (one system-scope fence per chunk).
template <typename SendFn>
__device__ __forceinline__ void for_each_token_chunk(int num_tokens, int warp_id, int num_warps,
                                                     unsigned long long epoch, SendFn send) {
  for (int t0 = warp_id * kTokensPerRelease; t0 < num_tokens;
       t0 += num_warps * kTokensPerRelease) {
    char* rows[kTokensPerRelease];
#pragma unroll
    for (int i = 0; i < kTokensPerRelease; ++i) rows[i] = t0 + i < num_tokens ? send(t0 + i) : nullptr;
    __syncwarp();
#pragma unroll
    for (int i = 0; i < kTokensPerRelease; ++i) {
      if (rows[i] != nullptr) st_release_sys(row_flag(rows[i]), epoch);
    }
  }
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

// ---------------------------------------------------------------------------------------
// Barriers
// ---------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kNotifyThreads)
    dispatch_notify_kernel(GroupView g, int num_tokens, int num_experts, int capacity,
                           bool expert_layout, int* num_tokens_matrix, int* num_recv_tokens,
                           int* num_recv_tokens_per_expert, int* num_dropped) {
  __shared__ int s_warp[kWarpSize + 1];
  const int num_ranks = g.num_ranks, me = g.rank;
  const int experts_per_rank = num_experts / num_ranks;
  Control* ctl = control_of(g, me);
  Scratch* sc = scratch_of(g);
  const unsigned long long epoch = ld_volatile(&ctl->epoch) + 1;
  const int stride = g.layout.count_stride;
  const int slot = static_cast<int>(epoch & 1);

  // The layout kernel's tile totals become exclusive offsets over the tiles (in place; the
  // senders add them), and this rank's totals [tokens per rank | tokens per expert] go to
  // the count slot of every peer. A thread per column; loads of kBatch tiles in flight.
  constexpr int kBatch = 8;
  const int num_tiles = (num_tokens + kLayoutTileTokens - 1) / kLayoutTileTokens;
  int* tile_counts = reinterpret_cast<int*>(g.base[me] + g.layout.tile_counts);
  for (int c = threadIdx.x; c < num_ranks + num_experts; c += blockDim.x) {
    const int col = c < num_ranks ? c : kMaxRanks + c - num_ranks;
    int run = 0;
    for (int base = 0; base < num_tiles; base += kBatch) {
      int n[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        n[u] = base + u < num_tiles ? tile_counts[(base + u) * stride + col] : 0;
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (base + u < num_tiles) tile_counts[(base + u) * stride + col] = run;
        run += n[u];
      }
    }
    for (int peer = 0; peer < num_ranks; ++peer) {
      reinterpret_cast<int*>(g.base[peer] + g.layout.counts)[(slot * kMaxRanks + me) * stride + col] = run;
    }
  }
  const bool ok = peer_barrier(g, epoch, kOpDispatch);
  if (threadIdx.x == 0) ctl->epoch = epoch;
  if (!ok) return;

  const int* counts = reinterpret_cast<const int*>(g.base[me] + g.layout.counts) + slot * kMaxRanks * stride;
  for (int i = threadIdx.x; i < num_ranks * num_ranks; i += blockDim.x) {
    num_tokens_matrix[i] = ld_staging(counts + (i / num_ranks) * stride + i % num_ranks);
  }
  if (threadIdx.x == 0) {
    int offset = 0;
    for (int s = 0; s < num_ranks; ++s) {
      sc->recv_offset[s] = offset;
      offset += ld_staging(counts + s * stride + me);
    }
    sc->recv_offset[num_ranks] = offset;
  }

  // Expert layout: local expert e starts at expert_offset[e]; inside it, source s starts at
  // expert_offset[e] + sum_{s' < s} (tokens of s' selecting e).
  const int e = threadIdx.x;
  const int* expert_counts = counts + kMaxRanks + me * experts_per_rank + e;
  int total = 0;
  if (e < experts_per_rank) {
    for (int s = 0; s < num_ranks; ++s) total += ld_staging(expert_counts + s * stride);
  }
  int num_expert_rows;
  const int expert_offset = block_exclusive_scan(total, s_warp, &num_expert_rows);
  if (e < experts_per_rank) {
    int row = expert_offset;
    for (int s = 0; s < num_ranks; ++s) {
      sc->recv_expert_base[s * experts_per_rank + e] = row;
      row += ld_staging(expert_counts + s * stride);
    }
    num_recv_tokens_per_expert[e] =
        expert_layout ? max(0, min(capacity - expert_offset, total)) : 0;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int wanted = expert_layout ? num_expert_rows : sc->recv_offset[num_ranks];
    const int rows = min(wanted, capacity);
    sc->num_rows = rows;
    *num_recv_tokens = rows;
    *num_dropped = wanted - rows;
  }
}

__global__ void __launch_bounds__(kNotifyThreads)
    barrier_kernel(GroupView g, int op, const int* pair_expert_rows, int num_entries) {
  __shared__ int s_warp[kWarpSize + 1];
  Control* ctl = control_of(g, g.rank);
  const unsigned long long epoch = ld_volatile(&ctl->epoch) + 1;
  const bool ok = peer_barrier(g, epoch, op);
  if (threadIdx.x == 0) ctl->epoch = epoch;
  if (!ok || pair_expert_rows == nullptr) return;
  int count = 0;
  for (int i = threadIdx.x; i < num_entries; i += blockDim.x) count += pair_expert_rows[i] >= 0;
  int rows;
  block_exclusive_scan(count, s_warp, &rows);
  if (threadIdx.x == 0) scratch_of(g)->num_rows = rows;
}

// ---------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------
__device__ void dispatch_send(const GroupView& g, const DispatchArgs& a, const int* expert_rank,
                              unsigned long long epoch, int warp_id, int num_warps, int lane) {
  const int num_ranks = g.num_ranks, me = g.rank, num_topk = a.num_topk;
  const int num_vecs = a.hidden_bytes / 16;
  const int* tile_offsets = reinterpret_cast<const int*>(g.base[me] + g.layout.tile_counts);
  for_each_token_chunk(a.num_tokens, warp_id, num_warps, epoch, [&](int t) -> char* {
    // The layout kernel's positions count from the token's tile: add the tile's offsets
    // (and store the final send_pos, an output of the op).
    const int* tile_offset = tile_offsets + (t / kLayoutTileTokens) * g.layout.count_stride;
    int pos = -1;
    if (lane < num_ranks) {
      pos = a.send_pos[t * num_ranks + lane];
      if (pos >= 0) {
        pos += tile_offset[lane];
        a.send_pos[t * num_ranks + lane] = pos;
      }
    }
    const unsigned dst_mask = __ballot_sync(kFullMask, pos >= 0);
    char* row = pos >= 0 ? dispatch_row(g, lane, me, pos) : nullptr;

    int idx = -1, rank_in_expert = -1;
    float weight = 0.f;
    if (lane < num_topk) {
      idx = a.topk_idx[t * num_topk + lane];
      weight = a.topk_weights[t * num_topk + lane];
      if (expert_rank != nullptr) {
        rank_in_expert = expert_rank[t * num_topk + lane];
        if (rank_in_expert >= 0) rank_in_expert += tile_offset[kMaxRanks + idx];
      }
    }
    for (unsigned m = dst_mask; m != 0; m &= m - 1) {
      char* dst = reinterpret_cast<char*>(
          __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(row), __ffs(m) - 1));
      int* meta = reinterpret_cast<int*>(dst + kRowHeaderBytes);
      if (lane < num_topk) {
        meta[lane] = idx;
        meta[g.max_topk + lane] = __float_as_int(weight);
        meta[2 * g.max_topk + lane] = rank_in_expert;
      }
      float* scales = reinterpret_cast<float*>(dst + g.layout.dispatch_scales);
      for (int i = lane; i < a.num_scales; i += kWarpSize) {
        scales[i] = a.x_scales[static_cast<size_t>(t) * a.num_scales + i];
      }
    }
    const int4* src = reinterpret_cast<const int4*>(static_cast<const char*>(a.x) +
                                                    static_cast<size_t>(t) * a.hidden_bytes);
    warp_copy_row<kSendUnroll, true>(src, reinterpret_cast<int4*>(row + g.layout.dispatch_data),
                                     dst_mask, num_vecs, lane);
    return row;
  });
}

__device__ void dispatch_recv(const GroupView& g, const DispatchArgs& a, unsigned long long epoch,
                              int warp_id, int num_warps, int lane, const int* recv_offset,
                              int* s_expert_count) {
  const int num_ranks = g.num_ranks, me = g.rank, num_topk = a.num_topk;
  const int experts_per_rank = a.num_experts / num_ranks;
  const int first_expert = me * experts_per_rank;
  const int num_vecs = a.hidden_bytes / 16;
  const Scratch* sc = scratch_of(g);
  const int num_pairs = recv_offset[num_ranks];
  const int num_rows = sc->num_rows;

  for_each_pair(recv_offset, num_ranks, warp_id, num_warps, [&](int s, int j, int p) {
    if (!a.expert_layout && p >= a.capacity) return false;
    char* row = dispatch_row(g, me, s, j);
    int ok = 1;
    if (lane == 0) ok = wait_flag(g, row_flag(row), epoch, kOpDispatch, s);
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
    const float* src_scales = reinterpret_cast<const float*>(row + g.layout.dispatch_scales);
    const int4* src = reinterpret_cast<const int4*>(row + g.layout.dispatch_data);

    if (!a.expert_layout) {
      if (lane < num_topk) {
        a.recv_topk_idx[p * num_topk + lane] = e;
        a.recv_topk_weights[p * num_topk + lane] = e >= 0 ? weight : 0.f;
        if (first) atomicAdd(&s_expert_count[e], 1);
      }
      for (int i = lane; i < a.num_scales; i += kWarpSize) {
        a.recv_x_scales[static_cast<size_t>(p) * a.num_scales + i] = ld_staging(src_scales + i);
      }
      int4* dst = reinterpret_cast<int4*>(static_cast<char*>(a.recv_x) +
                                          static_cast<size_t>(p) * a.hidden_bytes);
      warp_copy_row<kRecvUnroll, false>(src, dst, 1u, num_vecs, lane);
    } else {
      int out_row = -1;
      if (first) {
        out_row = sc->recv_expert_base[s * experts_per_rank + e] + rank_in_expert;
        if (out_row >= a.capacity) out_row = -1;
      }
      if (lane < num_topk) a.pair_expert_rows[p * num_topk + lane] = out_row;
      const unsigned dst_mask = __ballot_sync(kFullMask, out_row >= 0);
      for (unsigned m = dst_mask; m != 0; m &= m - 1) {
        const int d = __ffs(m) - 1;
        const int r = __shfl_sync(kFullMask, out_row, d);
        const int row_expert = __shfl_sync(kFullMask, e, d);
        if (lane < num_topk) {
          const bool same = e == row_expert;
          a.recv_topk_idx[r * num_topk + lane] = same ? row_expert : -1;
          a.recv_topk_weights[r * num_topk + lane] = same ? weight : 0.f;
        }
        for (int i = lane; i < a.num_scales; i += kWarpSize) {
          a.recv_x_scales[static_cast<size_t>(r) * a.num_scales + i] = ld_staging(src_scales + i);
        }
      }
      int4* dst = reinterpret_cast<int4*>(static_cast<char*>(a.recv_x) +
                                          static_cast<size_t>(max(out_row, 0)) * a.hidden_bytes);
      warp_copy_row<kRecvUnroll, false>(src, dst, dst_mask, num_vecs, lane);
    }
    return true;
  });

  // Rows no pair wrote: zero data, scales and weights, -1 top-k ids.
  for (int r = num_rows + warp_id; r < a.capacity; r += num_warps) {
    warp_zero_row(reinterpret_cast<int4*>(static_cast<char*>(a.recv_x) +
                                          static_cast<size_t>(r) * a.hidden_bytes),
                  num_vecs, lane);
    for (int i = lane; i < a.num_scales; i += kWarpSize) {
      a.recv_x_scales[static_cast<size_t>(r) * a.num_scales + i] = 0.f;
    }
    if (lane < num_topk) {
      a.recv_topk_idx[r * num_topk + lane] = -1;
      a.recv_topk_weights[r * num_topk + lane] = 0.f;
    }
  }
  if (a.expert_layout) {
    for (int p = num_pairs + warp_id; p < a.num_pair_rows; p += num_warps) {
      if (lane < num_topk) a.pair_expert_rows[p * num_topk + lane] = -1;
    }
  } else {
    __syncthreads();
    for (int i = threadIdx.x; i < experts_per_rank; i += blockDim.x) {
      if (s_expert_count[i] != 0) atomicAdd(&a.num_recv_tokens_per_expert[i], s_expert_count[i]);
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    dispatch_kernel(GroupView g, DispatchArgs a, const int* expert_rank, int num_senders) {
  __shared__ int s_abort;
  __shared__ int s_recv_offset[kMaxRanks + 1];
  __shared__ int s_expert_count[kMaxExperts];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const bool sender = static_cast<int>(blockIdx.x) < num_senders;
  if (threadIdx.x == 0) s_abort = aborted(g);
  if (!sender) {
    const Scratch* sc = scratch_of(g);
    for (int i = threadIdx.x; i <= g.num_ranks; i += blockDim.x) s_recv_offset[i] = sc->recv_offset[i];
    for (int i = threadIdx.x; i < a.num_experts / g.num_ranks; i += blockDim.x) s_expert_count[i] = 0;
  }
  __syncthreads();
  if (s_abort) return;
  const unsigned long long epoch = current_epoch(g);
  const int block = sender ? blockIdx.x : blockIdx.x - num_senders;
  const int warp_id = block * kWarps + warp;
  const int num_warps = (sender ? num_senders : gridDim.x - num_senders) * kWarps;
  if (sender) {
    dispatch_send(g, a, expert_rank, epoch, warp_id, num_warps, lane);
  } else {
    dispatch_recv(g, a, epoch, warp_id, num_warps, lane, s_recv_offset, s_expert_count);
  }
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

// out = cast(bias + sum over ranks r in src_mask, ascending, of row r) in fp32. Lane r < R
// holds the pointer to rank r's staging row.
template <typename T>
__device__ __forceinline__ void warp_reduce_rows(const int4* lane_src, unsigned src_mask,
                                                 const int4* bias, int4* out, int num_vecs,
                                                 int lane) {
  using V = VecTraits<T>;
  const int4* src[kMaxRanks];
#pragma unroll
  for (int r = 0; r < kMaxRanks; ++r) {
    src[r] = reinterpret_cast<const int4*>(
        __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(lane_src), r));
  }
  for (int base = 0; base < num_vecs; base += kWarpSize * kReduceUnroll) {
    int4 v[kMaxRanks][kReduceUnroll];
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
      if ((src_mask >> r) & 1u) {
#pragma unroll
        for (int u = 0; u < kReduceUnroll; ++u) {
          const int i = base + u * kWarpSize + lane;
          if (i < num_vecs) v[r][u] = ld_staging(src[r] + i);
        }
      }
    }
    float acc[kReduceUnroll][V::kElems] = {};
    if (bias != nullptr) {
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u) {
        const int i = base + u * kWarpSize + lane;
        if (i < num_vecs) V::add(acc[u], ld_nc(bias + i));
      }
    }
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
      if ((src_mask >> r) & 1u) {
#pragma unroll
        for (int u = 0; u < kReduceUnroll; ++u) {
          if (base + u * kWarpSize + lane < num_vecs) V::add(acc[u], v[r][u]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kReduceUnroll; ++u) {
      const int i = base + u * kWarpSize + lane;
      if (i < num_vecs) out[i] = V::pack(acc[u]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    combine_kernel(GroupView g, CombineArgs a, int num_holders) {
  __shared__ int s_abort;
  __shared__ int s_recv_offset[kMaxRanks + 1];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int num_ranks = g.num_ranks, me = g.rank;
  if (threadIdx.x == 0) {
    s_abort = aborted(g);
    load_recv_offset(a.num_tokens_matrix, num_ranks, me, s_recv_offset);
  }
  __syncthreads();
  if (s_abort) return;
  const unsigned long long epoch = current_epoch(g);
  const bool holder = static_cast<int>(blockIdx.x) < num_holders;
  const int block = holder ? blockIdx.x : blockIdx.x - num_holders;
  const int warp_id = block * kWarps + warp;
  const int num_warps = (holder ? num_holders : gridDim.x - num_holders) * kWarps;
  const int num_vecs = a.hidden * static_cast<int>(sizeof(T)) / 16;
  const int4* y = static_cast<const int4*>(a.y);

  if (holder) {
    for_each_pair_chunk(s_recv_offset, num_ranks, warp_id, num_warps, kRowsPerRelease,
                        [&](int s, int j0, int n) {
      for (int j = j0; j < j0 + n; ++j) {
        const int p = s_recv_offset[s] + j;
        int4* dst = reinterpret_cast<int4*>(combine_row(g, s, me, j) + g.layout.combine_data);
        if (!a.expert_layout) {
          if (p < a.capacity) {
            warp_copy_row<kHoldUnroll, true>(y + static_cast<size_t>(p) * num_vecs, dst, 1u,
                                             num_vecs, lane);
          } else {
            warp_zero_row(dst, num_vecs, lane);
          }
        } else {
          const int src_row = lane < a.num_topk ? a.pair_expert_rows[p * a.num_topk + lane] : -1;
          warp_sum_rows<T>(y, src_row, __ballot_sync(kFullMask, src_row >= 0), dst, num_vecs, lane);
        }
      }
      __syncwarp();
      if (lane < n) st_release_sys(row_flag(combine_row(g, s, me, j0 + lane)), epoch);
      return true;
    });
  } else {
    for (int t = warp_id; t < a.num_tokens; t += num_warps) {
      const int pos = lane < num_ranks ? a.send_pos[t * num_ranks + lane] : -1;
      char* row = pos >= 0 ? combine_row(g, me, lane, pos) : nullptr;
      int ok = 1;
      if (pos >= 0) ok = wait_flag(g, row_flag(row), epoch, kOpCombine, lane);
      if (!__all_sync(kFullMask, ok)) break;
      const int4* bias = a.bias == nullptr
                             ? nullptr
                             : static_cast<const int4*>(a.bias) + static_cast<size_t>(t) * num_vecs;
      warp_reduce_rows<T>(reinterpret_cast<const int4*>(row + g.layout.combine_data),
                          __ballot_sync(kFullMask, pos >= 0), bias,
                          static_cast<int4*>(a.out) + static_cast<size_t>(t) * num_vecs, num_vecs,
                          lane);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Cached dispatch
// ---------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads, 1)
    cached_dispatch_kernel(GroupView g, CachedDispatchArgs a, int num_senders) {
  __shared__ int s_abort;
  __shared__ int s_recv_offset[kMaxRanks + 1];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int num_ranks = g.num_ranks, me = g.rank, num_topk = a.num_topk;
  if (threadIdx.x == 0) {
    s_abort = aborted(g);
    load_recv_offset(a.num_tokens_matrix, num_ranks, me, s_recv_offset);
  }
  __syncthreads();
  if (s_abort) return;
  const unsigned long long epoch = current_epoch(g);
  const bool sender = static_cast<int>(blockIdx.x) < num_senders;
  const int block = sender ? blockIdx.x : blockIdx.x - num_senders;
  const int warp_id = block * kWarps + warp;
  const int num_warps = (sender ? num_senders : gridDim.x - num_senders) * kWarps;
  const int num_vecs = a.hidden_bytes / 16;

  if (sender) {
    for_each_token_chunk(a.num_tokens, warp_id, num_warps, epoch, [&](int t) -> char* {
      const int pos = lane < num_ranks ? a.send_pos[t * num_ranks + lane] : -1;
      char* row = pos >= 0 ? dispatch_row(g, lane, me, pos) : nullptr;
      const int4* src = reinterpret_cast<const int4*>(static_cast<const char*>(a.g) +
                                                      static_cast<size_t>(t) * a.hidden_bytes);
      warp_copy_row<kSendUnroll, true>(src, reinterpret_cast<int4*>(row + g.layout.dispatch_data),
                                       __ballot_sync(kFullMask, pos >= 0), num_vecs, lane);
      return row;
    });
    return;
  }

  const int num_pairs = s_recv_offset[num_ranks];
  const int num_rows = a.expert_layout ? scratch_of(g)->num_rows : min(num_pairs, a.capacity);
  for_each_pair(s_recv_offset, num_ranks, warp_id, num_warps, [&](int s, int j, int p) {
    if (!a.expert_layout && p >= a.capacity) return false;
    // Rank layout: row p (held by lane 0); expert layout: the rows of the pair's slots.
    int out_row = lane == 0 ? p : -1;
    if (a.expert_layout) out_row = lane < num_topk ? a.pair_expert_rows[p * num_topk + lane] : -1;
    const unsigned dst_mask = __ballot_sync(kFullMask, out_row >= 0);
    if (dst_mask == 0) return true;
    char* row = dispatch_row(g, me, s, j);
    int ok = 1;
    if (lane == 0) ok = wait_flag(g, row_flag(row), epoch, kOpCachedDispatch, s);
    if (!__shfl_sync(kFullMask, ok, 0)) return false;
    int4* dst = reinterpret_cast<int4*>(static_cast<char*>(a.recv) +
                                        static_cast<size_t>(max(out_row, 0)) * a.hidden_bytes);
    warp_copy_row<kRecvUnroll, false>(reinterpret_cast<const int4*>(row + g.layout.dispatch_data),
                                      dst, dst_mask, num_vecs, lane);
    return true;
  });
  for (int r = num_rows + warp_id; r < a.capacity; r += num_warps) {
    warp_zero_row(reinterpret_cast<int4*>(static_cast<char*>(a.recv) +
                                          static_cast<size_t>(r) * a.hidden_bytes),
                  num_vecs, lane);
  }
}

// Blocks of the first role among num_blocks: percent of them, at least one of each role.
int first_role_blocks(int num_blocks, int percent) {
  return std::min(num_blocks - 1, std::max(1, num_blocks * percent / 100));
}

size_t align_up(size_t value, size_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
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
  l.scratch = offset;
  offset = align_up(offset + sizeof(Scratch), kAlign);
  l.expert_rank = offset;
  offset = align_up(offset + static_cast<size_t>(max_tokens) * max_topk * sizeof(int), kAlign);
  l.tile_counts = offset;
  const size_t num_tiles = (static_cast<size_t>(max_tokens) + kLayoutTileTokens - 1) / kLayoutTileTokens;
  offset = align_up(offset + num_tiles * l.count_stride * sizeof(int), kAlign);

  const size_t rows = static_cast<size_t>(num_ranks) * max_tokens;
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
  l.total = offset;
  return l;
}

cudaError_t launch_dispatch(const GroupView& g, const DispatchArgs& a, cudaStream_t stream) {
  int* expert_rank = reinterpret_cast<int*>(g.base[g.rank] + g.layout.expert_rank);
  int* tile_counts = reinterpret_cast<int*>(g.base[g.rank] + g.layout.tile_counts);
  cudaError_t err = launch_dispatch_layout(a.topk_idx, a.num_tokens, a.num_topk, a.num_experts,
                                           g.num_ranks, g.layout.count_stride, a.send_pos,
                                           expert_rank, tile_counts, stream);
  if (err != cudaSuccess) return err;
  dispatch_notify_kernel<<<1, kNotifyThreads, 0, stream>>>(
      g, a.num_tokens, a.num_experts, a.capacity, a.expert_layout, a.num_tokens_matrix,
      a.num_recv_tokens, a.num_recv_tokens_per_expert, a.num_dropped);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  expert_rank = a.expert_layout ? expert_rank : nullptr;
  const int num_blocks = 2 * a.num_channels;
  dispatch_kernel<<<num_blocks, kThreads, 0, stream>>>(
      g, a, expert_rank, first_role_blocks(num_blocks, JAX_EP_SEND_PERCENT));
  return cudaGetLastError();
}

cudaError_t launch_combine(const GroupView& g, const CombineArgs& a, cudaStream_t stream) {
  barrier_kernel<<<1, kNotifyThreads, 0, stream>>>(g, kOpCombine, nullptr, 0);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int num_blocks = 2 * a.num_channels;
  const int num_holders = first_role_blocks(num_blocks, JAX_EP_HOLD_PERCENT);
  if (a.is_bf16) {
    combine_kernel<__nv_bfloat16><<<num_blocks, kThreads, 0, stream>>>(g, a, num_holders);
  } else {
    combine_kernel<float><<<num_blocks, kThreads, 0, stream>>>(g, a, num_holders);
  }
  return cudaGetLastError();
}

cudaError_t launch_cached_dispatch(const GroupView& g, const CachedDispatchArgs& a,
                                   cudaStream_t stream) {
  const int* rows = a.expert_layout ? a.pair_expert_rows : nullptr;
  barrier_kernel<<<1, kNotifyThreads, 0, stream>>>(g, kOpCachedDispatch, rows,
                                                   a.expert_layout ? a.num_pair_rows * a.num_topk : 0);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int num_blocks = 2 * a.num_channels;
  cached_dispatch_kernel<<<num_blocks, kThreads, 0, stream>>>(
      g, a, first_role_blocks(num_blocks, JAX_EP_SEND_PERCENT));
  return cudaGetLastError();
}

}  // namespace jax_ep
