// Device helpers shared by the kernels: system-scope flag loads/stores, the peer barrier
// with epochs and a %globaltimer time limit, the error record, 16-byte vector copies and
// bf16/f32 vector arithmetic in fp32.
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
  return reinterpret_cast<Control*>(g.base[rank]);
}
__device__ __forceinline__ Scratch* scratch_of(const GroupView& g) {
  return reinterpret_cast<Scratch*>(g.base[g.rank] + g.layout.scratch);
}
// Row `row` of the staging block that `source` fills on `owner`'s device.
__device__ __forceinline__ char* dispatch_row(const GroupView& g, int owner, int source,
                                              int row) {
  return g.base[owner] + g.layout.dispatch +
         (static_cast<size_t>(source) * g.max_tokens + row) * g.layout.dispatch_row_bytes;
}
__device__ __forceinline__ char* combine_row(const GroupView& g, int owner, int holder,
                                             int row) {
  return g.base[owner] + g.layout.combine +
         (static_cast<size_t>(holder) * g.max_tokens + row) * g.layout.combine_row_bytes;
}
__device__ __forceinline__ unsigned long long* row_flag(char* row) {
  return reinterpret_cast<unsigned long long*>(row);
}

// ---------------------------------------------------------------------------------------
// Memory-model primitives
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ unsigned long long globaltimer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ unsigned long long ld_acquire_sys(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ int ld_volatile(const int* p) {
  return *reinterpret_cast<const volatile int*>(p);
}
__device__ __forceinline__ unsigned long long ld_volatile(const unsigned long long* p) {
  return *reinterpret_cast<const volatile unsigned long long*>(p);
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
// Timeouts and the error record
// ---------------------------------------------------------------------------------------
// First timeout on this device wins: it sets abort (which makes every other waiter on this
// device give up at once) and fills the host-mapped record.
__device__ __forceinline__ void report_timeout(const GroupView& g, int op, int waited_rank) {
  Control* ctl = control_of(g, g.rank);
  if (atomicCAS(&ctl->abort, 0, 1) == 0) {
    g.error->op = op;
    g.error->waited_rank = waited_rank;
    __threadfence_system();
    g.error->flag = 1;
    __threadfence_system();
  }
}

__device__ __forceinline__ bool aborted(const GroupView& g) {
  return ld_volatile(&control_of(g, g.rank)->abort) != 0;
}

// Spins until *flag >= target (acquire, system scope). Returns false if this device already
// gave up or the time limit passed (then the timeout is recorded against waited_rank).
__device__ __forceinline__ bool wait_flag(const GroupView& g, const unsigned long long* flag,
                                          unsigned long long target, int op, int waited_rank) {
  if (ld_acquire_sys(flag) >= target) return true;
  const unsigned long long start = globaltimer_ns();
  const int* abort_word = &control_of(g, g.rank)->abort;
  while (ld_acquire_sys(flag) < target) {
    if (ld_volatile(abort_word) != 0) return false;
    if (globaltimer_ns() - start > g.timeout_ns) {
      report_timeout(g, op, waited_rank);
      return false;
    }
  }
  return true;
}

// The epoch of the running operation, published by its first kernel.
__device__ __forceinline__ unsigned long long current_epoch(const GroupView& g) {
  return ld_volatile(&control_of(g, g.rank)->epoch);
}

// Barrier over the group, run by the first num_ranks threads of one block: thread p tells
// rank p that this rank reached `epoch`, then waits until rank p did the same. Writes made
// by this block before the call are visible to every peer once the barrier completes.
// Returns false (on every thread of the block) if some rank did not arrive in time.
__device__ __forceinline__ bool peer_barrier(const GroupView& g, unsigned long long epoch,
                                             int op) {
  __shared__ int s_aborted, s_failed;
  if (threadIdx.x == 0) {
    s_aborted = aborted(g) ? 1 : 0;
    s_failed = 0;
  }
  __threadfence_system();
  __syncthreads();
  if (s_aborted) return false;
  const int p = threadIdx.x;
  if (p < g.num_ranks) {
    st_release_sys(&control_of(g, p)->signal[g.rank], epoch);
    if (!wait_flag(g, &control_of(g, g.rank)->signal[p], epoch, op, p)) s_failed = 1;
  }
  __syncthreads();
  return s_failed == 0;
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

__device__ __forceinline__ void warp_zero_row(int4* dst, int num_vecs, int lane) {
  for (int i = lane; i < num_vecs; i += kWarpSize) dst[i] = make_int4(0, 0, 0, 0);
}

}  // namespace jax_ep
