// FFI handlers of the low-latency mode (both process models): dispatch and combine, each
// fused (one launch) or hooked (a send handler that returns the op's `pending` number and a
// receive handler that consumes it, so XLA can run other work in between). Shapes are
// checked here; the kernels are in cuda/low_latency.cu. The fused handlers are command-buffer
// compatible (the op number lives in device memory, never in the launch). The hooked ones
// are not: a send runs on the device's send stream beside XLA's, and its receive joins it,
// which one graph capture per handler cannot express; XLA runs them between its graphs.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

#include <mutex>
#include <string>

#include "cuda/kernels.h"
#include "ffi/ffi_util.h"
#include "ffi/handlers.h"
#include "ffi/state.h"

namespace jax_ep {
namespace {


ffi::Error check_blocks(const char* op, int64_t num_sms, const DeviceResources& device) {
  if (num_sms < 1 || num_sms > device.num_sms_on_device) {
    return ffi::Error::InvalidArgument(
        std::string(op) + ": num_sms=" + std::to_string(num_sms) + " must be between 1 and " +
        std::to_string(device.num_sms_on_device) + " (every block must be resident at once).");
  }
  return ffi::Error::Success();
}

// The driver's stream memory operations, looked up once through the runtime (the extension
// does not link libcuda, so it imports on machines without a GPU driver).
struct StreamMemOps {
  PFN_cuStreamWriteValue32_v11070 write = nullptr;
  PFN_cuStreamWaitValue32_v11070 wait = nullptr;
  std::string error;  // why they are unavailable, or ""
};

const StreamMemOps& stream_mem_ops() {
  static StreamMemOps ops;
  static std::once_flag once;
  std::call_once(once, [] {
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    cudaError_t err = cudaGetDriverEntryPointByVersion("cuStreamWriteValue32", reinterpret_cast<void**>(&ops.write),
                                                       11070, cudaEnableDefault, &found);
    if (err == cudaSuccess && found == cudaDriverEntryPointSuccess) {
      err = cudaGetDriverEntryPointByVersion("cuStreamWaitValue32", reinterpret_cast<void**>(&ops.wait),
                                             11070, cudaEnableDefault, &found);
    }
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess || !ops.write || !ops.wait) {
      ops.error = "the CUDA driver has no cuStreamWriteValue32 / cuStreamWaitValue32";
    }
  });
  return ops;
}

ffi::Error driver_error(const char* op, const char* what, CUresult res) {
  return ffi::Error::Internal(std::string(op) + ": " + what + " failed (CUresult " +
                              std::to_string(static_cast<int>(res)) + ").");
}

// A hooked send runs on the device's send stream, after the work XLA queued before it, so
// that XLA's stream goes on with the computation placed before the receive while the rows
// are copied. XLA's stream waits until every block of the send is resident (send_gate,
// cuda/runtime.h): otherwise the next kernel there could take the SMs first and the send
// would start only after it. `launch` enqueues the kernel on the stream it is given.
template <typename Launch>
ffi::Error launch_on_send_stream(const char* op, const DeviceResources& device, cudaStream_t stream,
                                 Launch launch) {
  const StreamMemOps& mem_ops = stream_mem_ops();
  if (!mem_ops.error.empty()) return ffi::Error::Internal(std::string(op) + ": " + mem_ops.error + ".");
  const auto started = reinterpret_cast<CUdeviceptr>(device.send_gate + 1);
  CUresult res = mem_ops.write(reinterpret_cast<CUstream>(stream), started, 0, CU_STREAM_WRITE_VALUE_DEFAULT);
  if (res != CUDA_SUCCESS) return driver_error(op, "cuStreamWriteValue32", res);
  cudaError_t err = cudaEventRecord(device.send_ready, stream);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(device.send_stream, device.send_ready, 0);
  if (err != cudaSuccess) return cuda_error(op, err);
  JAX_EP_RETURN_IF_ERROR(launch(device.send_stream));
  err = cudaEventRecord(device.send_done, device.send_stream);
  if (err != cudaSuccess) return cuda_error(op, err);
  res = mem_ops.wait(reinterpret_cast<CUstream>(stream), started, 1, CU_STREAM_WAIT_VALUE_GEQ);
  if (res != CUDA_SUCCESS) return driver_error(op, "cuStreamWaitValue32", res);
  return ffi::Error::Success();
}

// A receive makes XLA's stream wait for every send issued so far on this device (the send
// stream runs them in order), so it reads `pending` after its send wrote it, and XLA frees
// the send's inputs (the receive's extra operands) only after the send read them.
ffi::Error wait_for_sends(const char* op, const DeviceResources& device, cudaStream_t stream) {
  const cudaError_t err = cudaStreamWaitEvent(stream, device.send_done, 0);
  if (err != cudaSuccess) return cuda_error(op, err);
  return ffi::Error::Success();
}

// recv_x [L, R * M, H] (x's dtype, or float8_e4m3fn), recv_scales [L, R * M, H / 128 or 0],
// recv_count [L], row_of_slot [R, M, K]: fills the receive side of `a`.
ffi::Error dispatch_results(const char* op, const Group& group, int64_t hidden, int64_t num_topk,
                            ffi::Result<ffi::AnyBuffer>& recv_x,
                            ffi::ResultBuffer<ffi::F32>& recv_scales,
                            ffi::ResultBuffer<ffi::S32>& recv_count,
                            ffi::ResultBuffer<ffi::S32>& row_of_slot, LowLatencyDispatchArgs& a) {
  const int64_t num_ranks = group.num_ranks(), local = group.num_experts / num_ranks;
  const int64_t m = a.max_tokens_per_rank;
  const ffi::DataType dtype = recv_x->element_type();
  a.fp8 = dtype == ffi::DataType::F8E4M3FN;
  const int64_t num_scales = a.fp8 ? hidden / 128 : 0;
  if (a.fp8 && hidden % 128 != 0) {
    return ffi::Error::InvalidArgument(std::string(op) + ": FP8 needs hidden (" + std::to_string(hidden) +
                                       ") to be a multiple of 128.");
  }
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "recv_x", recv_x->dimensions(), {local, num_ranks * m, hidden}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "recv_scales", recv_scales->dimensions(), {local, num_ranks * m, num_scales}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "recv_count", recv_count->dimensions(), {local}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "row_of_slot", row_of_slot->dimensions(), {num_ranks, m, num_topk}));
  a.recv_x = recv_x->untyped_data();
  a.recv_scales = a.fp8 ? recv_scales->typed_data() : nullptr;
  a.recv_count = recv_count->typed_data();
  a.row_of_slot = row_of_slot->typed_data();
  return ffi::Error::Success();
}

