// Every XLA FFI handler of jax_ep._cuda (platform "CUDA", typed FFI, api_version 1).
// The contract (attributes, operands, results) is the table in docs/design.md.
#pragma once

#include "xla/ffi/api/c_api.h"

extern "C" {
// ffi/layout.cc
XLA_FFI_Error* jax_ep_get_dispatch_layout(XLA_FFI_CallFrame* call_frame);
// ffi/intranode.cc
XLA_FFI_Error* jax_ep_dispatch(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_combine(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* jax_ep_cached_dispatch(XLA_FFI_CallFrame* call_frame);
}
