// Host-side interface of the CUDA kernels: the view of a group that kernels receive by value
// and the launch functions the FFI handlers call. Plain C++: included by ffi/*.cc and
// cuda/*.cu. Every op is one kernel launch (cuda/intranode.cu says how).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "cuda/region.h"
#include "cuda/transport.cuh"

namespace jax_ep {

// Everything a kernel needs to know about its group, passed by value (the same on every
// call: values that change per call live in the region's Control words).
struct GroupView {
  PeerTransport peers;
  RegionLayout layout;
  ErrorRecord* error;  // this device's record (device pointer of host-mapped memory)
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

// Outputs are [rows, cols] row-major; num_pair_rows = rows of pair_expert_rows (R * T in
// expert layout, 1 for the rank layout's placeholder).
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
  int num_pair_rows;
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
  int num_channels;  // blocks per role (holder / reducer): half of the num_sms SMs used
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

// Low-latency mode (cuda/low_latency.cu). A hooked op runs its send and its receive as two
// launches; a fused op runs both phases in one (OpPhases, cuda/region.h).

// Shapes: x [T, H], topk_idx [T, K], recv_x [L, R * M, H], recv_scales [L, R * M, H / 128]
// (FP8 only), recv_count [L], row_of_slot [R, M, K], pending int32 [2] (the op number: a send
// writes it, a receive reads it). A send reads x and topk_idx; a receive writes the rest.
struct LowLatencyDispatchArgs {
  const void* x;
  const int* topk_idx;
  void* recv_x;
  float* recv_scales;
  int* recv_count;
  int* row_of_slot;
  int* pending;
  unsigned* send_gate;  // hooked send: DeviceResources::send_gate (else unused)
  int num_tokens;
  int hidden;
  int num_topk;
  int num_experts;
  int max_tokens_per_rank;  // M
  bool x_is_bf16;           // otherwise float32
  bool fp8;                 // cast to float8_e4m3fn with one float32 scale per 128 channels
  bool round_scale;         // FP8 scales rounded up to powers of two
  bool mask;                // mask peers that time out instead of failing
  int num_blocks;
};

// Shapes: x [L, R * M, H] (bf16 or f32), topk_idx [T, K], topk_weights [T, K] (f32),
// row_of_slot [R, M, K], out [T, H] x's dtype, pending int32 [2]. A send reads x,
// topk_weights and row_of_slot; a receive reads topk_idx and writes out.
struct LowLatencyCombineArgs {
  const void* x;
  const int* topk_idx;
  const float* topk_weights;
  const int* row_of_slot;
  void* out;
  int* pending;
  unsigned* send_gate;  // hooked send: DeviceResources::send_gate (else unused)
  int num_tokens;
  int hidden;
  int num_topk;
  int num_experts;
  int max_tokens_per_rank;
  bool is_bf16;
  bool mask;
  int num_blocks;
};

// Dynamic shared memory a low-latency dispatch send needs (bytes); at most
// kMaxLowLatencyDispatchSmem launch.
constexpr size_t kMaxLowLatencyDispatchSmem = 200 * 1024;
size_t low_latency_dispatch_smem(int num_tokens, int num_topk, int num_experts, int num_blocks);

cudaError_t launch_low_latency_dispatch(const GroupView& group, const LowLatencyDispatchArgs& args,
                                        int phases, cudaStream_t stream);
cudaError_t launch_low_latency_combine(const GroupView& group, const LowLatencyCombineArgs& args,
                                       int phases, cudaStream_t stream);

cudaError_t launch_dispatch(const GroupView& group, const DispatchArgs& args, cudaStream_t stream);
cudaError_t launch_combine(const GroupView& group, const CombineArgs& args, cudaStream_t stream);
cudaError_t launch_cached_dispatch(const GroupView& group, const CachedDispatchArgs& args,
                                   cudaStream_t stream);

}  // namespace jax_ep
