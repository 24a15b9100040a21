// Checks, for every float32 bit pattern, that the low-latency kernels' FP8 cast
// (to_e4m3x4: the conversion instruction from sm_89 on) gives the bits of the documented
// arithmetic (to_e4m3: round to nearest even, saturated at +-448, NaN -> +-448), in every
// byte position. Prints "mismatches N" and, if any, the first one; exits 1 on a mismatch.
// Built and run by tests/test_gpu_fp8_cast.py.
#include <cstdio>

#include "cuda/low_latency_common.cuh"

namespace {

__global__ void compare_all(unsigned long long* mismatches, unsigned* first) {
  const unsigned long long stride = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
  for (unsigned long long i = blockIdx.x * blockDim.x + threadIdx.x; i < (1ull << 32); i += stride) {
    const float v = __uint_as_float(static_cast<unsigned>(i));
    const float w = __uint_as_float(static_cast<unsigned>(i) ^ 0x00400000u);  // another neighbour
    const unsigned want = jax_ep::to_e4m3(v) | jax_ep::to_e4m3(w) << 8 | jax_ep::to_e4m3(w) << 16 |
                          jax_ep::to_e4m3(v) << 24;
    if (jax_ep::to_e4m3x4(v, w, w, v) != want) {
      if (atomicAdd(mismatches, 1ull) == 0) *first = static_cast<unsigned>(i);
    }
  }
}

int check(cudaError_t err) {
  if (err != cudaSuccess) {
    std::printf("CUDA error: %s\n", cudaGetErrorString(err));
    return 1;
  }
  return 0;
}

}  // namespace

int main() {
  unsigned long long* mismatches;
  unsigned* first;
  if (check(cudaMallocManaged(&mismatches, sizeof(*mismatches))) ||
      check(cudaMallocManaged(&first, sizeof(*first)))) {
    return 2;
  }
  *mismatches = 0;
  *first = 0;
  compare_all<<<1024, 256>>>(mismatches, first);
  if (check(cudaGetLastError()) || check(cudaDeviceSynchronize())) return 2;
  std::printf("mismatches %llu\n", *mismatches);
  if (*mismatches != 0) {
    const unsigned i = *first;
    std::printf("first: float bits 0x%08x (%g)\n", i, static_cast<double>(*reinterpret_cast<const float*>(&i)));
    return 1;
  }
  return 0;
}
