// Low-latency (decode) dispatch and combine between the GPUs of one NVLink domain, through
// the transport (cuda/transport.cuh). Every block of the grid works in both phases (a few
// tokens: latency, not bandwidth, decides). An op is one launch (kPhaseBoth) or, hooked, a
// send launch and a receive launch with any computation in between (the op protocol of
// cuda/region.h: the send starts op n and writes n into `pending`, the receive finishes it).
// Staging is the intranode staging (cuda/region.h), indexed by source token: slot (s, t) of
// a receiver holds token t of source rank s.
//
// low_latency_dispatch
//   send: every block counts, for every expert, the tokens of this rank that select it (a
//     thread per (expert, chunk of tokens), two passes), which gives each (token, expert) its
//     position among this rank's tokens for that expert. Block 0 writes each rank's counts for
//     its local experts into the rank's count slot and announces the op. A warp per token
//     writes, to every rank, the token's slot header (its local experts and their positions)
//     and, to the ranks that hold one of its experts only, the row (cast to FP8 on the way
//     with fp8): each token crosses NVLink once per rank, not once per expert. Then it
//     releases the slot with the op's tag.
//   receive: every block waits for every source's counts and derives where each source's
//     rows of each local expert start (rows grouped by source rank, then source token); a
//     warp per slot waits for its tag and copies the row into recv_x once per local expert
//     it selects, and fills row_of_slot.
// low_latency_combine
//   send: block 0 writes this rank's top-k weights into every rank's weights staging and
//     announces the op. A warp per (source, token) with rows here (as in row_of_slot) waits
//     for the source's weights, sums w_k * x[row_k] over the token's local slots in fp32 in
//     slot order, casts the sum to x's dtype and writes it into the source's combine
//     staging: one row per (token, rank) instead of one per (token, expert).
//   receive: a warp per token waits for the rows of the ranks that hold its experts and sums
//     them in fp32 in ascending rank order.
// With mask, a peer that does not answer within the time limit is masked (ErrorRecord) and
// treated as sending nothing, in this op and every later one.
#include "cuda/common.cuh"

