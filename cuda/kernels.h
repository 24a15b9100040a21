// Host-side interface of the CUDA kernels: the per-device region layout shared by every
// device of a group, the view of a group that kernels receive by value, and the launch
// functions the FFI handlers call. Plain C++: included by ffi/*.cc and cuda/*.cu.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace jax_ep {

constexpr int kMaxRanks = 8;       // one NVLink domain driven by one process
constexpr int kMaxTopk = 32;       // a warp holds one token's top-k slots, a slot per lane
constexpr int kMaxExperts = 1024;  // bounds the layout kernel's shared memory
constexpr int kLayoutTileTokens = 256;  // tokens per block of the dispatch layout kernel

// Operation codes written into the error record by a kernel that timed out.
enum OpCode : int { kOpDispatch = 1, kOpCombine = 2, kOpCachedDispatch = 3 };

// One per device, in host-mapped pinned memory. The first kernel of a device that times
// out fills op and waited_rank, then sets flag. Never cleared: a group that timed out
// stays unusable until it is destroyed.
struct ErrorRecord {
  volatile int flag;
  volatile int op;
  volatile int waited_rank;
  volatile int reserved;
};

// Start of every device's region. signal[p] is written by EP rank p (barrier), epoch
// counts this device's operations, abort is set once a kernel on this device timed out.
struct Control {
  unsigned long long signal[kMaxRanks];
  unsigned long long epoch;
  int abort;
};

// Per-device scratch, written and read only by the device that owns it.
struct Scratch {
  int recv_offset[kMaxRanks + 1];           // receiver side; recv_offset[R] = num_pairs
  int num_rows;                             // rows this op writes into its [C, ...] outputs
  int recv_expert_base[kMaxExperts];        // [source rank][local expert]: first expert row
};

// Byte offsets inside one device's region; the same on every device of a group, so a
// peer's address is peer_base + offset.
struct RegionLayout {
  size_t counts;       // int [2][kMaxRanks][count_stride], written by every source rank
  size_t scratch;      // Scratch
  size_t expert_rank;  // int [max_tokens][max_topk], dispatch sender side
  size_t tile_counts;  // int [max_tokens / kLayoutTileTokens][count_stride], sender side
  size_t dispatch;     // dispatch staging: [source rank][max_tokens] rows of dispatch_row_bytes
  size_t combine;      // combine staging: [holder rank][max_tokens] rows of combine_row_bytes
  size_t total;
  size_t dispatch_row_bytes;
  size_t dispatch_scales;  // offset of the scales inside a dispatch row
  size_t dispatch_data;    // offset of the data inside a dispatch row
  size_t combine_row_bytes;
  size_t combine_data;     // offset of the data inside a combine row
  int count_stride;        // kMaxRanks + num_experts
};

// Staging rows start with a 16-byte header holding the epoch that wrote them (uint64). The
// data of every row starts on a 128-byte boundary: a warp's 512-byte store then covers whole
// 32-byte sectors (no byte-masked partial writes over NVLink).
constexpr size_t kRowHeaderBytes = 16;
constexpr size_t kRowDataAlign = 128;

RegionLayout make_region_layout(int num_ranks, int max_tokens, int hidden, int max_topk,
                                int num_experts);

// Everything a kernel needs to know about its group, passed by value.
struct GroupView {
  char* base[kMaxRanks];  // region base on each EP rank's device, usable from this device
  RegionLayout layout;
  ErrorRecord* error;     // this device's record (device pointer of host-mapped memory)
  unsigned long long timeout_ns;
  int rank;
  int num_ranks;
  int max_tokens;
  int hidden;
  int max_topk;
  int num_experts;
};

cudaError_t launch_get_dispatch_layout(const int* topk_idx, int num_tokens, int num_topk,
                                       int num_experts, int num_ranks, int num_ranks_per_node,
                                       int* num_tokens_per_rank, int* num_tokens_per_rdma_rank,
                                       int* num_tokens_per_expert, bool* is_token_in_rank,
                                       cudaStream_t stream);

struct DispatchArgs {
  const void* x;
  const float* x_scales;
  const int* topk_idx;
  const float* topk_weights;
  void* recv_x;
  float* recv_x_scales;
  int* recv_topk_idx;
  float* recv_topk_weights;
  int* num_recv_tokens;
  int* num_recv_tokens_per_expert;
  int* num_dropped;
  int* send_pos;
  int* num_tokens_matrix;
  int* pair_expert_rows;
  int num_tokens;
  int hidden_bytes;  // bytes of one x row; a multiple of 16
  int num_scales;    // floats per row of x_scales (0 unless FP8)
  int num_topk;
  int num_experts;
  int capacity;
  int num_pair_rows;  // rows of pair_expert_rows (R * T in expert layout, else 0)
  bool expert_layout;
  int num_channels;  // blocks per role (sender / receiver): half of the num_sms SMs used
};

struct CombineArgs {
  const void* y;
  const int* send_pos;
  const int* num_tokens_matrix;
  const int* pair_expert_rows;
  const void* bias;  // nullptr when there is no bias
  void* out;
  int num_tokens;
  int hidden;
  int capacity;
  int num_topk;
  bool is_bf16;  // otherwise float32
  bool expert_layout;
  int num_channels;  // blocks per role (sender / receiver): half of the num_sms SMs used
};

struct CachedDispatchArgs {
  const void* g;
  const int* send_pos;
  const int* num_tokens_matrix;
  const int* pair_expert_rows;
  void* recv;
  int num_tokens;
  int hidden_bytes;
  int capacity;
  int num_topk;
  int num_pair_rows;
  bool expert_layout;
  int num_channels;  // blocks per role (sender / receiver): half of the num_sms SMs used
};

cudaError_t launch_dispatch(const GroupView& group, const DispatchArgs& args, cudaStream_t stream);
cudaError_t launch_combine(const GroupView& group, const CombineArgs& args, cudaStream_t stream);
cudaError_t launch_cached_dispatch(const GroupView& group, const CachedDispatchArgs& args,
                                   cudaStream_t stream);

// Internal to cuda/: the first kernel of launch_dispatch (cuda/layout.cu). Positions in
// send_pos [T, R] and expert_rank [T, K] count from the start of their token's tile;
// tile_counts [tiles][count_stride] gets each tile's [tokens per rank | tokens per expert].
cudaError_t launch_dispatch_layout(const int* topk_idx, int num_tokens, int num_topk,
                                   int num_experts, int num_ranks, int count_stride,
                                   int* send_pos, int* expert_rank, int* tile_counts,
                                   cudaStream_t stream);

}  // namespace jax_ep
