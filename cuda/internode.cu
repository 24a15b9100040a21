// Internode dispatch, combine and cached dispatch (cuda/internode.h says how the ops are
// split into kernels and how the ranks talk). The network legs use NVSHMEM's portable device
// API (put with signal from a warp, signal ops, quiet), so the same code runs over IBGDA,
// IBRC or UCX between nodes and over NVLink P2P between the virtual nodes of one host; the
// NVLink legs inside a node are plain stores through nvshmem_ptr mappings with a release
// store of the row's tag.
#include <nvshmem.h>
#include <nvshmemx.h>

#include "cuda/common.cuh"
#include "cuda/internode.h"
#include "cuda/internode_protocol.cuh"

namespace jax_ep {
namespace {

using namespace internode;

// Op kernels: as many warps per SM as the intranode kernels (the copies need loads in
// flight); plan kernels: a thread per token of a layout tile.
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kPlanThreads = kLayoutTileTokens;
constexpr int kPlanWarps = kPlanThreads / kWarpSize;
constexpr int kCopyUnroll = 8;  // 16-byte vectors per lane in flight in a row copy
constexpr int kSumUnroll = 4;   // in a row sum (its fp32 accumulators fit 128 registers)

template <typename T>
__device__ __forceinline__ T* region(const InternodeView& v, size_t offset) {
  return reinterpret_cast<T*>(v.base + offset);
}
__device__ __forceinline__ int global_warp() { return (blockIdx.x * kThreads + threadIdx.x) / kWarpSize; }
__device__ __forceinline__ int num_global_warps() { return gridDim.x * kWarps; }

// A warp reduces rows kSumUnroll vectors per lane at a time, every load of a step issued
// before the first add (one load in flight per lane left the copies latency-bound): vectors
// base + u * 32 + lane (u < kSumUnroll) below num_vecs. acc[u] += src's vector, in fp32.
template <typename T, bool kReadOnly>
__device__ __forceinline__ void add_row_step(float (&acc)[kSumUnroll][VecTraits<T>::kElems],
                                             const int4* src, int base, int num_vecs, int lane) {
  int4 x[kSumUnroll];
#pragma unroll
  for (int u = 0; u < kSumUnroll; ++u) {
    const int i = base + u * kWarpSize + lane;
    if (i < num_vecs) x[u] = kReadOnly ? ld_nc(src + i) : ld_staging(src + i);
  }
#pragma unroll
  for (int u = 0; u < kSumUnroll; ++u) {
    if (base + u * kWarpSize + lane < num_vecs) VecTraits<T>::add(acc[u], x[u]);
  }
}
// out's vectors of the step: acc cast to T.
template <typename T>
__device__ __forceinline__ void store_row_step(int4* out, float (&acc)[kSumUnroll][VecTraits<T>::kElems],
                                               int base, int num_vecs, int lane) {
#pragma unroll
  for (int u = 0; u < kSumUnroll; ++u) {
    const int i = base + u * kWarpSize + lane;
    if (i < num_vecs) out[i] = VecTraits<T>::pack(acc[u]);
  }
}

// ---------------------------------------------------------------------------------------
// Op protocol
// ---------------------------------------------------------------------------------------
// The op, its tag, failures and waits for a tag: cuda/internode_protocol.cuh.

// Every thread of the block: true once every rank finished op n - 1 (nobody still reads the
// staging op n writes into). Threads 0 .. R-1 wait, one rank each.
__device__ bool wait_previous_op(const InternodeView& v, const Op& op) {
  __shared__ int s_ok;
  if (threadIdx.x == 0) s_ok = !aborted(v);
  __syncthreads();
  if (threadIdx.x < v.num_ranks && op.n > 1) {
    const u64* done = &ctrl(v)->done[threadIdx.x];
    const u64 start = globaltimer_ns();
    while (poll(done) < op.n - 1) {
      if (aborted(v)) { s_ok = 0; break; }
      if (globaltimer_ns() - start > v.timeout_ns) {
        fail(v, op, kFailTimeout, threadIdx.x, poll(done));
        s_ok = 0;
        break;
      }
    }
  }
  __syncthreads();
  return s_ok != 0;
}

// Hooked ops: the send half records its op in `pending`; the receive half (block-uniform)
// checks that `pending` names the op it is about to finish, and records kFailInFlight if not
// (a stale or repeated receive).
__device__ __forceinline__ void record_pending(int* pending, const Op& op) {
  if (pending != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    pending[0] = static_cast<int>(op.n);
    pending[1] = op.code;
  }
}
__device__ bool check_pending(const InternodeView& v, const Op& op, const int* pending) {
  __shared__ int s_ok;
  if (threadIdx.x == 0) {
    s_ok = 1;
    if (pending != nullptr && (pending[0] != static_cast<int>(op.n) || pending[1] != op.code)) {
      fail(v, op, kFailInFlight, v.rank, make_tag(static_cast<unsigned>(pending[0]), pending[1]));
      s_ok = 0;
    }
  }
  __syncthreads();
  return s_ok != 0;
}

// Outputs as (pointer, bytes) pairs; a failed op fills them with all-ones bytes.
struct Outputs {
  void* ptr[10];
  size_t bytes[10];
  int count = 0;
  __host__ __device__ void add(void* p, size_t n) {
    ptr[count] = p;
    bytes[count] = n;
    ++count;
  }
};

// End of an op, run by every block of its last kernel: the last block to get here poisons
// the outputs if the op failed, runs last(), records the op as finished and tells every rank.
template <typename Fn>
__device__ void finish_op(const InternodeView& v, const Op& op, const Outputs& outputs, Fn last) {
  __shared__ int s_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    s_last = atomicAdd(&ctrl(v)->blocks_done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  if (aborted(v)) {
    for (int o = 0; o < outputs.count; ++o) {
      unsigned char* p = static_cast<unsigned char*>(outputs.ptr[o]);
      for (size_t i = threadIdx.x; i < outputs.bytes[o]; i += blockDim.x) p[i] = 0xff;
    }
  } else {
    last();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    ctrl(v)->blocks_done = 0;
    ctrl(v)->issued = op.n;
  }
  // A failed rank announces nothing: its peers time out on their own.
  if (threadIdx.x < v.num_ranks && !aborted(v)) {
    nvshmemx_signal_op(sig(&ctrl(v)->done[v.rank]), op.n, NVSHMEM_SIGNAL_SET, v.pe[threadIdx.x]);
  }
}

// ---------------------------------------------------------------------------------------
// Plan: per token its ranks, nodes and experts, and its index among this rank's tokens for
// each (send_pos [T, R], node_pos [T, N], expert_pos [T, K]); per rank / node / expert the
// totals (my_counts). Two kernels over tiles of kLayoutTileTokens tokens: tile totals, then
// positions with the earlier tiles' totals added.
// ---------------------------------------------------------------------------------------
struct PlanArgs {
  const int* topk_idx;   // dispatch: the routing (else nullptr: ranks from send_pos)
  int* send_pos;         // dispatch: written; otherwise read
  int num_tokens;
  int num_topk;
};

// Whether slot k of a token holds a valid expert not held by an earlier slot.
__device__ __forceinline__ bool first_expert(const int* idx, int k, int num_experts) {
  const int e = idx[k];
  if (e < 0 || e >= num_experts) return false;
  for (int j = 0; j < k; ++j) {
    if (idx[j] == e) return false;
  }
  return true;
}

// One tile: with base == nullptr writes the tile's totals to `totals`; otherwise writes the
// positions (base = totals of the earlier tiles).
__device__ void plan_tile(const InternodeView& v, const PlanArgs& a, int tile, const int* base,
                          int* totals) {
  __shared__ unsigned s_expert_mask[kPlanWarps * kMaxExperts];
  __shared__ int s_warp_count[kPlanWarps][kMaxInternodeRanks + kMaxNodes];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int R = v.num_ranks, N = v.num_nodes, G = v.ranks_per_node, E = v.num_experts;
  const int L = E / R, K = a.num_topk;
  const int t = tile * kLayoutTileTokens + threadIdx.x;
  const bool valid = t < a.num_tokens;
  const bool with_experts = a.topk_idx != nullptr;
  u64 rank_mask = 0;
  if (valid) {
    if (with_experts) {
      const int* idx = a.topk_idx + at(t, K, 0);
      for (int k = 0; k < K; ++k) {
        if (first_expert(idx, k, E)) rank_mask |= 1ull << (idx[k] / L);
      }
    } else {
      for (int r = 0; r < R; ++r) {
        if (a.send_pos[at(t, R, r)] >= 0) rank_mask |= 1ull << r;
      }
    }
  }
  unsigned node_mask = 0;
  for (int m = 0; m < N; ++m) {
    if ((rank_mask >> (m * G)) & ((1ull << G) - 1)) node_mask |= 1u << m;
  }
  // Ranks and nodes: warp ballots, then a scan over the warps.
  const int num_slots = R + N;
  for (int i = 0; i < num_slots; ++i) {
    const bool bit = i < R ? (rank_mask >> i) & 1 : (node_mask >> (i - R)) & 1;
    const unsigned ballot = __ballot_sync(kFullMask, bit);
    if (lane == 0) s_warp_count[warp][i] = __popc(ballot);
  }
  if (with_experts) {
    for (int i = threadIdx.x; i < kPlanWarps * E; i += kPlanThreads) s_expert_mask[i] = 0;
  }
  __syncthreads();
  if (threadIdx.x < num_slots) {
    int run = base != nullptr ? base[threadIdx.x] : 0;
    for (int w = 0; w < kPlanWarps; ++w) {
      const int c = s_warp_count[w][threadIdx.x];
      s_warp_count[w][threadIdx.x] = run;
      run += c;
    }
    if (base == nullptr) totals[threadIdx.x] = run;
  }
  if (with_experts && valid) {
    const int* idx = a.topk_idx + at(t, K, 0);
    for (int k = 0; k < K; ++k) {
      if (first_expert(idx, k, E)) atomicOr(&s_expert_mask[warp * E + idx[k]], 1u << lane);
    }
  }
  __syncthreads();
  if (base != nullptr) {
    int* node_pos = region<int>(v, v.layout.node_pos);
    int* node_token = region<int>(v, v.layout.node_token);
    for (int i = 0; i < num_slots; ++i) {
      const bool bit = i < R ? (rank_mask >> i) & 1 : (node_mask >> (i - R)) & 1;
      const unsigned ballot = __ballot_sync(kFullMask, bit);
      const int pos = s_warp_count[warp][i] + __popc(ballot & lanemask_lt());
      if (!valid) continue;
      if (i < R) {
        if (with_experts) a.send_pos[at(t, R, i)] = bit ? pos : -1;
      } else {
        node_pos[at(t, N, i - R)] = bit ? pos : -1;
        if (bit) node_token[at(i - R, v.max_tokens, pos)] = t;
      }
    }
  }
  if (!with_experts) return;
  // Experts: per-warp bit tables. A slot's index inside its warp, then the table turned into
  // each warp's offset (in place), then the offsets added.
  int* expert_pos = region<int>(v, v.layout.expert_pos);
  const int* idx = a.topk_idx + at(t, K, 0);
  if (base != nullptr && valid) {
    for (int k = 0; k < K; ++k) {
      expert_pos[at(t, K, k)] =
          first_expert(idx, k, E) ? __popc(s_expert_mask[warp * E + idx[k]] & lanemask_lt()) : -1;
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kPlanThreads) {
    int run = base != nullptr ? base[num_slots + e] : 0;
    for (int w = 0; w < kPlanWarps; ++w) {
      const int c = __popc(s_expert_mask[w * E + e]);
      s_expert_mask[w * E + e] = static_cast<unsigned>(run);
      run += c;
    }
    if (base == nullptr) totals[num_slots + e] = run;
  }
  __syncthreads();
  if (base != nullptr && valid) {
    for (int k = 0; k < K; ++k) {
      const int pos = expert_pos[at(t, K, k)];
      if (pos >= 0) expert_pos[at(t, K, k)] = pos + static_cast<int>(s_expert_mask[warp * E + idx[k]]);
    }
  }
}

__global__ void __launch_bounds__(kPlanThreads) plan_totals_kernel(InternodeView v, PlanArgs a) {
  int* tile_counts = region<int>(v, v.layout.tile_counts);
  plan_tile(v, a, blockIdx.x, nullptr, tile_counts + at(blockIdx.x, v.layout.count_stride, 0));
}

// This rank's totals of op `op` (my_counts: a half per op parity). The count puts of op n read
// them and may still be in flight when op n + 1 plans (the send kernels do not wait for their
// puts to complete); op n + 2 plans only after every rank finished op n, which received them.
__device__ __forceinline__ int* my_counts_of(const InternodeView& v, const Op& op) {
  return region<int>(v, v.layout.my_counts) + op.parity * v.layout.count_stride;
}

// Positions; block 0 also writes this rank's totals (my_counts), the rows of its puts.
__global__ void __launch_bounds__(kPlanThreads) plan_positions_kernel(InternodeView v, PlanArgs a) {
  __shared__ int s_base[kMaxInternodeRanks + kMaxNodes + kMaxExperts];
  const int stride = v.layout.count_stride;
  const int used = a.topk_idx != nullptr ? stride : v.num_ranks + v.num_nodes;
  const int* tile_counts = region<int>(v, v.layout.tile_counts);
  int* my_counts = my_counts_of(v, current_op(v, 0));
  for (int i = threadIdx.x; i < stride; i += kPlanThreads) {
    int run = 0, total = 0;
    if (i < used) {
      for (int tile = 0; tile < static_cast<int>(gridDim.x); ++tile) {
        if (tile == static_cast<int>(blockIdx.x)) run = total;
        total += tile_counts[at(tile, stride, i)];
      }
    }
    s_base[i] = run;
    if (blockIdx.x == 0) my_counts[i] = total;  // experts stay 0 when only ranks are planned
  }
  __syncthreads();
  plan_tile(v, a, blockIdx.x, s_base, nullptr);
}

// ---------------------------------------------------------------------------------------
// Dispatch (and cached dispatch)
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ size_t dispatch_stride(const InternodeView& v, const InternodeDispatchArgs& a) {
  return (v.layout.row_data + a.hidden_bytes + 15) / 16 * 16;
}
__device__ __forceinline__ int dispatch_code(const InternodeDispatchArgs& a) {
  return a.cached ? kOpCachedDispatch : kOpDispatch;
}
// Tags the n rows a warp wrote (lane i < n holds row i): each of those lanes fences once after
// the whole warp's writes, then releases its row's tag.
__device__ __forceinline__ void tag_rows(char* lane_row, int n, u64 tag, int lane) {
  __syncwarp();
  if (lane < n) {
    __threadfence_system();
    signal(reinterpret_cast<u64*>(lane_row), tag);
  }
}

// Node m's rows: packed here for it (rdma_send), or received from (m, my local index).
__device__ __forceinline__ char* rdma_row(const InternodeView& v, size_t offset, int m, int j,
                                          size_t stride) {
  return v.base + offset + (static_cast<size_t>(m) * v.max_tokens + j) * stride;
}

// Releases a chunk a warp wrote for the rank `pe` at signal word `sig_offset` of the regions.
// mapped: that rank's region, where NVSHMEM maps it (the warp wrote the chunk there itself):
// a system fence after every lane's writes, then lane 0 stores the tag. nullptr: the chunk is
// at `src` here and goes to `dst` (same offset on `pe`) by put with a signal.
__device__ __forceinline__ void release_chunk(const InternodeView& v, char* mapped, size_t sig_offset,
                                              void* dst, const void* src, size_t bytes, int pe,
                                              u64 tag, int lane) {
  if (mapped != nullptr) {
    __threadfence_system();
    __syncwarp();
    if (lane == 0) signal(reinterpret_cast<u64*>(mapped + sig_offset), tag);
  } else {
    __syncwarp();
    nvshmemx_putmem_signal_nbi_warp(dst, src, bytes, sig(region<u64>(v, sig_offset)), tag,
                                    NVSHMEM_SIGNAL_SET, pe);
  }
}

// Send: the count row to every rank, then every row, packed per destination node, to that
// node's forwarder with a signal per chunk of kChunkRows rows: packed straight into its
// rdma_recv where it is mapped (forwarder_base), else into rdma_send and put. The rows for
// this node stay here (the forward kernel reads them from rdma_send).
__global__ void __launch_bounds__(kThreads, 1) dispatch_send_kernel(InternodeView v, InternodeDispatchArgs a) {
  const Op op = current_op(v, dispatch_code(a));
  record_pending(a.pending, op);
  if (!wait_previous_op(v, op)) return;
  const int lane = threadIdx.x % kWarpSize;
  const int R = v.num_ranks, N = v.num_nodes, G = v.ranks_per_node, K = a.num_topk;
  const int* my_counts = my_counts_of(v, op);
  const size_t count_bytes = static_cast<size_t>(v.layout.count_stride) * sizeof(int);
  if (blockIdx.x == 0 && threadIdx.x < R) {
    nvshmem_putmem_signal_nbi(region<int>(v, v.layout.counts) + at(v.rank, v.layout.count_stride, 0),
                              my_counts, count_bytes, sig(&ctrl(v)->count_sig[v.rank]), op.tag,
                              NVSHMEM_SIGNAL_SET, v.pe[threadIdx.x]);
  }
  const size_t stride = dispatch_stride(v, a);
  const int* node_token = region<int>(v, v.layout.node_token);
  const int* expert_pos = region<int>(v, v.layout.expert_pos);
  const int data_vecs = a.hidden_bytes / 16;
  // Work items (node m, chunk c), interleaved across nodes (item i is chunk i / N of node
  // i % N) so that the warps write to every node at once, not to one node after another.
  int max_count = 0;
  for (int m = 0; m < N; ++m) max_count = max(max_count, my_counts[R + m]);
  const int num_items = N * ((max_count + kChunkRows - 1) / kChunkRows);
  for (int item = global_warp(); item < num_items; item += num_global_warps()) {
    const int m = item % N, first = item / N * kChunkRows;
    if (first >= my_counts[R + m]) continue;
    const int c = first / kChunkRows;
    const int rows = min(kChunkRows, my_counts[R + m] - first);
    char* forwarder = m != v.node ? v.forwarder_base[m] : nullptr;
    for (int j = first; j < first + rows; ++j) {
      const int t = node_token[at(m, v.max_tokens, j)];
      char* row = forwarder != nullptr ? forwarder + v.layout.rdma_recv + (static_cast<size_t>(v.node) * v.max_tokens + j) * stride
                                       : rdma_row(v, v.layout.rdma_send, m, j, stride);
      if (lane == 0) *reinterpret_cast<int*>(row + sizeof(u64)) = t;
      if (lane < G) {
        reinterpret_cast<int*>(row + v.layout.row_send_pos)[lane] = a.send_pos[at(t, R, m * G + lane)];
      }
      if (!a.cached && lane < K) {
        reinterpret_cast<int*>(row + v.layout.row_topk_idx)[lane] = a.topk_idx[at(t, K, lane)];
        reinterpret_cast<float*>(row + v.layout.row_topk_weights)[lane] = a.topk_weights[at(t, K, lane)];
        reinterpret_cast<int*>(row + v.layout.row_expert_pos)[lane] = expert_pos[at(t, K, lane)];
      }
      for (int i = lane; i < a.num_scales; i += kWarpSize) {
        reinterpret_cast<float*>(row + v.layout.row_scales)[i] = a.x_scales[at(t, a.num_scales, i)];
      }
      const int4* src = reinterpret_cast<const int4*>(static_cast<const char*>(a.x) + static_cast<size_t>(t) * a.hidden_bytes);
      int4* dst = reinterpret_cast<int4*>(row + v.layout.row_data);
      warp_copy_row<kCopyUnroll, true>(src, lane == 0 ? dst : nullptr, 1u, data_vecs, lane);
    }
    if (m != v.node) {  // this node's rows stay in rdma_send, unreleased
      release_chunk(v, forwarder, v.layout.rdma_sig + at(v.node, v.max_tokens / kChunkRows + 1, c) * sizeof(u64),
                    rdma_row(v, v.layout.rdma_recv, v.node, first, stride),
                    rdma_row(v, v.layout.rdma_send, m, first, stride), rows * stride,
                    v.pe[m * G + v.local], op.tag, lane);
    }
  }
  // No nvshmem_quiet: the rows' sources (rdma_send) are rewritten only by a later dispatch,
  // after every rank finished this op and so received them; a hooked send's SMs are free
  // while the NIC still moves its puts.
}

// Forward: every row of the node's sources (m, my local index), as it arrives, to the ranks of
// this node that need it, into their nvl_recv at [source][send_pos], then the row's tag.
__device__ __forceinline__ void dispatch_forward(const InternodeView& v, const InternodeDispatchArgs& a) {
  __shared__ int s_count[kMaxNodes];
  __shared__ int s_ok;
  const Op op = current_op(v, dispatch_code(a));
  const int lane = threadIdx.x % kWarpSize;
  const int R = v.num_ranks, N = v.num_nodes, G = v.ranks_per_node;
  if (!check_pending(v, op, a.pending)) return;
  if (threadIdx.x == 0) s_ok = !aborted(v);
  __syncthreads();
  if (threadIdx.x < N) {
    const int source = threadIdx.x * G + v.local;
    if (!wait_tag(v, op, &ctrl(v)->count_sig[source], source)) s_ok = 0;
    s_count[threadIdx.x] = ld_staging(region<int>(v, v.layout.counts) + at(source, v.layout.count_stride, R + v.node));
  }
  __syncthreads();
  if (!s_ok) return;
  const size_t stride = dispatch_stride(v, a);
  const int body_vecs = static_cast<int>((stride - 16) / 16);
  int num_items = 0;
  for (int m = 0; m < N; ++m) num_items += (s_count[m] + kChunkRows - 1) / kChunkRows;
  for (int item = global_warp(); item < num_items; item += num_global_warps()) {
    int m = 0, c = item;
    for (;; ++m) {
      const int chunks = (s_count[m] + kChunkRows - 1) / kChunkRows;
      if (c < chunks) break;
      c -= chunks;
    }
    const int source = m * G + v.local;
    if (m != v.node) {
      const u64* word = region<u64>(v, v.layout.rdma_sig) + at(m, v.max_tokens / kChunkRows + 1, c);
      bool ok = true;
      if (lane == 0) ok = wait_tag(v, op, word, source);
      if (!__shfl_sync(kFullMask, ok, 0)) return;
    }
    const size_t offset = m == v.node ? v.layout.rdma_send : v.layout.rdma_recv;
    const int first = c * kChunkRows;
    const int rows = min(kChunkRows, s_count[m] - first);
    for (int j = first; j < first + rows; ++j) {
      const char* row = rdma_row(v, offset, m, j, stride);
      const int pos = lane < G ? ld_staging(reinterpret_cast<const int*>(row + v.layout.row_send_pos) + lane) : -1;
      const unsigned mask = __ballot_sync(kFullMask, pos >= 0);
      // nvl_recv rows keep the layout's full stride whatever the op's row size: a row's tag
      // must never land on another op's row data.
      char* dst = pos >= 0 ? v.nvl_base[lane] + v.layout.nvl_recv +
                                 (static_cast<size_t>(source) * v.max_tokens + pos) * v.layout.row_bytes
                           : nullptr;
      warp_copy_row<kCopyUnroll, false>(reinterpret_cast<const int4*>(row + 16),
                                        reinterpret_cast<int4*>(dst + 16), mask, body_vecs, lane);
    }
    // The chunk's tags, one system fence per destination lane for all its rows (every row of
    // the chunk written before any of its tags).
    __syncwarp();
    bool fenced = false;
    for (int j = first; lane < G && j < first + rows; ++j) {
      const char* row = rdma_row(v, offset, m, j, stride);
      const int pos = ld_staging(reinterpret_cast<const int*>(row + v.layout.row_send_pos) + lane);
      if (pos < 0) continue;
      if (!fenced) __threadfence_system();
      fenced = true;
      signal(reinterpret_cast<u64*>(v.nvl_base[lane] + v.layout.nvl_recv +
                                    (static_cast<size_t>(source) * v.max_tokens + pos) * v.layout.row_bytes),
             op.tag);
    }
  }
}

// Receive: every pair (source s, j < tokens s sends here) into the outputs, in DeepEP's order.
__device__ __forceinline__ void dispatch_recv(const InternodeView& v, const InternodeDispatchArgs& a) {
  __shared__ int s_recv_offset[kMaxInternodeRanks + 1];
  __shared__ int s_expert_offset[kMaxExperts + 1];
  __shared__ int s_source_base[kMaxExperts];  // [e * R + s]: rows of local expert e from sources < s
  __shared__ int s_ok;
  const Op op = current_op(v, dispatch_code(a));
  const int lane = threadIdx.x % kWarpSize;
  const int R = v.num_ranks, N = v.num_nodes, G = v.ranks_per_node, K = a.num_topk;
  const int L = v.num_experts / R, C = a.capacity, stride_c = v.layout.count_stride;
  const int* counts = region<int>(v, v.layout.counts);
  if (threadIdx.x == 0) s_ok = !aborted(v);
  __syncthreads();
  if (threadIdx.x < R && !wait_tag(v, op, &ctrl(v)->count_sig[threadIdx.x], threadIdx.x)) s_ok = 0;
  __syncthreads();
  const bool ok = s_ok != 0;
  if (ok && threadIdx.x == 0) {
    int run = 0;
    for (int s = 0; s < R; ++s) {
      s_recv_offset[s] = run;
      run += ld_staging(counts + at(s, stride_c, v.rank));
    }
    s_recv_offset[R] = run;
  }
  const bool expert_counts = a.expert_layout && !a.cached;
  if (ok && expert_counts) {
    for (int e = threadIdx.x; e < L; e += kThreads) {
      int run = 0;
      for (int s = 0; s < R; ++s) {
        s_source_base[e * R + s] = run;
        run += ld_staging(counts + at(s, stride_c, R + N + v.rank * L + e));
      }
      s_expert_offset[e] = run;  // rows of expert e, made a prefix below
    }
  }
  __syncthreads();
  if (ok && expert_counts && threadIdx.x == 0) {
    int run = 0;
    for (int e = 0; e < L; ++e) {
      const int rows = s_expert_offset[e];
      s_expert_offset[e] = run;
      run += rows;
    }
    s_expert_offset[L] = run;
  }
  __syncthreads();
  const int num_pairs = ok ? s_recv_offset[R] : 0;
  const int total_rows = expert_counts ? s_expert_offset[L] : num_pairs;
  const int num_recv = min(total_rows, C);
  if (ok && !a.cached && blockIdx.x == 0) {
    for (int i = threadIdx.x; i < R * R; i += kThreads) {
      a.num_tokens_matrix[i] = ld_staging(counts + at(i / R, stride_c, i % R));
    }
  }
  const int data_vecs = a.hidden_bytes / 16;
  int* expert_acc = region<int>(v, v.layout.expert_acc);
  for (int p = global_warp(); ok && p < num_pairs; p += num_global_warps()) {
    int s = 0;
    while (s_recv_offset[s + 1] <= p) ++s;
    const int j = p - s_recv_offset[s];
    const char* row = v.base + v.layout.nvl_recv + (static_cast<size_t>(s) * v.max_tokens + j) * v.layout.row_bytes;
    bool arrived = true;
    if (lane == 0) arrived = wait_tag(v, op, reinterpret_cast<const u64*>(row), v.node * G + s % G);
    if (!__shfl_sync(kFullMask, arrived, 0)) break;
    const int4* data = reinterpret_cast<const int4*>(row + v.layout.row_data);
    const float* scales = reinterpret_cast<const float*>(row + v.layout.row_scales);
    // Destination rows: the rank layout's p, or one per distinct local expert (lane k holds
    // slot k's row, -1 for none).
    int dst_row = -1, local = -1;
    if (a.cached) {
      if (!a.expert_layout) {
        dst_row = lane == 0 && p < C ? p : -1;
      } else if (lane < K) {
        dst_row = a.pair_expert_rows[at(p, K, lane)];
      }
    } else {
      int e = -1;
      if (lane < K) e = ld_staging(reinterpret_cast<const int*>(row + v.layout.row_topk_idx) + lane);
      local = e >= 0 && e / L == v.rank ? e - v.rank * L : -1;
      bool first = local >= 0;
      for (int k = 0; k < K; ++k) {
        const int other = __shfl_sync(kFullMask, e, k);
        if (k < lane && other == e) first = false;
      }
      if (!a.expert_layout) {
        if (first && p < C) atomicAdd(&expert_acc[local], 1);
        dst_row = lane == 0 && p < C ? p : -1;
      } else {
        if (first) {
          const int pos = ld_staging(reinterpret_cast<const int*>(row + v.layout.row_expert_pos) + lane);
          dst_row = s_expert_offset[local] + s_source_base[local * R + s] + pos;
          if (dst_row >= C) dst_row = -1;
        }
        if (lane < K) a.pair_expert_rows[at(p, K, lane)] = dst_row;
      }
    }
    const float weight = !a.cached && lane < K ? ld_staging(reinterpret_cast<const float*>(row + v.layout.row_topk_weights) + lane) : 0.f;
    const unsigned dst_rows = __ballot_sync(kFullMask, dst_row >= 0);
    int4* lane_dst = dst_row >= 0 ? reinterpret_cast<int4*>(static_cast<char*>(a.recv_x) + static_cast<size_t>(dst_row) * a.hidden_bytes)
                                  : nullptr;
    warp_copy_row<kCopyUnroll, false>(data, lane_dst, dst_rows, data_vecs, lane);
    for (unsigned rows = dst_rows; rows != 0; rows &= rows - 1) {
      const int k = __ffs(rows) - 1;
      const int out = __shfl_sync(kFullMask, dst_row, k);
      const int expert = __shfl_sync(kFullMask, local, k);
      for (int i = lane; i < a.num_scales; i += kWarpSize) {
        a.recv_x_scales[at(out, a.num_scales, i)] = ld_staging(scales + i);
      }
      if (!a.cached && lane < K) {
        // Rank layout: every local slot; expert layout: the slots of this row's expert.
        const bool keep = a.expert_layout ? local == expert && local >= 0 : local >= 0;
        a.recv_topk_idx[at(out, K, lane)] = keep ? local : -1;
        a.recv_topk_weights[at(out, K, lane)] = keep ? weight : 0.f;
      }
    }
  }
  // Rows past the received ones (and pairs past the received ones) are zero / -1.
  if (ok && !a.cached) {
    for (int r = num_recv + global_warp(); r < C; r += num_global_warps()) {
      int4* dst = reinterpret_cast<int4*>(static_cast<char*>(a.recv_x) + static_cast<size_t>(r) * a.hidden_bytes);
      warp_zero_row(dst, data_vecs, lane);
      for (int i = lane; i < a.num_scales; i += kWarpSize) a.recv_x_scales[at(r, a.num_scales, i)] = 0.f;
      if (lane < K) {
        a.recv_topk_idx[at(r, K, lane)] = -1;
        a.recv_topk_weights[at(r, K, lane)] = 0.f;
      }
    }
    if (a.expert_layout) {
      for (size_t i = static_cast<size_t>(num_pairs) * K + blockIdx.x * kThreads + threadIdx.x;
           i < static_cast<size_t>(a.num_pair_rows) * K; i += gridDim.x * kThreads) {
        a.pair_expert_rows[i] = -1;
      }
    }
  }
  Outputs outputs;
  if (a.cached) {
    outputs.add(a.recv_x, static_cast<size_t>(C) * a.hidden_bytes);
  } else {
    outputs.add(a.recv_x, static_cast<size_t>(C) * a.hidden_bytes);
    outputs.add(a.recv_x_scales, static_cast<size_t>(C) * a.num_scales * sizeof(float));
    outputs.add(a.recv_topk_idx, static_cast<size_t>(C) * K * sizeof(int));
    outputs.add(a.recv_topk_weights, static_cast<size_t>(C) * K * sizeof(float));
    outputs.add(a.num_recv_tokens, sizeof(int));
    outputs.add(a.num_recv_tokens_per_expert, static_cast<size_t>(L) * sizeof(int));
    outputs.add(a.num_dropped, sizeof(int));
    if (a.pending == nullptr) outputs.add(a.send_pos, static_cast<size_t>(a.num_tokens) * R * sizeof(int));
    outputs.add(a.num_tokens_matrix, static_cast<size_t>(R) * R * sizeof(int));
    if (a.expert_layout) outputs.add(a.pair_expert_rows, static_cast<size_t>(a.num_pair_rows) * K * sizeof(int));
  }
  finish_op(v, op, outputs, [&] {
    if (a.cached) return;
    if (threadIdx.x == 0) {
      *a.num_recv_tokens = num_recv;
      *a.num_dropped = total_rows - num_recv;
    }
    for (int e = threadIdx.x; e < L; e += kThreads) {
      if (a.expert_layout) {
        const int rows = s_expert_offset[e + 1] - s_expert_offset[e];
        a.num_recv_tokens_per_expert[e] = max(0, min(rows, C - s_expert_offset[e]));
      } else {
        a.num_recv_tokens_per_expert[e] = ld_volatile(&expert_acc[e]);
        expert_acc[e] = 0;
      }
    }
  });
}

// Forward, then receive, as phases of one kernel: a block starts on the received rows as soon
// as its own forwarding is done (no launch gap, no wait for the slowest block of the forward).
// A receive may wait for a row another block of this kernel forwards; that block does not
// wait for this one's, so the kernel needs no co-residency, only that blocks get scheduled.
__global__ void __launch_bounds__(kThreads, 1) dispatch_forward_recv_kernel(InternodeView v, InternodeDispatchArgs a) {
  dispatch_forward(v, a);
  dispatch_recv(v, a);
}

// ---------------------------------------------------------------------------------------
// Combine
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ int* meta_of(const InternodeView& v, size_t offset, int m) {
  return region<int>(v, offset) + static_cast<size_t>(m) * v.layout.meta_stride;
}
// Row j of node m's partial sums (comb_send / comb_recv), in the combine's dtype T.
template <typename T>
__device__ __forceinline__ int4* partial_row(const InternodeView& v, size_t offset, int m, int j) {
  return reinterpret_cast<int4*>(region<T>(v, offset) + (static_cast<size_t>(m) * v.max_tokens + j) * v.hidden);
}

// The value holder g of this node wrote for pair j of source (m, this rank's local index).
// Rows keep the layout's stride (for f32 rows) whatever y's dtype: a row's tag must never land
// on another op's row data.
__device__ __forceinline__ char* comb_nvl_row(const InternodeView& v, char* base, int g, int m, int j) {
  return base + v.layout.comb_nvl + ((static_cast<size_t>(g) * v.num_nodes + m) * v.max_tokens + j) * v.layout.comb_row_bytes;
}

// Send: warps 0 .. N-1 put each node's routing (the tokens it received from this rank, in
// order, with their send_pos on that node's ranks) to this rank's forwarder there; every warp
// then builds the value of each pair this rank holds and stores it, over NVLink, in the
// forwarder of the pair's source (this node's rank with the source's local index). In the
// rank layout pairs whose forwarder is this rank are not copied: its forward reads y.
template <typename T>
__device__ __forceinline__ void combine_send(const InternodeView& v, const InternodeCombineArgs& a) {
  using V = VecTraits<T>;
  __shared__ int s_recv_offset[kMaxInternodeRanks + 1];
  __shared__ int s_most_pairs;
  const Op op = current_op(v, kOpCombine);
  record_pending(a.pending, op);
  if (!wait_previous_op(v, op)) return;
  const int lane = threadIdx.x % kWarpSize;
  const int R = v.num_ranks, N = v.num_nodes, G = v.ranks_per_node, K = a.num_topk;
  const int* my_counts = my_counts_of(v, op);
  const int* node_token = region<int>(v, v.layout.node_token);
  const int warp = global_warp();
  if (warp < N) {
    const int m = warp, count = my_counts[R + m];
    int* meta = meta_of(v, v.layout.meta_send, m);
    if (lane == 0) meta[0] = count;
    for (int i = lane; i < count * (1 + G); i += kWarpSize) {
      const int j = i / (1 + G), g = i % (1 + G) - 1;
      const int t = node_token[at(m, v.max_tokens, j)];
      meta[4 + i] = g < 0 ? t : a.send_pos[at(t, R, m * G + g)];
    }
    __syncwarp();
    nvshmemx_putmem_signal_nbi_warp(meta_of(v, v.layout.meta_recv, v.node), meta,
                                    (4 + static_cast<size_t>(count) * (1 + G)) * sizeof(int),
                                    sig(&ctrl(v)->meta_sig[v.node]), op.tag, NVSHMEM_SIGNAL_SET,
                                    v.pe[m * G + v.local]);
  }
  if (threadIdx.x == 0) {
    int run = 0, most = 0;
    for (int s = 0; s < R; ++s) {
      s_recv_offset[s] = run;
      run += a.num_tokens_matrix[at(s, R, v.rank)];
      most = max(most, a.num_tokens_matrix[at(s, R, v.rank)]);
    }
    s_recv_offset[R] = run;
    s_most_pairs = most;
  }
  __syncthreads();
  const int num_vecs = a.hidden / V::kElems;
  const int4* y = static_cast<const int4*>(a.y);
  // Rows are tagged kChunkRows at a time after one system fence: lane i holds the i-th row
  // of the batch written but not tagged yet.
  char* untagged_row = nullptr;
  int num_untagged = 0;
  // Pairs interleaved across sources (item i is pair i / R of source i % R) so that the warps
  // write to every forwarder at once, not to one source's after another.
  for (int item = warp; item < R * s_most_pairs; item += num_global_warps()) {
    const int s = item % R, j = item / R;
    if ((s % G == v.local && !a.expert_layout) || j >= s_recv_offset[s + 1] - s_recv_offset[s]) continue;
    const int p = s_recv_offset[s] + j;
    char* row = comb_nvl_row(v, v.nvl_base[s % G], v.local, s / G, j);
    int4* dst = reinterpret_cast<int4*>(row + v.layout.comb_row_data);
    if (!a.expert_layout) {
      if (p < a.capacity) {
        warp_copy_row<kCopyUnroll, true>(y + static_cast<size_t>(p) * num_vecs, lane == 0 ? dst : nullptr, 1u,
                                         num_vecs, lane);
      } else {
        warp_zero_row(dst, num_vecs, lane);
      }
    } else {
      const int out_row = lane < K ? a.pair_expert_rows[at(p, K, lane)] : -1;
      const unsigned rows = __ballot_sync(kFullMask, out_row >= 0);
      for (int base = 0; base < num_vecs; base += kWarpSize * kSumUnroll) {  // whole warps: shuffles
        float acc[kSumUnroll][V::kElems] = {};
        for (unsigned m = rows; m != 0; m &= m - 1) {
          const int r = __shfl_sync(kFullMask, out_row, __ffs(m) - 1);
          add_row_step<T, true>(acc, y + static_cast<size_t>(r) * num_vecs, base, num_vecs, lane);
        }
        store_row_step<T>(dst, acc, base, num_vecs, lane);
      }
    }
    if (lane == num_untagged) untagged_row = row;
    if (++num_untagged == kChunkRows) {
      tag_rows(untagged_row, num_untagged, op.tag, lane);
      num_untagged = 0;
    }
  }
  tag_rows(untagged_row, num_untagged, op.tag, lane);
}

// Forward: for every token a source (m, my local index) sent to this node, the sum of the
// values of this node's holders in ascending local rank, in fp32 then cast to the combine's
// dtype T (half the network bytes of fp32 for bf16, as DeepEP); back to the source per chunk
// of kChunkRows tokens with a signal: written straight into its comb_recv where it is mapped
// (forwarder_base: this rank itself, and the other nodes on one host), else put.
template <typename T>
__device__ __forceinline__ void combine_forward(const InternodeView& v, const InternodeCombineArgs& a) {
  using V = VecTraits<T>;
  __shared__ int s_count[kMaxNodes];
  __shared__ int s_self_offset[kMaxNodes];  // [m]: this rank's first pair of source (m, local)
  __shared__ int s_ok;
  const Op op = current_op(v, kOpCombine);
  const int lane = threadIdx.x % kWarpSize;
  const int R = v.num_ranks, N = v.num_nodes, G = v.ranks_per_node;
  if (threadIdx.x == 0) {
    s_ok = !aborted(v);
    int run = 0;
    for (int s = 0; s < R; ++s) {
      if (s % G == v.local) s_self_offset[s / G] = run;
      run += a.num_tokens_matrix[at(s, R, v.rank)];
    }
  }
  __syncthreads();
  if (threadIdx.x < N) {
    if (!wait_tag(v, op, &ctrl(v)->meta_sig[threadIdx.x], threadIdx.x * G + v.local)) s_ok = 0;
    s_count[threadIdx.x] = ld_staging(meta_of(v, v.layout.meta_recv, threadIdx.x));
  }
  __syncthreads();
  if (!s_ok) return;
  const int num_vecs = a.hidden / V::kElems;
  const int4* y = static_cast<const int4*>(a.y);
  // Work items (node m, chunk c), interleaved across nodes as in the dispatch send.
  int max_count = 0;
  for (int m = 0; m < N; ++m) max_count = max(max_count, s_count[m]);
  const int num_items = N * ((max_count + kChunkRows - 1) / kChunkRows);
  for (int item = global_warp(); item < num_items; item += num_global_warps()) {
    const int m = item % N, first = item / N * kChunkRows;
    if (first >= s_count[m]) continue;
    const int c = first / kChunkRows;
    const int rows = min(kChunkRows, s_count[m] - first);
    const int* meta = meta_of(v, v.layout.meta_recv, m) + 4;
    char* source = v.forwarder_base[m];
    for (int j = first; j < first + rows; ++j) {
      // Lane g < G: the token's pair index on holder g of this node (-1: g does not hold it),
      // and the value g wrote here; in the rank layout this rank's own value is y's row.
      const int pos = lane < G ? ld_staging(meta + at(j, 1 + G, 1 + lane)) : -1;
      const char* row = pos >= 0 && (lane != v.local || a.expert_layout) ? comb_nvl_row(v, v.base, lane, m, pos) : nullptr;
      bool ok = row == nullptr || wait_tag(v, op, reinterpret_cast<const u64*>(row), v.node * G + lane);
      if (__ballot_sync(kFullMask, !ok) != 0) return;
      const unsigned holders = __ballot_sync(kFullMask, pos >= 0);
      const int self_pos = __shfl_sync(kFullMask, pos, v.local);
      const int p = self_pos >= 0 ? s_self_offset[m] + self_pos : -1;  // this rank's pair
      int4* out = source != nullptr
                      ? reinterpret_cast<int4*>(source + v.layout.comb_recv + (static_cast<size_t>(v.node) * v.max_tokens + j) * v.hidden * sizeof(T))
                      : partial_row<T>(v, v.layout.comb_send, m, j);
      for (int base = 0; base < num_vecs; base += kWarpSize * kSumUnroll) {  // whole warps: shuffles
        float acc[kSumUnroll][V::kElems] = {};
        for (unsigned h = holders; h != 0; h &= h - 1) {
          const int g = __ffs(h) - 1;
          if (g != v.local || a.expert_layout) {
            const char* src = reinterpret_cast<const char*>(
                __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(row), g));
            add_row_step<T, false>(acc, reinterpret_cast<const int4*>(src + v.layout.comb_row_data), base, num_vecs, lane);
          } else if (p < a.capacity) {  // this rank's value of pair p: y[p] (zero past C)
            add_row_step<T, true>(acc, y + static_cast<size_t>(p) * num_vecs, base, num_vecs, lane);
          }
        }
        store_row_step<T>(out, acc, base, num_vecs, lane);
      }
    }
    release_chunk(v, source, v.layout.comb_sig + at(v.node, v.max_tokens / kChunkRows + 1, c) * sizeof(u64),
                  partial_row<T>(v, v.layout.comb_recv, v.node, first),
                  partial_row<T>(v, v.layout.comb_send, m, first),
                  static_cast<size_t>(rows) * v.hidden * sizeof(T), v.pe[m * G + v.local], op.tag, lane);
  }
  // No nvshmem_quiet, as in the dispatch send: comb_send is rewritten only by a later
  // combine's forward, after every rank finished this op.
}

// Send, then forward, as phases of one kernel (as dispatch_forward_recv_kernel).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) combine_send_forward_kernel(InternodeView v, InternodeCombineArgs a) {
  combine_send<T>(v, a);
  combine_forward<T>(v, a);
}

// Reduce: out[t] = bias[t] + the partial sums of the nodes t went to, in ascending node, in
// fp32, then cast to T.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) combine_reduce_kernel(InternodeView v, InternodeCombineArgs a) {
  using V = VecTraits<T>;
  const Op op = current_op(v, kOpCombine);
  const int lane = threadIdx.x % kWarpSize;
  const int N = v.num_nodes, G = v.ranks_per_node;
  const int num_vecs = a.hidden / V::kElems;
  const int* node_pos = region<int>(v, v.layout.node_pos);
  bool ok = check_pending(v, op, a.pending) && !aborted(v);
  for (int t = global_warp(); ok && t < a.num_tokens; t += num_global_warps()) {
    const int pos = lane < N ? node_pos[at(t, N, lane)] : -1;
    if (pos >= 0) {
      const u64* word = region<u64>(v, v.layout.comb_sig) + at(lane, v.max_tokens / kChunkRows + 1, pos / kChunkRows);
      ok = wait_tag(v, op, word, lane * G + v.local);
    }
    if (__ballot_sync(kFullMask, !ok) != 0) {
      ok = false;
      break;
    }
    const unsigned nodes = __ballot_sync(kFullMask, pos >= 0);
    int4* out = static_cast<int4*>(a.out) + static_cast<size_t>(t) * num_vecs;
    for (int base = 0; base < num_vecs; base += kWarpSize * kSumUnroll) {  // whole warps: shuffles
      float acc[kSumUnroll][V::kElems] = {};
      if (a.bias != nullptr) {
        add_row_step<T, true>(acc, static_cast<const int4*>(a.bias) + static_cast<size_t>(t) * num_vecs, base, num_vecs, lane);
      }
      for (unsigned n = nodes; n != 0; n &= n - 1) {
        const int m = __ffs(n) - 1;
        const int j = __shfl_sync(kFullMask, pos, m);
        add_row_step<T, false>(acc, partial_row<T>(v, v.layout.comb_recv, m, j), base, num_vecs, lane);
      }
      store_row_step<T>(out, acc, base, num_vecs, lane);
    }
  }
  Outputs outputs;
  outputs.add(a.out, static_cast<size_t>(a.num_tokens) * a.hidden * sizeof(T));
  finish_op(v, op, outputs, [] {});
}

}  // namespace

