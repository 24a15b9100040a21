// Low-latency (decode) dispatch and combine for internode Buffers (one process per GPU,
// nodes of G = ranks_per_node consecutive EP ranks), over NVSHMEM. Plain C++ (host and
// device): the runtime (cuda/nvshmem_runtime.cc) sizes and allocates the symmetric staging,
// the handlers (ffi/internode_low_latency.cc) fill the intranode argument structs
// (LowLatencyDispatchArgs / LowLatencyCombineArgs of cuda/kernels.h: same operands, same
// outputs), the kernels (cuda/internode_low_latency.cu) run the ops.
//
// Transport: a rank of this node is reached with plain stores through its nvshmem_ptr mapping
// and a release store of the row's signal word; a rank of another node only through NVSHMEM's
// portable device API (put with signal from a local symmetric staging row, signal ops, quiet),
// so the same code runs over IBGDA / IBRC between hosts and over P2P between virtual nodes.
//
// Protocol: the ops share the internode op numbers (InternodeControl: issued, done, abort;
// tags n << kOpBits | code), so an order mismatch with another low-latency op is caught by the
// tag of a shared signal word. Staging that peers write is double-buffered by the parity of n:
// before op n writes into rank r's staging it waits until r finished op n - 2 (done[r]).
// Masked ranks (mask=True) are neither waited for nor written to.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "cuda/internode.h"
#include "cuda/kernels.h"

namespace jax_ep {

// Byte offsets in the low-latency symmetric area (the same on every PE). M = the Buffer's
// low-latency cap on tokens per rank (InternodeGroup::ll_max_tokens), K = max_topk,
// L = num_experts / R, W = ceil(M / 32).
//   announce   u64 [2][R]: [p][s] tag of source s's op of parity p: its dispatch counts or its
//              combine weights arrived (both ops signal this word: a mismatch shows)
//   row_sig    u64 [2][R][M]: [p][s][t] tag of the row of (source s, token t): a dispatch row
//              from source s, or a combine row from holder s for this rank's token t
//   counts     int [2][R][count_stride]: [p][s] = s's [tokens per local expert of this rank (L)
//              | bit per token it sends here (W words)]
//   count_send int [R][count_stride]: this rank's count row for each rank (source of its puts)
//   weights    float [2][R][M][K]: [p][s] source s's top-k weights (combine)
//   weight_send float [M][K]: this rank's top-k weights (source of its puts)
//   recv       [2][R][M] rows of row_bytes: [p][s][t] dispatch row of source s's token t, or
//              combine row of holder s for token t
//   send       [(R - G) * M] rows, this rank's sources of puts: dispatch: row t = token t (if
//              a rank of another node holds one of its experts); combine: [remote source][M],
//              the sums for the tokens of the ranks of other nodes (remote source: the rank's
//              index among the R - G ranks outside this node)
struct InternodeLowLatencyLayout {
  size_t announce, row_sig, counts, count_send, weights, weight_send, recv, send, total;
  // A dispatch row: global expert of each top-k slot [K] (-1: none), the token's position among
  // the source's tokens for it [K], the FP8 scales, then the data (128-byte aligned). A combine
  // row is the data alone.
  size_t row_bytes, row_positions, row_scales, row_data;
  int count_stride;  // L + W
  int max_tokens;    // M
};

InternodeLowLatencyLayout make_internode_low_latency_layout(int num_ranks, int ranks_per_node,
                                                            int max_tokens, int hidden,
                                                            int max_topk, int num_experts);

// The low-latency area of a group: this rank's, and those of the ranks of its node.
struct InternodeLowLatencyView {
  char* base;
  char* nvl_base[kMaxNvlRanks];  // the area of the rank of this node at local index g
  InternodeLowLatencyLayout layout;
};

// The op (phases = kPhaseBoth), or its send or receive half (a hooked op: the send writes
// [n, op code] into a.pending, the receive checks it), on `stream`. With a.mask, a rank that
// does not answer in time is masked (InternodeControl::masked) instead of failing the op.
cudaError_t launch_internode_low_latency_dispatch(const InternodeView& v,
                                                  const InternodeLowLatencyView& ll,
                                                  const LowLatencyDispatchArgs& a, int phases,
                                                  cudaStream_t stream);
cudaError_t launch_internode_low_latency_combine(const InternodeView& v,
                                                 const InternodeLowLatencyView& ll,
                                                 const LowLatencyCombineArgs& a, int phases,
                                                 cudaStream_t stream);
// Bytes of dynamic shared memory a dispatch send needs (count_positions_smem of
// cuda/low_latency_common.cuh); the handler refuses more than kMaxLowLatencyDispatchSmem.
size_t internode_low_latency_dispatch_smem(int num_tokens, int num_topk, int num_experts,
                                           int num_blocks);

}  // namespace jax_ep