namespace jax_ep {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kCopyUnroll = 4;
constexpr int kSumUnroll = 2;
constexpr int kFp8Block = 128;  // channels per FP8 scale
constexpr float kFp8Max = 448.0f;
constexpr float kMinAmax = 1e-4f;

// Slot header (after the tag): local expert of each top-k slot at the receiver (-1: not
// there), then the token's position among the source's tokens for that expert.
__device__ __forceinline__ int* slot_experts(char* row) {
  return reinterpret_cast<int*>(row + kRowHeaderBytes);
}
__device__ __forceinline__ int* slot_positions(char* row, int max_topk) {
  return slot_experts(row) + max_topk;
}
__device__ __forceinline__ float* weights_of(const GroupView& g, int owner, int p, int source) {
  const size_t index = (static_cast<size_t>(p) * kMaxRanks + source) * g.max_tokens * g.max_topk;
  return reinterpret_cast<float*>(remote(g.peers, owner, g.layout.weights)) + index;
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
__device__ __forceinline__ bool selects(const int* topk_idx, int t, int num_topk, int e) {
  bool hit = false;
  for (int k = 0; k < num_topk; ++k) hit |= __ldg(&topk_idx[at(t, num_topk, k)]) == e;
  return hit;
}

// Positions of this block's tokens (t = blockIdx.x + j * gridDim.x): s_pos[j * K + k] = the
// number of this rank's tokens before t that select expert topk_idx[t, k] (-1 for an empty
// or out-of-range slot; a repeated expert's slots share one position). s_total[e] = this
// rank's tokens that select expert e. s_chunk: [kMaxExperts] scratch.
__device__ void count_positions(const LowLatencyDispatchArgs& a, int* s_pos, int* s_total,
                                int* s_chunk) {
  const int num_experts = a.num_experts, num_topk = a.num_topk, num_tokens = a.num_tokens;
  const int num_chunks = max(1, kThreads / num_experts);
  const int chunk = (num_tokens + num_chunks - 1) / num_chunks;
  const int items = num_chunks * num_experts;
  const int my_tokens = (num_tokens - static_cast<int>(blockIdx.x) + gridDim.x - 1) / gridDim.x;
  for (int i = threadIdx.x; i < max(my_tokens, 0) * num_topk; i += blockDim.x) s_pos[i] = -1;
  for (int i = threadIdx.x; i < items; i += blockDim.x) {  // pass 1: counts per chunk
    const int e = i % num_experts, begin = i / num_experts * chunk;
    int n = 0;
    for (int t = begin; t < min(begin + chunk, num_tokens); ++t) n += selects(a.topk_idx, t, num_topk, e);
    s_chunk[i] = n;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {  // exclusive scan over chunks
    int running = 0;
    for (int c = 0; c < num_chunks; ++c) {
      const int n = s_chunk[c * num_experts + e];
      s_chunk[c * num_experts + e] = running;
      running += n;
    }
    s_total[e] = running;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < items; i += blockDim.x) {  // pass 2: this block's positions
    const int e = i % num_experts, begin = i / num_experts * chunk;
    int running = s_chunk[i];
    for (int t = begin; t < min(begin + chunk, num_tokens); ++t) {
      bool hit = false;
      for (int k = 0; k < num_topk; ++k) {
        if (__ldg(&a.topk_idx[at(t, num_topk, k)]) != e) continue;
        hit = true;
        if (t % gridDim.x == blockIdx.x) s_pos[t / gridDim.x * num_topk + k] = running;
      }
      running += hit;
    }
  }
  __syncthreads();
}

// One FP8 group of 128 channels spans kGroupLanes lanes (a 16-byte vector each).
template <typename T>
struct Fp8Traits {
  static constexpr int kVecChannels = 16 / sizeof(T);
  static constexpr int kGroupLanes = kFp8Block / kVecChannels;
};

// float -> float8_e4m3fn, rounded to nearest even from the float itself, saturated at
// +-448: the bits XLA:CPU and ml_dtypes give (spelled out rather than left to a conversion
// instruction, so that the rounding is the documented one on every architecture).
__device__ __forceinline__ unsigned to_e4m3(float v) {
  const unsigned sign = (__float_as_uint(v) >> 24) & 0x80u;
  const float a = fabsf(v);
  if (!(a < 464.0f)) return sign | 0x7eu;  // past the midpoint of 448 and 480 (or NaN): 448
  int exponent = static_cast<int>((__float_as_uint(a) >> 23) & 0xffu) - 127;
  if (exponent < -6) {  // subnormal: multiples of 2^-9 (q == 8 is the smallest normal)
    return sign | static_cast<unsigned>(__float2int_rn(a * 512.0f));
  }
  // a * 2^(3 - exponent) is exact; q in [8, 16] counts eighths of 2^exponent.
  int q = __float2int_rn(a * __uint_as_float(static_cast<unsigned>(127 + 3 - exponent) << 23));
  if (q == 16) {
    q = 8;
    ++exponent;
  }
  const unsigned bits = static_cast<unsigned>(exponent + 7) << 3 | static_cast<unsigned>(q - 8);
  return sign | min(bits, 0x7eu);
}

__device__ __forceinline__ float fp8_scale(float amax, bool round_scale) {
  // A product with the rounded reciprocal, as XLA computes amax / 448 (the reference).
  const float scale = fmaxf(amax, kMinAmax) * (1.0f / kFp8Max);
  if (!round_scale) return scale;
  int exponent;  // scale = m * 2^exponent, m in [0.5, 1): round up to a power of two
  const float m = frexpf(scale, &exponent);
  return ldexpf(1.0f, m == 0.5f ? exponent - 1 : exponent);
}

// Writes row src (num_vecs 16-byte vectors of T) to the destinations in dst_mask (lane i
// holds destination i's data pointer), cast to FP8 with one scale per 128 channels (lane i's
// scales pointer). A warp-wide call; every lane reads each source vector once.
template <typename T>
__device__ __forceinline__ void warp_send_fp8_row(const int4* src, char* lane_data,
                                                  float* lane_scales, unsigned dst_mask,
                                                  int num_vecs, bool round_scale, int lane) {
  using V = VecTraits<T>;
  using F = Fp8Traits<T>;
  constexpr int kOut = F::kVecChannels;  // FP8 bytes per vector: 8 (bf16) or 4 (f32)
  for (int base = 0; base < num_vecs; base += kWarpSize) {
    const int i = base + lane;
    float v[kOut];
    float amax = 0.0f;
    if (i < num_vecs) {
      V::unpack(ld_nc(src + i), v);
#pragma unroll
      for (int j = 0; j < kOut; ++j) amax = fmaxf(amax, fabsf(v[j]));
    }
#pragma unroll
    for (int offset = F::kGroupLanes / 2; offset > 0; offset /= 2) {
      amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, offset));
    }
    const float scale = fp8_scale(amax, round_scale);
    unsigned packed[kOut / 4];
#pragma unroll
    for (int j = 0; j < kOut / 4; ++j) {
      packed[j] = to_e4m3(v[4 * j] / scale) | to_e4m3(v[4 * j + 1] / scale) << 8 |
                  to_e4m3(v[4 * j + 2] / scale) << 16 | to_e4m3(v[4 * j + 3] / scale) << 24;
    }
    for (unsigned m = dst_mask; m != 0; m &= m - 1) {
      const int d = __ffs(m) - 1;
      char* data = reinterpret_cast<char*>(
          __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(lane_data), d));
      float* scales = reinterpret_cast<float*>(
          __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(lane_scales), d));
      if (i < num_vecs) {
        if constexpr (kOut == 8) {
          reinterpret_cast<uint2*>(data)[i] = make_uint2(packed[0], packed[1]);
        } else {
          reinterpret_cast<unsigned*>(data)[i] = packed[0];
        }
        if (lane % F::kGroupLanes == 0) scales[i / F::kGroupLanes] = scale;
      }
    }
  }
}

