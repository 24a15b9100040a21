// The NVSHMEM runtime of the internode mode: one NVSHMEM PE per process (one GPU each),
// initialised once per process from a unique id that Python exchanges over the
// jax.distributed key-value store (jax_ep/internode.py), and the registry of internode
// groups: buffer_id -> this process's rank of the group, its symmetric region and error
// record (failures, and the peers low-latency ops with mask=True masked). Everything here
// runs eagerly from Python, never inside a handler. Collective calls (create_internode_group,
// destroy_internode_group) must run in every process, in the same order: they allocate and
// free NVSHMEM's symmetric memory.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda/internode.h"
#include "cuda/internode_low_latency.h"

namespace jax_ep {

// 128 bytes that identify an NVSHMEM job; made by the process of PE 0.
std::string nvshmem_unique_id();
// Makes this process PE `pe` of `num_pes` on CUDA device `ordinal`. If NVSHMEM is already up
// in this process (another component initialised it), checks that it has the same PEs and
// shares it. Throws std::runtime_error with NVSHMEM's status otherwise.
void nvshmem_initialize(int pe, int num_pes, const std::string& unique_id, int ordinal);
// Collective (every PE): nvshmem_finalize, if jax_ep initialised NVSHMEM in this process
// (returns false and does nothing otherwise: the component that did owns it). Throws while an
// internode group is open.
bool nvshmem_finalize_here();
// "not initialized", "initialized by jax_ep" or "initialized by another component".
std::string nvshmem_state();

struct InternodeGroup {
  int64_t buffer_id = 0;
  int ordinal = -1;
  int num_sms_on_device = 0;
  double timeout_s = 0;
  int max_tokens = 0, hidden = 0, max_topk = 0, num_experts = 0;
  // The most tokens per rank (T and M) of a low-latency op, which size the low-latency
  // staging; 0: no low-latency staging (ll_base null), the group runs no low-latency op.
  int ll_max_tokens = 0;
  char* base = nullptr;          // nvshmem_malloc
  ErrorRecord* error = nullptr;  // host-mapped
  InternodeView view{};
  char* ll_base = nullptr;       // nvshmem_malloc: the low-latency staging, or null
  InternodeLowLatencyView ll_view{};
  std::atomic<bool> closed{false};
  // OpCode of the hooked send whose receive has not run yet, or 0. The internode handlers run
  // on the host in stream order (never in command buffers), so they keep it.
  mutable std::atomic<int> hooked_in_flight{0};
  // "" while no kernel failed; else a sentence naming the op and the rank it waited for.
  std::string error_message() const;
};

// Collective: allocates the symmetric region and the low-latency staging (sized by
// ll_max_tokens <= max_tokens; none when 0), zeroed, and maps the NVLink peers of this node
// (rank r of num_ranks: node r / ranks_per_node; pes[r] is rank r's PE).
void create_internode_group(int64_t buffer_id, int ordinal, int rank, int num_ranks,
                            int ranks_per_node, const std::vector<int>& pes, int max_tokens,
                            int ll_max_tokens, int hidden, int max_topk, int num_experts,
                            double timeout_s, bool puts_only);
// Waits for the device and forgets the group. With free_region, frees the symmetric region:
// collective (nvshmem_free waits for every PE, without a time limit). Without it, the region
// stays allocated until the process exits: the way out when a peer died or failed.
void destroy_internode_group(int64_t buffer_id, bool free_region);
std::shared_ptr<const InternodeGroup> find_internode_group(int64_t buffer_id);
std::string internode_take_error(int64_t buffer_id);

// A peer that a low-latency op with mask=True stopped waiting for (MaskedRank of
// cuda/runtime.h, for an internode group).
struct InternodeMaskedRank {
  int rank;        // this process's EP rank, which masked it
  int peer;        // the masked EP rank
  std::string op;  // the first op of `rank` that masked a peer
  unsigned long long op_number;
};
// The peers this process's rank of Buffer buffer_id masked, in ascending rank.
std::vector<InternodeMaskedRank> internode_masked_ranks(int64_t buffer_id);

}  // namespace jax_ep
