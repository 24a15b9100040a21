// Low-latency (decode) dispatch and combine between the GPUs of one NVLink domain, through
// the transport (cuda/transport.cuh). Every block of the grid works in both phases (a few
// tokens: latency, not bandwidth, decides). An op is one launch (kPhaseBoth) or, hooked, a
// send launch and a receive launch with any computation in between (the op protocol of
// cuda/region.h: the send starts op n and writes n into `pending`, the receive finishes it).
// Staging is the intranode staging (cuda/region.h), indexed by source token: slot (s, t) of
// a receiver holds token t of source rank s.
//
// Rows are cut into pieces of whole warp-wide steps so that several warps share a row when
// there are few tokens; a block signals its rows once all their pieces are written.
//
// low_latency_dispatch
//   send: every block builds, in shared memory, a bit per (expert, token) of this rank's
//     routing; a token's position among this rank's tokens for an expert is the population
//     count of the bits before it. Block 0 writes each rank's counts for its local experts,
//     stamped with the op (no fence: the receivers poll the words), and announces the op.
//     The warps of a block share its tokens: they write, to every rank, each token's slot
//     header (its local experts and their positions) and, to the ranks that hold one of its
//     experts only, the row (cast to FP8 on the way with fp8): each token crosses NVLink
//     once per rank, not once per expert. Then the block releases its slots with the op's
//     tag.
//   receive: every block polls every source's stamped counts and derives where each
//     source's rows of each local expert start (rows grouped by source rank, then source
//     token); a warp per piece of a slot waits for its tag and copies the piece into recv_x
//     once per local expert the slot selects; row_of_slot is filled on the way.
// low_latency_combine
//   send: every block writes its tokens' top-k weights, each stamped with the op, into every
//     rank's weights staging (no fence, no flag: the holders poll the words); block 0
//     announces the op. The warps of a block share its (source, token) pairs with rows here
//     (as in row_of_slot): they wait for the source's weights, sum w_k * x[row_k] over the
//     token's local slots in fp32 in slot order, cast the sum to x's dtype and write it into
//     the source's combine staging: one row per (token, rank) instead of one per (token,
//     expert). Then the block releases the rows it sent.
//   receive: a warp per piece of a token's row waits for the rows of the ranks that hold its
//     experts and sums them in fp32 in ascending rank order.
// With mask, a peer that does not answer within the time limit is masked (ErrorRecord) and
// treated as sending nothing, in this op and every later one.
#include "cuda/common.cuh"
#include "cuda/low_latency_common.cuh"