template <typename T>
__device__ void low_latency_dispatch_send(const GroupView& g, const LowLatencyDispatchArgs& a,
                                          const OpContext& c, int* s_pos, int* s_total,
                                          int* s_chunk) {
  const int num_ranks = g.num_ranks, me = g.rank, lane = threadIdx.x % kWarpSize;
  const int num_local = a.num_experts / num_ranks, num_topk = a.num_topk;
  count_positions(a, s_pos, s_total, s_chunk);
  if (!wait_peers_done_or_mask(g, c, a.mask)) return;
  if (blockIdx.x == 0) {
    for (int i = threadIdx.x; i < a.num_experts; i += blockDim.x) {
      const int r = i / num_local;
      if (!(a.mask && is_masked(g, r))) count_slot(g, r, c.parity, me)[i % num_local] = s_total[i];
    }
    __syncthreads();
    __threadfence_system();
    announce_op(g, c);
  }
  const int row_bytes = a.fp8 ? a.hidden : a.hidden * static_cast<int>(sizeof(T));
  const int num_vecs = a.hidden * static_cast<int>(sizeof(T)) / 16;
  const int my_tokens = (a.num_tokens - static_cast<int>(blockIdx.x) + gridDim.x - 1) / gridDim.x;
  for (int j = threadIdx.x / kWarpSize; j < my_tokens; j += kWarps) {
    const int t = blockIdx.x + j * gridDim.x;
    int e = lane < num_topk ? __ldg(&a.topk_idx[at(t, num_topk, lane)]) : -1;
    const int pos = lane < num_topk ? s_pos[j * num_topk + lane] : -1;
    if (e < 0 || e >= a.num_experts) e = -1;
    const int holder = e >= 0 ? e / num_local : -1;
    const unsigned holders = __reduce_or_sync(kFullMask, holder >= 0 ? 1u << holder : 0u);
    // Lane r < R: rank r's slot for this token (skipped if r is masked).
    const bool live = lane < num_ranks && !(a.mask && is_masked(g, lane));
    char* row = live ? dispatch_row(g, lane, c.parity, me, t) : nullptr;
    for (int r = 0; r < num_ranks; ++r) {
      char* slot = reinterpret_cast<char*>(
          __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(row), r));
      if (slot != nullptr && lane < num_topk) {
        slot_experts(slot)[lane] = holder == r ? e % num_local : -1;
        slot_positions(slot, g.max_topk)[lane] = pos;
      }
    }
    const unsigned dst_mask = __ballot_sync(kFullMask, live && ((holders >> lane) & 1u));
    const char* src = static_cast<const char*>(a.x) + at(t, a.hidden * static_cast<int>(sizeof(T)), 0);
    if (a.fp8) {
      warp_send_fp8_row<T>(reinterpret_cast<const int4*>(src),
                           row == nullptr ? nullptr : row + g.layout.dispatch_data,
                           row == nullptr ? nullptr
                                          : reinterpret_cast<float*>(row + g.layout.dispatch_scales),
                           dst_mask, num_vecs, a.round_scale, lane);
    } else {
      warp_copy_row<kCopyUnroll, true>(
          reinterpret_cast<const int4*>(src),
          row == nullptr ? nullptr : reinterpret_cast<int4*>(row + g.layout.dispatch_data),
          dst_mask, row_bytes / 16, lane);
    }
    __syncwarp();
    if (row != nullptr) signal(row_flag(row), c.tag);
  }
}

