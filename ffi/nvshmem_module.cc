// jax_ep._nvshmem: the internode mode's FFI targets and its NVSHMEM runtime. A module of its
// own (relocatable device code linked with NVSHMEM's static device library), imported only
// when an internode Buffer is made, so the single-process path never loads NVSHMEM.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <vector>

#include "cuda/nvshmem_runtime.h"
#include "xla/ffi/api/c_api.h"

extern "C" {
XLA_FFI_Error* jax_ep_internode_state_instantiate(XLA_FFI_CallFrame* call_frame);
const XLA_FFI_TypeId* jax_ep_internode_state_type_id();
const XLA_FFI_TypeInfo* jax_ep_internode_state_type_info();
XLA_FFI_Error* jax_ep_internode_dispatch(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_internode_combine(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_internode_cached_dispatch(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_internode_dispatch_send(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_internode_dispatch_recv(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_internode_combine_send(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_internode_combine_recv(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_internode_low_latency_dispatch(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_internode_low_latency_dispatch_send(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_internode_low_latency_dispatch_recv(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_internode_low_latency_combine(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_internode_low_latency_combine_send(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_internode_low_latency_combine_recv(XLA_FFI_CallFrame* call_frame);
}

namespace nb = nanobind;

NB_MODULE(_nvshmem, m) {
  m.doc() = "jax_ep internode mode: NVSHMEM runtime and XLA FFI handlers (one GPU per process).";
  m.attr("TARGET_DISPATCH") = "jax_ep_internode_dispatch";
  m.attr("TARGET_COMBINE") = "jax_ep_internode_combine";
  m.attr("TARGET_CACHED_DISPATCH") = "jax_ep_internode_cached_dispatch";
  m.attr("TARGET_DISPATCH_SEND") = "jax_ep_internode_dispatch_send";
  m.attr("TARGET_DISPATCH_RECV") = "jax_ep_internode_dispatch_recv";
  m.attr("TARGET_COMBINE_SEND") = "jax_ep_internode_combine_send";
  m.attr("TARGET_COMBINE_RECV") = "jax_ep_internode_combine_recv";
  m.attr("TARGET_LOW_LATENCY_DISPATCH") = "jax_ep_internode_low_latency_dispatch";
  m.attr("TARGET_LOW_LATENCY_DISPATCH_SEND") = "jax_ep_internode_low_latency_dispatch_send";
  m.attr("TARGET_LOW_LATENCY_DISPATCH_RECV") = "jax_ep_internode_low_latency_dispatch_recv";
  m.attr("TARGET_LOW_LATENCY_COMBINE") = "jax_ep_internode_low_latency_combine";
  m.attr("TARGET_LOW_LATENCY_COMBINE_SEND") = "jax_ep_internode_low_latency_combine_send";
  m.attr("TARGET_LOW_LATENCY_COMBINE_RECV") = "jax_ep_internode_low_latency_combine_recv";
  m.attr("STATE_TYPE_NAME") = "jax_ep_internode_state";

  m.def("targets", []() {
    nb::dict d;
    for (auto [name, execute] :
         {std::pair{"jax_ep_internode_dispatch", jax_ep_internode_dispatch},
          std::pair{"jax_ep_internode_combine", jax_ep_internode_combine},
          std::pair{"jax_ep_internode_cached_dispatch", jax_ep_internode_cached_dispatch},
          std::pair{"jax_ep_internode_dispatch_send", jax_ep_internode_dispatch_send},
          std::pair{"jax_ep_internode_dispatch_recv", jax_ep_internode_dispatch_recv},
          std::pair{"jax_ep_internode_combine_send", jax_ep_internode_combine_send},
          std::pair{"jax_ep_internode_combine_recv", jax_ep_internode_combine_recv}}) {
      nb::dict stages;
      stages["instantiate"] = nb::capsule(reinterpret_cast<void*>(jax_ep_internode_state_instantiate));
      stages["execute"] = nb::capsule(reinterpret_cast<void*>(execute));
      d[name] = stages;
    }
    // Low-latency targets (ffi/internode_low_latency.cc): stateless, they find the group by
    // buffer_id when they run.
    for (auto [name, execute] :
         {std::pair{"jax_ep_internode_low_latency_dispatch", jax_ep_internode_low_latency_dispatch},
          std::pair{"jax_ep_internode_low_latency_dispatch_send", jax_ep_internode_low_latency_dispatch_send},
          std::pair{"jax_ep_internode_low_latency_dispatch_recv", jax_ep_internode_low_latency_dispatch_recv},
          std::pair{"jax_ep_internode_low_latency_combine", jax_ep_internode_low_latency_combine},
          std::pair{"jax_ep_internode_low_latency_combine_send", jax_ep_internode_low_latency_combine_send},
          std::pair{"jax_ep_internode_low_latency_combine_recv", jax_ep_internode_low_latency_combine_recv}}) {
      d[name] = nb::capsule(reinterpret_cast<void*>(execute));
    }
    return d;
  }, "FFI target name -> {'instantiate', 'execute'} handler capsules, or the execute capsule "
     "of a stateless target (platform 'CUDA').");

  m.def("state_type", []() {
    nb::dict d;
    d["type_id"] = nb::capsule(const_cast<XLA_FFI_TypeId*>(jax_ep_internode_state_type_id()));
    d["type_info"] = nb::capsule(const_cast<XLA_FFI_TypeInfo*>(jax_ep_internode_state_type_info()));
    return d;
  }, "Registration of the handlers' state type (register it before the targets).");

  m.def("unique_id", []() {
    const std::string id = jax_ep::nvshmem_unique_id();
    return nb::bytes(id.data(), id.size());
  }, "128 bytes naming a new NVSHMEM job; made by the process of PE 0 and shared with the others.");

  m.def("initialize", [](int pe, int num_pes, nb::bytes unique_id, int ordinal) {
    jax_ep::nvshmem_initialize(pe, num_pes, std::string(unique_id.c_str(), unique_id.size()), ordinal);
  }, nb::arg("pe"), nb::arg("num_pes"), nb::arg("unique_id"), nb::arg("device_ordinal"),
     "Makes this process PE `pe` of `num_pes` on CUDA device device_ordinal (or checks and "
     "shares an NVSHMEM instance that is already up).");

  m.def("finalize", &jax_ep::nvshmem_finalize_here,
        "Collective: finalises NVSHMEM if jax_ep initialised it in this process (True), else "
        "does nothing (False). Every internode Buffer must be closed first.");

  m.def("state", &jax_ep::nvshmem_state, "NVSHMEM's state in this process, in words.");

  m.def("create_group", &jax_ep::create_internode_group, nb::arg("buffer_id"),
        nb::arg("device_ordinal"), nb::arg("rank"), nb::arg("num_ranks"), nb::arg("ranks_per_node"),
        nb::arg("pes"), nb::arg("max_tokens"), nb::arg("low_latency_max_tokens"), nb::arg("hidden"),
        nb::arg("max_topk"), nb::arg("num_experts"), nb::arg("timeout_s"), nb::arg("puts_only"),
        "Collective (every process, same order): allocates the Buffer's symmetric region and its "
        "low-latency staging (sized by low_latency_max_tokens <= max_tokens; none when 0) and "
        "maps the NVLink peers of this rank's node. puts_only: the network legs put every row "
        "(JAX_EP_INTERNODE_PUTS=1), even to peers NVSHMEM maps.");

  m.def("destroy", &jax_ep::destroy_internode_group, nb::arg("buffer_id"),
        nb::arg("free_region"),
        "Forgets the Buffer's group. free_region=True is collective: frees the symmetric region "
        "once every process got here (no time limit); False leaves it allocated until exit.");

  m.def("take_error", &jax_ep::internode_take_error, nb::arg("buffer_id"),
        "The first recorded failure (timeout, order mismatch) as a sentence, or ''.");

  m.def("masked_ranks", [](int64_t buffer_id) {
    nb::list out;
    for (const jax_ep::InternodeMaskedRank& r : jax_ep::internode_masked_ranks(buffer_id)) {
      out.append(nb::make_tuple(r.rank, r.peer, r.op, r.op_number));
    }
    return out;
  }, nb::arg("buffer_id"),
     "Peers masked by low-latency ops with mask=True on this process's rank: a list of (EP rank "
     "that masked, masked EP rank, name of the first op that masked a peer there, its operation "
     "number), as jax_ep._cuda.masked_ranks.");

  m.def("region_bytes", [](int num_ranks, int ranks_per_node, int max_tokens,
                           int low_latency_max_tokens, int hidden, int max_topk, int num_experts) {
    const size_t region = jax_ep::make_internode_layout(num_ranks, ranks_per_node, max_tokens,
                                                        hidden, max_topk, num_experts).total;
    if (low_latency_max_tokens == 0) return region;
    return region + jax_ep::make_internode_low_latency_layout(num_ranks, ranks_per_node,
                                                              low_latency_max_tokens, hidden,
                                                              max_topk, num_experts).total;
  }, nb::arg("num_ranks"), nb::arg("ranks_per_node"), nb::arg("max_tokens"),
     nb::arg("low_latency_max_tokens"), nb::arg("hidden"), nb::arg("max_topk"),
     nb::arg("num_experts"),
     "Bytes of symmetric memory one rank's internode Buffer takes (its region and its "
     "low-latency staging, sized by low_latency_max_tokens; none when 0).");
}
