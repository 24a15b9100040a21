// FFI handlers of the low-latency mode for internode Buffers (jax_ep._nvshmem): dispatch and
// combine, fused or hooked (send / receive halves), with the operands, attributes and results
// of the intranode targets (docs/design.md), launched through cuda/internode_low_latency.cu.
// Execute looks the Buffer's group up by buffer_id (one GPU per process: one group), checks
// shapes and the hook rule, and launches on XLA's stream (both halves of a hooked op too: the
// send half's puts leave every SM free for the work between the halves). Not command-buffer
// compatible: the kernels' NVSHMEM calls have not been tried under graph capture. mask=True
// masks a rank that does not answer in time (cuda/internode_low_latency.cu), as on one host.
#include <cuda_runtime_api.h>

#include <memory>
#include <string>

#include "cuda/internode_low_latency.h"
#include "cuda/nvshmem_runtime.h"
#include "ffi/ffi_util.h"

namespace jax_ep {
namespace {

// The open, healthy group of Buffer buffer_id on this device, with low-latency staging.
ffi::Error find_group(const char* op, int64_t buffer_id, int32_t ordinal,
                      std::shared_ptr<const InternodeGroup>* out) {
  std::shared_ptr<const InternodeGroup> group = find_internode_group(buffer_id);
  if (group == nullptr) {
    return ffi::Error::InvalidArgument(std::string(op) + ": Buffer " + std::to_string(buffer_id) +
                                       " has no internode group in this process (it was closed, "
                                       "or never created here).");
  }
  if (group->ordinal != ordinal) {
    return ffi::Error::InvalidArgument(std::string(op) + ": CUDA device " + std::to_string(ordinal) +
                                       " is not the device of Buffer " + std::to_string(buffer_id) +
                                       " in this process.");
  }
  if (group->closed.load(std::memory_order_acquire)) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      std::string(op) + ": Buffer " + std::to_string(buffer_id) +
                          " is closed; create a new Buffer (and jit again) to keep going.");
  }
  const std::string failure = group->error_message();
  if (!failure.empty()) return ffi::Error(ffi::ErrorCode::kAborted, std::string(op) + ": " + failure);
  if (group->ll_base == nullptr) {
    return ffi::Error::InvalidArgument(
        std::string(op) + ": Buffer " + std::to_string(buffer_id) + " has no low-latency staging: it "
        "was made with low_latency_max_tokens_per_rank=0. Make it with a positive "
        "low_latency_max_tokens_per_rank to run low-latency ops.");
  }
  *out = std::move(group);
  return ffi::Error::Success();
}

// What both ops check: the group's sizes bound T, H, K, E and M (M by the low-latency cap,
// which sizes the staging); every block must be resident.
ffi::Error check_sizes(const char* op, const InternodeGroup& group, int64_t num_tokens,
                       int64_t hidden, int64_t num_topk, int64_t num_experts,
                       int64_t max_tokens_per_rank, int64_t num_sms) {
  if (num_sms < 1 || num_sms > group.num_sms_on_device) {
    return ffi::Error::InvalidArgument(
        std::string(op) + ": num_sms=" + std::to_string(num_sms) + " must be between 1 and " +
        std::to_string(group.num_sms_on_device) + " (every block must be resident at once).");
  }
  if (max_tokens_per_rank > group.ll_max_tokens) {
    return ffi::Error::InvalidArgument(
        std::string(op) + ": max_tokens_per_rank=" + std::to_string(max_tokens_per_rank) +
        " exceeds the Buffer's low-latency cap, " + std::to_string(group.ll_max_tokens) +
        " (low_latency_max_tokens_per_rank, or max_tokens_per_rank if None).");
  }
  return check_low_latency_sizes(op, group, num_tokens, hidden, num_topk, num_experts,
                                 max_tokens_per_rank);
}

const char* op_word(int code) {
  switch (code) {
    case kOpDispatch: return "dispatch";
    case kOpCombine: return "combine";
    case kOpLowLatencyDispatch: return "low_latency_dispatch";
    default: return "low_latency_combine";
  }
}