namespace jax_ep {
namespace {

constexpr int kThreads = 512;
constexpr size_t kDefaultDynamicSmem = 32 * 1024;  // more needs an opt-in (with the static tables)
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kCopyUnroll = 8;
constexpr int kReduceUnroll = 1;  // combine receive: a step loads one vector of every rank

// Slot header (after the tag): local expert of each top-k slot at the receiver (-1: not
// there), then the token's position among the source's tokens for that expert.
__device__ __forceinline__ int* slot_experts(char* row) {
  return reinterpret_cast<int*>(row + kRowHeaderBytes);
}
__device__ __forceinline__ int* slot_positions(char* row, int max_topk) {
  return slot_experts(row) + max_topk;
}
// Source's top-k weights at `owner`: [max_tokens][max_topk] words stamped with the op.
__device__ __forceinline__ unsigned long long* weights_of(const GroupView& g, int owner, int p,
                                                          int source) {
  const size_t index = (static_cast<size_t>(p) * kMaxRanks + source) * g.max_tokens * g.max_topk;
  return reinterpret_cast<unsigned long long*>(remote(g.peers, owner, g.layout.weights)) + index;
}
// Source's tokens per local expert at `owner`: [num_local] words stamped with the op.
__device__ __forceinline__ unsigned long long* expert_counts_of(const GroupView& g, int owner, int p,
                                                                int source, int num_experts) {
  const size_t index = (static_cast<size_t>(p) * kMaxRanks + source) * num_experts;
  return reinterpret_cast<unsigned long long*>(remote(g.peers, owner, g.layout.expert_counts)) + index;
}

// Block-uniform: every peer this op writes to finished op n - 2 (masked peers skipped).
__device__ __forceinline__ bool wait_peers_done_or_mask(const GroupView& g, const OpContext& c,
                                                        bool mask) {
  __shared__ int s_ok;
  if (threadIdx.x == 0) s_ok = 1;
  __syncthreads();
  if (threadIdx.x < g.num_ranks &&
      wait_peer_done_or_mask(g, c, threadIdx.x, mask) == kWaitFailed) {
    s_ok = 0;
  }
  __syncthreads();
  return s_ok != 0;
}

// The op a receive finishes: the one its send wrote into `pending`. It must be in flight
// (started, not yet received): otherwise recorded, and skipped.
__device__ __forceinline__ OpContext receive_op(const int* pending, int op) {
  const unsigned long long n = static_cast<unsigned>(__ldg(pending)) |
                               static_cast<unsigned long long>(static_cast<unsigned>(__ldg(pending + 1))) << 32;
  return make_op_context(n, op);
}
__device__ __forceinline__ bool receive_must_skip(const GroupView& g, const OpContext& c) {
  const Control* ctl = control_of(g, g.rank);
  const unsigned long long epoch = ld_volatile(&ctl->epoch);
  const bool in_flight = c.n > epoch && c.n <= ld_volatile(&ctl->issued) &&
                         ld_volatile(&ctl->finished[c.parity]) < c.n;
  if (!in_flight) {
    if (blockIdx.x == 0 && threadIdx.x == 0) report_failure(g, c, kFailInFlight, g.rank, epoch);
    return true;
  }
  return aborted(g);
}
__device__ __forceinline__ void write_pending(int* pending, const OpContext& c) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    pending[0] = static_cast<int>(c.n & 0xffffffffu);
    pending[1] = static_cast<int>(c.n >> 32);
  }
}