// x [T, H] bf16 or f32 (rows of whole 16-byte vectors), topk_idx [T, K]: the send side.
ffi::Error dispatch_inputs(const char* op, const Group& group, int64_t num_sms, ffi::AnyBuffer x,
                           ffi::Buffer<ffi::S32> topk_idx, LowLatencyDispatchArgs& a) {
  const ffi::DataType dtype = x.element_type();
  if ((dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F32) || x.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument(std::string(op) + ": x is " + dtype_name(dtype) + " " +
                                       shape_str(x.dimensions()) + "; it must be bfloat16 or float32 [T, H].");
  }
  const int64_t num_tokens = x.dimensions()[0], hidden = x.dimensions()[1];
  if (hidden * ffi::ByteWidth(dtype) % 16 != 0) {
    return ffi::Error::InvalidArgument(std::string(op) + ": rows of x must be a multiple of 16 bytes.");
  }
  const auto idx = topk_idx.dimensions();
  if (idx.size() != 2 || idx[0] != num_tokens) {
    return ffi::Error::InvalidArgument(std::string(op) + ": topk_idx has shape " + shape_str(idx) +
                                       "; it must be [" + std::to_string(num_tokens) + ", K].");
  }
  JAX_EP_RETURN_IF_ERROR(check_low_latency_sizes(op, group, num_tokens, hidden, idx[1], a.num_experts,
                                     a.max_tokens_per_rank));
  if (low_latency_dispatch_smem(num_tokens, idx[1], a.num_experts, num_sms) > kMaxLowLatencyDispatchSmem) {
    return ffi::Error::InvalidArgument(std::string(op) + ": " + std::to_string(num_tokens) + " tokens x " +
                                       std::to_string(a.num_experts) +
                                       " experts need more shared memory than a block has; use fewer "
                                       "tokens per call (or more SMs: num_sms).");
  }
  a.x = x.untyped_data();
  a.topk_idx = topk_idx.typed_data();
  a.num_tokens = static_cast<int>(num_tokens);
  a.hidden = static_cast<int>(hidden);
  a.num_topk = static_cast<int>(idx[1]);
  a.x_is_bf16 = dtype == ffi::DataType::BF16;
  return ffi::Error::Success();
}

