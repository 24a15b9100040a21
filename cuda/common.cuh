// Device helpers shared by the kernels: region access through the transport, the op
// protocol of cuda/region.h (op numbers, tags, acknowledgements, failures with a time
// limit), 16-byte vector copies and bf16/f32 vector arithmetic in fp32.
#pragma once

#include <cuda_bf16.h>

#include "cuda/kernels.h"

namespace jax_ep {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------
// Region access
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ Control* control_of(const GroupView& g, int rank) {
  return reinterpret_cast<Control*>(remote(g.peers, rank, 0));
}
// Row `row` of the staging block that `source` fills on `owner`'s device, for ops of parity p.
__device__ __forceinline__ char* dispatch_row(const GroupView& g, int owner, int p, int source,
                                              int row) {
  const size_t index = (static_cast<size_t>(p) * g.num_ranks + source) * g.max_tokens + row;
  return remote(g.peers, owner, g.layout.dispatch + index * g.layout.dispatch_row_bytes);
}
__device__ __forceinline__ char* combine_row(const GroupView& g, int owner, int p, int holder,
                                             int row) {
  const size_t index = (static_cast<size_t>(p) * g.num_ranks + holder) * g.max_tokens + row;
  return remote(g.peers, owner, g.layout.combine + index * g.layout.combine_row_bytes);
}
// The count slot that `source` fills on `owner`'s device for ops of parity p.
__device__ __forceinline__ int* count_slot(const GroupView& g, int owner, int p, int source) {
  const size_t index = (static_cast<size_t>(p) * kMaxRanks + source) * g.layout.count_stride;
  return reinterpret_cast<int*>(remote(g.peers, owner, g.layout.counts)) + index;
}
template <typename T>
__device__ __forceinline__ T* local_array(const GroupView& g, size_t offset) {
  return reinterpret_cast<T*>(remote(g.peers, g.rank, offset));
}
__device__ __forceinline__ unsigned long long* row_flag(char* row) {
  return reinterpret_cast<unsigned long long*>(row);
}
// Source token of a row a rank stages for itself (its data is read from the op's input).
__device__ __forceinline__ int* row_token(char* row) {
  return reinterpret_cast<int*>(row + sizeof(unsigned long long));
}
// Element (row, col) of a row-major matrix with `cols` columns, in 64 bits.
__device__ __forceinline__ size_t at(int row, int cols, int col) {
  return static_cast<size_t>(row) * cols + col;
}

// ---------------------------------------------------------------------------------------
// Memory-model primitives
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ unsigned long long globaltimer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ int ld_volatile(const int* p) {
  return *reinterpret_cast<const volatile int*>(p);
}
__device__ __forceinline__ unsigned long long ld_volatile(const unsigned long long* p) {
  return *reinterpret_cast<const volatile unsigned long long*>(p);
}
// A word that only the blocks of this device's kernel hand to each other: release and acquire
// at GPU scope (cheaper than signal()/poll(), which peers on other GPUs need).
__device__ __forceinline__ void store_release_gpu(unsigned long long* word, unsigned long long value) {
  asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(word), "l"(value) : "memory");
}
__device__ __forceinline__ unsigned long long load_acquire_gpu(const unsigned long long* word) {
  unsigned long long v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(word) : "memory");
  return v;
}
// Read-only input of the whole kernel (an XLA operand): non-coherent path, no L1 allocation.
__device__ __forceinline__ int4 ld_nc(const int4* p) {
  int4 v;
  asm("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}
// Staging written by a peer during this kernel: read from L2, never from L1.
__device__ __forceinline__ int4 ld_staging(const int4* p) { return __ldcg(p); }
__device__ __forceinline__ int ld_staging(const int* p) { return __ldcg(p); }
__device__ __forceinline__ float ld_staging(const float* p) { return __ldcg(p); }

__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

// ---------------------------------------------------------------------------------------
// The op protocol (cuda/region.h)
// ---------------------------------------------------------------------------------------
// The op a kernel runs: its number on this device, its tag, the parity of its staging.
struct OpContext {
  unsigned long long n;
  unsigned long long tag;
  int parity;
  int op;
};

__device__ __forceinline__ OpContext make_op_context(unsigned long long n, int op) {
  OpContext c;
  c.n = n;
  c.tag = make_tag(c.n, op);
  c.parity = static_cast<int>(c.n & 1);
  c.op = op;
  return c;
}

// The op a kernel starts: the one after the last started on this device.
__device__ __forceinline__ OpContext begin_op(const GroupView& g, int op) {
  return make_op_context(ld_volatile(&control_of(g, g.rank)->issued) + 1, op);
}

// Whether op c may start with max_in_flight hooked ops still in flight (sent, not received):
// 0 for a fused op, 1 for a hooked send. Every thread reads the same words (the previous
// kernel finished), so every block reaches the same answer.
__device__ __forceinline__ bool in_flight_ok(const GroupView& g, const OpContext& c,
                                            unsigned long long max_in_flight) {
  return c.n - 1 - ld_volatile(&control_of(g, g.rank)->epoch) <= max_in_flight;
}

__device__ __forceinline__ bool aborted(const GroupView& g) {
  return ld_volatile(&control_of(g, g.rank)->abort) != 0;
}

// The first failure on this device wins: it fills the host-mapped record, sets abort (every
// other waiter of this device gives up at once) and announces kOpFailed to every peer on
// this op's parity, so peers waiting for this rank give up too instead of timing out.
static __device__ __noinline__ void report_failure(const GroupView& g, const OpContext& c, int kind,
                                            int peer, unsigned long long seen_tag) {
  Control* ctl = control_of(g, g.rank);
  if (atomicCAS(&ctl->abort, 0, 1) != 0) return;
  g.error->kind = kind;
  g.error->op = c.op;
  g.error->peer = peer;
  g.error->op_number = c.n;
  g.error->seen_tag = seen_tag;
  __threadfence_system();
  g.error->flag = 1;
  for (int r = 0; r < g.num_ranks; ++r) {
    signal(&control_of(g, r)->announce[c.parity][g.rank], make_tag(c.n, kOpFailed));
  }
}

// Whether a kernel starting op c must skip its work: this device already failed, or the op
// breaks the hook rules (more than max_in_flight hooked ops in flight; recorded by block 0).
// Every block that checks gets the same answer for the rules.
__device__ __forceinline__ bool must_skip(const GroupView& g, const OpContext& c,
                                          unsigned long long max_in_flight) {
  if (!in_flight_ok(g, c, max_in_flight)) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      report_failure(g, c, kFailInFlight, g.rank, ld_volatile(&control_of(g, g.rank)->epoch));
    }
    return true;
  }
  return aborted(g);
}

