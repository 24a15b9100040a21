// Device helpers of the low-latency (decode) kernels, shared by the intranode kernels
// (cuda/low_latency.cu) and the internode ones over NVSHMEM (cuda/internode_low_latency.cu):
// dealing tokens over the grid, cutting rows into pieces of whole warp-wide steps, the
// positions of a rank's tokens per expert (a bit table in shared memory), the FP8 cast (e4m3,
// one float32 scale per 128 channels) and the weighted sum of a token's expert rows.
#pragma once

#include <cuda_fp8.h>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace jax_ep {

constexpr int kFp8Block = 128;  // channels per FP8 scale
constexpr float kFp8Max = 448.0f;
constexpr float kMinAmax = 1e-4f;
constexpr int kFp8Unroll = 2;  // FP8 cast: warp-wide steps in flight
constexpr int kSumUnroll = 2;  // weighted sum: warp-wide steps in flight
constexpr int kSumBatch = 4;   // weighted sum: rows whose loads are in flight together

// Dynamic shared memory of count_positions (bytes): a block's positions [ceil(T / blocks) * K]
// and the bit table [E][ceil(T / 32)].
inline size_t count_positions_smem(int num_tokens, int num_topk, int num_experts, int num_blocks) {
  const size_t per_block = (num_tokens + num_blocks - 1) / num_blocks;
  const size_t words = (num_tokens + kWarpSize - 1) / kWarpSize;
  return (per_block * num_topk + static_cast<size_t>(num_experts) * words) * sizeof(int);
}

// Items of this block when n items are dealt round-robin over the grid: item i of the block
// is blockIdx.x + i * gridDim.x.
__device__ __forceinline__ int block_items(int n) {
  return (n - static_cast<int>(blockIdx.x) + static_cast<int>(gridDim.x) - 1) /
         static_cast<int>(gridDim.x);
}

// A row of num_vecs 16-byte vectors is cut into `pieces` pieces of whole warp-wide steps
// (32 vectors: whole FP8 groups), so several warps can work on one row. Piece p covers
// vectors [*begin, *end).
__device__ __forceinline__ int row_pieces(int num_vecs, int items, int warps) {
  const int steps = (num_vecs + kWarpSize - 1) / kWarpSize;
  return max(1, min(steps, warps / max(items, 1)));
}
__device__ __forceinline__ void piece_range(int num_vecs, int pieces, int p, int* begin, int* end) {
  const int steps = (num_vecs + kWarpSize - 1) / kWarpSize;
  *begin = p * steps / pieces * kWarpSize;
  *end = min((p + 1) * steps / pieces * kWarpSize, num_vecs);
}

// Positions of this block's tokens (t = blockIdx.x + j * gridDim.x): s_pos[j * K + k] = the
// number of this rank's tokens before t that select expert topk_idx[t, k] (-1 for an empty
// or out-of-range slot; a repeated expert's slots share one position). Block 0 also gets
// s_total[e] = this rank's tokens that select expert e. s_sel: [E][ceil(T / 32)] words, bit
// i of word w of expert e set when token 32 w + i selects e; a position is a population
// count of the bits before the token's.
__device__ __forceinline__ void count_positions(const LowLatencyDispatchArgs& a, int* s_pos,
                                                int* s_total, unsigned* s_sel) {
  const int num_experts = a.num_experts, num_topk = a.num_topk, num_tokens = a.num_tokens;
  const int words = (num_tokens + kWarpSize - 1) / kWarpSize;
  for (int i = threadIdx.x; i < num_experts * words; i += blockDim.x) s_sel[i] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < num_tokens * num_topk; i += blockDim.x) {
    const int e = __ldg(&a.topk_idx[i]), t = i / num_topk;
    if (e >= 0 && e < num_experts) atomicOr(&s_sel[e * words + t / kWarpSize], 1u << (t % kWarpSize));
  }
  __syncthreads();
  const int my_tokens = block_items(num_tokens);
  for (int i = threadIdx.x; i < my_tokens * num_topk; i += blockDim.x) {
    const int t = blockIdx.x + i / num_topk * gridDim.x;
    const int e = __ldg(&a.topk_idx[at(t, num_topk, i % num_topk)]);
    int pos = -1;
    if (e >= 0 && e < num_experts) {
      const unsigned* bits = s_sel + e * words;
      pos = __popc(bits[t / kWarpSize] & ((1u << (t % kWarpSize)) - 1u));
      for (int w = 0; w < t / kWarpSize; ++w) pos += __popc(bits[w]);
    }
    s_pos[i] = pos;
  }
  if (blockIdx.x == 0) {
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
      int total = 0;
      for (int w = 0; w < words; ++w) total += __popc(s_sel[e * words + w]);
      s_total[e] = total;
    }
  }
  __syncthreads();
}

