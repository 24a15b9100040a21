#include "ffi/runtime.h"

#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>

namespace jax_ep {
namespace {

struct Registry {
  std::mutex mutex;
  std::map<int64_t, std::vector<std::shared_ptr<Group>>> groups;
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

const char* op_name(int op) {
  switch (op) {
    case kOpDispatch:
      return "dispatch";
    case kOpCombine:
      return "combine";
    case kOpCachedDispatch:
      return "cached dispatch";
    default:
      return "operation";
  }
}

}  // namespace

Group::~Group() {
  DeviceGuard guard;
  for (DeviceResources& d : devices) {
    if (d.base == nullptr) continue;
    cudaSetDevice(d.ordinal);
    cudaDeviceSynchronize();  // kernels still using the region
    cudaFree(d.base);
  }
  if (errors != nullptr) cudaFreeHost(errors);
  cudaGetLastError();
}

int Group::rank_of_ordinal(int ordinal) const {
  for (int r = 0; r < num_ranks(); ++r) {
    if (devices[r].ordinal == ordinal) return r;
  }
  return -1;
}

std::string Group::error_message() const {
  for (int r = 0; r < num_ranks(); ++r) {
    const ErrorRecord& e = errors[r];
    if (e.flag == 0) continue;
    const int waited = e.waited_rank;
    const int waited_ordinal = waited >= 0 && waited < num_ranks() ? devices[waited].ordinal : -1;
    return std::string("the ") + op_name(e.op) + " on CUDA device " +
           std::to_string(devices[r].ordinal) + " (EP rank " + std::to_string(r) +
           ") waited more than " + std::to_string(timeout_s) + " s for EP rank " +
           std::to_string(waited) + " (CUDA device " + std::to_string(waited_ordinal) +
           ") of group " + std::to_string(buffer_id) +
           ". Every device of a group must run the same sequence of jax_ep operations. The "
           "group is unusable now: destroy it and create it again.";
  }
  return "";
}

void create_group(int64_t buffer_id, const std::vector<int>& device_ordinals, int max_tokens,
                  int hidden, int max_topk, int num_experts, double timeout_s) {
  const int num_ranks = static_cast<int>(device_ordinals.size());
  int device_count = 0;
  check_cuda(cudaGetDeviceCount(&device_count), "cudaGetDeviceCount");
  if (num_ranks < 1 || num_ranks > kMaxRanks) {
    throw std::invalid_argument("jax_ep: a group needs between 1 and " + std::to_string(kMaxRanks) +
                                " devices, got " + std::to_string(num_ranks) + ".");
  }
  std::set<int> seen;
  for (int ordinal : device_ordinals) {
    if (ordinal < 0 || ordinal >= device_count) {
      throw std::invalid_argument("jax_ep: CUDA device " + std::to_string(ordinal) +
                                  " does not exist; this process sees " +
                                  std::to_string(device_count) + " devices.");
    }
    if (!seen.insert(ordinal).second) {
      throw std::invalid_argument("jax_ep: CUDA device " + std::to_string(ordinal) +
                                  " appears twice in device_ordinals; list each device once.");
    }
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
  auto check_free = [&]() {
    auto it = registry().groups.find(buffer_id);
    if (it == registry().groups.end()) return;
    for (const auto& other : it->second) {
      for (int ordinal : device_ordinals) {
        if (other->rank_of_ordinal(ordinal) >= 0) {
          throw std::invalid_argument("jax_ep: CUDA device " + std::to_string(ordinal) +
                                      " is already in a group with buffer_id " +
                                      std::to_string(buffer_id) +
                                      "; destroy it first or use another buffer_id.");
        }
      }
    }
  };
  {
    std::lock_guard<std::mutex> lock(registry().mutex);
    check_free();
  }

  auto group = std::make_shared<Group>();
  group->buffer_id = buffer_id;
  group->max_tokens = max_tokens;
  group->hidden = hidden;
  group->max_topk = max_topk;
  group->num_experts = num_experts;
  group->timeout_s = timeout_s;
  const RegionLayout layout = make_region_layout(num_ranks, max_tokens, hidden, max_topk, num_experts);

  DeviceGuard guard;
  check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&group->errors), num_ranks * sizeof(ErrorRecord),
                           cudaHostAllocMapped | cudaHostAllocPortable),
             "cudaHostAlloc of the error records");
  std::memset(static_cast<void*>(group->errors), 0, num_ranks * sizeof(ErrorRecord));