// Outcome of waiting for a peer.
enum WaitResult : int { kWaitFailed = 0, kWaitOk = 1, kWaitMasked = 2 };

// Whether peer is masked on this device (low-latency ops with mask=True skip it).
__device__ __forceinline__ bool is_masked(const GroupView& g, int peer) {
  return (ld_volatile(reinterpret_cast<const int*>(&control_of(g, g.rank)->masked)) >> peer) & 1;
}

// Masks `peer` on this device (it did not answer within the time limit): later waits for it
// return kWaitMasked at once. The first masking is recorded with its op for the host.
static __device__ __noinline__ void mask_peer(const GroupView& g, const OpContext& c, int peer) {
  const unsigned old = atomicOr(&control_of(g, g.rank)->masked, 1u << peer);
  if (old & (1u << peer)) return;
  if (old == 0) {
    g.error->mask_op = c.op;
    g.error->mask_op_number = c.n;
  }
  __threadfence_system();
  g.error->masked[peer] = 1;
}

// A peer that is too late: masked (mask=true) or a recorded failure.
__device__ __forceinline__ int late_peer(const GroupView& g, const OpContext& c, int peer,
                                         bool mask) {
  if (mask) {
    mask_peer(g, c, peer);
    return kWaitMasked;
  }
  report_failure(g, c, kFailTimeout, peer, 0);
  return kWaitFailed;
}