// Where each source's rows of each local expert start in the expert-major output, run by
// one whole block: s_base[s * L + e] = the rows of local expert e from the sources before s,
// where count(s, e) gives source s's rows of expert e (0 for a source that sent nothing);
// block 0 also writes recv_count[e] = all the rows of expert e.
template <typename Count>
__device__ __forceinline__ void expert_row_bases(int num_ranks, int num_local, Count count,
                                                 int* s_base, int* recv_count) {
  for (int e = threadIdx.x; e < num_local; e += blockDim.x) {
    int running = 0;
    for (int s = 0; s < num_ranks; ++s) {
      s_base[s * num_local + e] = running;
      running += count(s, e);
    }
    if (blockIdx.x == 0) recv_count[e] = running;
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

// Four floats -> their to_e4m3 bytes, a in the low byte. From sm_89 on, the conversion
// instruction (round to nearest even, saturated at +-448) gives to_e4m3's bits for every
// number; only NaN differs (NaN there, +-448 here), so NaN is replaced first.
__device__ __forceinline__ unsigned to_e4m3x4(float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  auto finite = [](float v) { return v != v ? copysignf(kFp8Max, v) : v; };
  const unsigned lo = __nv_cvt_float2_to_fp8x2(make_float2(finite(a), finite(b)), __NV_SATFINITE, __NV_E4M3);
  const unsigned hi = __nv_cvt_float2_to_fp8x2(make_float2(finite(c), finite(d)), __NV_SATFINITE, __NV_E4M3);
  return lo | hi << 16;
#else
  return to_e4m3(a) | to_e4m3(b) << 8 | to_e4m3(c) << 16 | to_e4m3(d) << 24;
#endif
}

__device__ __forceinline__ float fp8_scale(float amax, bool round_scale) {
  // A product with the rounded reciprocal, as XLA computes amax / 448 (the reference).
  const float scale = fmaxf(amax, kMinAmax) * (1.0f / kFp8Max);
  if (!round_scale) return scale;
  int exponent;  // scale = m * 2^exponent, m in [0.5, 1): round up to a power of two
  const float m = frexpf(scale, &exponent);
  return ldexpf(1.0f, m == 0.5f ? exponent - 1 : exponent);
}

// Writes vectors [begin, end) of row src (16-byte vectors of T; begin a multiple of 32) to
// the destinations in dst_mask (lane i holds destination i's data pointer), cast to FP8
// with one scale per 128 channels (lane i's scales pointer). A warp-wide call; every lane
// reads each source vector once, kFp8Unroll warp-wide steps in flight.
template <typename T>
__device__ __forceinline__ void warp_send_fp8_row(const int4* src, char* lane_data,
                                                  float* lane_scales, unsigned dst_mask,
                                                  int begin, int end, bool round_scale,
                                                  int lane) {
  using V = VecTraits<T>;
  using F = Fp8Traits<T>;
  constexpr int kOut = F::kVecChannels;  // FP8 bytes per vector: 8 (bf16) or 4 (f32)
  for (int base = begin; base < end; base += kWarpSize * kFp8Unroll) {
    int4 raw[kFp8Unroll];
#pragma unroll
    for (int u = 0; u < kFp8Unroll; ++u) {
      const int i = base + u * kWarpSize + lane;
      if (i < end) raw[u] = ld_nc(src + i);
    }
    unsigned packed[kFp8Unroll][kOut / 4];
    float scale[kFp8Unroll];
#pragma unroll
    for (int u = 0; u < kFp8Unroll; ++u) {
      const int i = base + u * kWarpSize + lane;
      float v[kOut];
      float amax = 0.0f;
      if (i < end) {
        V::unpack(raw[u], v);
#pragma unroll
        for (int j = 0; j < kOut; ++j) amax = fmaxf(amax, fabsf(v[j]));
      }
#pragma unroll
      for (int offset = F::kGroupLanes / 2; offset > 0; offset /= 2) {
        amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, offset));
      }
      scale[u] = fp8_scale(amax, round_scale);
#pragma unroll
      for (int j = 0; j < kOut / 4; ++j) {
        packed[u][j] = i < end ? to_e4m3x4(v[4 * j] / scale[u], v[4 * j + 1] / scale[u],
                                           v[4 * j + 2] / scale[u], v[4 * j + 3] / scale[u])
                               : 0u;
      }
    }
    for (unsigned m = dst_mask; m != 0; m &= m - 1) {
      const int d = __ffs(m) - 1;
      char* data = reinterpret_cast<char*>(
          __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(lane_data), d));
      float* scales = reinterpret_cast<float*>(
          __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(lane_scales), d));
#pragma unroll
      for (int u = 0; u < kFp8Unroll; ++u) {
        const int i = base + u * kWarpSize + lane;
        if (i >= end) continue;
        if constexpr (kOut == 8) {
          reinterpret_cast<uint2*>(data)[i] = make_uint2(packed[u][0], packed[u][1]);
        } else {
          reinterpret_cast<unsigned*>(data)[i] = packed[u][0];
        }
        if (lane % F::kGroupLanes == 0) scales[i / F::kGroupLanes] = scale[u];
      }
    }
  }
}

