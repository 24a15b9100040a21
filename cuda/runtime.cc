#include "cuda/runtime.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>

namespace jax_ep {
namespace {

struct Registry {
  std::mutex mutex;  // guards `groups`; handlers' instantiate stage takes it in find_groups
  std::map<int64_t, std::vector<std::shared_ptr<Group>>> groups;   // connected
  // Held for the whole of every call that creates, connects or destroys groups, so that the
  // pending groups are changed by one caller at a time. Taken before `mutex`.
  std::mutex pending_mutex;
  std::map<int64_t, std::vector<std::shared_ptr<Group>>> pending;  // not connected yet
};

// Never destroyed: freeing device memory during static destruction, after the CUDA runtime
// may have shut down, is unsafe. Live groups are released by the OS at exit.
Registry& registry() {
  static Registry* r = new Registry();
  return *r;
}

// Restores the calling thread's current device when it goes out of scope.
class DeviceGuard {
 public:
  DeviceGuard() { cudaGetDevice(&previous_); }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

void check_cuda(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error("jax_ep: " + what + " failed: " + cudaGetErrorString(err) + ".");
  }
}

// Destroys what create_local made for the hooked sends (the device must be current and idle).
void destroy_send_resources(DeviceResources& d) {
  if (d.send_gate != nullptr) cudaFree(d.send_gate);
  d.send_gate = nullptr;
  if (d.send_done != nullptr) cudaEventDestroy(d.send_done);
  if (d.send_ready != nullptr) cudaEventDestroy(d.send_ready);
  if (d.send_stream != nullptr) cudaStreamDestroy(d.send_stream);
  d.send_done = d.send_ready = nullptr;
  d.send_stream = nullptr;
}

const char* op_name(int op) {
  switch (op) {
    case kOpDispatch:
      return "dispatch";
    case kOpCombine:
      return "combine";
    case kOpCachedDispatch:
      return "cached dispatch";
    case kOpLowLatencyDispatch:
      return "low-latency dispatch";
    case kOpLowLatencyCombine:
      return "low-latency combine";
    default:
      return "operation";
  }
}

// Group key of the group that create_group builds in one call (create_local's keys are >= 0).
constexpr int64_t kWholeGroupKey = -1;

void check_group_sizes(int num_ranks, int max_tokens, int hidden, int max_topk, int num_experts,
                       double timeout_s) {
  if (num_ranks < 1 || num_ranks > kMaxRanks) {
    throw std::invalid_argument("jax_ep: a group needs between 1 and " + std::to_string(kMaxRanks) +
                                " devices, got " + std::to_string(num_ranks) + ".");
  }
  if (max_tokens < 1 || hidden < 1) {
    throw std::invalid_argument("jax_ep: max_tokens and hidden must be positive.");
  }
  if (max_topk < 1 || max_topk > kMaxTopk) {
    throw std::invalid_argument("jax_ep: max_topk must be between 1 and " +
                                std::to_string(kMaxTopk) + ", got " + std::to_string(max_topk) + ".");
  }
  if (num_experts < num_ranks || num_experts % num_ranks != 0 || num_experts > kMaxExperts) {
    throw std::invalid_argument("jax_ep: num_experts (" + std::to_string(num_experts) +
                                ") must be a multiple of the number of devices (" +
                                std::to_string(num_ranks) + ") and at most " +
                                std::to_string(kMaxExperts) + ".");
  }
  if (!(timeout_s > 0)) {
    throw std::invalid_argument("jax_ep: timeout_s must be positive.");
  }
}

void check_ordinal_exists(int ordinal) {
  int device_count = 0;
  check_cuda(cudaGetDeviceCount(&device_count), "cudaGetDeviceCount");
  if (ordinal < 0 || ordinal >= device_count) {
    throw std::invalid_argument("jax_ep: CUDA device " + std::to_string(ordinal) +
                                " does not exist; this process sees " +
                                std::to_string(device_count) + " devices.");
  }
}

// Throws if `ordinal` is already in a group of `groups` (all of one buffer_id).
void check_ordinal_free(const std::vector<std::shared_ptr<Group>>& groups, int ordinal) {
  for (const auto& group : groups) {
    if (group->rank_of_ordinal(ordinal) >= 0) {
      throw std::invalid_argument("jax_ep: CUDA device " + std::to_string(ordinal) +
                                  " is already in a group with buffer_id " +
                                  std::to_string(group->buffer_id) +
                                  "; destroy it first or use another buffer_id.");
    }
  }
}

std::shared_ptr<Group> make_pending_group(int64_t buffer_id, int64_t group_key, int num_ranks,
                                          int max_tokens, int hidden, int max_topk,
                                          int num_experts, double timeout_s) {
  auto group = std::make_shared<Group>();
  group->buffer_id = buffer_id;
  group->group_key = group_key;
  group->max_tokens = max_tokens;
  group->hidden = hidden;
  group->max_topk = max_topk;
  group->num_experts = num_experts;
  group->timeout_s = timeout_s;
  group->devices.resize(num_ranks);
  check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&group->errors), num_ranks * sizeof(ErrorRecord),
                           cudaHostAllocMapped | cudaHostAllocPortable),
             "cudaHostAlloc of the error records");
  std::memset(static_cast<void*>(group->errors), 0, num_ranks * sizeof(ErrorRecord));
  return group;
}

