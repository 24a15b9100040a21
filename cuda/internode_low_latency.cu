// Low-latency (decode) dispatch and combine of internode Buffers over NVSHMEM
// (cuda/internode_low_latency.h: the staging and the protocol). Each op is one kernel whose
// blocks (num_sms, all resident) first send, then receive. Staging is indexed by source token
// as in the intranode kernels (cuda/low_latency.cu), whose semantics and output order these
// kernels keep: recv slot (s, t) of a rank holds token t of source s.
//
// low_latency_dispatch
//   send: every block builds the bit table of this rank's routing (count_positions); block 0
//     sends every rank its count row (this rank's tokens per expert of that rank, and a bit per
//     token that rank receives) and with it the op's announcement. The warps of a block share
//     its tokens: a token's row (header: global expert and position of every top-k slot; FP8
//     scales; data, cast to FP8 on the way with fp8) goes once per holding rank: stored into
//     the recv slot of each holder of this node, and staged once in the symmetric send area
//     when a rank of another node holds one of its experts. Once the block's rows are written,
//     it releases them: a release store of the tag for the ranks of this node, a put with
//     signal of the staged row for each holder in another node.
//   receive: every block waits for every source's count row and derives where each source's
//     rows of each local expert start (rows grouped by source rank, then source token); a warp
//     per piece of a slot that its count row announces waits for the row's tag and copies the
//     piece into recv_x once per local expert the slot selects; row_of_slot is filled on the
//     way (-1 for the slots no row comes for).
// low_latency_combine
//   send: block 0 sends every rank this rank's top-k weights (with the announcement). The warps
//     of a block share its (source, token) pairs with rows here (row_of_slot): they sum
//     w_k * x[row_k] over the token's local slots in fp32 in slot order, cast to x's dtype, and
//     write it into the source's recv slot (source in this node) or into the send area (another
//     node), which is then put with a signal: one row per (token, holding rank).
//   receive: a warp per piece of a token's output row waits for the rows of the ranks holding
//     its experts and sums them in fp32 in ascending rank order.
// A wait past the time limit (or a tag of another op) records the failure (ErrorRecord) and
// the op's outputs are filled with all-ones bytes. With mask, a rank that does not answer
// within the time limit is masked instead (InternodeControl::masked, ErrorRecord) and treated
// as sending nothing, in this op and every later one: its done word, announcement and rows are
// not waited for, its count row and rows count as empty (its slots' row_of_slot is -1, a
// combine output row leaves its rows out), and nothing is stored, put or signalled to it.
// Hooked, an op is two launches on XLA's stream: the send half (send phase: the rows are put
// and, on one host, already written when it ends) and the receive half (receive phase); the
// work between them runs on every SM.
#include <nvshmem.h>
#include <nvshmemx.h>

#include "cuda/common.cuh"
#include "cuda/internode_low_latency.h"
#include "cuda/internode_protocol.cuh"
#include "cuda/low_latency_common.cuh"

namespace jax_ep {
namespace {

using namespace internode;

constexpr int kThreads = 512;
constexpr size_t kDefaultDynamicSmem = 32 * 1024;  // more needs an opt-in (with the static tables)
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kCopyUnroll = 4;
constexpr int kReduceBatch = 4;  // combine receive: holders' rows whose loads are in flight together

// ---------------------------------------------------------------------------------------
// Staging (InternodeLowLatencyLayout) in the area starting at `base`: this rank's, or that of
// a rank of this node (nvl_base). For a put, the destination is the same offset in this rank's
// area (a symmetric address) and NVSHMEM's PE names the rank.
// ---------------------------------------------------------------------------------------
struct Staging {
  const InternodeLowLatencyLayout& l;
  int num_ranks, max_tokens, max_topk;