// The hook rule of internode Buffers (InternodeGroup::hooked_in_flight, shared with the
// normal-mode handlers): no op may run while a hooked send waits for its receive
// (`expected` = 0), and a receive needs its own send in flight (`expected` = its op code).
ffi::Error check_in_flight(const char* op, const InternodeGroup& group, int expected) {
  const int in_flight = group.hooked_in_flight.load(std::memory_order_acquire);
  if (in_flight == expected) return ffi::Error::Success();
  const std::string rule =
      " Receive each hooked send exactly once, with no other jax_ep operation of the Buffer "
      "between the send and its receive.";
  if (in_flight != 0) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      std::string(op) + ": a hooked " + op_word(in_flight) + "_send of Buffer " +
                          std::to_string(group.buffer_id) + " is still in flight; call " +
                          op_word(in_flight) + "_recv on it first." + rule);
  }
  return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                    std::string(op) + ": no " + op_word(expected) + "_send of Buffer " +
                        std::to_string(group.buffer_id) + " is in flight (it was received already?)." +
                        rule);
}

// ---------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------
// The send side: x [T, H] bf16 or f32 (rows of whole 16-byte vectors), topk_idx [T, K].
ffi::Error dispatch_inputs(const char* op, const InternodeGroup& group, int64_t num_experts,
                           int64_t max_tokens_per_rank, bool mask, int64_t num_sms, bool fp8,
                           ffi::AnyBuffer x, ffi::Buffer<ffi::S32> topk_idx, LowLatencyDispatchArgs& a) {
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
                                       "; it must be [T, K] with x's T.");
  }
  const int64_t num_topk = idx[1];
  JAX_EP_RETURN_IF_ERROR(check_sizes(op, group, num_tokens, hidden, num_topk, num_experts,
                                     max_tokens_per_rank, num_sms));
  const size_t smem = internode_low_latency_dispatch_smem(static_cast<int>(num_tokens), static_cast<int>(num_topk),
                                                          static_cast<int>(num_experts), static_cast<int>(num_sms));
  if (smem > kMaxLowLatencyDispatchSmem) {
    return ffi::Error::InvalidArgument(
        std::string(op) + ": " + std::to_string(num_tokens) + " tokens x " + std::to_string(num_experts) +
        " experts need " + std::to_string(smem) + " bytes of shared memory per block, more than " +
        std::to_string(kMaxLowLatencyDispatchSmem) + "; pass fewer tokens per call.");
  }
  if (fp8 && hidden % 128 != 0) {
    return ffi::Error::InvalidArgument(std::string(op) + ": FP8 needs hidden (" + std::to_string(hidden) +
                                       ") to be a multiple of 128.");
  }
  a.x = x.untyped_data();
  a.topk_idx = topk_idx.typed_data();
  a.num_tokens = static_cast<int>(num_tokens);
  a.hidden = static_cast<int>(hidden);
  a.num_topk = static_cast<int>(num_topk);
  a.num_experts = static_cast<int>(num_experts);
  a.max_tokens_per_rank = static_cast<int>(max_tokens_per_rank);
  a.x_is_bf16 = dtype == ffi::DataType::BF16;
  a.fp8 = fp8;
  a.mask = mask;
  a.num_blocks = static_cast<int>(num_sms);
  return ffi::Error::Success();
}

// The receive side (a's sizes set): recv_x [L, R * M, H] (x's dtype, or float8_e4m3fn),
// recv_scales f32 [L, R * M, H / 128 or 0], recv_count s32 [L], row_of_slot s32 [R, M, K].
ffi::Error dispatch_results(const char* op, const InternodeGroup& group,
                            ffi::Result<ffi::AnyBuffer>& recv_x, ffi::ResultBuffer<ffi::F32>& recv_scales,
                            ffi::ResultBuffer<ffi::S32>& recv_count,
                            ffi::ResultBuffer<ffi::S32>& row_of_slot, LowLatencyDispatchArgs& a) {
  const ffi::DataType dtype = recv_x->element_type();
  if (dtype != (a.fp8 ? ffi::DataType::F8E4M3FN : (a.x_is_bf16 ? ffi::DataType::BF16 : ffi::DataType::F32))) {
    return ffi::Error::InvalidArgument(std::string(op) + ": recv_x must have x's dtype, or float8_e4m3fn with FP8.");
  }
  const int64_t num_ranks = group.view.num_ranks, local = a.num_experts / num_ranks;
  const int64_t m = a.max_tokens_per_rank, num_scales = a.fp8 ? a.hidden / 128 : 0;
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "recv_x", recv_x->dimensions(), {local, num_ranks * m, a.hidden}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "recv_scales", recv_scales->dimensions(), {local, num_ranks * m, num_scales}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "recv_count", recv_count->dimensions(), {local}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "row_of_slot", row_of_slot->dimensions(), {num_ranks, m, a.num_topk}));
  a.recv_x = recv_x->untyped_data();
  a.recv_scales = a.fp8 ? recv_scales->typed_data() : nullptr;
  a.recv_count = recv_count->typed_data();
  a.row_of_slot = row_of_slot->typed_data();
  return ffi::Error::Success();
}