// Allocates the zeroed region of EP rank `rank` on CUDA device `ordinal` into the pending
// group (buffer_id, group_key), creating the group on its first device. Caller holds
// pending_mutex. Returns the region.
char* add_local_device(int64_t buffer_id, int64_t group_key, int ordinal, int rank, int num_ranks,
                       int max_tokens, int hidden, int max_topk, int num_experts,
                       double timeout_s) {
  check_group_sizes(num_ranks, max_tokens, hidden, max_topk, num_experts, timeout_s);
  check_ordinal_exists(ordinal);
  if (rank < 0 || rank >= num_ranks) {
    throw std::invalid_argument("jax_ep: rank=" + std::to_string(rank) +
                                " must be between 0 and num_ranks - 1 = " +
                                std::to_string(num_ranks - 1) + ".");
  }
  Registry& reg = registry();
  {
    std::lock_guard<std::mutex> lock(reg.mutex);
    auto it = reg.groups.find(buffer_id);
    if (it != reg.groups.end()) check_ordinal_free(it->second, ordinal);
  }
  std::shared_ptr<Group> group;
  auto pending = reg.pending.find(buffer_id);
  if (pending != reg.pending.end()) {
    check_ordinal_free(pending->second, ordinal);
    for (const auto& candidate : pending->second) {
      if (candidate->group_key == group_key) group = candidate;
    }
  }
  const bool new_group = group == nullptr;
  if (new_group) {
    group = make_pending_group(buffer_id, group_key, num_ranks, max_tokens, hidden, max_topk,
                               num_experts, timeout_s);
  } else {
    if (group->num_ranks() != num_ranks || group->max_tokens != max_tokens ||
        group->hidden != hidden || group->max_topk != max_topk ||
        group->num_experts != num_experts || group->timeout_s != timeout_s) {
      throw std::invalid_argument(
          "jax_ep: create_local for CUDA device " + std::to_string(ordinal) + " passed sizes "
          "(num_ranks, max_tokens, hidden, max_topk, num_experts, timeout_s) that differ from the "
          "first device of group_key " + std::to_string(group_key) + "; pass the same sizes for "
          "every device of a group.");
    }
    if (group->devices[rank].ordinal >= 0) {
      throw std::invalid_argument("jax_ep: EP rank " + std::to_string(rank) + " of group_key " +
                                  std::to_string(group_key) + " is already on CUDA device " +
                                  std::to_string(group->devices[rank].ordinal) +
                                  "; give each device of a group its own rank.");
    }
  }

  const RegionLayout layout = make_region_layout(num_ranks, max_tokens, hidden, max_topk, num_experts);
  DeviceResources d;
  d.ordinal = ordinal;
  DeviceGuard guard;
  check_cuda(cudaSetDevice(ordinal), "cudaSetDevice");
  check_cuda(cudaDeviceGetAttribute(&d.num_sms_on_device, cudaDevAttrMultiProcessorCount, ordinal),
             "cudaDeviceGetAttribute");
  const cudaError_t err = cudaMalloc(reinterpret_cast<void**>(&d.base), layout.total);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(
        "jax_ep: allocating " + std::to_string(layout.total >> 20) + " MiB on CUDA device " +
        std::to_string(ordinal) + " failed (" + cudaGetErrorString(err) +
        "). Create the group before JAX allocates its memory pool, lower "
        "XLA_PYTHON_CLIENT_MEM_FRACTION, or reduce max_tokens / hidden.");
  }
  // Peers read this region as soon as they are connected: zero it before anyone can.
  const cudaError_t zeroed = cudaMemset(d.base, 0, layout.total);
  const cudaError_t synced = zeroed == cudaSuccess ? cudaDeviceSynchronize() : zeroed;
  if (synced != cudaSuccess) {
    cudaFree(d.base);
    check_cuda(synced, "zeroing the region (cudaMemset)");
  }
  int least_priority = 0, greatest_priority = 0;
  cudaError_t made = cudaDeviceGetStreamPriorityRange(&least_priority, &greatest_priority);
  if (made == cudaSuccess) {
    made = cudaStreamCreateWithPriority(&d.send_stream, cudaStreamNonBlocking, greatest_priority);
  }
  if (made == cudaSuccess) made = cudaEventCreateWithFlags(&d.send_ready, cudaEventDisableTiming);
  if (made == cudaSuccess) made = cudaEventCreateWithFlags(&d.send_done, cudaEventDisableTiming);
  if (made == cudaSuccess) made = cudaMalloc(reinterpret_cast<void**>(&d.send_gate), 2 * sizeof(unsigned));
  if (made == cudaSuccess) made = cudaMemset(d.send_gate, 0, 2 * sizeof(unsigned));
  if (made != cudaSuccess) {
    destroy_send_resources(d);
    cudaFree(d.base);
    check_cuda(made, "creating the hooked sends' stream and events");
  }
  group->devices[rank] = d;
  if (new_group) reg.pending[buffer_id].push_back(group);
  return d.base;
}