  for (int ordinal : device_ordinals) {
    DeviceResources d;
    d.ordinal = ordinal;
    check_cuda(cudaSetDevice(ordinal), "cudaSetDevice");
    check_cuda(cudaDeviceGetAttribute(&d.num_sms_on_device, cudaDevAttrMultiProcessorCount, ordinal),
               "cudaDeviceGetAttribute");
    check_cuda(prepare_kernels(), "setting kernel attributes");
    const cudaError_t err = cudaMalloc(reinterpret_cast<void**>(&d.base), layout.total);
    if (err != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error(
          "jax_ep: allocating " + std::to_string(layout.total >> 20) + " MiB on CUDA device " +
          std::to_string(ordinal) + " failed (" + cudaGetErrorString(err) +
          "). Create the group before JAX allocates its memory pool, lower "
          "XLA_PYTHON_CLIENT_MEM_FRACTION, or reduce max_tokens / hidden.");
    }
    group->devices.push_back(d);
    check_cuda(cudaMemset(d.base, 0, layout.total), "cudaMemset");
  }

  for (int i = 0; i < num_ranks; ++i) {
    check_cuda(cudaSetDevice(device_ordinals[i]), "cudaSetDevice");
    for (int j = 0; j < num_ranks; ++j) {
      if (i == j) continue;
      int can_access = 0;
      check_cuda(cudaDeviceCanAccessPeer(&can_access, device_ordinals[i], device_ordinals[j]),
                 "cudaDeviceCanAccessPeer");
      if (!can_access) {
        throw std::runtime_error("jax_ep: CUDA device " + std::to_string(device_ordinals[i]) +
                                 " cannot access the memory of device " +
                                 std::to_string(device_ordinals[j]) +
                                 " (no peer-to-peer path); the single-process backend needs "
                                 "all devices of a group on one NVLink/P2P domain.");
      }
      const cudaError_t err = cudaDeviceEnablePeerAccess(device_ordinals[j], 0);
      if (err == cudaErrorPeerAccessAlreadyEnabled) {
        cudaGetLastError();
      } else {
        check_cuda(err, "cudaDeviceEnablePeerAccess");
      }
    }
  }

  const unsigned long long timeout_ns = static_cast<unsigned long long>(timeout_s * 1e9);
  for (int i = 0; i < num_ranks; ++i) {
    DeviceResources& d = group->devices[i];
    check_cuda(cudaSetDevice(d.ordinal), "cudaSetDevice");
    GroupView& v = d.view;
    for (int j = 0; j < num_ranks; ++j) v.base[j] = group->devices[j].base;
    v.layout = layout;
    check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&v.error), group->errors + i, 0),
               "cudaHostGetDevicePointer");
    v.timeout_ns = timeout_ns;
    v.rank = i;
    v.num_ranks = num_ranks;
    v.max_tokens = max_tokens;
    v.hidden = hidden;
    v.max_topk = max_topk;
    v.num_experts = num_experts;
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  }

  std::lock_guard<std::mutex> lock(registry().mutex);
  check_free();
  registry().groups[buffer_id].push_back(std::move(group));
}

void destroy_groups(int64_t buffer_id) {
  std::vector<std::shared_ptr<Group>> groups;
  {
    std::lock_guard<std::mutex> lock(registry().mutex);
    auto it = registry().groups.find(buffer_id);
    if (it == registry().groups.end()) {
      throw std::invalid_argument("jax_ep: there is no group with buffer_id " +
                                  std::to_string(buffer_id) + ".");
    }
    groups = std::move(it->second);
    registry().groups.erase(it);
  }
  // A handler holds a group only while it launches; let it finish so that the regions are
  // freed here and never inside a handler.
  for (auto& group : groups) {
    while (group.use_count() > 1) std::this_thread::yield();
    group.reset();
  }
}

std::shared_ptr<const Group> find_group(int64_t buffer_id, int ordinal) {
  std::lock_guard<std::mutex> lock(registry().mutex);
  auto it = registry().groups.find(buffer_id);
  if (it == registry().groups.end()) return nullptr;
  for (const auto& group : it->second) {
    if (group->rank_of_ordinal(ordinal) >= 0) return group;
  }
  return nullptr;
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

}  // namespace jax_ep
