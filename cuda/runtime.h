// The runtime layer: the process-global registry of EP groups, buffer_id -> the resources
// this process made for each of its devices (EP rank, memory region, peer mapping, error
// record). The FFI handlers look groups up once per executable (ffi/state.h), never per
// call. Two process models, one group structure:
//   - one process driving all local GPUs: create_group (every rank is local; peers are
//     reached through peer access);
//   - one process per GPU (jax.distributed), intranode: create_local on each local device
//     returns its region's CUDA IPC handle, the handles are exchanged (Python, through the
//     jax.distributed key-value store), then connect_peers maps the other processes'
//     regions with cudaIpcOpenMemHandle.
// A group is pending (invisible to handlers) from its first create_local until connect_peers
// has run on every device of this process; then handlers find it by (buffer_id, CUDA
// ordinal). Groups are created and destroyed eagerly from Python (jax_ep/bootstrap.py does
// the multi-process exchange), never inside a handler.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda/kernels.h"

namespace jax_ep {

// One EP rank of a group. A rank of another process keeps ordinal -1 and base nullptr.
struct DeviceResources {
  int ordinal = -1;                 // CUDA device in this process, or -1
  int num_sms_on_device = 0;        // multiprocessors of the device
  char* base = nullptr;             // this device's region (cudaMalloc)
  char* ipc_peers[kMaxRanks] = {};  // other processes' regions mapped on this device, by rank
  bool connected = false;           // connect_peers filled `view`
  // The hooked low-latency sends run on send_stream (highest priority), so XLA's stream runs
  // other work while they copy: a send waits for send_ready (recorded on XLA's stream) and
  // records send_done, which the receive makes XLA's stream wait for.
  // XLA's stream goes on only once every block of the send is resident (else work queued
  // after it could take the SMs first and the send would wait for it): the send's blocks
  // count themselves in send_gate[0] (device memory) and the last sets send_gate[1] = 1,
  // which XLA's stream waits for (a stream memory operation; the handler clears it first).
  cudaStream_t send_stream = nullptr;
  cudaEvent_t send_ready = nullptr;
  cudaEvent_t send_done = nullptr;
  unsigned* send_gate = nullptr;
  GroupView view{};                 // what kernels on this device receive
};

// A peer that a low-latency op with mask=True stopped waiting for.
struct MaskedRank {
  int rank;          // EP rank of this process's device that masked it
  int peer;          // the masked EP rank
  std::string op;    // the first op of `rank` that masked a peer
  unsigned long long op_number;
};

struct Group {
  int64_t buffer_id = 0;
  int64_t group_key = 0;  // tells apart the groups of one buffer_id while they are pending
  int max_tokens = 0;
  int hidden = 0;
  int max_topk = 0;
  int num_experts = 0;
  double timeout_s = 0;
  std::vector<DeviceResources> devices;  // index = EP rank
  ErrorRecord* errors = nullptr;         // host-mapped, one per EP rank

  std::atomic<bool> closed{false};       // release() ran: handlers must not launch

  Group() = default;
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;
  ~Group() { release(); }

  // Waits for each local device and closes its mappings of other processes' regions. The
  // group's own regions stay allocated (peers may still have them mapped).
  void close_peer_mappings();
  // close_peer_mappings, then frees the regions and the error records; marks the group
  // closed. Idempotent. Executables that still hold the group (ffi/state.h) then fail
  // their calls with an error instead of launching.
  void release();

  int num_ranks() const { return static_cast<int>(devices.size()); }
  // EP rank of a CUDA ordinal, or -1 if the group has no such device.
  int rank_of_ordinal(int ordinal) const;
  // "" while no kernel of the group timed out; otherwise a sentence naming the operation,
  // the device and the rank it waited for.
  std::string error_message() const;
  // Peers masked by low-latency ops with mask=True, for every device of this process.
  std::vector<MaskedRank> masked_ranks() const;
};

// A buffer_id may hold several groups on disjoint devices (one per EP group of a mesh such
// as (dp=2, ep=4)). Every function below throws std::invalid_argument (bad arguments, a
// device already in a group of this buffer_id, calls out of order) or std::runtime_error
// (CUDA failure), with a sentence saying what to change.

// Allocates and zeroes the region of EP rank `rank` (of num_ranks) on CUDA device `ordinal`,
// in the pending group (buffer_id, group_key) (group_key >= 0; the first call creates the
// group, later ones must pass the same sizes). Returns the region's CUDA IPC handle.
cudaIpcMemHandle_t create_local(int64_t buffer_id, int64_t group_key, int ordinal, int rank,
                                int num_ranks, int max_tokens, int hidden, int max_topk,
                                int num_experts, double timeout_s);
// Fills the peer table of CUDA device `ordinal` (created by create_local): for every EP rank
// r, local_ordinals[r] is its CUDA device if create_local ran for it in this process (its
// region is used directly, with peer access), else -1 (handles[r] is opened with
// cudaIpcOpenMemHandle). handles and local_ordinals have num_ranks entries. Once every local
// device of the group is connected, handlers can find the group.
void connect_peers(int64_t buffer_id, int ordinal, const std::vector<cudaIpcMemHandle_t>& handles,
                   const std::vector<int>& local_ordinals);
// One process driving every device of a group (EP rank = position in device_ordinals):
// allocates each region as create_local does (without exporting an IPC handle), then
// connect_peers on each device. Leaves nothing behind if it fails.
void create_group(int64_t buffer_id, const std::vector<int>& device_ordinals, int max_tokens,
                  int hidden, int max_topk, int num_experts, double timeout_s);
// Closes this process's mappings of other processes' regions in every group of buffer_id
// (after waiting for its devices). Does nothing for groups without such mappings.
void close_peers(int64_t buffer_id);
// Releases every group of buffer_id, connected or pending, and forgets them. Throws
// std::invalid_argument if there is none. With several processes, call it in each only
// after every process closed its peer mappings (close_peers + a barrier): a region must
// not be freed while another process still maps it.
void destroy_groups(int64_t buffer_id);
// The connected groups of buffer_id (one per EP group with a device in this process).
std::vector<std::shared_ptr<const Group>> find_groups(int64_t buffer_id);
// The first timeout recorded by any group of buffer_id, or "". Throws std::invalid_argument
// if buffer_id has no group.
std::string take_error(int64_t buffer_id);
// Peers masked on this process's devices by every group of buffer_id.
std::vector<MaskedRank> masked_ranks(int64_t buffer_id);

}  // namespace jax_ep
