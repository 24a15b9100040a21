// The floor under the low-latency sends: how long plain SM stores take to move B bytes from
// every GPU to every other GPU of one host over NVLink (peer access, one process), with no
// protocol around them. Each GPU's grid first meets the other GPUs' grids at a device-side
// barrier, so launch skew is not timed; a GPU's time runs from its grid leaving the barrier
// to its last block's system fence after its stores (%globaltimer); also with bulk copies
// (cp.async.bulk, TMA) from shared memory instead of stores. Printed: the median over
// iterations of the slowest GPU's time, and the GB/s each GPU sent.
//
//   nvcc -O3 -arch=sm_90 -o /tmp/nvlink_store_bench scripts/nvlink_store_bench.cu
//   /tmp/nvlink_store_bench
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(call)                                                                  \
  do {                                                                               \
    const cudaError_t err_ = (call);                                                 \
    if (err_ != cudaSuccess) {                                                       \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(err_)); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

constexpr int kMaxGpus = 8;
constexpr int kThreads = 512;
constexpr int kUnroll = 4;

struct Args {
  char* dst[kMaxGpus];          // this GPU's slice of GPU r's receive buffer (+ scales)
  unsigned* peer_flag[kMaxGpus];  // GPU r's barrier word for this GPU
  unsigned* my_flags;           // [num_gpus] barrier words written by the GPUs
  const char* src;              // bytes of local data
  unsigned long long* times;    // [grid][2]: start, end (ns)
  size_t bytes;                 // per destination
  unsigned epoch;
  int num_gpus, me;
};

__device__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// kScales: as the FP8 dispatch, every 16th lane also writes a 4-byte scale after the row
// bytes (one 8-byte write per warp-wide store of 8-byte vectors).
// Every GPU's grid meets the others: block 0 tells every GPU, every block waits for all.
__device__ void meet(const Args& a) {
  if (blockIdx.x == 0 && threadIdx.x < a.num_gpus) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(a.peer_flag[threadIdx.x]), "r"(a.epoch)
                 : "memory");
  }
  if (threadIdx.x < a.num_gpus) {
    unsigned seen = 0;
    do {
      asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(seen) : "l"(a.my_flags + threadIdx.x)
                   : "memory");
    } while (seen < a.epoch);
  }
  __syncthreads();
}

// After a block's transfers: a system fence, then its start and end times.
__device__ void record(const Args& a, unsigned long long start) {
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    a.times[2 * blockIdx.x] = start;
    a.times[2 * blockIdx.x + 1] = now_ns();
  }
}

template <typename V, bool kScales>
__global__ void __launch_bounds__(kThreads, 1) all_to_all_stores(Args a) {
  meet(a);
  const unsigned long long start = now_ns();
  // Items: one warp-wide store of 32 vectors to one destination, destinations interleaved.
  const int lane = threadIdx.x % 32, peers = a.num_gpus - 1;
  const size_t chunks = a.bytes / (32 * sizeof(V));
  const size_t items = chunks * peers;
  const size_t warp = blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
  const size_t warps = static_cast<size_t>(gridDim.x) * (kThreads / 32);
  const V* src = reinterpret_cast<const V*>(a.src);
  for (size_t base = warp; base < items; base += warps * kUnroll) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const size_t i = base + u * warps;
      if (i < items) v[u] = src[(i / peers) * 32 + lane];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const size_t i = base + u * warps;
      if (i >= items) continue;
      int d = static_cast<int>(i % peers);
      d += d >= a.me;  // skip this GPU
      reinterpret_cast<V*>(a.dst[d])[(i / peers) * 32 + lane] = v[u];
      if (kScales && lane % 16 == 0) {
        reinterpret_cast<float*>(a.dst[d] + a.bytes)[(i / peers) * 2 + lane / 16] = 1.0f;
      }
    }
  }
  record(a, start);
}

// Bulk copies (TMA) instead of stores: a warp loads kBulkBytes of an item into shared memory
// and one lane hands them to cp.async.bulk towards the peer; two buffers per warp, so the
// warp fills one while the other is in flight.
constexpr int kBulkBytes = 2048;
constexpr size_t kBulkSmem = (kThreads / 32) * 2 * kBulkBytes;
__global__ void __launch_bounds__(kThreads, 1) all_to_all_bulk(Args a) {
  extern __shared__ int4 s_buf[];  // [warp][2][kBulkBytes / 16]
  meet(a);
  const unsigned long long start = now_ns();
  constexpr int kVecs = kBulkBytes / 16;
  const int lane = threadIdx.x % 32, peers = a.num_gpus - 1;
  const size_t items = a.bytes / kBulkBytes * peers;
  const size_t warp = blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
  const size_t warps = static_cast<size_t>(gridDim.x) * (kThreads / 32);
  int4* mine = s_buf + (threadIdx.x / 32) * 2 * kVecs;
  int k = 0;
  for (size_t i = warp; i < items; i += warps, ++k) {
    int4* buf = mine + (k & 1) * kVecs;
    if (lane == 0) asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");  // buf is free
    __syncwarp();
    const size_t chunk = i / peers;
    int d = static_cast<int>(i % peers);
    d += d >= a.me;
    const int4* src = reinterpret_cast<const int4*>(a.src) + chunk * kVecs;
    int4 v[kVecs / 32];
#pragma unroll
    for (int j = 0; j < kVecs / 32; ++j) v[j] = src[j * 32 + lane];
#pragma unroll
    for (int j = 0; j < kVecs / 32; ++j) buf[j * 32 + lane] = v[j];
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // visible to the bulk copy
    __syncwarp();
    if (lane == 0) {
      const unsigned from = static_cast<unsigned>(__cvta_generic_to_shared(buf));
      asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(a.dst[d] + chunk * kBulkBytes),
                   "r"(from), "r"(kBulkBytes)
                   : "memory");
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    }
  }
  if (lane == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  __syncwarp();
  record(a, start);
}