// Enables access from the current device `ordinal` to the memory of device `peer`.
void enable_peer_access(int ordinal, int peer) {
  int can_access = 0;
  check_cuda(cudaDeviceCanAccessPeer(&can_access, ordinal, peer), "cudaDeviceCanAccessPeer");
  if (!can_access) {
    throw std::runtime_error("jax_ep: CUDA device " + std::to_string(ordinal) +
                             " cannot access the memory of device " + std::to_string(peer) +
                             " (no peer-to-peer path); all devices of a group must be on one "
                             "NVLink/P2P domain.");
  }
  const cudaError_t err = cudaDeviceEnablePeerAccess(peer, 0);
  if (err == cudaErrorPeerAccessAlreadyEnabled) {
    cudaGetLastError();
  } else {
    check_cuda(err, "cudaDeviceEnablePeerAccess");
  }
}

// The pending group of buffer_id that holds CUDA device `ordinal`. Caller holds pending_mutex.
std::shared_ptr<Group> find_pending(int64_t buffer_id, int ordinal) {
  auto it = registry().pending.find(buffer_id);
  if (it == registry().pending.end()) return nullptr;
  for (const auto& group : it->second) {
    if (group->rank_of_ordinal(ordinal) >= 0) return group;
  }
  return nullptr;
}

// Removes `group` from the pending groups of its buffer_id. Caller holds pending_mutex.
void remove_pending(const std::shared_ptr<Group>& group) {
  auto it = registry().pending.find(group->buffer_id);
  if (it == registry().pending.end()) return;
  it->second.erase(std::remove(it->second.begin(), it->second.end(), group), it->second.end());
  if (it->second.empty()) registry().pending.erase(it);
}