static size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

InternodeLayout make_internode_layout(int num_ranks, int ranks_per_node, int max_tokens, int hidden,
                                      int max_topk, int num_experts) {
  InternodeLayout l{};
  const size_t R = num_ranks, G = ranks_per_node, N = num_ranks / ranks_per_node, T = max_tokens;
  const size_t chunks = T / kChunkRows + 1;
  l.count_stride = static_cast<int>(R + N + num_experts);
  l.meta_stride = static_cast<int>(4 + T * (1 + G));
  l.row_send_pos = 16;
  l.row_topk_idx = l.row_send_pos + kMaxNvlRanks * sizeof(int);
  l.row_topk_weights = l.row_topk_idx + max_topk * sizeof(int);
  l.row_expert_pos = l.row_topk_weights + max_topk * sizeof(float);
  l.row_scales = align_up(l.row_expert_pos + max_topk * sizeof(int), 16);
  l.row_data = align_up(l.row_scales + hidden / 128 * sizeof(float), kRowDataAlign);
  l.row_bytes = align_up(l.row_data + static_cast<size_t>(hidden) * 4, 16);
  l.comb_row_data = 16;
  l.comb_row_bytes = l.comb_row_data + static_cast<size_t>(hidden) * 4;
  size_t at = align_up(sizeof(InternodeControl), 128);
  auto take = [&](size_t* field, size_t bytes) {
    *field = at;
    at = align_up(at + bytes, 128);
  };
  take(&l.counts, R * l.count_stride * sizeof(int));
  take(&l.my_counts, 2 * l.count_stride * sizeof(int));
  take(&l.rdma_sig, N * chunks * 8);
  take(&l.comb_sig, N * chunks * 8);
  take(&l.rdma_send, N * T * l.row_bytes);
  take(&l.rdma_recv, N * T * l.row_bytes);
  take(&l.nvl_recv, R * T * l.row_bytes);
  take(&l.meta_send, N * l.meta_stride * sizeof(int));
  take(&l.meta_recv, N * l.meta_stride * sizeof(int));
  take(&l.comb_nvl, G * N * T * l.comb_row_bytes);
  take(&l.comb_send, N * T * hidden * sizeof(float));
  take(&l.comb_recv, N * T * hidden * sizeof(float));
  take(&l.node_pos, T * N * sizeof(int));
  take(&l.node_token, N * T * sizeof(int));
  take(&l.expert_pos, T * max_topk * sizeof(int));
  take(&l.tile_counts, (T / kLayoutTileTokens + 1) * l.count_stride * sizeof(int));
  take(&l.expert_acc, kMaxExperts * sizeof(int));
  l.total = at;
  return l;
}