LowLatencyDispatchArgs dispatch_args(int64_t num_experts, int64_t max_tokens_per_rank,
                                     bool round_scale, bool mask, int64_t num_sms) {
  LowLatencyDispatchArgs a{};
  a.num_experts = static_cast<int>(num_experts);
  a.max_tokens_per_rank = static_cast<int>(max_tokens_per_rank);
  a.round_scale = round_scale;
  a.mask = mask;
  a.num_blocks = static_cast<int>(num_sms);
  return a;
}

ffi::Error launch_dispatch_op(const char* op, const DeviceContext& ctx, const LowLatencyDispatchArgs& a,
                              int phases, cudaStream_t stream) {
  const cudaError_t err = launch_low_latency_dispatch(ctx.device->view, a, phases, stream);
  if (err != cudaSuccess) return cuda_error(op, err);
  return ffi::Error::Success();
}

ffi::Error DispatchImpl(cudaStream_t stream, GroupState* state, int32_t ordinal, int64_t buffer_id,
                        int64_t num_experts, int64_t max_tokens_per_rank, bool round_scale,
                        bool mask, int64_t num_sms, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> topk_idx,
                        ffi::Result<ffi::AnyBuffer> recv_x, ffi::ResultBuffer<ffi::F32> recv_scales,
                        ffi::ResultBuffer<ffi::S32> recv_count, ffi::ResultBuffer<ffi::S32> row_of_slot) {
  constexpr const char* kOp = "jax_ep low_latency_dispatch";
  DeviceContext ctx;
  JAX_EP_RETURN_IF_ERROR(find_device(kOp, state, ordinal, &ctx));
  JAX_EP_RETURN_IF_ERROR(check_blocks(kOp, num_sms, *ctx.device));
  LowLatencyDispatchArgs a = dispatch_args(num_experts, max_tokens_per_rank, round_scale, mask, num_sms);
  JAX_EP_RETURN_IF_ERROR(dispatch_inputs(kOp, *ctx.group, num_sms, x, topk_idx, a));
  const ffi::DataType out = recv_x->element_type();
  if (out != x.element_type() && out != ffi::DataType::F8E4M3FN) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": recv_x must be x's dtype or float8_e4m3fn.");
  }
  JAX_EP_RETURN_IF_ERROR(dispatch_results(kOp, *ctx.group, a.hidden, a.num_topk, recv_x, recv_scales,
                                          recv_count, row_of_slot, a));
  return launch_dispatch_op(kOp, ctx, a, kPhaseBoth, stream);
}

