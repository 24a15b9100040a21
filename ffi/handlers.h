// Every XLA FFI handler of jax_ep._cuda (platform "CUDA", typed FFI, api_version 1).
// The contract (attributes, operands, results) is the table in docs/design.md.
#pragma once

#include "xla/ffi/api/c_api.h"

namespace jax_ep {
// FFI target names (the Python side reads them from the module: jax_ep._cuda.TARGET_*).
constexpr const char* kTargetGetDispatchLayout = "jax_ep_get_dispatch_layout";
constexpr const char* kTargetDispatch = "jax_ep_dispatch";
constexpr const char* kTargetCombine = "jax_ep_combine";
constexpr const char* kTargetCachedDispatch = "jax_ep_cached_dispatch";
constexpr const char* kTargetLowLatencyDispatch = "jax_ep_low_latency_dispatch";
constexpr const char* kTargetLowLatencyDispatchSend = "jax_ep_low_latency_dispatch_send";
constexpr const char* kTargetLowLatencyDispatchRecv = "jax_ep_low_latency_dispatch_recv";
constexpr const char* kTargetLowLatencyCombine = "jax_ep_low_latency_combine";
constexpr const char* kTargetLowLatencyCombineSend = "jax_ep_low_latency_combine_send";
constexpr const char* kTargetLowLatencyCombineRecv = "jax_ep_low_latency_combine_recv";
constexpr const char* kStateTypeName = "jax_ep_group_state";
}  // namespace jax_ep

extern "C" {
// ffi/layout.cc
XLA_FFI_Error* jax_ep_get_dispatch_layout(XLA_FFI_CallFrame* call_frame);
// ffi/intranode.cc
XLA_FFI_Error* jax_ep_dispatch(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_combine(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_cached_dispatch(XLA_FFI_CallFrame* call_frame);
// ffi/low_latency.cc
XLA_FFI_Error* jax_ep_low_latency_dispatch(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_low_latency_dispatch_send(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_low_latency_dispatch_recv(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_low_latency_combine(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_low_latency_combine_send(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_low_latency_combine_recv(XLA_FFI_CallFrame* call_frame);
// Instantiate stage of every communication handler (ffi/state.h), and the type id
// of their state.
XLA_FFI_Error* jax_ep_group_state_instantiate(XLA_FFI_CallFrame* call_frame);
const XLA_FFI_TypeId* jax_ep_group_state_type_id();
const XLA_FFI_TypeInfo* jax_ep_group_state_type_info();
}
