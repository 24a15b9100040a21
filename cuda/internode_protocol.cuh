// The device side of the internode ops' protocol (cuda/internode.h), shared by the normal
// kernels (cuda/internode.cu) and the low-latency ones (cuda/internode_low_latency.cu): the
// op a kernel belongs to, its tag, the sticky failure record, the peers masked by low-latency
// ops with mask=True, and the wait for a peer's tag with the time limit. Device code of the
// relocatable-device-code module jax_ep._nvshmem.
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
// Whether `peer` is masked on this rank (low-latency ops with mask=True skip it).
__device__ __forceinline__ bool is_masked(const InternodeView& v, int peer) {
  return (ld_volatile(&ctrl(v)->masked) >> peer) & 1;
}
// Masks `peer` on this rank (it did not answer within the time limit): later waits for it
// return kWaitMasked at once and nothing is sent to it. The first masking is recorded with its
// op for the host. (Pointers, not the view: see record_failure.)
static __device__ __noinline__ void mask_peer(InternodeControl* control, ErrorRecord* error,
                                              u64 op_number, int code, int peer) {
  const u64 bit = 1ull << peer;
  const u64 old = atomicOr(&control->masked, bit);
  if (old & bit) return;
  if (old == 0) {
    error->mask_op = code;
    error->mask_op_number = op_number;
  }
  __threadfence_system();
  error->masked[peer] = 1;
}
// A peer that is too late: masked (mask=true) or a recorded failure.
__device__ __forceinline__ int late_peer(const InternodeView& v, const Op& op, int peer, bool mask,
                                         u64 seen) {
  if (mask) {
    mask_peer(ctrl(v), v.error, op.n, op.code, peer);
    return kWaitMasked;
  }
  fail(v, op, kFailTimeout, peer, seen);
  return kWaitFailed;
}
// Waits for `peer`'s part of op: poll_once(&seen) returns kWaitOk once it arrived,
// kKeepWaiting, or kWordAhead when the word it polled (seen) shows a later op (an order
// mismatch: recorded). Gives up (kWaitFailed) when this rank failed, and after the time limit
// (recorded; with mask=true the peer is masked instead: kWaitMasked). With mask=true a masked
// peer is not polled at all (kWaitMasked: masking is for good), and a wait stops as soon as
// another thread masks its peer.
template <typename PollOnce>
__device__ __forceinline__ int wait_peer_or_mask(const InternodeView& v, const Op& op, int peer,
                                                 bool mask, PollOnce poll_once) {
  if (mask && is_masked(v, peer)) return kWaitMasked;
  u64 seen = 0;
  int w = poll_once(&seen);
  if (w == kWaitOk) return w;
  const u64 start = globaltimer_ns();
  for (unsigned i = 0;; ++i) {
    if (w == kWaitOk) return w;
    if (w == kWordAhead) {
      fail(v, op, kFailOrder, peer, seen);
      return kWaitFailed;
    }
    if (i % 128 == 127) {
      if (aborted(v)) return kWaitFailed;
      if (mask && is_masked(v, peer)) return kWaitMasked;
      if (globaltimer_ns() - start > v.timeout_ns) return late_peer(v, op, peer, mask, seen);
    }
    w = poll_once(&seen);
  }
}
// Waits until *word (set by `peer` with a store or a put's signal) holds this op's tag. A tag
// of this op number or a later one with another code is an order mismatch.
__device__ __forceinline__ int wait_tag_or_mask(const InternodeView& v, const Op& op, const u64* word,
                                                int peer, bool mask) {
  return wait_peer_or_mask(v, op, peer, mask, [&](u64* seen) -> int {
    *seen = poll(word);
    if (*seen == op.tag) return kWaitOk;
    return (*seen >> kOpBits) >= op.n ? kWordAhead : kKeepWaiting;
  });
}
__device__ __forceinline__ bool wait_tag(const InternodeView& v, const Op& op, const u64* word, int peer) {
  return wait_tag_or_mask(v, op, word, peer, false) == kWaitOk;
}

}  // namespace internode
}  // namespace jax_ep