ffi::Error DispatchSendImpl(cudaStream_t stream, GroupState* state, int32_t ordinal,
                            int64_t buffer_id, int64_t num_experts, int64_t max_tokens_per_rank,
                            bool fp8, bool round_scale, bool mask, int64_t num_sms,
                            ffi::AnyBuffer x, ffi::Buffer<ffi::S32> topk_idx,
                            ffi::ResultBuffer<ffi::S32> pending) {
  constexpr const char* kOp = "jax_ep low_latency_dispatch_send";
  DeviceContext ctx;
  JAX_EP_RETURN_IF_ERROR(find_device(kOp, state, ordinal, &ctx));
  JAX_EP_RETURN_IF_ERROR(check_blocks(kOp, num_sms, *ctx.device));
  LowLatencyDispatchArgs a = dispatch_args(num_experts, max_tokens_per_rank, round_scale, mask, num_sms);
  JAX_EP_RETURN_IF_ERROR(dispatch_inputs(kOp, *ctx.group, num_sms, x, topk_idx, a));
  if (fp8 && a.hidden % 128 != 0) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": FP8 needs hidden to be a multiple of 128.");
  }
  a.fp8 = fp8;
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "pending", pending->dimensions(), {2}));
  a.pending = pending->typed_data();
  a.send_gate = ctx.device->send_gate;
  return launch_on_send_stream(kOp, *ctx.device, stream, [&](cudaStream_t send_stream) {
    return launch_dispatch_op(kOp, ctx, a, kPhaseSend, send_stream);
  });
}

ffi::Error DispatchRecvImpl(cudaStream_t stream, GroupState* state, int32_t ordinal,
                            int64_t buffer_id, int64_t num_experts, int64_t max_tokens_per_rank,
                            bool mask, int64_t num_sms, int64_t num_tokens,
                            ffi::Buffer<ffi::S32> pending, ffi::AnyBuffer /*send's x*/,
                            ffi::Buffer<ffi::S32> /*send's topk_idx*/,
                            ffi::Result<ffi::AnyBuffer> recv_x,
                            ffi::ResultBuffer<ffi::F32> recv_scales,
                            ffi::ResultBuffer<ffi::S32> recv_count,
                            ffi::ResultBuffer<ffi::S32> row_of_slot) {
  constexpr const char* kOp = "jax_ep low_latency_dispatch_recv";
  DeviceContext ctx;
  JAX_EP_RETURN_IF_ERROR(find_device(kOp, state, ordinal, &ctx));
  JAX_EP_RETURN_IF_ERROR(check_blocks(kOp, num_sms, *ctx.device));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "pending", pending.dimensions(), {2}));
  const ffi::DataType dtype = recv_x->element_type();
  if (dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F32 && dtype != ffi::DataType::F8E4M3FN) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": recv_x must be bfloat16, float32 or float8_e4m3fn.");
  }
  const auto dims = recv_x->dimensions();
  const auto slots = row_of_slot->dimensions();
  if (dims.size() != 3 || slots.size() != 3) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": recv_x and row_of_slot must be rank 3.");
  }
  LowLatencyDispatchArgs a = dispatch_args(num_experts, max_tokens_per_rank, false, mask, num_sms);
  JAX_EP_RETURN_IF_ERROR(check_low_latency_sizes(kOp, *ctx.group, num_tokens, dims[2], slots[2], num_experts,
                                     max_tokens_per_rank));
  a.num_tokens = static_cast<int>(num_tokens);
  a.hidden = static_cast<int>(dims[2]);
  a.num_topk = static_cast<int>(slots[2]);
  a.x_is_bf16 = dtype == ffi::DataType::BF16;
  a.pending = const_cast<int*>(pending.typed_data());
  JAX_EP_RETURN_IF_ERROR(dispatch_results(kOp, *ctx.group, a.hidden, a.num_topk, recv_x, recv_scales,
                                          recv_count, row_of_slot, a));
  JAX_EP_RETURN_IF_ERROR(wait_for_sends(kOp, *ctx.device, stream));
  return launch_dispatch_op(kOp, ctx, a, kPhaseRecv, stream);
}

