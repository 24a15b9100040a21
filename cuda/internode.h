// Internode mode: hierarchical dispatch / combine between nodes over NVSHMEM (RDMA, or
// NVLink P2P between the "virtual nodes" of one host) and inside a node over NVLink.
// Plain C++ (host and device): the runtime (cuda/nvshmem_runtime.cc) sizes the symmetric
// region, the handlers (ffi/internode.cc) fill the argument structs, the kernels
// (cuda/internode.cu, compiled with relocatable device code against NVSHMEM) run the ops.
//
// Ranks: EP rank r sits on node r / G at local index r % G (G = ranks per node, N = R / G
// nodes). A token of rank s = (m, l) that goes to node n crosses the network once, to the
// *forwarder* (n, l): the rank of node n with s's local index. The forwarder copies it over
// NVLink to every rank of node n that needs it. Combine goes back the same way: the holders
// of node n send their values over NVLink to the forwarder, which sums them in fp32 (in
// ascending local rank) and sends one partial sum per (token, node), cast to the combine's
// dtype, over the network; the source adds bias and the nodes' partials in ascending node
// order, in fp32.
//
// Every op is a few kernels on XLA's stream, none of which waits for a later one of its own
// rank, so they cannot deadlock; the phases of one kernel (forward, then receive) wait only
// for earlier phases:
//   dispatch / cached dispatch: plan (2 kernels: tile counts, positions), send (counts to
//     every rank; rows packed per destination node and put with a signal per chunk), then
//     one kernel: forward (rows of the node's sources to their destinations over NVLink, a
//     tag in each row's header), receive (rows into the outputs in DeepEP's order).
//   combine: plan (from the handle's send_pos), one kernel: send (routing metadata to the
//     forwarders; holders' values to the forwarders over NVLink), forward (partial sums, put
//     with a signal per chunk); then reduce.
// Hooked (SM-free) ops run the same kernels as two launches: dispatch's send half is plan +
// send, its receive half forward + receive; combine's send half is plan + send + forward (the
// network leg), its receive half reduce. Between the halves the rows are in flight (put by the
// NIC, or already written on one host) and no kernel of the op waits on any SM. The send half
// writes the op's number and code into `pending` (int32 [2]); the receive half checks it.
// Protocol: ops are numbered per rank (InternodeControl::issued); the tag n << 3 | op code
// marks every signal and row header of op n, so a rank that runs ops in another order than
// its peers is detected. Staging is single-buffered: before op n writes to any peer it waits
// until every rank finished op n - 1 (done[r] >= n - 1; a rank publishes done = n to every
// rank when its op n ends). A wait that passes the time limit records the failure
// (ErrorRecord) and the op's outputs are filled with all-ones bytes; a low-latency op with
// mask=True masks the peer instead (InternodeControl::masked, cuda/internode_low_latency.h).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "cuda/region.h"