int main() {
  int n = 0;
  CHECK(cudaGetDeviceCount(&n));
  n = std::min(n, kMaxGpus);
  if (n < 2) {
    std::printf("needs 2 GPUs or more\n");
    return 1;
  }
  const size_t max_bytes = 16u << 20;
  std::vector<char*> recv(n), src(n);
  std::vector<unsigned*> flags(n);
  std::vector<unsigned long long*> times(n);
  for (int g = 0; g < n; ++g) {
    CHECK(cudaSetDevice(g));
    for (int p = 0; p < n; ++p) {
      if (p != g) CHECK(cudaDeviceEnablePeerAccess(p, 0));
    }
    CHECK(cudaMalloc(&recv[g], 2 * max_bytes * n));
    CHECK(cudaMalloc(&src[g], max_bytes));
    CHECK(cudaMemset(src[g], g + 1, max_bytes));
    CHECK(cudaMalloc(&flags[g], kMaxGpus * sizeof(unsigned)));
    CHECK(cudaMemset(flags[g], 0, kMaxGpus * sizeof(unsigned)));
    CHECK(cudaMalloc(&times[g], 2 * 1024 * sizeof(unsigned long long)));
    CHECK(cudaFuncSetAttribute(all_to_all_bulk, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(kBulkSmem)));
  }
  std::printf("GPUs %d, %d threads per block; time = slowest GPU, median of 20 iterations\n", n,
              kThreads);
  std::printf("%10s %6s %6s %10s %12s   (vec 9: 8-byte vectors + FP8-like scales; 0: bulk copies of 2 KB)\n", "bytes/peer", "vec",
              "SMs", "us", "GB/s out");
  unsigned epoch = 0;
  const size_t sizes[] = {300u << 10, 860u << 10, 1700u << 10, 16u << 20};
  const int grids[] = {32, 64, 96, 132};
  for (size_t bytes : sizes) {
    for (int vec : {8, 9, 16, 0}) {  // 9: 8-byte vectors and the scales; 0: bulk copies
      for (int grid : grids) {
        std::vector<double> worst;
        for (int it = 0; it < 23; ++it) {
          ++epoch;
          for (int g = 0; g < n; ++g) {
            CHECK(cudaSetDevice(g));
            Args a{};
            for (int p = 0; p < n; ++p) {
              a.dst[p] = recv[p] + 2 * bytes * g;
              a.peer_flag[p] = flags[p] + g;
            }
            a.my_flags = flags[g];
            a.src = src[g];
            a.times = times[g];
            a.bytes = bytes;
            a.epoch = epoch;
            a.num_gpus = n;
            a.me = g;
            if (vec == 8) {
              all_to_all_stores<uint2, false><<<grid, kThreads>>>(a);
            } else if (vec == 9) {
              all_to_all_stores<uint2, true><<<grid, kThreads>>>(a);
            } else if (vec == 16) {
              all_to_all_stores<int4, false><<<grid, kThreads>>>(a);
            } else {
              all_to_all_bulk<<<grid, kThreads, kBulkSmem>>>(a);
            }
            CHECK(cudaGetLastError());
          }
          double slowest = 0;
          for (int g = 0; g < n; ++g) {
            CHECK(cudaSetDevice(g));
            CHECK(cudaDeviceSynchronize());
            std::vector<unsigned long long> t(2 * grid);
            CHECK(cudaMemcpy(t.data(), times[g], t.size() * sizeof(t[0]), cudaMemcpyDeviceToHost));
            unsigned long long lo = ~0ull, hi = 0;
            for (int b = 0; b < grid; ++b) {
              lo = std::min(lo, t[2 * b]);
              hi = std::max(hi, t[2 * b + 1]);
            }
            slowest = std::max(slowest, (hi - lo) * 1e-3);
          }
          if (it >= 3) worst.push_back(slowest);
        }
        std::sort(worst.begin(), worst.end());
        const double us = worst[worst.size() / 2];
        std::printf("%10zu %6d %6d %10.1f %12.1f\n", bytes, vec, grid, us,
                    bytes * (n - 1) / us * 1e-3);
      }
    }
  }
  return 0;
}