// connect_peers with pending_mutex held.
void connect_device(int64_t buffer_id, int ordinal, const std::vector<cudaIpcMemHandle_t>& handles,
                    const std::vector<int>& local_ordinals) {
  std::shared_ptr<Group> group = find_pending(buffer_id, ordinal);
  if (group == nullptr) {
    throw std::invalid_argument("jax_ep: CUDA device " + std::to_string(ordinal) +
                                " has no region of buffer_id " + std::to_string(buffer_id) +
                                " waiting to be connected; call create_local for it first, and "
                                "connect_peers once per device.");
  }
  const int num_ranks = group->num_ranks();
  const int me = group->rank_of_ordinal(ordinal);
  DeviceResources& d = group->devices[me];
  if (d.connected) {
    throw std::invalid_argument("jax_ep: CUDA device " + std::to_string(ordinal) +
                                " is already connected in buffer_id " + std::to_string(buffer_id) +
                                "; call connect_peers once per device.");
  }
  if (static_cast<int>(handles.size()) != num_ranks ||
      static_cast<int>(local_ordinals.size()) != num_ranks) {
    throw std::invalid_argument("jax_ep: connect_peers got " + std::to_string(handles.size()) +
                                " handles and " + std::to_string(local_ordinals.size()) +
                                " local_ordinals; pass one of each per EP rank (" +
                                std::to_string(num_ranks) + ").");
  }
  for (int r = 0; r < num_ranks; ++r) {
    const int created = group->devices[r].ordinal;
    if (local_ordinals[r] != created) {
      throw std::invalid_argument(
          "jax_ep: local_ordinals[" + std::to_string(r) + "] is " +
          std::to_string(local_ordinals[r]) + " but EP rank " + std::to_string(r) + " was created " +
          (created >= 0 ? "on CUDA device " + std::to_string(created) : "on no device of this process") +
          "; call create_local for every device of the group in this process first, then pass "
          "their CUDA ordinals and -1 for the ranks of other processes.");
    }
  }

  DeviceGuard guard;
  check_cuda(cudaSetDevice(ordinal), "cudaSetDevice");
  GroupView& v = d.view;
  for (int r = 0; r < num_ranks; ++r) {
    if (r == me) {
      v.peers.base[r] = d.base;
    } else if (local_ordinals[r] >= 0) {
      enable_peer_access(ordinal, local_ordinals[r]);
      v.peers.base[r] = group->devices[r].base;
    } else {
      const cudaError_t err = cudaIpcOpenMemHandle(reinterpret_cast<void**>(&d.ipc_peers[r]),
                                                   handles[r], cudaIpcMemLazyEnablePeerAccess);
      if (err != cudaSuccess) {
        cudaGetLastError();
        d.ipc_peers[r] = nullptr;
        throw std::runtime_error(
            "jax_ep: CUDA device " + std::to_string(ordinal) + " (EP rank " + std::to_string(me) +
            ") could not map the region of EP rank " + std::to_string(r) +
            " of another process (cudaIpcOpenMemHandle: " + cudaGetErrorString(err) +
            "). Every rank of an EP group must be on one host with peer-to-peer (NVLink) access "
            "between its GPUs, every process must see those GPUs (do not hide them with "
            "CUDA_VISIBLE_DEVICES; use jax.distributed.initialize(local_device_ids=...)), and "
            "processes in containers must share the IPC namespace (docker --ipc=host).");
      }
      v.peers.base[r] = d.ipc_peers[r];
    }
  }
  v.layout = make_region_layout(num_ranks, group->max_tokens, group->hidden, group->max_topk,
                                group->num_experts);
  check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&v.error), group->errors + me, 0),
             "cudaHostGetDevicePointer");
  v.timeout_ns = static_cast<unsigned long long>(group->timeout_s * 1e9);
  v.rank = me;
  v.num_ranks = num_ranks;
  v.max_tokens = group->max_tokens;
  v.hidden = group->hidden;
  v.max_topk = group->max_topk;
  v.num_experts = group->num_experts;
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  d.connected = true;

  for (const DeviceResources& other : group->devices) {
    if (other.ordinal >= 0 && !other.connected) return;
  }
  remove_pending(group);
  std::lock_guard<std::mutex> lock(registry().mutex);
  registry().groups[buffer_id].push_back(std::move(group));
}

}  // namespace

void Group::close_peer_mappings() {
  DeviceGuard guard;
  for (DeviceResources& d : devices) {
    if (d.ordinal < 0) continue;
    cudaSetDevice(d.ordinal);
    cudaDeviceSynchronize();  // kernels still using the regions
    for (char*& peer : d.ipc_peers) {
      if (peer != nullptr) cudaIpcCloseMemHandle(peer);
      peer = nullptr;
    }
  }
  cudaGetLastError();
}