  __device__ u64* announce(char* base, int p, int s) const {
    return reinterpret_cast<u64*>(base + l.announce) + at(p, num_ranks, s);
  }
  __device__ u64* row_sig(char* base, int p, int s, int t) const {
    return reinterpret_cast<u64*>(base + l.row_sig) + at(p * num_ranks + s, max_tokens, t);
  }
  __device__ int* counts(char* base, int p, int s) const {
    return reinterpret_cast<int*>(base + l.counts) + at(p * num_ranks + s, l.count_stride, 0);
  }
  __device__ int* count_send(char* base, int r) const {
    return reinterpret_cast<int*>(base + l.count_send) + at(r, l.count_stride, 0);
  }
  __device__ float* weights(char* base, int p, int s) const {
    return reinterpret_cast<float*>(base + l.weights) +
           static_cast<size_t>(p * num_ranks + s) * max_tokens * max_topk;
  }
  __device__ float* weight_send(char* base) const {
    return reinterpret_cast<float*>(base + l.weight_send);
  }
  __device__ char* recv_row(char* base, int p, int s, int t) const {
    return base + l.recv + at(p * num_ranks + s, max_tokens, t) * l.row_bytes;
  }
  __device__ char* send_row(char* base, int i) const {
    return base + l.send + static_cast<size_t>(i) * l.row_bytes;
  }
};

__device__ __forceinline__ Staging staging(const InternodeView& v, const InternodeLowLatencyView& ll) {
  return Staging{ll.layout, v.num_ranks, ll.layout.max_tokens, v.max_topk};
}
__device__ __forceinline__ bool same_node(const InternodeView& v, int r) {
  return r / v.ranks_per_node == v.node;
}
// Bit r set for every rank.
__device__ __forceinline__ u64 all_ranks(const InternodeView& v) {
  return v.num_ranks == 64 ? ~0ull : (1ull << v.num_ranks) - 1;
}
// Bit r set for the ranks of this node.
__device__ __forceinline__ u64 node_ranks(const InternodeView& v) {
  const u64 ones = v.ranks_per_node == 64 ? ~0ull : (1ull << v.ranks_per_node) - 1;
  return ones << (v.node * v.ranks_per_node);
}
// Index of rank r (of another node) among the ranks outside this node: its rows in the send area.
__device__ __forceinline__ int remote_index(const InternodeView& v, int r) {
  return r < v.node * v.ranks_per_node ? r : r - v.ranks_per_node;
}
template <typename P>
__device__ __forceinline__ P* shfl_ptr(P* p, int lane) {
  return reinterpret_cast<P*>(__shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(p), lane));
}
// Warp-wide: bit r set when rank r holds the expert of some lane's slot (e = -1: none).
__device__ __forceinline__ u64 warp_holders(int e, int num_local) {
  const int r = e >= 0 ? e / num_local : -1;
  const unsigned lo = __reduce_or_sync(kFullMask, r >= 0 && r < 32 ? 1u << r : 0u);
  const unsigned hi = __reduce_or_sync(kFullMask, r >= 32 ? 1u << (r - 32) : 0u);
  return static_cast<u64>(hi) << 32 | lo;
}

// ---------------------------------------------------------------------------------------
// Op protocol: cuda/internode_protocol.cuh (the internode ops' numbers, tags and done words).
// ---------------------------------------------------------------------------------------
// Block-uniform: every rank finished op n - 2, the last op that used the staging of this
// parity (threads 0 .. R-1 wait, one rank each), and this rank has not failed. *live: the
// ranks the op sends to, every rank but those masked (mask=true; masked here if they time out).
__device__ __forceinline__ bool wait_peers_done(const InternodeView& v, const Op& op, bool mask,
                                                u64* live) {
  __shared__ int s_ok;
  __shared__ u64 s_live;
  if (threadIdx.x == 0) {
    s_ok = !aborted(v);
    s_live = all_ranks(v);
  }
  __syncthreads();
  if (threadIdx.x < v.num_ranks) {
    const u64* done = &ctrl(v)->done[threadIdx.x];
    const int w = wait_peer_or_mask(v, op, threadIdx.x, mask, [&](u64* seen) -> int {
      *seen = poll(done);
      return *seen + 2 >= op.n ? kWaitOk : kKeepWaiting;
    });
    if (w == kWaitFailed) s_ok = 0;
    if (w == kWaitMasked) atomicAnd(&s_live, ~(1ull << threadIdx.x));
  }
  __syncthreads();
  *live = s_live;
  return s_ok != 0;
}
// Block-uniform: every rank of *live announced this op (its count row or its weights arrived);
// with mask=true, those masked (here or before) are taken out of *live instead.
__device__ __forceinline__ bool wait_announcements(const InternodeView& v, const Staging& st, char* base,
                                                   const Op& op, bool mask, u64* live) {
  __shared__ int s_ok;
  __shared__ u64 s_live;
  if (threadIdx.x == 0) {
    s_ok = 1;
    s_live = *live;
  }
  __syncthreads();
  const int r = threadIdx.x;
  if (r < v.num_ranks && ((*live >> r) & 1)) {
    const int w = wait_tag_or_mask(v, op, st.announce(base, op.parity, r), r, mask);
    if (w == kWaitFailed) s_ok = 0;
    if (w == kWaitMasked) atomicAnd(&s_live, ~(1ull << r));
  }
  __syncthreads();
  *live = s_live;
  return s_ok != 0;
}

// Hooked ops: the send half records its op in `pending` ([n, code]); the receive half
// (block-uniform) checks that `pending` names the op it is about to finish and records
// kFailInFlight if not (a stale or repeated receive).
__device__ __forceinline__ void record_pending(int* pending, const Op& op) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    pending[0] = static_cast<int>(op.n);
    pending[1] = op.code;
  }
}
__device__ __forceinline__ bool check_pending(const InternodeView& v, const Op& op, const int* pending) {
  __shared__ int s_ok;
  if (threadIdx.x == 0) {
    s_ok = 1;
    if (pending[0] != static_cast<int>(op.n) || pending[1] != op.code) {
      fail(v, op, kFailInFlight, v.rank, make_tag(static_cast<unsigned>(pending[0]), pending[1]));
      s_ok = 0;
    }
  }
  __syncthreads();
  return s_ok != 0;
}

