// The layout kernel: what each token sends where.
//
// get_dispatch_layout_kernel (DeepEP's get_dispatch_layout; one block of 1024 threads):
//   every thread takes tokens with a block stride, writes the token's is_token_in_rank row
//   and counts each distinct rank, node and expert of the token into shared-memory counters,
//   written out at the end.
// (Dispatch counts its own layout inside its kernel: cuda/intranode.cu, count_tile.)
#include "cuda/common.cuh"

namespace jax_ep {
namespace {

constexpr int kLayoutThreads = 1024;

__global__ void __launch_bounds__(kLayoutThreads)
    get_dispatch_layout_kernel(const int* topk_idx, int num_tokens, int num_topk,
                               int num_experts, int num_ranks, int num_ranks_per_node,
                               int* num_tokens_per_rank, int* num_tokens_per_rdma_rank,
                               int* num_tokens_per_expert, bool* is_token_in_rank) {
  extern __shared__ int smem[];
  const int num_nodes = num_ranks / num_ranks_per_node;
  const int experts_per_rank = num_experts / num_ranks;
  int* rank_count = smem;
  int* node_count = rank_count + num_ranks;
  int* expert_count = node_count + num_nodes;
  for (int i = threadIdx.x; i < num_ranks + num_nodes + num_experts; i += blockDim.x) smem[i] = 0;
  __syncthreads();

  for (int t = threadIdx.x; t < num_tokens; t += blockDim.x) {
    const int* idx = topk_idx + static_cast<size_t>(t) * num_topk;
    bool* in_rank = is_token_in_rank + static_cast<size_t>(t) * num_ranks;
    for (int r = 0; r < num_ranks; ++r) in_rank[r] = false;
    for (int k = 0; k < num_topk; ++k) {
      const int e = idx[k];
      if (e < 0 || e >= num_experts) continue;
      const int r = e / experts_per_rank;
      const int node = r / num_ranks_per_node;
      bool new_expert = true, new_rank = true, new_node = true;
      for (int j = 0; j < k; ++j) {
        const int f = idx[j];
        if (f < 0 || f >= num_experts) continue;
        new_expert &= f != e;
        new_rank &= f / experts_per_rank != r;
        new_node &= f / experts_per_rank / num_ranks_per_node != node;
      }
      if (new_expert) atomicAdd(&expert_count[e], 1);
      if (new_rank) {
        atomicAdd(&rank_count[r], 1);
        in_rank[r] = true;
      }
      if (new_node) atomicAdd(&node_count[node], 1);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < num_ranks; i += blockDim.x) num_tokens_per_rank[i] = rank_count[i];
  for (int i = threadIdx.x; i < num_nodes; i += blockDim.x) num_tokens_per_rdma_rank[i] = node_count[i];
  for (int i = threadIdx.x; i < num_experts; i += blockDim.x) num_tokens_per_expert[i] = expert_count[i];
}

}  // namespace

cudaError_t launch_get_dispatch_layout(const int* topk_idx, int num_tokens, int num_topk,
                                       int num_experts, int num_ranks, int num_ranks_per_node,
                                       int* num_tokens_per_rank, int* num_tokens_per_rdma_rank,
                                       int* num_tokens_per_expert, bool* is_token_in_rank,
                                       cudaStream_t stream) {
  const int num_nodes = num_ranks / num_ranks_per_node;
  const size_t smem = static_cast<size_t>(num_ranks + num_nodes + num_experts) * sizeof(int);
  get_dispatch_layout_kernel<<<1, kLayoutThreads, smem, stream>>>(
      topk_idx, num_tokens, num_topk, num_experts, num_ranks, num_ranks_per_node,
      num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank);
  return cudaGetLastError();
}

}  // namespace jax_ep
