// The device side of the internode ops' protocol (cuda/internode.h), shared by the normal
// kernels (cuda/internode.cu) and the low-latency ones (cuda/internode_low_latency.cu): the
// op a kernel belongs to, its tag, the sticky failure record, and the wait for a peer's tag
// with the time limit. Device code of the relocatable-device-code module jax_ep._nvshmem.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/internode.h"

namespace jax_ep {
namespace internode {

using u64 = unsigned long long;

__device__ __forceinline__ InternodeControl* ctrl(const InternodeView& v) {
  return reinterpret_cast<InternodeControl*>(v.base);
}
// NVSHMEM's signal words are uint64_t; ours are unsigned long long.
__device__ __forceinline__ uint64_t* sig(u64* word) { return reinterpret_cast<uint64_t*>(word); }

struct Op {
  u64 n;       // the op's number on this rank
  u64 tag;     // make_tag(n, code): every signal and row header of the op carries it
  int parity;  // n & 1: the staging half of double-buffered ops
  int code;    // OpCode
};
// The op the running kernels belong to: the one after the last finished here.
__device__ __forceinline__ Op current_op(const InternodeView& v, int code) {
  Op op;
  op.n = ld_volatile(&ctrl(v)->issued) + 1;
  op.tag = make_tag(op.n, code);
  op.parity = static_cast<int>(op.n & 1);
  op.code = code;
  return op;
}
__device__ __forceinline__ bool aborted(const InternodeView& v) {
  return ld_volatile(&ctrl(v)->abort) != 0;
}
// The first failure on this rank fills the host-mapped record and sets abort: every later
// wait of the op gives up at once and its last kernel poisons the outputs.
// (Pointers, not the view: a reference to a kernel parameter in a call that is not inlined
// would copy the whole view to every thread's stack.)
static __device__ __noinline__ void record_failure(InternodeControl* control, ErrorRecord* error,
                                                   u64 op_number, int code, int kind, int peer,
                                                   u64 seen) {
  if (atomicCAS(&control->abort, 0, 1) != 0) return;
  error->kind = kind;
  error->op = code;
  error->peer = peer;
  error->op_number = op_number;
  error->seen_tag = seen;
  __threadfence_system();
  error->flag = 1;
}
__device__ __forceinline__ void fail(const InternodeView& v, const Op& op, int kind, int peer, u64 seen) {
  record_failure(ctrl(v), v.error, op.n, op.code, kind, peer, seen);
}
// Waits until *word (set by `peer` with a store or a put's signal) holds this op's tag. A tag
// of this op number or a later one with another code is an order mismatch.
__device__ __forceinline__ bool wait_tag(const InternodeView& v, const Op& op, const u64* word, int peer) {
  u64 x = poll(word);
  if (x == op.tag) return true;
  const u64 start = globaltimer_ns();
  for (unsigned i = 0;; ++i) {
    if (x == op.tag) return true;
    if ((x >> kOpBits) >= op.n) {
      fail(v, op, kFailOrder, peer, x);
      return false;
    }
    if (i % 128 == 127) {
      if (aborted(v)) return false;
      if (globaltimer_ns() - start > v.timeout_ns) {
        fail(v, op, kFailTimeout, peer, x);
        return false;
      }
    }
    x = poll(word);
  }
}

}  // namespace internode
}  // namespace jax_ep
