// Per-executable state of the communication handlers (XLA FFI State, instantiate stage).
// When XLA instantiates an executable, each jax_ep call site looks up the groups of its
// buffer_id once (cuda/runtime.h) and keeps them by CUDA ordinal; executing a call then
// takes no lock and does no lookup. One executable serves every local device of a
// single-process mesh, so the state holds a slot per device.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "cuda/runtime.h"
#include "ffi/ffi_util.h"

namespace jax_ep {

struct GroupState {
  static ffi::TypeId id;
  int64_t buffer_id = 0;
  std::shared_ptr<const Group> by_ordinal[kMaxDevices];
};

// The device's group and resources for one call.
struct DeviceContext {
  const Group* group = nullptr;
  const DeviceResources* device = nullptr;
};

// Finds the group of this device in the state; fails if the Buffer was closed or a previous
// operation of the group failed (timeout, order mismatch).
inline ffi::Error find_device(const char* op, const GroupState* state, int32_t ordinal,
                              DeviceContext* ctx) {
  const Group* group = ordinal >= 0 && ordinal < kMaxDevices ? state->by_ordinal[ordinal].get() : nullptr;
  if (group == nullptr) {
    return ffi::Error::InvalidArgument(
        std::string(op) + ": CUDA device " + std::to_string(ordinal) +
        " is in no EP group of Buffer " + std::to_string(state->buffer_id) +
        "; run the computation on the mesh the Buffer was made for.");
  }
  if (group->closed.load(std::memory_order_acquire)) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      std::string(op) + ": Buffer " + std::to_string(state->buffer_id) +
                          " is closed; create a new Buffer (and jit again) to keep going.");
  }
  const std::string failure = group->error_message();
  if (!failure.empty()) {
    return ffi::Error(ffi::ErrorCode::kAborted, std::string(op) + ": " + failure);
  }
  ctx->group = group;
  ctx->device = &group->devices[group->rank_of_ordinal(ordinal)];
  return ffi::Error::Success();
}

}  // namespace jax_ep