// ---------------------------------------------------------------------------------------
// Dispatch: send
// ---------------------------------------------------------------------------------------
template <typename T>
__device__ void low_latency_dispatch_send(const GroupView& g, const LowLatencyDispatchArgs& a,
                                          const OpContext& c, int* s_pos, int* s_total,
                                          unsigned* s_sel) {
  const int num_ranks = g.num_ranks, me = g.rank, lane = threadIdx.x % kWarpSize;
  const int num_local = a.num_experts / num_ranks, num_topk = a.num_topk;
  count_positions(a, s_pos, s_total, s_sel);
  if (!wait_peers_done_or_mask(g, c, a.mask)) return;
  if (blockIdx.x == 0) {  // the counts need no fence: the receivers poll the stamped words
    for (int i = threadIdx.x; i < a.num_experts; i += blockDim.x) {
      const int r = i / num_local;
      if (!(a.mask && is_masked(g, r))) {
        expert_counts_of(g, r, c.parity, me, a.num_experts)[i % num_local] = stamped(c, s_total[i]);
      }
    }
    announce_op(g, c);
  }
  // Warps of this block share its tokens (t = blockIdx.x + j * gridDim.x), each row cut into
  // `pieces` pieces: item (j, p) is piece p of token j's row.
  const int num_vecs = a.hidden * static_cast<int>(sizeof(T)) / 16;
  const int my_tokens = block_items(a.num_tokens);
  const int pieces = row_pieces(num_vecs, my_tokens, kWarps);
  for (int item = threadIdx.x / kWarpSize; item < my_tokens * pieces; item += kWarps) {
    const int j = item / pieces, p = item % pieces;
    const int t = blockIdx.x + j * gridDim.x;
    int e = lane < num_topk ? __ldg(&a.topk_idx[at(t, num_topk, lane)]) : -1;
    if (e < 0 || e >= a.num_experts) e = -1;
    const int holder = e >= 0 ? e / num_local : -1;
    const unsigned holders = __reduce_or_sync(kFullMask, holder >= 0 ? 1u << holder : 0u);
    // Lane r < R: rank r's slot for this token (skipped if r is masked).
    const bool live = lane < num_ranks && !(a.mask && is_masked(g, lane));
    char* row = live ? dispatch_row(g, lane, c.parity, me, t) : nullptr;
    if (p == 0) {  // the slot header, to every rank
      const int pos = lane < num_topk ? s_pos[j * num_topk + lane] : -1;
      for (int r = 0; r < num_ranks; ++r) {
        char* slot = reinterpret_cast<char*>(
            __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(row), r));
        if (slot != nullptr && lane < num_topk) {
          slot_experts(slot)[lane] = holder == r ? e % num_local : -1;
          slot_positions(slot, g.max_topk)[lane] = pos;
        }
      }
    }
    const unsigned dst_mask = __ballot_sync(kFullMask, live && ((holders >> lane) & 1u));
    int begin, end;
    piece_range(num_vecs, pieces, p, &begin, &end);
    const int4* src = reinterpret_cast<const int4*>(static_cast<const char*>(a.x) +
                                                    at(t, a.hidden * static_cast<int>(sizeof(T)), 0));
    if (a.fp8) {
      warp_send_fp8_row<T>(src, row == nullptr ? nullptr : row + g.layout.dispatch_data,
                           row == nullptr ? nullptr
                                          : reinterpret_cast<float*>(row + g.layout.dispatch_scales),
                           dst_mask, begin, end, a.round_scale, lane);
    } else {
      warp_copy_row<kCopyUnroll, true>(
          src + begin, row == nullptr ? nullptr : reinterpret_cast<int4*>(row + g.layout.dispatch_data) + begin,
          dst_mask, end - begin, lane);
    }
  }
  // Every piece of the block's rows is written and made visible: release each (token, rank)
  // slot.
  __threadfence_system();
  __syncthreads();
  for (int i = threadIdx.x; i < my_tokens * num_ranks; i += blockDim.x) {
    const int t = blockIdx.x + i / num_ranks * gridDim.x, r = i % num_ranks;
    if (!(a.mask && is_masked(g, r))) signal(row_flag(dispatch_row(g, r, c.parity, me, t)), c.tag);
  }
}