// ---------------------------------------------------------------------------------------
// Combine
// ---------------------------------------------------------------------------------------
// x [L, R * M, H] bf16 or f32, topk_weights [T, K] f32, row_of_slot [R, M, K]: the send side.
ffi::Error combine_inputs(const char* op, const Group& group, ffi::AnyBuffer x,
                          ffi::Buffer<ffi::F32> topk_weights, ffi::Buffer<ffi::S32> row_of_slot,
                          LowLatencyCombineArgs& a) {
  const ffi::DataType dtype = x.element_type();
  const auto dims = x.dimensions(), w = topk_weights.dimensions(), slots = row_of_slot.dimensions();
  if ((dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F32) || dims.size() != 3) {
    return ffi::Error::InvalidArgument(std::string(op) + ": x is " + dtype_name(dtype) + " " +
                                       shape_str(dims) + "; it must be bfloat16 or float32 [L, R * M, H].");
  }
  if (w.size() != 2 || slots.size() != 3) {
    return ffi::Error::InvalidArgument(std::string(op) + ": topk_weights must be [T, K] and row_of_slot [R, M, K].");
  }
  const int64_t num_ranks = group.num_ranks(), m = slots[1];
  JAX_EP_RETURN_IF_ERROR(check_low_latency_sizes(op, group, w[0], dims[2], w[1], a.num_experts, m));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "row_of_slot", slots, {num_ranks, m, w[1]}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "x", dims, {group.num_experts / num_ranks, num_ranks * m, dims[2]}));
  if (dims[2] * ffi::ByteWidth(dtype) % 16 != 0) {
    return ffi::Error::InvalidArgument(std::string(op) + ": rows of x must be a multiple of 16 bytes.");
  }
  a.x = x.untyped_data();
  a.topk_weights = topk_weights.typed_data();
  a.row_of_slot = row_of_slot.typed_data();
  a.num_tokens = static_cast<int>(w[0]);
  a.hidden = static_cast<int>(dims[2]);
  a.num_topk = static_cast<int>(w[1]);
  a.max_tokens_per_rank = static_cast<int>(m);
  a.is_bf16 = dtype == ffi::DataType::BF16;
  return ffi::Error::Success();
}

// topk_idx [T, K], out [T, H] x's dtype: the receive side.
ffi::Error combine_outputs(const char* op, ffi::Buffer<ffi::S32> topk_idx,
                           ffi::Result<ffi::AnyBuffer>& out, LowLatencyCombineArgs& a) {
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "topk_idx", topk_idx.dimensions(), {a.num_tokens, a.num_topk}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "out", out->dimensions(), {a.num_tokens, a.hidden}));
  const ffi::DataType dtype = out->element_type();
  if (dtype != (a.is_bf16 ? ffi::DataType::BF16 : ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument(std::string(op) + ": out must have x's dtype.");
  }
  a.topk_idx = topk_idx.typed_data();
  a.out = out->untyped_data();
  return ffi::Error::Success();
}

LowLatencyCombineArgs combine_args(int64_t num_experts, bool mask, int64_t num_sms) {
  LowLatencyCombineArgs a{};
  a.num_experts = static_cast<int>(num_experts);
  a.mask = mask;
  a.num_blocks = static_cast<int>(num_sms);
  return a;
}

ffi::Error launch_combine_op(const char* op, const DeviceContext& ctx, const LowLatencyCombineArgs& a,
                             int phases, cudaStream_t stream) {
  const cudaError_t err = launch_low_latency_combine(ctx.device->view, a, phases, stream);
  if (err != cudaSuccess) return cuda_error(op, err);
  return ffi::Error::Success();
}

ffi::Error CombineImpl(cudaStream_t stream, GroupState* state, int32_t ordinal, int64_t buffer_id,
                       int64_t num_experts, bool mask, int64_t num_sms, ffi::AnyBuffer x,
                       ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> topk_weights,
                       ffi::Buffer<ffi::S32> row_of_slot, ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kOp = "jax_ep low_latency_combine";
  DeviceContext ctx;
  JAX_EP_RETURN_IF_ERROR(find_device(kOp, state, ordinal, &ctx));
  JAX_EP_RETURN_IF_ERROR(check_blocks(kOp, num_sms, *ctx.device));
  LowLatencyCombineArgs a = combine_args(num_experts, mask, num_sms);
  JAX_EP_RETURN_IF_ERROR(combine_inputs(kOp, *ctx.group, x, topk_weights, row_of_slot, a));
  JAX_EP_RETURN_IF_ERROR(combine_outputs(kOp, topk_idx, out, a));
  return launch_combine_op(kOp, ctx, a, kPhaseBoth, stream);
}