ffi::Error DispatchImpl(cudaStream_t stream, int32_t ordinal, int64_t buffer_id, int64_t num_experts,
                        int64_t max_tokens_per_rank, bool round_scale, bool mask, int64_t num_sms,
                        ffi::AnyBuffer x, ffi::Buffer<ffi::S32> topk_idx,
                        ffi::Result<ffi::AnyBuffer> recv_x, ffi::ResultBuffer<ffi::F32> recv_scales,
                        ffi::ResultBuffer<ffi::S32> recv_count, ffi::ResultBuffer<ffi::S32> row_of_slot) {
  constexpr const char* kOp = "jax_ep internode low_latency_dispatch";
  std::shared_ptr<const InternodeGroup> group;
  JAX_EP_RETURN_IF_ERROR(find_group(kOp, buffer_id, ordinal, &group));
  JAX_EP_RETURN_IF_ERROR(check_in_flight(kOp, *group, 0));
  LowLatencyDispatchArgs a{};
  a.round_scale = round_scale;
  JAX_EP_RETURN_IF_ERROR(dispatch_inputs(kOp, *group, num_experts, max_tokens_per_rank, mask, num_sms,
                                         recv_x->element_type() == ffi::DataType::F8E4M3FN, x, topk_idx, a));
  JAX_EP_RETURN_IF_ERROR(dispatch_results(kOp, *group, recv_x, recv_scales, recv_count, row_of_slot, a));
  return launched(kOp, launch_internode_low_latency_dispatch(group->view, group->ll_view, a, kPhaseBoth, stream));
}

// The send half: x, topk_idx -> pending s32 [2] ([op number, op code]).
ffi::Error DispatchSendImpl(cudaStream_t stream, int32_t ordinal, int64_t buffer_id,
                            int64_t num_experts, int64_t max_tokens_per_rank, bool fp8, bool round_scale,
                            bool mask, int64_t num_sms, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> topk_idx,
                            ffi::ResultBuffer<ffi::S32> pending) {
  constexpr const char* kOp = "jax_ep internode low_latency_dispatch_send";
  std::shared_ptr<const InternodeGroup> group;
  JAX_EP_RETURN_IF_ERROR(find_group(kOp, buffer_id, ordinal, &group));
  JAX_EP_RETURN_IF_ERROR(check_in_flight(kOp, *group, 0));
  LowLatencyDispatchArgs a{};
  a.round_scale = round_scale;
  JAX_EP_RETURN_IF_ERROR(dispatch_inputs(kOp, *group, num_experts, max_tokens_per_rank, mask, num_sms,
                                         fp8, x, topk_idx, a));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "pending", pending->dimensions(), {2}));
  a.pending = pending->typed_data();
  JAX_EP_RETURN_IF_ERROR(launched(kOp, launch_internode_low_latency_dispatch(group->view, group->ll_view, a,
                                                                              kPhaseSend, stream)));
  group->hooked_in_flight.store(kOpLowLatencyDispatch, std::memory_order_release);
  return ffi::Error::Success();
}