void Group::release() {
  if (closed.exchange(true)) return;
  close_peer_mappings();
  DeviceGuard guard;
  for (DeviceResources& d : devices) {
    if (d.base == nullptr) continue;
    cudaSetDevice(d.ordinal);
    destroy_send_resources(d);
    cudaFree(d.base);
    d.base = nullptr;
  }
  if (errors != nullptr) cudaFreeHost(errors);
  errors = nullptr;
  cudaGetLastError();
}

int Group::rank_of_ordinal(int ordinal) const {
  if (ordinal < 0) return -1;
  for (int r = 0; r < num_ranks(); ++r) {
    if (devices[r].ordinal == ordinal) return r;
  }
  return -1;
}

std::string Group::error_message() const {
  if (errors == nullptr) return "";
  for (int r = 0; r < num_ranks(); ++r) {
    const ErrorRecord& e = errors[r];
    if (e.flag == 0) continue;
    const int peer = e.peer;
    const int peer_ordinal = peer >= 0 && peer < num_ranks() ? devices[peer].ordinal : -1;
    const std::string peer_device =
        peer_ordinal >= 0 ? "CUDA device " + std::to_string(peer_ordinal) : "in another process";
    const std::string where = std::string("the ") + op_name(e.op) + " (operation #" +
                              std::to_string(e.op_number) + " of group " +
                              std::to_string(buffer_id) + ") on CUDA device " +
                              std::to_string(devices[r].ordinal) + " (EP rank " +
                              std::to_string(r) + ")";
    std::string what;
    if (e.kind == kFailOrder) {
      const unsigned long long seen = e.seen_tag;
      const int seen_op = static_cast<int>(seen & ((1u << kOpBits) - 1));
      const std::string peer_did =
          seen_op == kOpFailed ? std::string(" failed its operation #")
                               : std::string(" ran a ") + op_name(seen_op) + " as operation #";
      what = where + " found that EP rank " + std::to_string(peer) + " (" + peer_device + ")" +
             peer_did + std::to_string(seen >> kOpBits) +
             ". Every device of a group must run the same sequence of jax_ep operations "
             "(the same jitted program, with the ops in the same order).";
    } else if (e.kind == kFailInFlight) {
      what = where + " broke the rules of hooked low-latency ops (the last finished operation "
             "was #" + std::to_string(e.seen_tag) + "): receive each send exactly once, with at "
             "most two sends in flight, and run no other jax_ep operation of the Buffer "
             "between a send and its receive.";
    } else {
      what = where + " waited more than " + std::to_string(timeout_s) + " s for EP rank " +
             std::to_string(peer) + " (" + peer_device +
             "). Every device of a group must run the same sequence of jax_ep operations; "
             "raise timeout_s if a peer can be that late (e.g. a slow first compile).";
    }
    return what + " The group is unusable now: close the Buffer and create a new one.";
  }
  return "";
}

std::vector<MaskedRank> Group::masked_ranks() const {
  std::vector<MaskedRank> out;
  if (errors == nullptr) return out;
  for (int r = 0; r < num_ranks(); ++r) {
    for (int peer = 0; peer < num_ranks(); ++peer) {
      if (errors[r].masked[peer] != 0) {
        out.push_back({r, peer, op_name(errors[r].mask_op), errors[r].mask_op_number});
      }
    }
  }
  return out;
}

cudaIpcMemHandle_t create_local(int64_t buffer_id, int64_t group_key, int ordinal, int rank,
                                int num_ranks, int max_tokens, int hidden, int max_topk,
                                int num_experts, double timeout_s) {
  if (group_key < 0) {
    throw std::invalid_argument("jax_ep: group_key must be >= 0, got " +
                                std::to_string(group_key) + ".");
  }
  std::lock_guard<std::mutex> creating(registry().pending_mutex);
  char* base = add_local_device(buffer_id, group_key, ordinal, rank, num_ranks, max_tokens, hidden,
                                max_topk, num_experts, timeout_s);
  DeviceGuard guard;
  check_cuda(cudaSetDevice(ordinal), "cudaSetDevice");
  cudaIpcMemHandle_t handle;
  check_cuda(cudaIpcGetMemHandle(&handle, base), "cudaIpcGetMemHandle");
  return handle;
}

void connect_peers(int64_t buffer_id, int ordinal, const std::vector<cudaIpcMemHandle_t>& handles,
                   const std::vector<int>& local_ordinals) {
  std::lock_guard<std::mutex> creating(registry().pending_mutex);
  connect_device(buffer_id, ordinal, handles, local_ordinals);
}