// Waits for `peer`'s part of op c: poll_once(&seen) returns kWaitOk once it arrived,
// kKeepWaiting, or kWordAhead when the word it polled (seen) shows an op at or after this
// one. Gives up (kWaitFailed) on such a word or when the peer's announcement shows another op
// at or after this one (an order mismatch: recorded), when this device already failed, or
// after the time limit (recorded; with mask=true the peer is masked instead: kWaitMasked).
constexpr int kKeepWaiting = -1, kWordAhead = -2;
template <typename PollOnce>
__device__ __forceinline__ int wait_peer_or_mask(const GroupView& g, const OpContext& c, int peer,
                                                 bool mask, PollOnce poll_once) {
  unsigned long long seen = 0;
  int w = poll_once(&seen);
  if (w == kWaitOk) return w;
  if (mask && is_masked(g, peer)) return kWaitMasked;
  const unsigned long long* announce = &control_of(g, g.rank)->announce[c.parity][peer];
  const unsigned long long start = globaltimer_ns();
  for (unsigned i = 0;; ++i) {
    if (w == kWaitOk) return w;
    if (w == kWordAhead) {
      report_failure(g, c, kFailOrder, peer, seen);
      return kWaitFailed;
    }
    if (i % 256 == 255) {
      if (aborted(g)) return kWaitFailed;
      const unsigned long long a = poll(announce);
      if ((a >> kOpBits) >= c.n && a != c.tag) {
        report_failure(g, c, kFailOrder, peer, a);
        return kWaitFailed;
      }
      if (globaltimer_ns() - start > g.timeout_ns) return late_peer(g, c, peer, mask);
    }
    w = poll_once(&seen);
  }
}

// Waits until *word == c.tag: `peer` wrote it for this op.
__device__ __forceinline__ int wait_tag_or_mask(const GroupView& g, const OpContext& c,
                                                const unsigned long long* word, int peer,
                                                bool mask) {
  return wait_peer_or_mask(g, c, peer, mask, [&](unsigned long long* seen) -> int {
    *seen = poll(word);
    if (*seen == c.tag) return kWaitOk;
    return (*seen >> kOpBits) >= c.n ? kWordAhead : kKeepWaiting;
  });
}

// A 32-bit value stamped with the op that wrote it (the low 32 bits of its number) in one
// 64-bit word: the reader polls the value itself, so the writer needs no fence and no flag.
// (A stale word of an op 2^32 ops earlier on the same staging could pass for the current one.)
__device__ __forceinline__ unsigned long long stamped(const OpContext& c, unsigned value) {
  return static_cast<unsigned long long>(static_cast<unsigned>(c.n)) << 32 | value;
}
__device__ __forceinline__ int wait_stamp_or_mask(const GroupView& g, const OpContext& c,
                                                  const unsigned long long* word, int peer,
                                                  bool mask, unsigned* value) {
  return wait_peer_or_mask(g, c, peer, mask, [&](unsigned long long* seen) -> int {
    *seen = poll(word);
    if (static_cast<unsigned>(*seen >> 32) != static_cast<unsigned>(c.n)) return kKeepWaiting;
    *value = static_cast<unsigned>(*seen);
    return kWaitOk;
  });
}

__device__ __forceinline__ bool wait_tag(const GroupView& g, const OpContext& c,
                                         const unsigned long long* word, int peer) {
  return wait_tag_or_mask(g, c, word, peer, false) == kWaitOk;
}

// Before op n writes into `peer`'s staging (parity n & 1), the peer must have finished op
// n - 2, the last op that used it. Normally already true: one load.
__device__ __forceinline__ int wait_peer_done_or_mask(const GroupView& g, const OpContext& c,
                                                      int peer, bool mask) {
  if (mask && is_masked(g, peer)) return kWaitMasked;
  if (c.n <= 2) return kWaitOk;
  const unsigned long long* done = &control_of(g, g.rank)->done[peer];
  if (poll(done) >= c.n - 2) return kWaitOk;
  const unsigned long long start = globaltimer_ns();
  while (poll(done) < c.n - 2) {
    if (aborted(g)) return kWaitFailed;
    if (globaltimer_ns() - start > g.timeout_ns) return late_peer(g, c, peer, mask);
  }
  return kWaitOk;
}

__device__ __forceinline__ bool wait_peer_done(const GroupView& g, const OpContext& c, int peer) {
  return wait_peer_done_or_mask(g, c, peer, false) == kWaitOk;
}

// Announces this op to every peer (tag on this parity); run by threads 0 .. R-1 of one block
// after their wait_peer_done.
__device__ __forceinline__ void announce_op(const GroupView& g, const OpContext& c) {
  if (threadIdx.x < g.num_ranks) {
    signal(&control_of(g, threadIdx.x)->announce[c.parity][g.rank], c.tag);
  }
}

// Outputs of an op as (pointer, bytes) pairs; a failed op fills them with all-ones bytes
// (NaN for every float type, -1 for int32).
struct Poison {
  static constexpr int kMax = 10;
  void* ptr[kMax];
  size_t bytes[kMax];
  int count;
};

