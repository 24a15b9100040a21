// The transport seam: how a kernel reaches the region of another EP rank and signals it.
// Every remote access of the kernels goes through these few functions, so a new transport
// (NVSHMEM put-with-signal for the internode modes) replaces this file's bodies, not the
// kernels.
//
// PeerTransport (today): every region of the group is mapped into this device's address
// space (peer access inside one process, CUDA IPC between processes of one host), so a
// remote write is a plain store over NVLink and a signal is a system-scope release store.
#pragma once

#include <cstddef>

#include "cuda/region.h"

namespace jax_ep {

struct PeerTransport {
  char* base[kMaxRanks];  // region of each EP rank, as seen from this device
};

#ifdef __CUDACC__
// Address of byte `offset` of `rank`'s region (stores to it travel over NVLink).
__device__ __forceinline__ char* remote(const PeerTransport& t, int rank, size_t offset) {
  return t.base[rank] + offset;
}

// Makes every earlier write of this thread visible to `word`'s reader, then sets it.
__device__ __forceinline__ void signal(unsigned long long* word, unsigned long long value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(word), "l"(value) : "memory");
}

// Reads a word that a peer sets with signal(); later reads see what the peer wrote before.
__device__ __forceinline__ unsigned long long poll(const unsigned long long* word) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(word) : "memory");
  return v;
}
#endif

}  // namespace jax_ep
