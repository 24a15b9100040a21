// jax_ep_cuda: the FFI handlers (as capsules for jax.ffi.register_ffi_target) and the
// eager runtime that creates and destroys EP groups.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "ffi/handlers.h"
#include "ffi/runtime.h"

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

NB_MODULE(jax_ep_cuda, m) {
  m.doc() = "jax_ep CUDA backend: XLA FFI handlers and the single-process EP group runtime.";

  m.def("registrations", []() {
    nb::dict d;
    d["jax_ep_get_dispatch_layout"] = handler_capsule(jax_ep_get_dispatch_layout);
    d["jax_ep_dispatch"] = handler_capsule(jax_ep_dispatch);
    d["jax_ep_combine"] = handler_capsule(jax_ep_combine);
    d["jax_ep_cached_dispatch"] = handler_capsule(jax_ep_cached_dispatch);
    return d;
  }, "FFI target name -> capsule of its handler (platform 'CUDA', api_version 1).");

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
      "Allocates the staging region on every device (EP rank = position in device_ordinals), "
      "enables peer access between them and registers the group under buffer_id (one call per "
      "EP group of the mesh, on disjoint devices). Call it eagerly, outside jit.");

  m.def(
      "destroy",
      [](int64_t buffer_id) { jax_ep::destroy_groups(buffer_id); }, nb::arg("buffer_id"),
      "Waits for the devices of every group of buffer_id, then frees their memory.");

  m.def(
      "take_error",
      [](int64_t buffer_id) { return jax_ep::take_error(buffer_id); },
      nb::arg("buffer_id"),
      "The first recorded peer timeout of the group as a sentence, or '' if there is none.");

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