// Fills every output of `poison` with 0xff bytes (NaN in floats, -1 in integers); run by
// one whole block.
__device__ __forceinline__ void poison_outputs(const Poison& poison) {
  for (int i = 0; i < poison.count; ++i) {
    char* p = static_cast<char*>(poison.ptr[i]);
    const size_t n = poison.bytes[i];
    // XLA buffers are 16-byte aligned; sizes may not be.
    for (size_t j = threadIdx.x; j < n / 16; j += blockDim.x) {
      reinterpret_cast<int4*>(p)[j] = make_int4(-1, -1, -1, -1);
    }
    for (size_t j = n / 16 * 16 + threadIdx.x; j < n; j += blockDim.x) p[j] = char(0xff);
  }
}

// End of every op (of a hooked op: of its receive), run by every block. Each block checks
// that every peer announced this op (an order mismatch with a rank this one exchanged nothing
// with is caught here; masked peers are skipped with mask=true) and counts itself with one
// acquire-release atomic; the last block to count runs finalize() or, if the op failed,
// poisons the outputs, then publishes the op number (Control::epoch here, done[me] on every
// peer). The chain after the last block's work is kept short: one atomic, the control words,
// one release per peer.
template <typename Finalize>
__device__ __forceinline__ void finish_op(const GroupView& g, const OpContext& c,
                                          const Poison& poison, Finalize finalize,
                                          bool mask = false) {
  __shared__ int s_last, s_failed;
  Control* ctl = control_of(g, g.rank);
  if (threadIdx.x < g.num_ranks && !aborted(g)) {
    wait_tag_or_mask(g, c, &ctl->announce[c.parity][threadIdx.x], threadIdx.x, mask);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // Releases this block's work (its reads of the staging included: the barrier above makes
    // them thread 0's to release) and, in the last block, acquires every other block's.
    unsigned before;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;"
                 : "=r"(before)
                 : "l"(&ctl->blocks_done)
                 : "memory");
    s_last = before == gridDim.x - 1;
    s_failed = s_last && aborted(g);
  }
  __syncthreads();
  if (!s_last) return;
  if (!s_failed) {
    finalize();
  } else {
    poison_outputs(poison);
  }
  __syncthreads();
  __shared__ unsigned long long s_epoch;
  if (threadIdx.x == 0) {
    ctl->blocks_done = 0;
    ctl->finished[c.parity] = c.n;
    unsigned long long epoch = ctl->epoch;  // hooked receives may finish out of order
    while (ctl->finished[(epoch + 1) & 1] == epoch + 1) ++epoch;
    ctl->epoch = epoch;
    if (ctl->issued < c.n) ctl->issued = c.n;
    s_epoch = epoch;
  }
  __syncthreads();
  // Each release covers every block's reads of this device's staging: a peer may reuse it.
  if (threadIdx.x < g.num_ranks) signal(&control_of(g, threadIdx.x)->done[g.rank], s_epoch);
}

