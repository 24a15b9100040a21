// The memory region every device of an EP group owns, and the words in it that devices use
// to talk to each other. Plain C++ (host and device): the runtime (cuda/runtime.cc) sizes and
// allocates regions, the kernels (cuda/*.cu) reach them through the transport
// (cuda/transport.cuh).
//
// Protocol (intranode, every op is one kernel; docs/design.md "Runtime"):
//   - Every device numbers its ops: op n is the device's n-th jax_ep operation of the group
//     (Control::issued holds the last one started, Control::epoch the last one finished).
//     A fused op starts and finishes in one kernel. A hooked low-latency op is two kernels:
//     its send starts op n (and hands n to its receive through device memory), its receive
//     finishes it. At most two ops are in flight (sent, not received), received in the
//     order the device likes (XLA schedules them); a fused op runs only when none is in
//     flight. Control::epoch (and done[r] on peers) is the last op up to which every op
//     finished, so it only grows. A tag (n << kOpBits | op code) names the
//     op in every signal word, so ops issued in a different order on different ranks are
//     detected instead of mixed.
//   - Staging (rows, counts, announcements) is double-buffered by the parity of n. Before op n
//     writes anything into peer r's staging, it waits until r has finished op n - 2 (r
//     publishes done[r] = n into every peer's Control when its op n ends): consecutive calls
//     never collide and no all-rank barrier is needed.
//   - A kernel that waits longer than the group's time limit, or sees a tag of another op,
//     records the failure (host-mapped ErrorRecord), sets Control::abort (sticky) and the op
//     fills its outputs with all-ones bytes (NaN floats, -1 integers): a failed call never
//     returns plausible outputs.
#pragma once

#include <cstddef>
#include <cstdint>

namespace jax_ep {

constexpr int kMaxRanks = 8;       // one NVLink domain
constexpr int kMaxTopk = 32;       // a warp holds one token's top-k slots, a slot per lane
constexpr int kMaxExperts = 1024;  // bounds the per-tile count tables
constexpr int kLayoutTileTokens = 256;  // tokens per tile of the dispatch layout (counting)
constexpr int kMaxDevices = 64;    // CUDA ordinals one process can drive
constexpr int kMaxMaskedRanks = 64;  // ErrorRecord::masked: any group's EP ranks (internode too)

// Operation codes (the low bits of a tag).
enum OpCode : int {
  kOpDispatch = 1,
  kOpCombine = 2,
  kOpCachedDispatch = 3,
  kOpLowLatencyDispatch = 4,
  kOpLowLatencyCombine = 5,
};
// The kernels a launch runs: a whole op, or (hooked) its send half or its receive half.
enum OpPhases : int { kPhaseSend = 1, kPhaseRecv = 2, kPhaseBoth = 3 };
constexpr int kOpFailed = 7;  // op code a failed rank announces, so its peers stop waiting
constexpr int kOpBits = 3;
inline constexpr unsigned long long make_tag(unsigned long long n, int op) {
  return (n << kOpBits) | static_cast<unsigned long long>(op);
}

// Why an op failed (ErrorRecord::kind).
// kFailInFlight: this device's own op sequence broke the hook rules (a third send in flight,
// a receive out of order, a fused op while a send is in flight).
enum FailureKind : int { kFailTimeout = 1, kFailOrder = 2, kFailInFlight = 3 };

// One per device, in host-mapped pinned memory. The first failure on a device fills it and
// then sets flag. Never cleared: a group that failed stays unusable until it is destroyed.
struct ErrorRecord {
  volatile int flag;
  volatile int kind;         // FailureKind
  volatile int op;           // OpCode of the op that failed
  volatile int peer;         // EP rank it waited for
  volatile unsigned long long op_number;  // n of the op that failed
  volatile unsigned long long seen_tag;   // kFailOrder: the peer's tag
  // Low-latency ops with mask=True do not fail when a peer times out: they mask it
  // (masked[r] = 1: EP rank r), treat it as sending nothing from then on and record the first
  // masking. One word per peer, written with plain stores: this record is host memory, and a
  // GPU on PCIe has no atomics to host memory (compute-sanitizer's memcheck rejects them).
  // Intranode groups use the first kMaxRanks words, internode groups up to kMaxInternodeRanks.
  volatile int masked[kMaxMaskedRanks];
  volatile int mask_op;                    // OpCode of the op that masked the first rank
  volatile unsigned long long mask_op_number;
};

// Start of every device's region. Words written by peers are indexed by the writer's rank.
struct Control {
  unsigned long long announce[2][kMaxRanks];  // [parity][source]: tag of source's op
  unsigned long long done[kMaxRanks];         // done[r]: last op rank r finished
  unsigned long long epoch;                   // every op up to this one finished here
  unsigned long long issued;                  // last op this device started
  unsigned long long finished[2];             // [parity]: last op of that parity finished
  unsigned long long counted;                 // dispatch: op whose counting phase is complete
  unsigned int blocks_done;                   // blocks of the running op that finished
  unsigned int senders_counted;               // dispatch: sender blocks done counting
  int abort;                                  // set once an op on this device failed
  unsigned masked;                            // peers masked by low-latency ops (bit r)
};

// Byte offsets inside one device's region; the same on every device of a group, so a peer's
// address is peer_base + offset.
struct RegionLayout {
  size_t counts;       // int [2][kMaxRanks][count_stride]: [parity][source] = source's
                       // [tokens per rank (kMaxRanks) | tokens per expert]
  size_t expert_rank;  // int [max_tokens][max_topk], dispatch sender side
  size_t tile_counts;  // int [max_tokens / kLayoutTileTokens][count_stride], sender side
  size_t expert_acc;   // int [kMaxExperts]: rank-layout rows per local expert (accumulator)
  size_t dispatch;     // dispatch staging: [2][source rank][max_tokens] rows
  size_t combine;      // combine staging: [2][holder rank][max_tokens] rows
  size_t weights;      // uint64 [2][source rank][max_tokens][max_topk]: low-latency combine's
                       // top-k weights (float bits, stamped with the op: cuda/common.cuh
                       // stamped), sent by each token's rank to the experts' holders
  size_t expert_counts;  // uint64 [2][source rank][num_experts]: low-latency dispatch's
                         // tokens per local expert of each source, stamped with the op
  size_t total;
  size_t dispatch_row_bytes;
  size_t dispatch_scales;  // offset of the scales inside a dispatch row
  size_t dispatch_data;    // offset of the data inside a dispatch row
  size_t combine_row_bytes;
  size_t combine_data;     // offset of the data inside a combine row
  int count_stride;        // kMaxRanks + num_experts
};

// Staging rows start with a 16-byte header: the tag that wrote them (uint64) and, for rows a
// rank sends itself, the source token (int). Row data starts on a 128-byte boundary: a warp's
// 512-byte store then covers whole 32-byte sectors (no byte-masked partial writes).
constexpr size_t kRowHeaderBytes = 16;
constexpr size_t kRowDataAlign = 128;

RegionLayout make_region_layout(int num_ranks, int max_tokens, int hidden, int max_topk,
                                int num_experts);

}  // namespace jax_ep
