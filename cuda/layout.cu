// Layout kernels: what each token sends where.
//
// get_dispatch_layout_kernel (DeepEP's get_dispatch_layout; one block of 1024 threads):
//   every thread takes tokens with a block stride, writes the token's is_token_in_rank row
//   and counts each distinct rank, node and expert of the token into shared-memory counters,
//   written out at the end.
//
// dispatch_layout_kernel (first kernel of dispatch, sender side): one block per tile of
//   kLayoutTileTokens tokens; positions are relative to the tile, and
//   dispatch_notify_kernel turns the tiles' totals into offsets (the senders add them):
//   - send_pos[t, r], t's position among the tile's tokens sent to rank r: warp ballots give
//     the position inside a warp, one thread per rank scans the warps' counts;
//   - expert_rank[t, k], t's position among the tile's tokens that select expert
//     topk_idx[t, k] (first slot of each distinct expert, else -1): each warp sets one bit
//     per (lane, expert) in a shared [warps][E] mask table, popcounts give the position
//     inside the warp, and one thread per expert scans the warps' counts;
//   - tile_counts[tile] = [tokens per rank (kMaxRanks slots) | tokens per expert].
#include "cuda/common.cuh"

namespace jax_ep {
namespace {

constexpr int kLayoutThreads = 1024;
constexpr int kTileWarps = kLayoutTileTokens / kWarpSize;

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

// One block per tile of kLayoutTileTokens tokens, a thread per token.
// Shared memory: unsigned expert_mask[kTileWarps][num_experts] (32 KiB at kMaxExperts).
__global__ void __launch_bounds__(kLayoutTileTokens)
    dispatch_layout_kernel(const int* topk_idx, int num_tokens, int num_topk, int num_experts,
                           int num_ranks, int count_stride, int* send_pos, int* expert_rank,
                           int* tile_counts) {
  extern __shared__ unsigned expert_mask[];
  __shared__ int warp_rank_offset[kTileWarps][kMaxRanks];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int experts_per_rank = num_experts / num_ranks;
  const int t = blockIdx.x * kLayoutTileTokens + threadIdx.x;
  const bool valid = t < num_tokens;
  const int* idx = topk_idx + static_cast<size_t>(t) * num_topk;
  for (int i = threadIdx.x; i < kTileWarps * num_experts; i += blockDim.x) expert_mask[i] = 0;
  __syncthreads();

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

  // Position of each expert slot inside its warp (the warp offsets are added below).
  if (valid) {
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

  // Warp counts -> offsets inside the tile (in place); the tile's totals go to tile_counts.
  int* tile_row = tile_counts + static_cast<size_t>(blockIdx.x) * count_stride;
  if (threadIdx.x < num_ranks) {
    int run = 0;
    for (int w = 0; w < kTileWarps; ++w) {
      const int c = warp_rank_offset[w][threadIdx.x];
      warp_rank_offset[w][threadIdx.x] = run;
      run += c;
    }
    tile_row[threadIdx.x] = run;
  }
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    int run = 0;
    for (int w = 0; w < kTileWarps; ++w) {
      const int c = __popc(expert_mask[w * num_experts + e]);
      expert_mask[w * num_experts + e] = static_cast<unsigned>(run);
      run += c;
    }
    tile_row[kMaxRanks + e] = run;
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
    for (int k = 0; k < num_topk; ++k) {
      int* pos = expert_rank + static_cast<size_t>(t) * num_topk + k;
      if (*pos >= 0) *pos += static_cast<int>(expert_mask[warp * num_experts + idx[k]]);
    }
  }
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
                                   int num_experts, int num_ranks, int count_stride,
                                   int* send_pos, int* expert_rank, int* tile_counts,
                                   cudaStream_t stream) {
  const int num_tiles = (num_tokens + kLayoutTileTokens - 1) / kLayoutTileTokens;
  if (num_tiles == 0) return cudaSuccess;
  const size_t smem = static_cast<size_t>(kTileWarps) * num_experts * sizeof(unsigned);
  dispatch_layout_kernel<<<num_tiles, kLayoutTileTokens, smem, stream>>>(
      topk_idx, num_tokens, num_topk, num_experts, num_ranks, count_stride, send_pos,
      expert_rank, tile_counts);
  return cudaGetLastError();
}

}  // namespace jax_ep