// dst[i] = cast(sum over the slots in src_mask, in lane (= slot) order, of lane_w *
// x[lane_row][i]) in fp32, for vectors i in [begin, end) of rows of num_vecs vectors. The
// loads of up to kSumBatch rows are in flight together.
template <typename T>
__device__ __forceinline__ void warp_weighted_sum(const int4* x, int lane_row, float lane_w,
                                                  unsigned src_mask, int4* dst, int begin,
                                                  int end, int num_vecs, int lane) {
  using V = VecTraits<T>;
  for (int base = begin; base < end; base += kWarpSize * kSumUnroll) {
    float acc[kSumUnroll][V::kElems] = {};
    for (unsigned m = src_mask; m != 0;) {
      int4 v[kSumBatch][kSumUnroll];
      float w[kSumBatch];
      unsigned batch = 0;
#pragma unroll
      for (int q = 0; q < kSumBatch; ++q) {
        if (m == 0) break;
        const int k = __ffs(m) - 1;
        m &= m - 1;
        batch |= 1u << q;
        const int4* src = x + static_cast<size_t>(__shfl_sync(kFullMask, lane_row, k)) * num_vecs;
        w[q] = __shfl_sync(kFullMask, lane_w, k);
#pragma unroll
        for (int u = 0; u < kSumUnroll; ++u) {
          const int i = base + u * kWarpSize + lane;
          if (i < end) v[q][u] = ld_nc(src + i);
        }
      }
#pragma unroll
      for (int q = 0; q < kSumBatch; ++q) {
        if ((batch >> q) & 1u) {
#pragma unroll
          for (int u = 0; u < kSumUnroll; ++u) {
            if (base + u * kWarpSize + lane < end) V::add_scaled(acc[u], v[q][u], w[q]);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kSumUnroll; ++u) {
      const int i = base + u * kWarpSize + lane;
      if (i < end) dst[i] = V::pack(acc[u]);
    }
  }
}

// recv_scales[row] = scales (num_scales floats, read once) for every row of recv_x in
// dst_mask (bit i: the row held by lane i in lane_row). A warp-wide call.
__device__ __forceinline__ void warp_copy_scales(const float* scales, float* recv_scales,
                                                 int num_scales, int lane_row, unsigned dst_mask,
                                                 int lane) {
  for (int j0 = 0; j0 < num_scales; j0 += kWarpSize) {
    const int j = j0 + lane;
    const float v = j < num_scales ? ld_staging(scales + j) : 0.0f;
    for (unsigned d = dst_mask; d != 0; d &= d - 1) {
      const int r = __shfl_sync(kFullMask, lane_row, __ffs(d) - 1);
      if (j < num_scales) recv_scales[at(r, num_scales, j)] = v;
    }
  }
}

// The row of x this rank holds for slot k of source s's token t (row_of_slot), or -1 when
// it holds none (or the index is past x's rows).
__device__ __forceinline__ int slot_row(const LowLatencyCombineArgs& a, int s, int t, int k, int rows) {
  const int row = __ldg(&a.row_of_slot[at(s * a.max_tokens_per_rank + t, a.num_topk, k)]);
  return row < rows ? row : -1;
}

// The outputs of a low-latency dispatch on `num_ranks` ranks, which a failed op fills with
// all-ones bytes: recv_x, recv_scales (FP8), recv_count, row_of_slot.
inline Poison dispatch_outputs(int num_ranks, const LowLatencyDispatchArgs& a) {
  const size_t rows = static_cast<size_t>(a.num_experts / num_ranks) * num_ranks *
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
  add(a.recv_count, static_cast<size_t>(a.num_experts / num_ranks) * sizeof(int));
  add(a.row_of_slot, static_cast<size_t>(num_ranks) * a.max_tokens_per_rank * a.num_topk * sizeof(int));
  return p;
}

}  // namespace jax_ep