namespace jax_ep {

constexpr int kMaxInternodeRanks = 64;   // R
constexpr int kMaxNodes = 32;            // N
constexpr int kMaxNvlRanks = kMaxRanks;  // G: one NVLink domain
constexpr int kChunkRows = 8;            // rows behind one signal on the network legs
static_assert(kMaxInternodeRanks <= kMaxMaskedRanks, "ErrorRecord::masked holds every EP rank");

struct InternodeControl {
  unsigned long long issued;                        // last op started here
  unsigned long long done[kMaxInternodeRanks];      // [r]: last op rank r finished
  unsigned long long count_sig[kMaxInternodeRanks]; // [s]: tag of s's count row
  unsigned long long meta_sig[kMaxNodes];           // [m]: tag of node m's combine routing
  unsigned long long masked;                        // peers masked by low-latency ops (bit r)
  unsigned int blocks_done;                         // blocks of the last kernel that ended
  int abort;                                        // an op on this rank failed (sticky)
};

// Byte offsets in the symmetric region (the same on every PE). T = max_tokens.
struct InternodeLayout {
  size_t counts;       // int [R][count_stride]: [s] = s's [tokens per rank | per node | per expert]
  size_t my_counts;    // int [2][count_stride]: this rank's row by op parity (the source of its puts)
  size_t rdma_sig;     // u64 [N][T / kChunkRows]: [m][c] tag of chunk c of node m's rows (dispatch)
  size_t comb_sig;     // u64 [N][T / kChunkRows]: [m][c] tag of chunk c of node m's partials
  size_t rdma_send;    // [N][T] dispatch rows packed per destination node
  size_t rdma_recv;    // [N][T] dispatch rows from source (m, my local index)
  size_t nvl_recv;     // [R][T] dispatch rows from source s, at s's send_pos for this rank
  size_t meta_send;    // int [N][meta_stride]: combine routing for each destination node
  size_t meta_recv;    // int [N][meta_stride]: from source (m, my local index)
  size_t comb_nvl;     // [G][N][T] combine values from holder g for source (m, my local index)
  size_t comb_send;    // y.dtype [N][T][hidden] (sized for f32): partial sums for source (m, my local index)
  size_t comb_recv;    // y.dtype [N][T][hidden] (sized for f32): partial sums from node m
  size_t node_pos;     // int [T][N]: token t's index among this rank's tokens for node m, or -1
  size_t node_token;   // int [N][T]: inverse of node_pos
  size_t expert_pos;   // int [T][K]: t's index among this rank's tokens selecting topk_idx[t, k]
  size_t tile_counts;  // int [T / kLayoutTileTokens][count_stride]
  size_t expert_acc;   // int [kMaxExperts]: rank-layout rows per local expert
  size_t total;
  // A dispatch row: header (tag u64, token int), send_pos[G], topk_idx[K], topk_weights[K],
  // expert_pos[K], then the scales, then the data (128-byte aligned).
  size_t row_bytes;
  size_t row_send_pos, row_topk_idx, row_topk_weights, row_expert_pos, row_scales, row_data;
  size_t comb_row_bytes;  // header (tag) + hidden * 4 bytes
  size_t comb_row_data;
  int count_stride;       // R + N + E
  int meta_stride;        // 4 + T * (1 + G) ints: [count, pad x3][token, send_pos[G]]...
};

InternodeLayout make_internode_layout(int num_ranks, int ranks_per_node, int max_tokens, int hidden,
                                      int max_topk, int num_experts);

// Everything a kernel needs to know about its group (the same on every call).
struct InternodeView {
  char* base;                      // this rank's symmetric region
  char* nvl_base[kMaxNvlRanks];    // the region of the rank of this node at local index g
  // [m]: the region of rank (m, local), this rank's forwarder in node m and the one it
  // forwards for, where NVSHMEM maps it (this rank; NVLink: the virtual nodes of one host or a
  // multi-node NVLink domain), else nullptr. The network legs write straight into a mapped
  // peer's staging and release a chunk with a store; an unmapped one (every one with
  // JAX_EP_INTERNODE_PUTS=1) gets NVSHMEM puts with a signal.
  char* forwarder_base[kMaxNodes];
  int pe[kMaxInternodeRanks];      // NVSHMEM PE of each EP rank
  InternodeLayout layout;
  ErrorRecord* error;              // host-mapped
  unsigned long long timeout_ns;
  int rank, num_ranks, ranks_per_node, num_nodes, node, local;
  int max_tokens, hidden, max_topk, num_experts;
};

// Shapes as in kernels.h's DispatchArgs (normal mode). cached = combine's backward: x is the
// gradient g [T, H], the positions come from the handle (send_pos, num_tokens_matrix,
// pair_expert_rows are inputs) and only recv_x is written.
struct InternodeDispatchArgs {
  const void* x;
  const float* x_scales;
  const int* topk_idx;      // dispatch only
  const float* topk_weights;
  void* recv_x;
  float* recv_x_scales;
  int* recv_topk_idx;
  float* recv_topk_weights;
  int* num_recv_tokens;
  int* num_recv_tokens_per_expert;
  int* num_dropped;
  int* send_pos;            // output (dispatch) or input (cached)
  int* num_tokens_matrix;   // likewise
  int* pair_expert_rows;    // likewise
  int num_tokens;
  int hidden_bytes;
  int num_scales;
  int num_topk;
  int capacity;
  int num_pair_rows;
  bool expert_layout;
  bool cached;
  int num_blocks;
  int* pending;             // hooked: int32 [2], the op's number (low 32 bits) and code
};

struct InternodeCombineArgs {
  const void* y;
  const int* send_pos;
  const int* num_tokens_matrix;
  const int* pair_expert_rows;
  const void* bias;  // nullptr: none
  void* out;
  int num_tokens;
  int hidden;
  int capacity;
  int num_topk;
  bool is_bf16;
  bool expert_layout;
  int num_blocks;
  int* pending;       // hooked: as in InternodeDispatchArgs
};

// `phases` (OpPhases): the whole op, or its send or receive half (a hooked op).
cudaError_t launch_internode_dispatch(const InternodeView& v, const InternodeDispatchArgs& a,
                                      int phases, cudaStream_t stream);
cudaError_t launch_internode_combine(const InternodeView& v, const InternodeCombineArgs& a,
                                     int phases, cudaStream_t stream);

}  // namespace jax_ep