// ---------------------------------------------------------------------------------------
// Dispatch: receive
// ---------------------------------------------------------------------------------------
// s_base[s * L + e]: first row of source s's rows of local expert e; s_count[s * L + e]: its
// rows; s_live[s]: s answered (0: masked).
__device__ void low_latency_dispatch_recv(const GroupView& g, const LowLatencyDispatchArgs& a,
                                          const OpContext& c, int* s_base) {
  __shared__ int s_live[kMaxRanks], s_failed;
  __shared__ int s_count[kMaxExperts];
  const int num_ranks = g.num_ranks, me = g.rank, lane = threadIdx.x % kWarpSize;
  const int num_local = a.num_experts / num_ranks, num_topk = a.num_topk;
  const int m = a.max_tokens_per_rank, rows_per_expert = num_ranks * m;
  if (threadIdx.x < num_ranks) s_live[threadIdx.x] = 1;
  if (threadIdx.x == 0) s_failed = 0;
  __syncthreads();
  // A thread per (source, local expert) count word.
  for (int i = threadIdx.x; i < num_ranks * num_local; i += blockDim.x) {
    const int s = i / num_local;
    unsigned count = 0;
    const int w = wait_stamp_or_mask(g, c, expert_counts_of(g, me, c.parity, s, a.num_experts) + i % num_local,
                                     s, a.mask, &count);
    s_count[i] = w == kWaitOk ? static_cast<int>(count) : 0;
    if (w == kWaitMasked) s_live[s] = 0;
    if (w == kWaitFailed) s_failed = 1;
  }
  __syncthreads();
  if (s_failed) return;  // finish_op poisons the outputs
  expert_row_bases(
      num_ranks, num_local, [&](int s, int e) { return s_live[s] ? s_count[s * num_local + e] : 0; },
      s_base, a.recv_count);

  const int elem = a.fp8 ? 1 : (a.x_is_bf16 ? 2 : 4);
  const int row_bytes = a.hidden * elem, num_scales = a.fp8 ? a.hidden / kFp8Block : 0;
  const int warp = blockIdx.x * kWarps + threadIdx.x / kWarpSize, num_warps = gridDim.x * kWarps;
  // Slots past this op's tokens are empty everywhere.
  const size_t empty = static_cast<size_t>(m - a.num_tokens) * num_topk;
  for (size_t i = static_cast<size_t>(warp) * kWarpSize + lane; i < num_ranks * empty;
       i += static_cast<size_t>(num_warps) * kWarpSize) {
    const size_t s = i / empty, rest = i % empty;
    a.row_of_slot[(s * m + a.num_tokens) * num_topk + rest] = -1;
  }
  // Item (slot, p): piece p of the row of slot (s, t), the row cut as in the send.
  const int num_vecs = row_bytes / 16;
  const int pieces = row_pieces(num_vecs, num_ranks * a.num_tokens, num_warps);
  for (int i = warp; i < num_ranks * a.num_tokens * pieces; i += num_warps) {
    const int slot = i / pieces, p = i % pieces;
    const int s = slot / a.num_tokens, t = slot % a.num_tokens;
    char* row = dispatch_row(g, me, c.parity, s, t);
    int w = s_live[s] ? kWaitOk : kWaitMasked;
    if (w == kWaitOk && lane == 0) w = wait_tag_or_mask(g, c, row_flag(row), s, a.mask);
    w = __shfl_sync(kFullMask, w, 0);
    if (w == kWaitFailed) break;
    int flat = -1;
    if (w == kWaitOk && lane < num_topk) {
      const int e = ld_staging(slot_experts(row) + lane);
      const int pos = ld_staging(slot_positions(row, g.max_topk) + lane);
      if (e >= 0 && e < num_local && pos >= 0) {
        const int r = s_base[s * num_local + e] + pos;
        if (r < rows_per_expert) flat = e * rows_per_expert + r;
      }
    }
    if (p == 0 && lane < num_topk) a.row_of_slot[at(s * m + t, num_topk, lane)] = flat;
    // A repeated expert's slots share one row: copy it once.
    const unsigned same = __match_any_sync(kFullMask, flat);
    const unsigned dst_mask = __ballot_sync(kFullMask, flat >= 0 && __ffs(same) - 1 == lane);
    if (dst_mask == 0) continue;
    int begin, end;
    piece_range(num_vecs, pieces, p, &begin, &end);
    int4* dst = reinterpret_cast<int4*>(static_cast<char*>(a.recv_x) + at(max(flat, 0), row_bytes, 0));
    warp_copy_row<kCopyUnroll, false>(reinterpret_cast<const int4*>(row + g.layout.dispatch_data) + begin,
                                      dst + begin, dst_mask, end - begin, lane);
    if (num_scales && p == 0) {
      warp_copy_scales(reinterpret_cast<const float*>(row + g.layout.dispatch_scales), a.recv_scales,
                       num_scales, flat, dst_mask, lane);
    }
  }
}