// The receive half: pending (and the send's x and topk_idx, kept alive, unused) -> the fused
// op's results.
ffi::Error DispatchRecvImpl(cudaStream_t stream, int32_t ordinal, int64_t buffer_id,
                            int64_t num_experts, int64_t max_tokens_per_rank, bool mask, int64_t num_sms,
                            int64_t num_tokens, ffi::Buffer<ffi::S32> pending, ffi::AnyBuffer /*send's x*/,
                            ffi::Buffer<ffi::S32> /*send's topk_idx*/, ffi::Result<ffi::AnyBuffer> recv_x,
                            ffi::ResultBuffer<ffi::F32> recv_scales, ffi::ResultBuffer<ffi::S32> recv_count,
                            ffi::ResultBuffer<ffi::S32> row_of_slot) {
  constexpr const char* kOp = "jax_ep internode low_latency_dispatch_recv";
  std::shared_ptr<const InternodeGroup> group;
  JAX_EP_RETURN_IF_ERROR(find_group(kOp, buffer_id, ordinal, &group));
  JAX_EP_RETURN_IF_ERROR(check_in_flight(kOp, *group, kOpLowLatencyDispatch));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "pending", pending.dimensions(), {2}));
  const ffi::DataType dtype = recv_x->element_type();
  if (dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F32 && dtype != ffi::DataType::F8E4M3FN) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": recv_x must be bfloat16, float32 or float8_e4m3fn.");
  }
  const auto dims = recv_x->dimensions(), slots = row_of_slot->dimensions();
  if (dims.size() != 3 || slots.size() != 3) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": recv_x and row_of_slot must be rank 3.");
  }
  JAX_EP_RETURN_IF_ERROR(check_sizes(kOp, *group, num_tokens, dims[2], slots[2], num_experts,
                                     max_tokens_per_rank, num_sms));
  LowLatencyDispatchArgs a{};
  a.num_tokens = static_cast<int>(num_tokens);
  a.hidden = static_cast<int>(dims[2]);
  a.num_topk = static_cast<int>(slots[2]);
  a.num_experts = static_cast<int>(num_experts);
  a.max_tokens_per_rank = static_cast<int>(max_tokens_per_rank);
  a.x_is_bf16 = dtype == ffi::DataType::BF16;
  a.fp8 = dtype == ffi::DataType::F8E4M3FN;
  a.mask = mask;
  a.num_blocks = static_cast<int>(num_sms);
  a.pending = const_cast<int*>(pending.typed_data());
  JAX_EP_RETURN_IF_ERROR(dispatch_results(kOp, *group, recv_x, recv_scales, recv_count, row_of_slot, a));
  JAX_EP_RETURN_IF_ERROR(launched(kOp, launch_internode_low_latency_dispatch(group->view, group->ll_view, a,
                                                                              kPhaseRecv, stream)));
  group->hooked_in_flight.store(0, std::memory_order_release);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------
// Combine
// ---------------------------------------------------------------------------------------
// The send side: x [L, R * M, H] bf16 or f32, topk_weights f32 [T, K], row_of_slot [R, M, K].
ffi::Error combine_inputs(const char* op, const InternodeGroup& group, int64_t num_experts, bool mask,
                          int64_t num_sms, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> topk_weights,
                          ffi::Buffer<ffi::S32> row_of_slot, LowLatencyCombineArgs& a) {
  const ffi::DataType dtype = x.element_type();
  const auto dims = x.dimensions(), w = topk_weights.dimensions(), slots = row_of_slot.dimensions();
  if ((dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F32) || dims.size() != 3) {
    return ffi::Error::InvalidArgument(std::string(op) + ": x is " + dtype_name(dtype) + " " +
                                       shape_str(dims) + "; it must be bfloat16 or float32 [L, R * M, H].");
  }
  if (w.size() != 2 || slots.size() != 3) {
    return ffi::Error::InvalidArgument(std::string(op) + ": topk_weights must be [T, K] and row_of_slot [R, M, K].");
  }
  const int64_t num_ranks = group.view.num_ranks, m = slots[1], hidden = dims[2];
  JAX_EP_RETURN_IF_ERROR(check_sizes(op, group, w[0], hidden, w[1], num_experts, m, num_sms));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "row_of_slot", slots, {num_ranks, m, w[1]}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "x", dims, {num_experts / num_ranks, num_ranks * m, hidden}));
  if (hidden * ffi::ByteWidth(dtype) % 16 != 0) {
    return ffi::Error::InvalidArgument(std::string(op) + ": rows of x must be a multiple of 16 bytes.");
  }
  a.x = x.untyped_data();
  a.topk_weights = topk_weights.typed_data();
  a.row_of_slot = row_of_slot.typed_data();
  a.num_tokens = static_cast<int>(w[0]);
  a.hidden = static_cast<int>(hidden);
  a.num_topk = static_cast<int>(w[1]);
  a.num_experts = static_cast<int>(num_experts);
  a.max_tokens_per_rank = static_cast<int>(m);
  a.is_bf16 = dtype == ffi::DataType::BF16;
  a.mask = mask;
  a.num_blocks = static_cast<int>(num_sms);
  return ffi::Error::Success();
}

// The receive side (a's sizes set): topk_idx [T, K], out [T, H] x's dtype.
ffi::Error combine_outputs(const char* op, ffi::Buffer<ffi::S32> topk_idx, ffi::Result<ffi::AnyBuffer>& out,
                           LowLatencyCombineArgs& a) {
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "topk_idx", topk_idx.dimensions(), {a.num_tokens, a.num_topk}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "out", out->dimensions(), {a.num_tokens, a.hidden}));
  if (out->element_type() != (a.is_bf16 ? ffi::DataType::BF16 : ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument(std::string(op) + ": out must have x's dtype.");
  }
  a.topk_idx = topk_idx.typed_data();
  a.out = out->untyped_data();
  return ffi::Error::Success();
}

