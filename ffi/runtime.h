// Process-global registry of EP groups for the single-process backend: buffer_id -> the
// resources create_group made on each device (EP rank, peer table, staging region, error
// record). Groups are created and destroyed eagerly from Python, never inside a handler;
// handlers only look them up.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda/kernels.h"

namespace jax_ep {

struct DeviceResources {
  int ordinal = -1;
  int num_sms_on_device = 0;  // multiprocessors of the device
  char* base = nullptr;       // this device's region (cudaMalloc)
  GroupView view{};           // what kernels on this device receive
};

struct Group {
  int64_t buffer_id = 0;
  int max_tokens = 0;
  int hidden = 0;
  int max_topk = 0;
  int num_experts = 0;
  double timeout_s = 0;
  std::vector<DeviceResources> devices;  // index = EP rank
  ErrorRecord* errors = nullptr;         // host-mapped, one per EP rank

  Group() = default;
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;
  ~Group();  // waits for each device, then frees its region and the error records

  int num_ranks() const { return static_cast<int>(devices.size()); }
  // EP rank of a CUDA ordinal, or -1 if the group has no such device.
  int rank_of_ordinal(int ordinal) const;
  // "" while no kernel of the group timed out; otherwise a sentence naming the operation,
  // the device and the rank it waited for.
  std::string error_message() const;
};

// A buffer_id may hold several groups on disjoint devices (one per EP group of a mesh such
// as (dp=2, ep=4)). Throws std::invalid_argument (bad arguments, a device already in a
// group of this buffer_id) or std::runtime_error (CUDA failure).
void create_group(int64_t buffer_id, const std::vector<int>& device_ordinals, int max_tokens,
                  int hidden, int max_topk, int num_experts, double timeout_s);
// Destroys every group of buffer_id. Throws std::invalid_argument if there is none.
void destroy_groups(int64_t buffer_id);
// The group of buffer_id that contains CUDA device `ordinal`, or nullptr.
std::shared_ptr<const Group> find_group(int64_t buffer_id, int ordinal);
// The first timeout recorded by any group of buffer_id, or "". Throws std::invalid_argument
// if buffer_id has no group.
std::string take_error(int64_t buffer_id);

}  // namespace jax_ep