// The body of every low-latency kernel: kPhases says which of send(c) and recv(c) it runs.
// A send alone starts op c (and hands c to its receive through `pending`); a receive alone
// finishes the op its send started; both run a fused op.
// A hooked send's blocks first count themselves in gate[0]; the last to arrive resets it
// and sets gate[1], which XLA's stream waits for (DeviceResources::send_gate).
template <int kPhases, typename Send, typename Recv>
__device__ __forceinline__ void run_phases(const GroupView& g, int op, int* pending, unsigned* gate,
                                           bool mask, const Poison& poison, Send send, Recv recv) {
  __shared__ int s_skip;
  constexpr bool kSend = kPhases & kPhaseSend, kRecv = kPhases & kPhaseRecv;
  if constexpr (kSend && !kRecv) {
    if (threadIdx.x == 0 && atomicAdd(&gate[0], 1u) == gridDim.x - 1) {
      gate[0] = 0;
      __threadfence();
      asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(gate + 1), "r"(1u) : "memory");
    }
  }
  const OpContext c = kSend ? begin_op(g, op) : receive_op(pending, op);
  if (threadIdx.x == 0) s_skip = kSend ? must_skip(g, c, kRecv ? 0 : 1) : receive_must_skip(g, c);
  __syncthreads();
  const bool skip = s_skip;
  if constexpr (kSend) {
    if (!skip) send(c);
    if constexpr (!kRecv) {
      write_pending(pending, c);
      finish_send(g, c);
      return;
    }
    __syncthreads();
  }
  if (!skip) recv(c);
  finish_op(g, c, poison, [] {}, mask);
}

template <typename T, int kPhases>
__global__ void __launch_bounds__(kThreads, 1)
    low_latency_dispatch_kernel(GroupView g, LowLatencyDispatchArgs a, Poison poison) {
  extern __shared__ int s_pos[];  // send: [ceil(T / grid) * K] positions, then s_sel
  __shared__ int s_table[kMaxExperts];
  __shared__ int s_total[kMaxExperts];
  unsigned* s_sel = reinterpret_cast<unsigned*>(s_pos + block_items(a.num_tokens) * a.num_topk);
  run_phases<kPhases>(
      g, kOpLowLatencyDispatch, a.pending, a.send_gate, a.mask, poison,
      [&](const OpContext& c) { low_latency_dispatch_send<T>(g, a, c, s_pos, s_total, s_sel); },
      [&](const OpContext& c) { low_latency_dispatch_recv(g, a, c, s_table); });
}