void create_group(int64_t buffer_id, const std::vector<int>& device_ordinals, int max_tokens,
                  int hidden, int max_topk, int num_experts, double timeout_s) {
  const int num_ranks = static_cast<int>(device_ordinals.size());
  check_group_sizes(num_ranks, max_tokens, hidden, max_topk, num_experts, timeout_s);
  std::set<int> seen;
  for (int ordinal : device_ordinals) {
    if (!seen.insert(ordinal).second) {
      throw std::invalid_argument("jax_ep: CUDA device " + std::to_string(ordinal) +
                                  " appears twice in device_ordinals; list each device once.");
    }
  }
  std::lock_guard<std::mutex> creating(registry().pending_mutex);
  try {
    for (int r = 0; r < num_ranks; ++r) {
      add_local_device(buffer_id, kWholeGroupKey, device_ordinals[r], r, num_ranks, max_tokens,
                       hidden, max_topk, num_experts, timeout_s);
    }
    const std::vector<cudaIpcMemHandle_t> unused(num_ranks);  // every rank is local
    for (int ordinal : device_ordinals) connect_device(buffer_id, ordinal, unused, device_ordinals);
  } catch (...) {
    for (int ordinal : device_ordinals) {
      std::shared_ptr<Group> group = find_pending(buffer_id, ordinal);
      if (group != nullptr && group->group_key == kWholeGroupKey) remove_pending(group);
    }
    throw;
  }
}

void destroy_groups(int64_t buffer_id) {
  std::vector<std::shared_ptr<Group>> groups;
  {
    std::lock_guard<std::mutex> creating(registry().pending_mutex);
    auto pending = registry().pending.find(buffer_id);
    if (pending != registry().pending.end()) {
      groups = std::move(pending->second);
      registry().pending.erase(pending);
    }
    std::lock_guard<std::mutex> lock(registry().mutex);
    auto it = registry().groups.find(buffer_id);
    if (it != registry().groups.end()) {
      groups.insert(groups.end(), it->second.begin(), it->second.end());
      registry().groups.erase(it);
    }
  }
  if (groups.empty()) {
    throw std::invalid_argument("jax_ep: there is no group with buffer_id " +
                                std::to_string(buffer_id) + ".");
  }
  // Executables may still hold a group (ffi/state.h): free its memory now, they see
  // `closed` and fail their calls.
  for (auto& group : groups) group->release();
}

void close_peers(int64_t buffer_id) {
  std::vector<std::shared_ptr<Group>> groups;
  {
    std::lock_guard<std::mutex> creating(registry().pending_mutex);
    auto pending = registry().pending.find(buffer_id);
    if (pending != registry().pending.end()) groups = pending->second;
    std::lock_guard<std::mutex> lock(registry().mutex);
    auto it = registry().groups.find(buffer_id);
    if (it != registry().groups.end()) groups.insert(groups.end(), it->second.begin(), it->second.end());
  }
  for (auto& group : groups) group->close_peer_mappings();
}
std::vector<std::shared_ptr<const Group>> find_groups(int64_t buffer_id) {
  std::lock_guard<std::mutex> lock(registry().mutex);
  auto it = registry().groups.find(buffer_id);
  if (it == registry().groups.end()) return {};
  return {it->second.begin(), it->second.end()};
}

std::string take_error(int64_t buffer_id) {
  std::vector<std::shared_ptr<Group>> groups;
  {
    std::lock_guard<std::mutex> lock(registry().mutex);
    auto it = registry().groups.find(buffer_id);
    if (it == registry().groups.end()) {
      throw std::invalid_argument("jax_ep: there is no group with buffer_id " +
                                  std::to_string(buffer_id) + ".");
    }
    groups = it->second;
  }
  for (const auto& group : groups) {
    std::string message = group->error_message();
    if (!message.empty()) return message;
  }
  return "";
}

std::vector<MaskedRank> masked_ranks(int64_t buffer_id) {
  std::vector<MaskedRank> out;
  for (const auto& group : find_groups(buffer_id)) {
    for (const MaskedRank& m : group->masked_ranks()) out.push_back(m);
  }
  return out;
}

}  // namespace jax_ep
