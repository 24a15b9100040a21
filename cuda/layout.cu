// Layout kernels: what each token sends where. Both run as a single block of 1024 threads
// (one thread per token of a 1024-token tile); T is a few thousand, so one block is enough
// and needs no global atomics or zero-filled outputs.
//
// get_dispatch_layout_kernel (DeepEP's get_dispatch_layout): every thread takes tokens with
//   a block stride, writes the token's is_token_in_rank row and counts each distinct rank,
//   node and expert of the token into shared-memory counters, written out at the end.
//
// dispatch_layout_kernel (first kernel of dispatch, sender side): per tile of 1024 tokens,
//   - send_pos[t, r], the exclusive prefix of is_token_in_rank along tokens: warp ballots
//     give the position inside a warp, a 32-entry scan per rank (one thread per rank) gives
//     the warp offsets, and a running total carries across tiles;
//   - expert_rank[t, k], the index of t among this rank's tokens that select expert
//     topk_idx[t, k] (first slot of each distinct expert, else -1): each warp sets one bit
//     per (lane, expert) in a shared [32 warps][E] mask table, popcounts give the position
//     inside the warp, and one thread per expert turns the table into warp offsets;
//   - num_tokens_per_rank, num_tokens_per_expert: the running totals.
#include "cuda/common.cuh"

namespace jax_ep {
namespace {

constexpr int kLayoutThreads = 1024;
constexpr int kLayoutWarps = kLayoutThreads / kWarpSize;

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

// Shared memory: unsigned expert_mask[kLayoutWarps][E], int expert_total[E].
__global__ void __launch_bounds__(kLayoutThreads)
    dispatch_layout_kernel(const int* topk_idx, int num_tokens, int num_topk, int num_experts,
                           int num_ranks, int* send_pos, int* num_tokens_per_rank,
                           int* num_tokens_per_expert, int* expert_rank) {
  extern __shared__ unsigned expert_mask[];  // [kLayoutWarps][num_experts]
  int* expert_total = reinterpret_cast<int*>(expert_mask + kLayoutWarps * num_experts);
  __shared__ int warp_rank_offset[kLayoutWarps][kMaxRanks];
  __shared__ int rank_total[kMaxRanks];

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int experts_per_rank = num_experts / num_ranks;
  for (int i = threadIdx.x; i < kLayoutWarps * num_experts; i += blockDim.x) expert_mask[i] = 0;
  for (int i = threadIdx.x; i < num_experts; i += blockDim.x) expert_total[i] = 0;
  if (threadIdx.x < kMaxRanks) rank_total[threadIdx.x] = 0;
  __syncthreads();

  for (int tile = 0; tile < num_tokens; tile += kLayoutThreads) {
    const int t = tile + threadIdx.x;
    const bool valid = t < num_tokens;
    const int* idx = topk_idx + static_cast<size_t>(t) * num_topk;

    // Ranks of this token, and one mask bit per distinct expert.
    unsigned rank_mask = 0;
    if (valid) {
      for (int k = 0; k < num_topk; ++k) {
        const int e = idx[k];
        if (e < 0 || e >= num_experts) continue;
        bool first = true;
        for (int j = 0; j < k; ++j) first &= idx[j] != e;
        if (!first) continue;
        rank_mask |= 1u << (e / experts_per_rank);
        atomicOr(&expert_mask[warp * num_experts + e], 1u << lane);
      }
    }
    int rank_in_warp[kMaxRanks];
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
      if (r < num_ranks) {
        const unsigned ballot = __ballot_sync(kFullMask, (rank_mask >> r) & 1u);
        rank_in_warp[r] = __popc(ballot & lanemask_lt());
        if (lane == 0) warp_rank_offset[warp][r] = __popc(ballot);
      }
    }
    __syncthreads();

    // Position of each expert slot inside its warp (offsets are added below).
    if (valid && expert_rank != nullptr) {
      for (int k = 0; k < num_topk; ++k) {
        const int e = idx[k];
        int pos = -1;
        if (e >= 0 && e < num_experts) {
          bool first = true;
          for (int j = 0; j < k; ++j) first &= idx[j] != e;
          if (first) pos = __popc(expert_mask[warp * num_experts + e] & lanemask_lt());
        }
        expert_rank[static_cast<size_t>(t) * num_topk + k] = pos;
      }
    }
    __syncthreads();

    // Warp counts -> warp offsets (in place), carrying the totals across tiles.
    if (threadIdx.x < num_ranks) {
      int run = rank_total[threadIdx.x];
      for (int w = 0; w < kLayoutWarps; ++w) {
        const int c = warp_rank_offset[w][threadIdx.x];
        warp_rank_offset[w][threadIdx.x] = run;
        run += c;
      }
      rank_total[threadIdx.x] = run;
    }
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
      int run = expert_total[e];
      for (int w = 0; w < kLayoutWarps; ++w) {
        const int c = __popc(expert_mask[w * num_experts + e]);
        expert_mask[w * num_experts + e] = static_cast<unsigned>(run);
        run += c;
      }
      expert_total[e] = run;
    }
    __syncthreads();

    if (valid) {
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r) {
        if (r < num_ranks) {
          send_pos[static_cast<size_t>(t) * num_ranks + r] =
              (rank_mask >> r) & 1u ? warp_rank_offset[warp][r] + rank_in_warp[r] : -1;
        }
      }
      if (expert_rank != nullptr) {
        for (int k = 0; k < num_topk; ++k) {
          int* pos = expert_rank + static_cast<size_t>(t) * num_topk + k;
          if (*pos >= 0) *pos += static_cast<int>(expert_mask[warp * num_experts + idx[k]]);
        }
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kLayoutWarps * num_experts; i += blockDim.x) expert_mask[i] = 0;
    __syncthreads();
  }

  if (threadIdx.x < num_ranks) num_tokens_per_rank[threadIdx.x] = rank_total[threadIdx.x];
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) num_tokens_per_expert[e] = expert_total[e];
}

size_t dispatch_layout_smem_bytes(int num_experts) {
  return (static_cast<size_t>(kLayoutWarps) + 1) * num_experts * sizeof(int);
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

cudaError_t launch_dispatch_layout(const int* topk_idx, int num_tokens, int num_topk,
                                   int num_experts, int num_ranks, int* send_pos,
                                   int* num_tokens_per_rank, int* num_tokens_per_expert,
                                   int* expert_rank, cudaStream_t stream) {
  dispatch_layout_kernel<<<1, kLayoutThreads, dispatch_layout_smem_bytes(num_experts), stream>>>(
      topk_idx, num_tokens, num_topk, num_experts, num_ranks, send_pos, num_tokens_per_rank,
      num_tokens_per_expert, expert_rank);
  return cudaGetLastError();
}

cudaError_t prepare_kernels() {
  return cudaFuncSetAttribute(dispatch_layout_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(dispatch_layout_smem_bytes(kMaxExperts)));
}

}  // namespace jax_ep