// ---------------------------------------------------------------------------------------
// Combine
// ---------------------------------------------------------------------------------------
template <typename T>
__device__ void low_latency_combine_send(const GroupView& g, const LowLatencyCombineArgs& a,
                                         const OpContext& c) {
  __shared__ unsigned s_masked;  // sources a warp of this block found masked
  const int num_ranks = g.num_ranks, me = g.rank, lane = threadIdx.x % kWarpSize;
  const int num_topk = a.num_topk;
  const int rows = a.num_experts / num_ranks * num_ranks * a.max_tokens_per_rank;
  if (threadIdx.x == 0) s_masked = 0;
  if (!wait_peers_done_or_mask(g, c, a.mask)) return;
  // This block's tokens' weights, stamped, to every rank: the holders poll them directly.
  const int my_tokens = block_items(a.num_tokens);
  for (int i = threadIdx.x; i < my_tokens * num_topk * num_ranks; i += blockDim.x) {
    const int r = i % num_ranks, k = i / num_ranks % num_topk;
    const int t = blockIdx.x + i / (num_ranks * num_topk) * gridDim.x;
    if (a.mask && is_masked(g, r)) continue;
    const float w = __ldg(&a.topk_weights[at(t, num_topk, k)]);
    weights_of(g, r, c.parity, me)[at(t, g.max_topk, k)] = stamped(c, __float_as_uint(w));
  }
  if (blockIdx.x == 0) announce_op(g, c);
  // Warps of this block share its (source, token) pairs (i = blockIdx.x + j * gridDim.x, s =
  // i / T, t = i % T), each row cut into `pieces` pieces.
  const int num_vecs = a.hidden * static_cast<int>(sizeof(T)) / 16;
  const int my_pairs = block_items(num_ranks * a.num_tokens);
  const int pieces = row_pieces(num_vecs, my_pairs, kWarps);
  for (int item = threadIdx.x / kWarpSize; item < my_pairs * pieces; item += kWarps) {
    const int pair = blockIdx.x + item / pieces * gridDim.x, p = item % pieces;
    const int s = pair / a.num_tokens, t = pair % a.num_tokens;
    const int row = lane < num_topk ? slot_row(a, s, t, lane, rows) : -1;
    const unsigned src_mask = __ballot_sync(kFullMask, row >= 0);
    if (src_mask == 0) continue;  // no expert of this token here: nothing to send
    unsigned bits = 0;
    const int w = row >= 0 ? wait_stamp_or_mask(g, c, weights_of(g, me, c.parity, s) + at(t, g.max_topk, lane),
                                                s, a.mask, &bits)
                           : kWaitOk;
    if (__any_sync(kFullMask, w == kWaitFailed)) break;
    if (__any_sync(kFullMask, w == kWaitMasked)) {
      if (lane == 0) atomicOr(&s_masked, 1u << s);
      continue;
    }
    char* dst = combine_row(g, s, c.parity, me, t);
    int begin, end;
    piece_range(num_vecs, pieces, p, &begin, &end);
    warp_weighted_sum<T>(static_cast<const int4*>(a.x), row, __uint_as_float(bits), src_mask,
                         reinterpret_cast<int4*>(dst + g.layout.combine_data), begin, end, num_vecs,
                         lane);
  }
  // Every piece of the block's rows is written and made visible: release each row sent.
  __threadfence_system();
  __syncthreads();
  if (aborted(g)) return;
  for (int j = threadIdx.x; j < my_pairs; j += blockDim.x) {
    const int pair = blockIdx.x + j * gridDim.x;
    const int s = pair / a.num_tokens, t = pair % a.num_tokens;
    if ((s_masked >> s) & 1u) continue;  // masked: its rows were not sent
    bool any = false;
    for (int k = 0; k < num_topk && !any; ++k) any = slot_row(a, s, t, k, rows) >= 0;
    if (any) signal(row_flag(combine_row(g, s, c.parity, me, t)), c.tag);
  }
}

template <typename T>
__device__ void low_latency_combine_recv(const GroupView& g, const LowLatencyCombineArgs& a,
                                         const OpContext& c) {
  const int num_ranks = g.num_ranks, me = g.rank, lane = threadIdx.x % kWarpSize;
  const int num_local = a.num_experts / num_ranks, num_topk = a.num_topk;
  const int num_vecs = a.hidden * static_cast<int>(sizeof(T)) / 16;
  const int warp = blockIdx.x * kWarps + threadIdx.x / kWarpSize, num_warps = gridDim.x * kWarps;
  // Item (t, p): piece p of token t's output row.
  const int pieces = row_pieces(num_vecs, a.num_tokens, num_warps);
  for (int i = warp; i < a.num_tokens * pieces; i += num_warps) {
    const int t = i / pieces, p = i % pieces;
    const int e = lane < num_topk ? __ldg(&a.topk_idx[at(t, num_topk, lane)]) : -1;
    const bool valid = e >= 0 && e < a.num_experts;
    const unsigned holders = __reduce_or_sync(kFullMask, valid ? 1u << (e / num_local) : 0u);
    int begin, end;
    piece_range(num_vecs, pieces, p, &begin, &end);
    const int4* src = nullptr;
    int w = kWaitMasked;
    if (lane < num_ranks && ((holders >> lane) & 1u)) {
      char* row = combine_row(g, me, c.parity, lane, t);
      w = wait_tag_or_mask(g, c, row_flag(row), lane, a.mask);
      src = reinterpret_cast<const int4*>(row + g.layout.combine_data) + begin;
    }
    if (__any_sync(kFullMask, w == kWaitFailed)) break;
    warp_reduce_rows<T, kReduceUnroll>(src, __ballot_sync(kFullMask, w == kWaitOk), nullptr,
                                    static_cast<int4*>(a.out) + at(t, num_vecs, begin), end - begin,
                                    lane);
  }
}