// ---------------------------------------------------------------------------------------
// Dispatch: receive
// ---------------------------------------------------------------------------------------
// s_base[s * L + e]: first row of source s's rows of local expert e; s_live[s]: s answered.
__device__ void low_latency_dispatch_recv(const GroupView& g, const LowLatencyDispatchArgs& a,
                                          const OpContext& c, int* s_base) {
  __shared__ int s_live[kMaxRanks];
  const int num_ranks = g.num_ranks, me = g.rank, lane = threadIdx.x % kWarpSize;
  const int num_local = a.num_experts / num_ranks, num_topk = a.num_topk;
  const int m = a.max_tokens_per_rank, rows_per_expert = num_ranks * m;
  if (threadIdx.x < num_ranks) {
    const int w = wait_tag_or_mask(g, c, &control_of(g, me)->announce[c.parity][threadIdx.x],
                                   threadIdx.x, a.mask);
    s_live[threadIdx.x] = w == kWaitOk ? 1 : (w == kWaitMasked ? 0 : -1);
  }
  __syncthreads();
  for (int s = 0; s < num_ranks; ++s) {
    if (s_live[s] < 0) return;  // failed: finish_op poisons the outputs
  }
  for (int e = threadIdx.x; e < num_local; e += blockDim.x) {
    int running = 0;
    for (int s = 0; s < num_ranks; ++s) {
      s_base[s * num_local + e] = running;
      if (s_live[s]) running += ld_staging(count_slot(g, me, c.parity, s) + e);
    }
    if (blockIdx.x == 0) a.recv_count[e] = running;
  }
  __syncthreads();

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
  for (int i = warp; i < num_ranks * a.num_tokens; i += num_warps) {
    const int s = i / a.num_tokens, t = i % a.num_tokens;
    int* out_slots = a.row_of_slot + at(s * m + t, num_topk, 0);
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
    if (lane < num_topk) out_slots[lane] = flat;
    // A repeated expert's slots share one row: copy it once.
    const unsigned same = __match_any_sync(kFullMask, flat);
    const unsigned dst_mask = __ballot_sync(kFullMask, flat >= 0 && __ffs(same) - 1 == lane);
    if (dst_mask == 0) continue;
    char* dst = static_cast<char*>(a.recv_x) + at(max(flat, 0), row_bytes, 0);
    warp_copy_row<kCopyUnroll, false>(reinterpret_cast<const int4*>(row + g.layout.dispatch_data),
                                      reinterpret_cast<int4*>(dst), dst_mask, row_bytes / 16, lane);
    if (num_scales) {
      const float* scales = reinterpret_cast<const float*>(row + g.layout.dispatch_scales);
      for (unsigned d = dst_mask; d != 0; d &= d - 1) {
        const int r = __shfl_sync(kFullMask, flat, __ffs(d) - 1);
        for (int j = lane; j < num_scales; j += kWarpSize) {
          a.recv_scales[at(r, num_scales, j)] = ld_staging(scales + j);
        }
      }
    }
  }
}

Poison dispatch_outputs(const GroupView& g, const LowLatencyDispatchArgs& a) {
  const size_t rows = static_cast<size_t>(a.num_experts / g.num_ranks) * g.num_ranks *
                      a.max_tokens_per_rank;
  const size_t elem = a.fp8 ? 1 : (a.x_is_bf16 ? 2 : 4);
  Poison p{};
  auto add = [&](void* ptr, size_t bytes) {
    if (ptr == nullptr || bytes == 0) return;
    p.ptr[p.count] = ptr;
    p.bytes[p.count++] = bytes;
  };
  add(a.recv_x, rows * a.hidden * elem);
  add(a.recv_scales, a.fp8 ? rows * (a.hidden / kFp8Block) * sizeof(float) : 0);
  add(a.recv_count, static_cast<size_t>(a.num_experts / g.num_ranks) * sizeof(int));
  add(a.row_of_slot, static_cast<size_t>(g.num_ranks) * a.max_tokens_per_rank * a.num_topk * sizeof(int));
  return p;
}