ffi::Error CombineSendImpl(cudaStream_t stream, GroupState* state, int32_t ordinal,
                           int64_t buffer_id, int64_t num_experts, bool mask, int64_t num_sms,
                           ffi::AnyBuffer x, ffi::Buffer<ffi::F32> topk_weights,
                           ffi::Buffer<ffi::S32> row_of_slot, ffi::ResultBuffer<ffi::S32> pending) {
  constexpr const char* kOp = "jax_ep low_latency_combine_send";
  DeviceContext ctx;
  JAX_EP_RETURN_IF_ERROR(find_device(kOp, state, ordinal, &ctx));
  JAX_EP_RETURN_IF_ERROR(check_blocks(kOp, num_sms, *ctx.device));
  LowLatencyCombineArgs a = combine_args(num_experts, mask, num_sms);
  JAX_EP_RETURN_IF_ERROR(combine_inputs(kOp, *ctx.group, x, topk_weights, row_of_slot, a));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "pending", pending->dimensions(), {2}));
  a.pending = pending->typed_data();
  a.send_gate = ctx.device->send_gate;
  return launch_on_send_stream(kOp, *ctx.device, stream, [&](cudaStream_t send_stream) {
    return launch_combine_op(kOp, ctx, a, kPhaseSend, send_stream);
  });
}

ffi::Error CombineRecvImpl(cudaStream_t stream, GroupState* state, int32_t ordinal,
                           int64_t buffer_id, int64_t num_experts, bool mask, int64_t num_sms,
                           ffi::Buffer<ffi::S32> pending, ffi::Buffer<ffi::S32> topk_idx,
                           ffi::AnyBuffer /*send's x*/, ffi::Buffer<ffi::F32> /*send's topk_weights*/,
                           ffi::Buffer<ffi::S32> /*send's row_of_slot*/,
                           ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kOp = "jax_ep low_latency_combine_recv";
  DeviceContext ctx;
  JAX_EP_RETURN_IF_ERROR(find_device(kOp, state, ordinal, &ctx));
  JAX_EP_RETURN_IF_ERROR(check_blocks(kOp, num_sms, *ctx.device));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "pending", pending.dimensions(), {2}));
  const auto idx = topk_idx.dimensions(), dims = out->dimensions();
  if (idx.size() != 2 || dims.size() != 2) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": topk_idx must be [T, K] and out [T, H].");
  }
  LowLatencyCombineArgs a = combine_args(num_experts, mask, num_sms);
  JAX_EP_RETURN_IF_ERROR(check_low_latency_sizes(kOp, *ctx.group, idx[0], dims[1], idx[1], num_experts, ctx.group->max_tokens));
  a.num_tokens = static_cast<int>(idx[0]);
  a.num_topk = static_cast<int>(idx[1]);
  a.hidden = static_cast<int>(dims[1]);
  a.is_bf16 = out->element_type() == ffi::DataType::BF16;
  a.pending = const_cast<int*>(pending.typed_data());
  JAX_EP_RETURN_IF_ERROR(combine_outputs(kOp, topk_idx, out, a));
  JAX_EP_RETURN_IF_ERROR(wait_for_sends(kOp, *ctx.device, stream));
  return launch_combine_op(kOp, ctx, a, kPhaseRecv, stream);
}

}  // namespace
}  // namespace jax_ep

namespace ffi = xla::ffi;