ffi::Error CombineImpl(cudaStream_t stream, int32_t ordinal, int64_t buffer_id, int64_t num_experts,
                       bool mask, int64_t num_sms, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> topk_idx,
                       ffi::Buffer<ffi::F32> topk_weights, ffi::Buffer<ffi::S32> row_of_slot,
                       ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kOp = "jax_ep internode low_latency_combine";
  std::shared_ptr<const InternodeGroup> group;
  JAX_EP_RETURN_IF_ERROR(find_group(kOp, buffer_id, ordinal, &group));
  JAX_EP_RETURN_IF_ERROR(check_in_flight(kOp, *group, 0));
  LowLatencyCombineArgs a{};
  JAX_EP_RETURN_IF_ERROR(combine_inputs(kOp, *group, num_experts, mask, num_sms, x, topk_weights, row_of_slot, a));
  JAX_EP_RETURN_IF_ERROR(combine_outputs(kOp, topk_idx, out, a));
  return launched(kOp, launch_internode_low_latency_combine(group->view, group->ll_view, a, kPhaseBoth, stream));
}

// The send half: x, topk_weights, row_of_slot -> pending s32 [2] ([op number, op code]).
ffi::Error CombineSendImpl(cudaStream_t stream, int32_t ordinal, int64_t buffer_id, int64_t num_experts,
                           bool mask, int64_t num_sms, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> topk_weights,
                           ffi::Buffer<ffi::S32> row_of_slot, ffi::ResultBuffer<ffi::S32> pending) {
  constexpr const char* kOp = "jax_ep internode low_latency_combine_send";
  std::shared_ptr<const InternodeGroup> group;
  JAX_EP_RETURN_IF_ERROR(find_group(kOp, buffer_id, ordinal, &group));
  JAX_EP_RETURN_IF_ERROR(check_in_flight(kOp, *group, 0));
  LowLatencyCombineArgs a{};
  JAX_EP_RETURN_IF_ERROR(combine_inputs(kOp, *group, num_experts, mask, num_sms, x, topk_weights, row_of_slot, a));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "pending", pending->dimensions(), {2}));
  a.pending = pending->typed_data();
  JAX_EP_RETURN_IF_ERROR(launched(kOp, launch_internode_low_latency_combine(group->view, group->ll_view, a,
                                                                             kPhaseSend, stream)));
  group->hooked_in_flight.store(kOpLowLatencyCombine, std::memory_order_release);
  return ffi::Error::Success();
}