namespace {
cudaError_t launch_plan(const InternodeView& v, const PlanArgs& p, cudaStream_t stream) {
  const int tiles = p.num_tokens > 0 ? (p.num_tokens + kLayoutTileTokens - 1) / kLayoutTileTokens : 1;
  plan_totals_kernel<<<tiles, kPlanThreads, 0, stream>>>(v, p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  plan_positions_kernel<<<tiles, kPlanThreads, 0, stream>>>(v, p);
  return cudaGetLastError();
}
}  // namespace

cudaError_t launch_internode_dispatch(const InternodeView& v, const InternodeDispatchArgs& a,
                                      int phases, cudaStream_t stream) {
  cudaError_t err;
  if (phases & kPhaseSend) {
    PlanArgs p{a.cached ? nullptr : a.topk_idx, a.send_pos, a.num_tokens, a.num_topk};
    if ((err = launch_plan(v, p, stream)) != cudaSuccess) return err;
    dispatch_send_kernel<<<a.num_blocks, kThreads, 0, stream>>>(v, a);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (!(phases & kPhaseRecv)) return cudaSuccess;
  dispatch_forward_recv_kernel<<<a.num_blocks, kThreads, 0, stream>>>(v, a);
  return cudaGetLastError();
}

namespace {
template <typename T>
cudaError_t launch_combine_kernels(const InternodeView& v, const InternodeCombineArgs& a,
                                   int phases, cudaStream_t stream) {
  cudaError_t err;
  if (phases & kPhaseSend) {
    PlanArgs p{nullptr, const_cast<int*>(a.send_pos), a.num_tokens, a.num_topk};
    if ((err = launch_plan(v, p, stream)) != cudaSuccess) return err;
    combine_send_forward_kernel<T><<<a.num_blocks, kThreads, 0, stream>>>(v, a);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (!(phases & kPhaseRecv)) return cudaSuccess;
  combine_reduce_kernel<T><<<a.num_blocks, kThreads, 0, stream>>>(v, a);
  return cudaGetLastError();
}
}  // namespace

cudaError_t launch_internode_combine(const InternodeView& v, const InternodeCombineArgs& a,
                                     int phases, cudaStream_t stream) {
  return a.is_bf16 ? launch_combine_kernels<__nv_bfloat16>(v, a, phases, stream)
                   : launch_combine_kernels<float>(v, a, phases, stream);
}

}  // namespace jax_ep
