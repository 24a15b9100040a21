// jax_ep._cuda: the FFI targets (names and handler capsules for jax.ffi.register_ffi_target),
// the FFI state type, and the eager runtime that creates and destroys EP groups.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cuda_runtime_api.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "ffi/handlers.h"
#include "cuda/runtime.h"
#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule handler_capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

int to_int(int64_t value, const char* name) {
  if (value < 0 || value > (int64_t{1} << 30)) {
    throw std::invalid_argument(std::string("jax_ep: ") + name + "=" + std::to_string(value) +
                                " is out of range.");
  }
  return static_cast<int>(value);
}

}  // namespace

NB_MODULE(_cuda, m) {
  m.doc() = "jax_ep CUDA backend: XLA FFI handlers and the EP group runtime (one process driving all "
           "local GPUs, or one process per GPU over CUDA IPC).";

  m.attr("TARGET_GET_DISPATCH_LAYOUT") = jax_ep::kTargetGetDispatchLayout;
  m.attr("TARGET_DISPATCH") = jax_ep::kTargetDispatch;
  m.attr("TARGET_COMBINE") = jax_ep::kTargetCombine;
  m.attr("TARGET_CACHED_DISPATCH") = jax_ep::kTargetCachedDispatch;
  m.attr("TARGET_LOW_LATENCY_DISPATCH") = jax_ep::kTargetLowLatencyDispatch;
  m.attr("TARGET_LOW_LATENCY_DISPATCH_SEND") = jax_ep::kTargetLowLatencyDispatchSend;
  m.attr("TARGET_LOW_LATENCY_DISPATCH_RECV") = jax_ep::kTargetLowLatencyDispatchRecv;
  m.attr("TARGET_LOW_LATENCY_COMBINE") = jax_ep::kTargetLowLatencyCombine;
  m.attr("TARGET_LOW_LATENCY_COMBINE_SEND") = jax_ep::kTargetLowLatencyCombineSend;
  m.attr("TARGET_LOW_LATENCY_COMBINE_RECV") = jax_ep::kTargetLowLatencyCombineRecv;
  m.attr("STATE_TYPE_NAME") = jax_ep::kStateTypeName;

  m.def("targets", []() {
    // name -> handler capsule, or {"instantiate": ..., "execute": ...} for stateful handlers.
    nb::dict d;
    d[jax_ep::kTargetGetDispatchLayout] = handler_capsule(jax_ep_get_dispatch_layout);
    for (auto [name, execute] : {std::pair{jax_ep::kTargetDispatch, jax_ep_dispatch},
                                 std::pair{jax_ep::kTargetCombine, jax_ep_combine},
                                 std::pair{jax_ep::kTargetCachedDispatch, jax_ep_cached_dispatch},
                                 std::pair{jax_ep::kTargetLowLatencyDispatch, jax_ep_low_latency_dispatch},
                                 std::pair{jax_ep::kTargetLowLatencyDispatchSend, jax_ep_low_latency_dispatch_send},
                                 std::pair{jax_ep::kTargetLowLatencyDispatchRecv, jax_ep_low_latency_dispatch_recv},
                                 std::pair{jax_ep::kTargetLowLatencyCombine, jax_ep_low_latency_combine},
                                 std::pair{jax_ep::kTargetLowLatencyCombineSend, jax_ep_low_latency_combine_send},
                                 std::pair{jax_ep::kTargetLowLatencyCombineRecv, jax_ep_low_latency_combine_recv}}) {
      nb::dict stages;
      stages["instantiate"] = handler_capsule(jax_ep_group_state_instantiate);
      stages["execute"] = handler_capsule(execute);
      d[name] = stages;
    }
    return d;
  }, "FFI target name -> its handler capsule(s) (platform 'CUDA', api_version 1).");

  m.def("state_type", []() {
    nb::dict d;
    d["type_id"] = nb::capsule(const_cast<XLA_FFI_TypeId*>(jax_ep_group_state_type_id()));
    d["type_info"] = nb::capsule(const_cast<XLA_FFI_TypeInfo*>(jax_ep_group_state_type_info()));
    return d;
  }, "Registration of the handlers' state type for jax.ffi.register_ffi_type (under "
     "STATE_TYPE_NAME); register it before the targets.");

  m.def(
      "create_group",
      [](int64_t buffer_id, const std::vector<int>& device_ordinals, int64_t max_tokens,
         int64_t hidden, int64_t max_topk, int64_t num_experts, double timeout_s) {
        jax_ep::create_group(buffer_id, device_ordinals, to_int(max_tokens, "max_tokens"),
                             to_int(hidden, "hidden"), to_int(max_topk, "max_topk"),
                             to_int(num_experts, "num_experts"), timeout_s);
      },
      nb::arg("buffer_id"), nb::arg("device_ordinals"), nb::arg("max_tokens"), nb::arg("hidden"),
      nb::arg("max_topk"), nb::arg("num_experts"), nb::arg("timeout_s"),
      "One process driving every device of the group: allocates the staging region on every "
      "device (EP rank = position in device_ordinals), enables peer access between them and "
      "registers the group under buffer_id (one call per EP group of the mesh, on disjoint "
      "devices). Call it eagerly, outside jit.");

  m.def(
      "create_local",
      [](int64_t buffer_id, int64_t group_key, int64_t device_ordinal, int64_t rank,
         int64_t num_ranks, int64_t max_tokens, int64_t hidden, int64_t max_topk,
         int64_t num_experts, double timeout_s) {
        const cudaIpcMemHandle_t handle = jax_ep::create_local(
            buffer_id, group_key, to_int(device_ordinal, "device_ordinal"), to_int(rank, "rank"),
            to_int(num_ranks, "num_ranks"), to_int(max_tokens, "max_tokens"),
            to_int(hidden, "hidden"), to_int(max_topk, "max_topk"),
            to_int(num_experts, "num_experts"), timeout_s);
        return nb::bytes(reinterpret_cast<const char*>(&handle), sizeof(handle));
      },
      nb::arg("buffer_id"), nb::arg("group_key"), nb::arg("device_ordinal"), nb::arg("rank"),
      nb::arg("num_ranks"), nb::arg("max_tokens"), nb::arg("hidden"), nb::arg("max_topk"),
      nb::arg("num_experts"), nb::arg("timeout_s"),
      "One process per GPU: allocates and zeroes the staging region of EP rank `rank` (of "
      "num_ranks) on CUDA device device_ordinal, in the group group_key (>= 0, e.g. the EP "
      "group's index in the mesh) of buffer_id. Returns the region's CUDA IPC handle (64 bytes) "
      "for the other processes' connect_peers. Call it eagerly, outside jit, for every device "
      "of this process, before connect_peers.");

  m.def(
      "connect_peers",
      [](int64_t buffer_id, int64_t device_ordinal, const std::vector<nb::bytes>& handles,
         const std::vector<int>& local_ordinals) {
        std::vector<cudaIpcMemHandle_t> ipc_handles(handles.size());
        for (size_t r = 0; r < handles.size(); ++r) {
          if (handles[r].size() != sizeof(cudaIpcMemHandle_t)) {
            throw std::invalid_argument(
                "jax_ep: handles[" + std::to_string(r) + "] has " +
                std::to_string(handles[r].size()) + " bytes; pass the " +
                std::to_string(sizeof(cudaIpcMemHandle_t)) +
                " bytes that create_local returned for EP rank " + std::to_string(r) + ".");
          }
          std::memcpy(&ipc_handles[r], handles[r].c_str(), sizeof(cudaIpcMemHandle_t));
        }
        jax_ep::connect_peers(buffer_id, to_int(device_ordinal, "device_ordinal"), ipc_handles,
                              local_ordinals);
      },
      nb::arg("buffer_id"), nb::arg("device_ordinal"), nb::arg("handles"),
      nb::arg("local_ordinals"),
      "Fills the peer table of CUDA device device_ordinal (made by create_local): for every EP "
      "rank r, handles[r] is the bytes create_local returned for it and local_ordinals[r] its "
      "CUDA ordinal if it is a device of this process (its region is used directly, with peer "
      "access), else -1 (its handle is opened with cudaIpcOpenMemHandle). Once every device of "
      "this process in the group is connected, the handlers find the group. Run a barrier over "
      "the processes before the first operation, so that every peer has mapped its memory.");

  m.def(
      "close_peers", [](int64_t buffer_id) { jax_ep::close_peers(buffer_id); },
      nb::arg("buffer_id"),
      "Waits for this process's devices of every group of buffer_id and closes their "
      "mappings of other processes' regions (the regions themselves stay allocated).");

  m.def(
      "destroy",
      [](int64_t buffer_id) { jax_ep::destroy_groups(buffer_id); }, nb::arg("buffer_id"),
      "Waits for this process's devices of every group of buffer_id (connected or not), closes "
      "their IPC mappings, then frees their memory. With several processes, call it in each "
      "only after every process ran close_peers (jax_ep/bootstrap.py: close_processes).");

  m.def(
      "take_error",
      [](int64_t buffer_id) { return jax_ep::take_error(buffer_id); },
      nb::arg("buffer_id"),
      "The first recorded failure of the group (timeout, order mismatch) as a sentence, or ''.");

  m.def(
      "masked_ranks",
      [](int64_t buffer_id) {
        nb::list out;
        for (const jax_ep::MaskedRank& r : jax_ep::masked_ranks(buffer_id)) {
          out.append(nb::make_tuple(r.rank, r.peer, r.op, r.op_number));
        }
        return out;
      },
      nb::arg("buffer_id"),
      "Peers masked by low-latency ops with mask=True on this process's devices: a list of "
      "(EP rank that masked, masked EP rank, name of the first op that masked a peer there, its "
      "operation number).");

  m.def(
      "region_bytes",
      [](int64_t num_ranks, int64_t max_tokens, int64_t hidden, int64_t max_topk,
         int64_t num_experts) {
        return jax_ep::make_region_layout(to_int(num_ranks, "num_ranks"), to_int(max_tokens, "max_tokens"),
                                          to_int(hidden, "hidden"), to_int(max_topk, "max_topk"),
                                          to_int(num_experts, "num_experts"))
            .total;
      },
      nb::arg("num_ranks"), nb::arg("max_tokens"), nb::arg("hidden"), nb::arg("max_topk"),
      nb::arg("num_experts"),
      "Bytes of GPU memory one device's region takes for this configuration (every mode).");

  m.def(
      "num_local_devices",
      []() {
        int count = 0;
        if (cudaGetDeviceCount(&count) != cudaSuccess) {
          cudaGetLastError();
          return 0;
        }
        return count;
      },
      "Number of CUDA devices visible to this process (0 if CUDA is unusable).");
}