#define JAX_EP_LL_CONTEXT                          \
  ffi::Ffi::Bind()                                 \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()    \
      .Ctx<ffi::State<jax_ep::GroupState>>()       \
      .Ctx<ffi::DeviceOrdinal>()                   \
      .Attr<int64_t>("buffer_id")                  \
      .Attr<int64_t>("num_experts")

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_low_latency_dispatch, jax_ep::DispatchImpl,
                              JAX_EP_LL_CONTEXT.Attr<int64_t>("max_tokens_per_rank")
                                  .Attr<bool>("round_scale")
                                  .Attr<bool>("mask")
                                  .Attr<int64_t>("num_sms")
                                  .Arg<ffi::AnyBuffer>()          // x
                                  .Arg<ffi::Buffer<ffi::S32>>()   // topk_idx
                                  .Ret<ffi::AnyBuffer>()          // recv_x
                                  .Ret<ffi::Buffer<ffi::F32>>()   // recv_scales
                                  .Ret<ffi::Buffer<ffi::S32>>()   // recv_count
                                  .Ret<ffi::Buffer<ffi::S32>>(),  // row_of_slot
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_low_latency_dispatch_send, jax_ep::DispatchSendImpl,
                              JAX_EP_LL_CONTEXT.Attr<int64_t>("max_tokens_per_rank")
                                  .Attr<bool>("fp8")
                                  .Attr<bool>("round_scale")
                                  .Attr<bool>("mask")
                                  .Attr<int64_t>("num_sms")
                                  .Arg<ffi::AnyBuffer>()          // x
                                  .Arg<ffi::Buffer<ffi::S32>>()   // topk_idx
                                  .Ret<ffi::Buffer<ffi::S32>>());  // pending

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_low_latency_dispatch_recv, jax_ep::DispatchRecvImpl,
                              JAX_EP_LL_CONTEXT.Attr<int64_t>("max_tokens_per_rank")
                                  .Attr<bool>("mask")
                                  .Attr<int64_t>("num_sms")
                                  .Attr<int64_t>("num_tokens")
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pending
                                  .Arg<ffi::AnyBuffer>()          // the send's x (kept alive)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // the send's topk_idx (kept alive)
                                  .Ret<ffi::AnyBuffer>()          // recv_x
                                  .Ret<ffi::Buffer<ffi::F32>>()   // recv_scales
                                  .Ret<ffi::Buffer<ffi::S32>>()   // recv_count
                                  .Ret<ffi::Buffer<ffi::S32>>());  // row_of_slot

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_low_latency_combine, jax_ep::CombineImpl,
                              JAX_EP_LL_CONTEXT.Attr<bool>("mask")
                                  .Attr<int64_t>("num_sms")
                                  .Arg<ffi::AnyBuffer>()          // x
                                  .Arg<ffi::Buffer<ffi::S32>>()   // topk_idx
                                  .Arg<ffi::Buffer<ffi::F32>>()   // topk_weights
                                  .Arg<ffi::Buffer<ffi::S32>>()   // row_of_slot
                                  .Ret<ffi::AnyBuffer>(),         // out
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_low_latency_combine_send, jax_ep::CombineSendImpl,
                              JAX_EP_LL_CONTEXT.Attr<bool>("mask")
                                  .Attr<int64_t>("num_sms")
                                  .Arg<ffi::AnyBuffer>()          // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // topk_weights
                                  .Arg<ffi::Buffer<ffi::S32>>()   // row_of_slot
                                  .Ret<ffi::Buffer<ffi::S32>>());  // pending

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_low_latency_combine_recv, jax_ep::CombineRecvImpl,
                              JAX_EP_LL_CONTEXT.Attr<bool>("mask")
                                  .Attr<int64_t>("num_sms")
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pending
                                  .Arg<ffi::Buffer<ffi::S32>>()   // topk_idx
                                  .Arg<ffi::AnyBuffer>()          // the send's x (kept alive)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // the send's topk_weights (kept alive)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // the send's row_of_slot (kept alive)
                                  .Ret<ffi::AnyBuffer>());         // out