// The phases of an op in one launch (OpPhases): the send half starts op n (the one after the
// last finished here) and records it in `pending`; the receive half checks `pending` and
// finishes the op; both run a fused op. Between a hooked op's halves no other op runs (the
// handlers keep that rule), so both halves find the same n.
// End of the op, run by every block: the last block poisons the outputs if the op failed,
// records the op as finished and tells every rank (done[me] = n) but the masked ones (mask).
// A failed rank announces nothing: its peers time out on their own.
__device__ __forceinline__ void finish_op(const InternodeView& v, const Op& op, const Poison& poison,
                                          bool mask) {
  __shared__ int s_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(&ctrl(v)->blocks_done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  if (aborted(v)) poison_outputs(poison);
  __syncthreads();
  if (threadIdx.x == 0) {
    ctrl(v)->blocks_done = 0;
    ctrl(v)->issued = op.n;
  }
  __syncthreads();
  if (threadIdx.x < v.num_ranks && !aborted(v) && !(mask && is_masked(v, threadIdx.x))) {
    nvshmemx_signal_op(sig(&ctrl(v)->done[v.rank]), op.n, NVSHMEM_SIGNAL_SET, v.pe[threadIdx.x]);
  }
}

// Sends this rank's `words` [R][stride] (already in the recv slots of this node's ranks and in
// count_send / weight_send for the others) with the announcement of op to the ranks of `live`:
// a release store for this node, a put with signal for the others. `remote_source(r)`: the
// source of the put to rank r in this rank's area. Block 0, every warp.
template <typename Remote>
__device__ __forceinline__ void announce_rows(const InternodeView& v, const InternodeLowLatencyView& ll,
                              const Staging& st, const Op& op, u64 live, char* dst_offset_base,
                              size_t bytes, Remote remote_source) {
  const int lane = threadIdx.x % kWarpSize;
  for (int r = threadIdx.x / kWarpSize; r < v.num_ranks; r += kWarps) {
    if (!((live >> r) & 1)) continue;  // masked
    if (same_node(v, r)) {
      if (lane == 0) signal(st.announce(ll.nvl_base[r % v.ranks_per_node], op.parity, v.rank), op.tag);
    } else {
      nvshmemx_putmem_signal_nbi_warp(dst_offset_base, remote_source(r), bytes,
                                      sig(st.announce(ll.base, op.parity, v.rank)), op.tag,
                                      NVSHMEM_SIGNAL_SET, v.pe[r]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------
// Block 0: rank r's count row [tokens per expert of r (L) | bit per token r holds one of the
// experts of (W words)], stored into r's counts (this node) or count_send[r] (another node),
// then announced; for the ranks of `live` only.
__device__ __forceinline__ void send_counts(const InternodeView& v, const InternodeLowLatencyView& ll,
                            const Staging& st, const LowLatencyDispatchArgs& a, const Op& op,
                            u64 live, const int* s_total, const unsigned* s_sel) {
  const int num_ranks = v.num_ranks, num_local = a.num_experts / num_ranks;
  const int stride = ll.layout.count_stride;
  const int words = (a.num_tokens + kWarpSize - 1) / kWarpSize;
  for (int i = threadIdx.x; i < num_ranks * stride; i += blockDim.x) {
    const int r = i / stride, c = i % stride;
    if (!((live >> r) & 1)) continue;  // masked
    int value;
    if (c < num_local) {
      value = s_total[r * num_local + c];
    } else {
      unsigned bits = 0;
      if (c - num_local < words) {
        for (int e = r * num_local; e < (r + 1) * num_local; ++e) bits |= s_sel[e * words + c - num_local];
      }
      value = static_cast<int>(bits);
    }
    int* row = same_node(v, r) ? st.counts(ll.nvl_base[r % v.ranks_per_node], op.parity, v.rank)
                               : st.count_send(ll.base, r);
    row[c] = value;
  }
  __threadfence_system();
  __syncthreads();
  announce_rows(v, ll, st, op, live, reinterpret_cast<char*>(st.counts(ll.base, op.parity, v.rank)),
                static_cast<size_t>(stride) * sizeof(int),
                [&](int r) { return st.count_send(ll.base, r); });
}

template <typename T>
__device__ __forceinline__ void dispatch_send(const InternodeView& v, const InternodeLowLatencyView& ll,
                              const LowLatencyDispatchArgs& a, const Op& op, int* s_pos,
                              int* s_total, unsigned* s_sel) {
  const Staging st = staging(v, ll);
  const InternodeLowLatencyLayout& l = ll.layout;
  const int G = v.ranks_per_node, me = v.rank, lane = threadIdx.x % kWarpSize;
  const int num_local = a.num_experts / v.num_ranks, num_topk = a.num_topk;
  const u64 mine = node_ranks(v);
  count_positions(a, s_pos, s_total, s_sel);
  u64 live;
  if (!wait_peers_done(v, op, a.mask, &live)) return;
  if (blockIdx.x == 0) send_counts(v, ll, st, a, op, live, s_total, s_sel);
  // Warps of this block share its tokens (t = blockIdx.x + j * gridDim.x), each row cut into
  // `pieces` pieces: item (j, p) is piece p of token j's row. Lane g < G: the recv slot of
  // rank (node, g) if it holds an expert of the token; lane G: the token's row in the send
  // area if a rank of another node does. Masked holders get nothing.
  const int num_vecs = a.hidden * static_cast<int>(sizeof(T)) / 16;
  const int my_tokens = block_items(a.num_tokens);
  const int pieces = row_pieces(num_vecs, my_tokens, kWarps);
  for (int item = threadIdx.x / kWarpSize; item < my_tokens * pieces; item += kWarps) {
    const int j = item / pieces, p = item % pieces;
    const int t = blockIdx.x + j * gridDim.x;
    int e = lane < num_topk ? __ldg(&a.topk_idx[at(t, num_topk, lane)]) : -1;
    if (e < 0 || e >= a.num_experts) e = -1;
    const u64 holders = warp_holders(e, num_local) & live;
    char* row = nullptr;
    if (lane < G && ((holders >> (v.node * G + lane)) & 1)) {
      row = st.recv_row(ll.nvl_base[lane], op.parity, me, t);
    } else if (lane == G && (holders & ~mine) != 0) {
      row = st.send_row(ll.base, t);
    }
    const unsigned dst_mask = __ballot_sync(kFullMask, row != nullptr);
    if (dst_mask == 0) continue;  // no expert: nothing to send (the count rows say so)
    if (p == 0) {  // the slot header
      const int pos = lane < num_topk ? s_pos[j * num_topk + lane] : -1;
      for (unsigned m = dst_mask; m != 0; m &= m - 1) {
        char* slot = shfl_ptr(row, __ffs(m) - 1);
        if (lane < num_topk) {
          reinterpret_cast<int*>(slot)[lane] = e;
          reinterpret_cast<int*>(slot + l.row_positions)[lane] = pos;
        }
      }
    }
    int begin, end;
    piece_range(num_vecs, pieces, p, &begin, &end);
    const int4* src = reinterpret_cast<const int4*>(static_cast<const char*>(a.x) +
                                                    at(t, a.hidden * static_cast<int>(sizeof(T)), 0));
    if (a.fp8) {
      warp_send_fp8_row<T>(src, row == nullptr ? nullptr : row + l.row_data,
                           row == nullptr ? nullptr : reinterpret_cast<float*>(row + l.row_scales),
                           dst_mask, begin, end, a.round_scale, lane);
    } else {
      warp_copy_row<kCopyUnroll, true>(
          src + begin, row == nullptr ? nullptr : reinterpret_cast<int4*>(row + l.row_data) + begin,
          dst_mask, end - begin, lane);
    }
  }
  // Every piece of the block's rows is written and visible: release them, a warp per token.
  __threadfence_system();
  __syncthreads();
  const size_t put_bytes = l.row_data + static_cast<size_t>(a.hidden) * (a.fp8 ? 1 : sizeof(T));
  for (int j = threadIdx.x / kWarpSize; j < my_tokens; j += kWarps) {
    const int t = blockIdx.x + j * gridDim.x;
    int e = lane < num_topk ? __ldg(&a.topk_idx[at(t, num_topk, lane)]) : -1;
    if (e < 0 || e >= a.num_experts) e = -1;
    const u64 holders = warp_holders(e, num_local) & live;
    if (lane < G && ((holders >> (v.node * G + lane)) & 1)) {
      signal(st.row_sig(ll.nvl_base[lane], op.parity, me, t), op.tag);
    }
    for (u64 m = holders & ~mine; m != 0; m &= m - 1) {
      const int r = __ffsll(static_cast<long long>(m)) - 1;
      nvshmemx_putmem_signal_nbi_warp(st.recv_row(ll.base, op.parity, me, t), st.send_row(ll.base, t),
                                      put_bytes, sig(st.row_sig(ll.base, op.parity, me, t)), op.tag,
                                      NVSHMEM_SIGNAL_SET, v.pe[r]);
    }
  }
  // The send area and count_send are sources of puts: complete them before the next op.
  __syncwarp();
  if (lane == 0) nvshmem_quiet();
}

// s_base[s * L + e]: first row of source s's rows of local expert e.
__device__ __forceinline__ void dispatch_recv(const InternodeView& v, const InternodeLowLatencyView& ll,
                              const LowLatencyDispatchArgs& a, const Op& op, int* s_base) {
  const Staging st = staging(v, ll);
  const InternodeLowLatencyLayout& l = ll.layout;
  const int num_ranks = v.num_ranks, me = v.rank, lane = threadIdx.x % kWarpSize;
  const int num_local = a.num_experts / num_ranks, num_topk = a.num_topk;
  const int m = a.max_tokens_per_rank, rows_per_expert = num_ranks * m;
  u64 live = all_ranks(v);  // the sources that announced this op (masked ones send nothing)
  if (!wait_announcements(v, st, ll.base, op, a.mask, &live)) return;  // failed: finish_op poisons
  const auto count_row = [&](int s) { return st.counts(ll.base, op.parity, s); };
  expert_row_bases(
      num_ranks, num_local, [&](int s, int e) { return (live >> s) & 1 ? ld_staging(count_row(s) + e) : 0; },
      s_base, a.recv_count);

  const int elem = a.fp8 ? 1 : (a.x_is_bf16 ? 2 : 4);
  const int row_bytes = a.hidden * elem, num_scales = a.fp8 ? a.hidden / kFp8Block : 0;
  const int warp = blockIdx.x * kWarps + threadIdx.x / kWarpSize, num_warps = gridDim.x * kWarps;
  // Slots past this op's tokens are empty everywhere.
  const size_t empty = static_cast<size_t>(m - a.num_tokens) * num_topk;
  for (size_t i = static_cast<size_t>(warp) * kWarpSize + lane; i < num_ranks * empty;
       i += static_cast<size_t>(num_warps) * kWarpSize) {
    const size_t s = i / empty, rest = i % empty;
    a.row_of_slot[(s * m + a.num_tokens) * num_topk + rest] = -1;
  }
  // Item (slot, p): piece p of the row of slot (s, t), the row cut as in the send.
  const int num_vecs = row_bytes / 16;
  const int pieces = row_pieces(num_vecs, num_ranks * a.num_tokens, 2 * num_warps);
  for (int i = warp; i < num_ranks * a.num_tokens * pieces; i += num_warps) {
    const int slot = i / pieces, p = i % pieces;
    const int s = slot / a.num_tokens, t = slot % a.num_tokens;
    const int bits = (live >> s) & 1 ? ld_staging(count_row(s) + num_local + t / kWarpSize) : 0;
    if (!((bits >> (t % kWarpSize)) & 1)) {  // no expert of this token here (or s is masked)
      if (p == 0 && lane < num_topk) a.row_of_slot[at(s * m + t, num_topk, lane)] = -1;
      continue;
    }
    char* row = st.recv_row(ll.base, op.parity, s, t);
    int w = kWaitOk;
    if (lane == 0) w = wait_tag_or_mask(v, op, st.row_sig(ll.base, op.parity, s, t), s, a.mask);
    w = __shfl_sync(kFullMask, w, 0);
    if (w == kWaitFailed) break;
    int flat = -1;  // masked during this wait: no row
    if (w == kWaitOk && lane < num_topk) {
      const int e = ld_staging(reinterpret_cast<const int*>(row) + lane) - me * num_local;
      const int pos = ld_staging(reinterpret_cast<const int*>(row + l.row_positions) + lane);
      if (e >= 0 && e < num_local && pos >= 0) {
        const int r = s_base[s * num_local + e] + pos;
        if (r < rows_per_expert) flat = e * rows_per_expert + r;
      }
    }
    if (p == 0 && lane < num_topk) a.row_of_slot[at(s * m + t, num_topk, lane)] = flat;
    // A repeated expert's slots share one row: copy it once.
    const unsigned same = __match_any_sync(kFullMask, flat);
    const unsigned dst_mask = __ballot_sync(kFullMask, flat >= 0 && __ffs(same) - 1 == lane);
    if (dst_mask == 0) continue;
    int begin, end;
    piece_range(num_vecs, pieces, p, &begin, &end);
    int4* dst = reinterpret_cast<int4*>(static_cast<char*>(a.recv_x) + at(max(flat, 0), row_bytes, 0));
    warp_copy_row<kCopyUnroll, false>(reinterpret_cast<const int4*>(row + l.row_data) + begin,
                                      dst + begin, dst_mask, end - begin, lane);
    if (num_scales && p == 0) {
      warp_copy_scales(reinterpret_cast<const float*>(row + l.row_scales), a.recv_scales, num_scales,
                       flat, dst_mask, lane);
    }
  }
}

template <int kPhases, typename Send, typename Recv>
__device__ __forceinline__ void run_phases(const InternodeView& v, const Op& op, int* pending, bool mask,
                                           const Poison& poison, Send send, Recv recv) {
  if constexpr ((kPhases & kPhaseSend) != 0) {
    if (pending != nullptr) record_pending(pending, op);
    send();
    if constexpr ((kPhases & kPhaseRecv) == 0) return;
    __syncthreads();
    recv();
  } else {
    if (check_pending(v, op, pending)) recv();
  }
  finish_op(v, op, poison, mask);
}

template <typename T, int kPhases>
__global__ void __launch_bounds__(kThreads, 1)
    dispatch_kernel(InternodeView v, InternodeLowLatencyView ll, LowLatencyDispatchArgs a, Poison poison) {
  extern __shared__ int s_pos[];  // send: [ceil(T / grid) * K] positions, then s_sel
  __shared__ int s_base[kMaxExperts];
  __shared__ int s_total[kMaxExperts];
  unsigned* s_sel = reinterpret_cast<unsigned*>(s_pos + block_items(a.num_tokens) * a.num_topk);
  const Op op = current_op(v, kOpLowLatencyDispatch);
  run_phases<kPhases>(
      v, op, a.pending, a.mask, poison, [&] { dispatch_send<T>(v, ll, a, op, s_pos, s_total, s_sel); },
      [&] { dispatch_recv(v, ll, a, op, s_base); });
}

// ---------------------------------------------------------------------------------------
// Combine
// ---------------------------------------------------------------------------------------
// Block 0: this rank's top-k weights [T][K] (rows of max_topk) to every rank of `live`.
__device__ __forceinline__ void send_weights(const InternodeView& v, const InternodeLowLatencyView& ll,
                             const Staging& st, const LowLatencyCombineArgs& a, const Op& op, u64 live) {
  const int G = v.ranks_per_node, num_topk = a.num_topk;
  float* remote = st.weight_send(ll.base);
  for (int i = threadIdx.x; i < a.num_tokens * num_topk; i += blockDim.x) {
    const size_t at_k = at(i / num_topk, v.max_topk, i % num_topk);
    const float w = __ldg(&a.topk_weights[i]);
    remote[at_k] = w;
    for (int g = 0; g < G; ++g) {
      if ((live >> (v.node * G + g)) & 1) st.weights(ll.nvl_base[g], op.parity, v.rank)[at_k] = w;
    }
  }
  __threadfence_system();
  __syncthreads();
  announce_rows(v, ll, st, op, live, reinterpret_cast<char*>(st.weights(ll.base, op.parity, v.rank)),
                static_cast<size_t>(a.num_tokens) * v.max_topk * sizeof(float),
                [&](int) { return remote; });
}

template <typename T>
__device__ __forceinline__ void combine_send(const InternodeView& v, const InternodeLowLatencyView& ll,
                             const LowLatencyCombineArgs& a, const Op& op) {
  const Staging st = staging(v, ll);
  const int num_ranks = v.num_ranks, me = v.rank, lane = threadIdx.x % kWarpSize;
  const int G = v.ranks_per_node, num_topk = a.num_topk;
  const int rows = a.num_experts / num_ranks * num_ranks * a.max_tokens_per_rank;
  u64 live;  // the ranks this op sends to: not masked, and (below) their weights arrived
  if (!wait_peers_done(v, op, a.mask, &live)) return;
  if (blockIdx.x == 0) send_weights(v, ll, st, a, op, live);
  if (!wait_announcements(v, st, ll.base, op, a.mask, &live)) return;
  // Warps of this block share its (source, token) pairs (i = blockIdx.x + j * gridDim.x, s =
  // i / T, t = i % T), each row cut into `pieces` pieces. The sum goes straight into the
  // source's recv slot (source in this node) or into the send area (another node); a masked
  // source gets nothing.
  const int num_vecs = a.hidden * static_cast<int>(sizeof(T)) / 16;
  const int my_pairs = block_items(num_ranks * a.num_tokens);
  const int pieces = row_pieces(num_vecs, my_pairs, kWarps);
  for (int item = threadIdx.x / kWarpSize; item < my_pairs * pieces; item += kWarps) {
    const int pair = blockIdx.x + item / pieces * gridDim.x, p = item % pieces;
    const int s = pair / a.num_tokens, t = pair % a.num_tokens;
    if (!((live >> s) & 1)) continue;
    const int row = lane < num_topk ? slot_row(a, s, t, lane, rows) : -1;
    const unsigned src_mask = __ballot_sync(kFullMask, row >= 0);
    if (src_mask == 0) continue;  // no expert of this token here: nothing to send
    const float w = row >= 0 ? ld_staging(st.weights(ll.base, op.parity, s) + at(t, v.max_topk, lane)) : 0.0f;
    char* dst = same_node(v, s) ? st.recv_row(ll.nvl_base[s % G], op.parity, me, t)
                                : st.send_row(ll.base, remote_index(v, s) * st.max_tokens + t);
    int begin, end;
    piece_range(num_vecs, pieces, p, &begin, &end);
    warp_weighted_sum<T>(static_cast<const int4*>(a.x), row, w, src_mask, reinterpret_cast<int4*>(dst),
                         begin, end, num_vecs, lane);
  }
  // Every piece of the block's rows is written and visible: release them, a warp per pair.
  __threadfence_system();
  __syncthreads();
  const size_t put_bytes = static_cast<size_t>(a.hidden) * sizeof(T);
  for (int j = threadIdx.x / kWarpSize; j < my_pairs; j += kWarps) {
    const int pair = blockIdx.x + j * gridDim.x;
    const int s = pair / a.num_tokens, t = pair % a.num_tokens;
    if (!((live >> s) & 1)) continue;
    const int row = lane < num_topk ? slot_row(a, s, t, lane, rows) : -1;
    if (__ballot_sync(kFullMask, row >= 0) == 0) continue;
    if (same_node(v, s)) {
      if (lane == 0) signal(st.row_sig(ll.nvl_base[s % G], op.parity, me, t), op.tag);
    } else {
      nvshmemx_putmem_signal_nbi_warp(st.recv_row(ll.base, op.parity, me, t),
                                      st.send_row(ll.base, remote_index(v, s) * st.max_tokens + t),
                                      put_bytes, sig(st.row_sig(ll.base, op.parity, me, t)), op.tag,
                                      NVSHMEM_SIGNAL_SET, v.pe[s]);
    }
  }
  // The send area and weight_send are sources of puts: complete them before the next op.
  __syncwarp();
  if (lane == 0) nvshmem_quiet();
}

// A warp per piece of a token's output row: the rows of its holders, in ascending rank, summed
// in fp32 (kReduceBatch holders' loads in flight together); masked holders are left out.
template <typename T>
__device__ __forceinline__ void combine_recv(const InternodeView& v, const InternodeLowLatencyView& ll,
                             const LowLatencyCombineArgs& a, const Op& op) {
  using V = VecTraits<T>;
  const Staging st = staging(v, ll);
  const int lane = threadIdx.x % kWarpSize;
  const int num_local = a.num_experts / v.num_ranks, num_topk = a.num_topk;
  const int num_vecs = a.hidden * static_cast<int>(sizeof(T)) / 16;
  const int warp = blockIdx.x * kWarps + threadIdx.x / kWarpSize, num_warps = gridDim.x * kWarps;
  const int pieces = row_pieces(num_vecs, a.num_tokens, num_warps);
  if (aborted(v)) return;  // finish_op poisons the outputs
  for (int i = warp; i < a.num_tokens * pieces; i += num_warps) {
    const int t = i / pieces, p = i % pieces;
    int e = lane < num_topk ? __ldg(&a.topk_idx[at(t, num_topk, lane)]) : -1;
    if (e < 0 || e >= a.num_experts) e = -1;
    // Lane k waits for the holder of slot k (a holder of several slots is waited for twice).
    int w = kWaitOk;
    if (e >= 0) {
      w = wait_tag_or_mask(v, op, st.row_sig(ll.base, op.parity, e / num_local, t), e / num_local, a.mask);
    }
    if (__any_sync(kFullMask, w == kWaitFailed)) break;
    const u64 holders = warp_holders(e, num_local) & ~warp_holders(w == kWaitMasked ? e : -1, num_local);
    int begin, end;
    piece_range(num_vecs, pieces, p, &begin, &end);
    int4* out = static_cast<int4*>(a.out) + at(t, num_vecs, 0);
    for (int c = begin + lane; c < end; c += kWarpSize) {
      float acc[V::kElems] = {};
      for (u64 m = holders; m != 0;) {
        int4 x[kReduceBatch];
        int n = 0;
#pragma unroll
        for (int b = 0; b < kReduceBatch; ++b) {
          if (m == 0) break;
          const int r = __ffsll(static_cast<long long>(m)) - 1;
          m &= m - 1;
          x[b] = ld_staging(reinterpret_cast<const int4*>(st.recv_row(ll.base, op.parity, r, t)) + c);
          n = b + 1;
        }
#pragma unroll
        for (int b = 0; b < kReduceBatch; ++b) {
          if (b < n) V::add(acc, x[b]);
        }
      }
      out[c] = V::pack(acc);
    }
  }
}

template <typename T, int kPhases>
__global__ void __launch_bounds__(kThreads, 1)
    combine_kernel(InternodeView v, InternodeLowLatencyView ll, LowLatencyCombineArgs a, Poison poison) {
  const Op op = current_op(v, kOpLowLatencyCombine);
  run_phases<kPhases>(
      v, op, a.pending, a.mask, poison, [&] { combine_send<T>(v, ll, a, op); },
      [&] { combine_recv<T>(v, ll, a, op); });
}

template <typename T, int kPhases>
cudaError_t launch_dispatch(const InternodeView& v, const InternodeLowLatencyView& ll,
                            const LowLatencyDispatchArgs& a, cudaStream_t stream) {
  const size_t smem = kPhases & kPhaseSend
                          ? count_positions_smem(a.num_tokens, a.num_topk, a.num_experts, a.num_blocks)
                          : 0;
  if (smem > kDefaultDynamicSmem) {
    const cudaError_t err = cudaFuncSetAttribute(dispatch_kernel<T, kPhases>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  Poison poison{};
  if (kPhases & kPhaseRecv) poison = dispatch_outputs(v.num_ranks, a);
  dispatch_kernel<T, kPhases><<<a.num_blocks, kThreads, smem, stream>>>(v, ll, a, poison);
  return cudaGetLastError();
}

template <typename T, int kPhases>
cudaError_t launch_combine(const InternodeView& v, const InternodeLowLatencyView& ll,
                           const LowLatencyCombineArgs& a, cudaStream_t stream) {
  Poison p{};
  if (kPhases & kPhaseRecv) {
    p.ptr[0] = a.out;
    p.bytes[0] = static_cast<size_t>(a.num_tokens) * a.hidden * sizeof(T);
    p.count = 1;
  }
  combine_kernel<T, kPhases><<<a.num_blocks, kThreads, 0, stream>>>(v, ll, a, p);
  return cudaGetLastError();
}

size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

}  // namespace

InternodeLowLatencyLayout make_internode_low_latency_layout(int num_ranks, int ranks_per_node,
                                                            int max_tokens, int hidden,
                                                            int max_topk, int num_experts) {
  InternodeLowLatencyLayout l{};
  const size_t R = num_ranks, G = ranks_per_node, M = max_tokens, K = max_topk;
  const size_t words = (M + kWarpSize - 1) / kWarpSize;
  l.count_stride = static_cast<int>(num_experts / num_ranks + words);
  l.max_tokens = max_tokens;
  l.row_positions = K * sizeof(int);
  l.row_scales = align_up(2 * K * sizeof(int), 16);
  l.row_data = align_up(l.row_scales + hidden / kFp8Block * sizeof(float), kRowDataAlign);
  // Every row's data starts on a 128-byte boundary; a combine row (data at 0, at most 4 bytes
  // per channel) fits in a dispatch row.
  l.row_bytes = align_up(l.row_data + static_cast<size_t>(hidden) * sizeof(float), kRowDataAlign);
  size_t at = 0;
  auto take = [&](size_t* field, size_t bytes) {
    *field = at;
    at = align_up(at + bytes, 128);
  };
  take(&l.announce, 2 * R * sizeof(u64));
  take(&l.row_sig, 2 * R * M * sizeof(u64));
  take(&l.counts, 2 * R * l.count_stride * sizeof(int));
  take(&l.count_send, R * l.count_stride * sizeof(int));
  take(&l.weights, 2 * R * M * K * sizeof(float));
  take(&l.weight_send, M * K * sizeof(float));
  take(&l.recv, 2 * R * M * l.row_bytes);
  take(&l.send, (R - G) * M * l.row_bytes);
  l.total = at;
  return l;
}

size_t internode_low_latency_dispatch_smem(int num_tokens, int num_topk, int num_experts,
                                           int num_blocks) {
  return count_positions_smem(num_tokens, num_topk, num_experts, num_blocks);
}

cudaError_t launch_internode_low_latency_dispatch(const InternodeView& v,
                                                  const InternodeLowLatencyView& ll,
                                                  const LowLatencyDispatchArgs& a, int phases,
                                                  cudaStream_t stream) {
  // The receive copies bytes: its instantiation does not depend on x's dtype.
  if (phases == kPhaseRecv) return launch_dispatch<float, kPhaseRecv>(v, ll, a, stream);
  if (a.x_is_bf16) {
    return phases == kPhaseSend ? launch_dispatch<__nv_bfloat16, kPhaseSend>(v, ll, a, stream)
                                : launch_dispatch<__nv_bfloat16, kPhaseBoth>(v, ll, a, stream);
  }
  return phases == kPhaseSend ? launch_dispatch<float, kPhaseSend>(v, ll, a, stream)
                              : launch_dispatch<float, kPhaseBoth>(v, ll, a, stream);
}

cudaError_t launch_internode_low_latency_combine(const InternodeView& v,
                                                 const InternodeLowLatencyView& ll,
                                                 const LowLatencyCombineArgs& a, int phases,
                                                 cudaStream_t stream) {
  if (a.is_bf16) {
    if (phases == kPhaseSend) return launch_combine<__nv_bfloat16, kPhaseSend>(v, ll, a, stream);
    if (phases == kPhaseRecv) return launch_combine<__nv_bfloat16, kPhaseRecv>(v, ll, a, stream);
    return launch_combine<__nv_bfloat16, kPhaseBoth>(v, ll, a, stream);
  }
  if (phases == kPhaseSend) return launch_combine<float, kPhaseSend>(v, ll, a, stream);
  if (phases == kPhaseRecv) return launch_combine<float, kPhaseRecv>(v, ll, a, stream);
  return launch_combine<float, kPhaseBoth>(v, ll, a, stream);
}

}  // namespace jax_ep