// End of a hooked op's send, run by every block: the last block records that op c started
// (its receive finishes it with finish_op).
__device__ __forceinline__ void finish_send(const GroupView& g, const OpContext& c) {
  __shared__ int s_last;
  Control* ctl = control_of(g, g.rank);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(&ctl->blocks_done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (s_last && threadIdx.x == 0) {
    ctl->blocks_done = 0;
    ctl->issued = c.n;
  }
}

// ---------------------------------------------------------------------------------------
// Vectors of 16 bytes: 8 x bf16 or 4 x f32, accumulated in fp32
// ---------------------------------------------------------------------------------------
template <typename T>
struct VecTraits;
template <>
struct VecTraits<__nv_bfloat16> {
  static constexpr int kElems = 8;
  __device__ __forceinline__ static void add(float* acc, const int4& v) {
    const unsigned w[4] = {static_cast<unsigned>(v.x), static_cast<unsigned>(v.y),
                           static_cast<unsigned>(v.z), static_cast<unsigned>(v.w)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      acc[2 * i] += __uint_as_float(w[i] << 16);
      acc[2 * i + 1] += __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  // acc += s * v, the product rounded before the sum (no fused multiply-add), as XLA computes
  // it: the low-latency combine equals the reference backend's bit for bit.
  __device__ __forceinline__ static void add_scaled(float* acc, const int4& v, float s) {
    const unsigned w[4] = {static_cast<unsigned>(v.x), static_cast<unsigned>(v.y),
                           static_cast<unsigned>(v.z), static_cast<unsigned>(v.w)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      acc[2 * i] = __fadd_rn(acc[2 * i], __fmul_rn(s, __uint_as_float(w[i] << 16)));
      acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], __fmul_rn(s, __uint_as_float(w[i] & 0xffff0000u)));
    }
  }
  __device__ __forceinline__ static void unpack(const int4& v, float* out) {
    const unsigned w[4] = {static_cast<unsigned>(v.x), static_cast<unsigned>(v.y),
                           static_cast<unsigned>(v.z), static_cast<unsigned>(v.w)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  __device__ __forceinline__ static int4 pack(const float* acc) {
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const unsigned lo = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * i]));
      const unsigned hi = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * i + 1]));
      w[i] = lo | (hi << 16);
    }
    return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]),
                     static_cast<int>(w[3]));
  }
};
template <>
struct VecTraits<float> {
  static constexpr int kElems = 4;
  __device__ __forceinline__ static void add(float* acc, const int4& v) {
    acc[0] += __int_as_float(v.x);
    acc[1] += __int_as_float(v.y);
    acc[2] += __int_as_float(v.z);
    acc[3] += __int_as_float(v.w);
  }
  // acc += s * v, without fused multiply-add (see the bf16 version).
  __device__ __forceinline__ static void add_scaled(float* acc, const int4& v, float s) {
    acc[0] = __fadd_rn(acc[0], __fmul_rn(s, __int_as_float(v.x)));
    acc[1] = __fadd_rn(acc[1], __fmul_rn(s, __int_as_float(v.y)));
    acc[2] = __fadd_rn(acc[2], __fmul_rn(s, __int_as_float(v.z)));
    acc[3] = __fadd_rn(acc[3], __fmul_rn(s, __int_as_float(v.w)));
  }
  __device__ __forceinline__ static void unpack(const int4& v, float* out) {
    out[0] = __int_as_float(v.x);
    out[1] = __int_as_float(v.y);
    out[2] = __int_as_float(v.z);
    out[3] = __int_as_float(v.w);
  }
  __device__ __forceinline__ static int4 pack(const float* acc) {
    return make_int4(__float_as_int(acc[0]), __float_as_int(acc[1]), __float_as_int(acc[2]),
                     __float_as_int(acc[3]));
  }
};

// Copies one row of num_vecs 16-byte vectors from src to every destination in dst_mask
// (bit i: the destination pointer held by lane i). A warp-wide call; kUnroll loads per lane
// are in flight before the stores.
template <int kUnroll, bool kSrcReadOnly>
__device__ __forceinline__ void warp_copy_row(const int4* src, int4* lane_dst, unsigned dst_mask,
                                              int num_vecs, int lane) {
  if (dst_mask == 0) return;
  for (int base = 0; base < num_vecs; base += kWarpSize * kUnroll) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kWarpSize + lane;
      if (i < num_vecs) v[u] = kSrcReadOnly ? ld_nc(src + i) : ld_staging(src + i);
    }
    for (unsigned m = dst_mask; m != 0; m &= m - 1) {
      int4* dst = reinterpret_cast<int4*>(
          __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(lane_dst), __ffs(m) - 1));
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kWarpSize + lane;
        if (i < num_vecs) dst[i] = v[u];
      }
    }
  }
}

// out = cast(bias + sum over ranks r in src_mask, ascending, of row r) in fp32. Lane r < R
// holds the pointer to rank r's staging row.
template <typename T, int kUnroll>
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
  for (int base = 0; base < num_vecs; base += kWarpSize * kUnroll) {
    int4 v[kMaxRanks][kUnroll];
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
      if ((src_mask >> r) & 1u) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int i = base + u * kWarpSize + lane;
          if (i < num_vecs) v[r][u] = ld_staging(src[r] + i);
        }
      }
    }
    float acc[kUnroll][V::kElems] = {};
    if (bias != nullptr) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kWarpSize + lane;
        if (i < num_vecs) V::add(acc[u], ld_nc(bias + i));
      }
    }
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
      if ((src_mask >> r) & 1u) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (base + u * kWarpSize + lane < num_vecs) V::add(acc[u], v[r][u]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kWarpSize + lane;
      if (i < num_vecs) out[i] = V::pack(acc[u]);
    }
  }
}

__device__ __forceinline__ void warp_zero_row(int4* dst, int num_vecs, int lane) {
  for (int i = lane; i < num_vecs; i += kWarpSize) dst[i] = make_int4(0, 0, 0, 0);
}

}  // namespace jax_ep