// The receive half: pending, topk_idx (and the send's operands, kept alive, unused) -> out.
ffi::Error CombineRecvImpl(cudaStream_t stream, int32_t ordinal, int64_t buffer_id, int64_t num_experts,
                           bool mask, int64_t num_sms, ffi::Buffer<ffi::S32> pending,
                           ffi::Buffer<ffi::S32> topk_idx, ffi::AnyBuffer /*send's x*/,
                           ffi::Buffer<ffi::F32> /*send's topk_weights*/,
                           ffi::Buffer<ffi::S32> /*send's row_of_slot*/, ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kOp = "jax_ep internode low_latency_combine_recv";
  std::shared_ptr<const InternodeGroup> group;
  JAX_EP_RETURN_IF_ERROR(find_group(kOp, buffer_id, ordinal, &group));
  JAX_EP_RETURN_IF_ERROR(check_in_flight(kOp, *group, kOpLowLatencyCombine));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "pending", pending.dimensions(), {2}));
  const auto idx = topk_idx.dimensions(), dims = out->dimensions();
  if (idx.size() != 2 || dims.size() != 2) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": topk_idx must be [T, K] and out [T, H].");
  }
  JAX_EP_RETURN_IF_ERROR(check_sizes(kOp, *group, idx[0], dims[1], idx[1], num_experts,
                                     group->ll_max_tokens, num_sms));
  const ffi::DataType dtype = out->element_type();
  if (dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": out must be bfloat16 or float32.");
  }
  LowLatencyCombineArgs a{};
  a.num_tokens = static_cast<int>(idx[0]);
  a.num_topk = static_cast<int>(idx[1]);
  a.hidden = static_cast<int>(dims[1]);
  a.num_experts = static_cast<int>(num_experts);
  a.is_bf16 = dtype == ffi::DataType::BF16;
  a.mask = mask;
  a.num_blocks = static_cast<int>(num_sms);
  a.pending = const_cast<int*>(pending.typed_data());
  JAX_EP_RETURN_IF_ERROR(combine_outputs(kOp, topk_idx, out, a));
  JAX_EP_RETURN_IF_ERROR(launched(kOp, launch_internode_low_latency_combine(group->view, group->ll_view, a,
                                                                             kPhaseRecv, stream)));
  group->hooked_in_flight.store(0, std::memory_order_release);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_ep

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_internode_low_latency_dispatch, jax_ep::DispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("max_tokens_per_rank")
                                  .Attr<bool>("round_scale")
                                  .Attr<bool>("mask")
                                  .Attr<int64_t>("num_sms")
                                  .Arg<ffi::AnyBuffer>()           // x
                                  .Arg<ffi::Buffer<ffi::S32>>()    // topk_idx
                                  .Ret<ffi::AnyBuffer>()           // recv_x
                                  .Ret<ffi::Buffer<ffi::F32>>()    // recv_scales
                                  .Ret<ffi::Buffer<ffi::S32>>()    // recv_count
                                  .Ret<ffi::Buffer<ffi::S32>>());  // row_of_slot

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_internode_low_latency_dispatch_send, jax_ep::DispatchSendImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("max_tokens_per_rank")
                                  .Attr<bool>("fp8")
                                  .Attr<bool>("round_scale")
                                  .Attr<bool>("mask")
                                  .Attr<int64_t>("num_sms")
                                  .Arg<ffi::AnyBuffer>()           // x
                                  .Arg<ffi::Buffer<ffi::S32>>()    // topk_idx
                                  .Ret<ffi::Buffer<ffi::S32>>());  // pending

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_internode_low_latency_dispatch_recv, jax_ep::DispatchRecvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("max_tokens_per_rank")
                                  .Attr<bool>("mask")
                                  .Attr<int64_t>("num_sms")
                                  .Attr<int64_t>("num_tokens")
                                  .Arg<ffi::Buffer<ffi::S32>>()    // pending
                                  .Arg<ffi::AnyBuffer>()           // the send's x (kept alive)
                                  .Arg<ffi::Buffer<ffi::S32>>()    // the send's topk_idx (kept alive)
                                  .Ret<ffi::AnyBuffer>()           // recv_x
                                  .Ret<ffi::Buffer<ffi::F32>>()    // recv_scales
                                  .Ret<ffi::Buffer<ffi::S32>>()    // recv_count
                                  .Ret<ffi::Buffer<ffi::S32>>());  // row_of_slot

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_internode_low_latency_combine, jax_ep::CombineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("num_experts")
                                  .Attr<bool>("mask")
                                  .Attr<int64_t>("num_sms")
                                  .Arg<ffi::AnyBuffer>()           // x
                                  .Arg<ffi::Buffer<ffi::S32>>()    // topk_idx
                                  .Arg<ffi::Buffer<ffi::F32>>()    // topk_weights
                                  .Arg<ffi::Buffer<ffi::S32>>()    // row_of_slot
                                  .Ret<ffi::AnyBuffer>());         // out

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_internode_low_latency_combine_send, jax_ep::CombineSendImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("num_experts")
                                  .Attr<bool>("mask")
                                  .Attr<int64_t>("num_sms")
                                  .Arg<ffi::AnyBuffer>()           // x
                                  .Arg<ffi::Buffer<ffi::F32>>()    // topk_weights
                                  .Arg<ffi::Buffer<ffi::S32>>()    // row_of_slot
                                  .Ret<ffi::Buffer<ffi::S32>>());  // pending

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_internode_low_latency_combine_recv, jax_ep::CombineRecvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("num_experts")
                                  .Attr<bool>("mask")
                                  .Attr<int64_t>("num_sms")
                                  .Arg<ffi::Buffer<ffi::S32>>()    // pending
                                  .Arg<ffi::Buffer<ffi::S32>>()    // topk_idx
                                  .Arg<ffi::AnyBuffer>()           // the send's x (kept alive)
                                  .Arg<ffi::Buffer<ffi::F32>>()    // the send's topk_weights (kept alive)
                                  .Arg<ffi::Buffer<ffi::S32>>()    // the send's row_of_slot (kept alive)
                                  .Ret<ffi::AnyBuffer>());         // out