// The body of every low-latency kernel: kPhases says which of send(c) and recv(c) it runs.
// A send alone starts op c (and hands c to its receive through `pending`); a receive alone
// finishes the op its send started; both run a fused op.
template <int kPhases, typename Send, typename Recv>
__device__ __forceinline__ void run_phases(const GroupView& g, int op, int* pending, bool mask,
                                           const Poison& poison, Send send, Recv recv) {
  __shared__ int s_skip;
  constexpr bool kSend = kPhases & kPhaseSend, kRecv = kPhases & kPhaseRecv;
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
  extern __shared__ int s_pos[];
  __shared__ int s_table[kMaxExperts];
  __shared__ int s_total[kMaxExperts];
  run_phases<kPhases>(
      g, kOpLowLatencyDispatch, a.pending, a.mask, poison,
      [&](const OpContext& c) { low_latency_dispatch_send<T>(g, a, c, s_pos, s_total, s_table); },
      [&](const OpContext& c) { low_latency_dispatch_recv(g, a, c, s_table); });
}

// ---------------------------------------------------------------------------------------
// Combine
// ---------------------------------------------------------------------------------------
// dst = cast(sum over the slots in src_mask, in lane (= slot) order, of lane_w * x[lane_row])
// in fp32.
template <typename T>
__device__ __forceinline__ void warp_weighted_sum(const int4* x, int lane_row, float lane_w,
                                                  unsigned src_mask, int4* dst, int num_vecs,
                                                  int lane) {
  using V = VecTraits<T>;
  for (int base = 0; base < num_vecs; base += kWarpSize * kSumUnroll) {
    float acc[kSumUnroll][V::kElems] = {};
    for (unsigned m = src_mask; m != 0; m &= m - 1) {
      const int k = __ffs(m) - 1;
      const int4* src = x + static_cast<size_t>(__shfl_sync(kFullMask, lane_row, k)) * num_vecs;
      const float w = __shfl_sync(kFullMask, lane_w, k);
      int4 v[kSumUnroll];
#pragma unroll
      for (int u = 0; u < kSumUnroll; ++u) {
        const int i = base + u * kWarpSize + lane;
        if (i < num_vecs) v[u] = ld_nc(src + i);
      }
#pragma unroll
      for (int u = 0; u < kSumUnroll; ++u) {
        if (base + u * kWarpSize + lane < num_vecs) V::add_scaled(acc[u], v[u], w);
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
__device__ void low_latency_combine_send(const GroupView& g, const LowLatencyCombineArgs& a,
                                         const OpContext& c) {
  __shared__ int s_weights[kMaxRanks];  // source's weights arrived: 1, masked: 0, unknown: -1
  const int num_ranks = g.num_ranks, me = g.rank, lane = threadIdx.x % kWarpSize;
  const int num_topk = a.num_topk, m = a.max_tokens_per_rank;
  const int rows = a.num_experts / num_ranks * num_ranks * m;
  if (threadIdx.x < kMaxRanks) s_weights[threadIdx.x] = -1;
  if (!wait_peers_done_or_mask(g, c, a.mask)) return;
  if (blockIdx.x == 0) {
    const int n = a.num_tokens * num_topk;
    for (int r = 0; r < num_ranks; ++r) {
      if (a.mask && is_masked(g, r)) continue;
      float* w = weights_of(g, r, c.parity, me);
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        w[at(i / num_topk, g.max_topk, i % num_topk)] = __ldg(&a.topk_weights[i]);
      }
    }
    __syncthreads();
    __threadfence_system();
    announce_op(g, c);
  }
  const int num_vecs = a.hidden * static_cast<int>(sizeof(T)) / 16;
  const int warp = blockIdx.x * kWarps + threadIdx.x / kWarpSize, num_warps = gridDim.x * kWarps;
  for (int i = warp; i < num_ranks * a.num_tokens; i += num_warps) {
    const int s = i / a.num_tokens, t = i % a.num_tokens;
    int row = lane < num_topk ? __ldg(&a.row_of_slot[at(s * m + t, num_topk, lane)]) : -1;
    if (row >= rows) row = -1;
    const unsigned src_mask = __ballot_sync(kFullMask, row >= 0);
    if (src_mask == 0) continue;  // no expert of this token here: nothing to send
    int ready = s_weights[s];
    if (ready < 0) {
      if (lane == 0) {
        const int w = wait_tag_or_mask(g, c, &control_of(g, me)->announce[c.parity][s], s, a.mask);
        ready = w == kWaitOk ? 1 : (w == kWaitMasked ? 0 : -2);
        if (ready >= 0) s_weights[s] = ready;
      }
      ready = __shfl_sync(kFullMask, ready, 0);
    }
    if (ready == -2) break;
    if (ready == 0) continue;
    const float w = row >= 0 ? ld_staging(weights_of(g, me, c.parity, s) + at(t, g.max_topk, lane)) : 0.0f;
    char* dst = combine_row(g, s, c.parity, me, t);
    warp_weighted_sum<T>(static_cast<const int4*>(a.x), row, w, src_mask,
                         reinterpret_cast<int4*>(dst + g.layout.combine_data), num_vecs, lane);
    __syncwarp();
    if (lane == 0) signal(row_flag(dst), c.tag);
  }
}

template <typename T>
__device__ void low_latency_combine_recv(const GroupView& g, const LowLatencyCombineArgs& a,
                                         const OpContext& c) {
  const int num_ranks = g.num_ranks, me = g.rank, lane = threadIdx.x % kWarpSize;
  const int num_local = a.num_experts / num_ranks, num_topk = a.num_topk;
  const int num_vecs = a.hidden * static_cast<int>(sizeof(T)) / 16;
  const int warp = blockIdx.x * kWarps + threadIdx.x / kWarpSize, num_warps = gridDim.x * kWarps;
  for (int t = warp; t < a.num_tokens; t += num_warps) {
    const int e = lane < num_topk ? __ldg(&a.topk_idx[at(t, num_topk, lane)]) : -1;
    const bool valid = e >= 0 && e < a.num_experts;
    const unsigned holders = __reduce_or_sync(kFullMask, valid ? 1u << (e / num_local) : 0u);
    const int4* src = nullptr;
    int w = kWaitMasked;
    if (lane < num_ranks && ((holders >> lane) & 1u)) {
      char* row = combine_row(g, me, c.parity, lane, t);
      w = wait_tag_or_mask(g, c, row_flag(row), lane, a.mask);
      src = reinterpret_cast<const int4*>(row + g.layout.combine_data);
    }
    if (__any_sync(kFullMask, w == kWaitFailed)) break;
    warp_reduce_rows<T, kSumUnroll>(src, __ballot_sync(kFullMask, w == kWaitOk), nullptr,
                        static_cast<int4*>(a.out) + at(t, num_vecs, 0), num_vecs, lane);
  }
}

template <typename T, int kPhases>
__global__ void __launch_bounds__(kThreads, 1)
    low_latency_combine_kernel(GroupView g, LowLatencyCombineArgs a, Poison poison) {
  run_phases<kPhases>(
      g, kOpLowLatencyCombine, a.pending, a.mask, poison,
      [&](const OpContext& c) { low_latency_combine_send<T>(g, a, c); },
      [&](const OpContext& c) { low_latency_combine_recv<T>(g, a, c); });
}

template <typename T, int kPhases>
cudaError_t launch_dispatch_phases(const GroupView& g, const LowLatencyDispatchArgs& a,
                                   cudaStream_t stream) {
  const size_t smem =
      kPhases & kPhaseSend ? low_latency_dispatch_smem(a.num_tokens, a.num_topk, a.num_blocks) : 0;
  low_latency_dispatch_kernel<T, kPhases><<<a.num_blocks, kThreads, smem, stream>>>(
      g, a, dispatch_outputs(g, a));
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

size_t low_latency_dispatch_smem(int num_tokens, int num_topk, int num_blocks) {
  const int per_block = (num_tokens + num_blocks - 1) / num_blocks;
  return static_cast<size_t>(per_block) * num_topk * sizeof(int);
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