template <typename T, int kPhases>
__global__ void __launch_bounds__(kThreads, 1)
    low_latency_combine_kernel(GroupView g, LowLatencyCombineArgs a, Poison poison) {
  run_phases<kPhases>(
      g, kOpLowLatencyCombine, a.pending, a.send_gate, a.mask, poison,
      [&](const OpContext& c) { low_latency_combine_send<T>(g, a, c); },
      [&](const OpContext& c) { low_latency_combine_recv<T>(g, a, c); });
}

template <typename T, int kPhases>
cudaError_t launch_dispatch_phases(const GroupView& g, const LowLatencyDispatchArgs& a,
                                   cudaStream_t stream) {
  const size_t smem = kPhases & kPhaseSend ? low_latency_dispatch_smem(a.num_tokens, a.num_topk,
                                                                        a.num_experts, a.num_blocks)
                                           : 0;
  if (smem > kDefaultDynamicSmem) {
    const cudaError_t err = cudaFuncSetAttribute(low_latency_dispatch_kernel<T, kPhases>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  low_latency_dispatch_kernel<T, kPhases><<<a.num_blocks, kThreads, smem, stream>>>(
      g, a, dispatch_outputs(g.num_ranks, a));
  return cudaGetLastError();
}

template <typename T, int kPhases>
cudaError_t launch_combine_phases(const GroupView& g, const LowLatencyCombineArgs& a,
                                  cudaStream_t stream) {
  Poison p{};
  if (kPhases & kPhaseRecv) {
    p.ptr[0] = a.out;
    p.bytes[0] = static_cast<size_t>(a.num_tokens) * a.hidden * sizeof(T);
    p.count = 1;
  }
  low_latency_combine_kernel<T, kPhases><<<a.num_blocks, kThreads, 0, stream>>>(g, a, p);
  return cudaGetLastError();
}

}  // namespace

size_t low_latency_dispatch_smem(int num_tokens, int num_topk, int num_experts, int num_blocks) {
  return count_positions_smem(num_tokens, num_topk, num_experts, num_blocks);
}

cudaError_t launch_low_latency_dispatch(const GroupView& g, const LowLatencyDispatchArgs& a,
                                        int phases, cudaStream_t stream) {
  // The receive copies bytes: its instantiation does not depend on x's dtype.
  if (phases == kPhaseRecv) return launch_dispatch_phases<float, kPhaseRecv>(g, a, stream);
  if (a.x_is_bf16) {
    return phases == kPhaseSend ? launch_dispatch_phases<__nv_bfloat16, kPhaseSend>(g, a, stream)
                                : launch_dispatch_phases<__nv_bfloat16, kPhaseBoth>(g, a, stream);
  }
  return phases == kPhaseSend ? launch_dispatch_phases<float, kPhaseSend>(g, a, stream)
                              : launch_dispatch_phases<float, kPhaseBoth>(g, a, stream);
}

cudaError_t launch_low_latency_combine(const GroupView& g, const LowLatencyCombineArgs& a,
                                       int phases, cudaStream_t stream) {
  if (a.is_bf16) {
    if (phases == kPhaseSend) return launch_combine_phases<__nv_bfloat16, kPhaseSend>(g, a, stream);
    if (phases == kPhaseRecv) return launch_combine_phases<__nv_bfloat16, kPhaseRecv>(g, a, stream);
    return launch_combine_phases<__nv_bfloat16, kPhaseBoth>(g, a, stream);
  }
  if (phases == kPhaseSend) return launch_combine_phases<float, kPhaseSend>(g, a, stream);
  if (phases == kPhaseRecv) return launch_combine_phases<float, kPhaseRecv>(g, a, stream);
  return launch_combine_phases<float, kPhaseBoth>(g, a, stream);
}

}  // namespace jax_ep
