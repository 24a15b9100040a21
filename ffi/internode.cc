// FFI handlers of the internode mode (jax_ep._nvshmem): dispatch, combine and cached
// dispatch with the same operands, attributes and results as the intranode targets
// (docs/design.md), and the hooked halves of dispatch and combine (send: returns `pending`,
// int32 [2]; receive: consumes it), launched through cuda/internode.cu. Instantiate finds the
// Buffer's group once per executable (one GPU per process: one group); execute checks shapes,
// the hook rule (InternodeGroup::hooked_in_flight) and launches.
// Not command-buffer compatible yet: the kernels' NVSHMEM calls have not been tried under
// graph capture, and the hook rule is kept on the host at execution.
#include <cuda_runtime_api.h>

#include <memory>
#include <string>

#include "cuda/nvshmem_runtime.h"
#include "ffi/ffi_util.h"
#include "xla/ffi/api/c_api.h"

namespace jax_ep {
namespace {

struct InternodeState {
  static ffi::TypeId id;
  std::shared_ptr<const InternodeGroup> group;
};
ffi::TypeId InternodeState::id = {};

ffi::ErrorOr<std::unique_ptr<InternodeState>> InstantiateInternodeState(ffi::Dictionary attrs) {
  const ffi::ErrorOr<int64_t> buffer_id = attrs.get<int64_t>("buffer_id");
  if (buffer_id.has_error()) return ffi::Unexpected(buffer_id.error());
  auto state = std::make_unique<InternodeState>();
  state->group = find_internode_group(*buffer_id);
  if (state->group == nullptr) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "jax_ep internode: Buffer " + std::to_string(*buffer_id) + " has no internode group in "
        "this process (it was closed, or never created here); create the Buffer before "
        "compiling the computation that uses it."));
  }
  return state;
}

ffi::Error find_group(const char* op, const InternodeState* state, int32_t ordinal,
                      const InternodeGroup** out) {
  const InternodeGroup* group = state->group.get();
  if (group->ordinal != ordinal) {
    return ffi::Error::InvalidArgument(std::string(op) + ": CUDA device " + std::to_string(ordinal) +
                                       " is not the device of Buffer " +
                                       std::to_string(group->buffer_id) + " in this process.");
  }
  if (group->closed.load(std::memory_order_acquire)) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      std::string(op) + ": Buffer " + std::to_string(group->buffer_id) +
                          " is closed; create a new Buffer (and jit again) to keep going.");
  }
  const std::string failure = group->error_message();
  if (!failure.empty()) return ffi::Error(ffi::ErrorCode::kAborted, std::string(op) + ": " + failure);
  *out = group;
  return ffi::Error::Success();
}

ffi::Error check_common(const char* op, const InternodeGroup& group, int64_t num_tokens,
                        int64_t hidden, int64_t num_topk, int64_t num_sms) {
  if (num_tokens > group.max_tokens || hidden > group.hidden || num_topk > group.max_topk ||
      num_topk < 1) {
    return ffi::Error::InvalidArgument(
        std::string(op) + ": " + std::to_string(num_tokens) + " tokens of " +
        std::to_string(hidden) + " channels with top-" + std::to_string(num_topk) +
        " exceed the Buffer's max_tokens=" + std::to_string(group.max_tokens) + ", hidden=" +
        std::to_string(group.hidden) + ", max_topk=" + std::to_string(group.max_topk) + ".");
  }
  if (num_sms < 2 || num_sms > group.num_sms_on_device) {
    return ffi::Error::InvalidArgument(std::string(op) + ": num_sms=" + std::to_string(num_sms) +
                                       " must be between 2 and " +
                                       std::to_string(group.num_sms_on_device) + ".");
  }
  return ffi::Error::Success();
}

ffi::Error check_handle(const char* op, int64_t num_tokens, int num_ranks, int64_t num_topk,
                        bool expert_layout, ffi::Span<const int64_t> send_pos,
                        ffi::Span<const int64_t> matrix, ffi::Span<const int64_t> pair_expert_rows) {
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "send_pos", send_pos, {num_tokens, num_ranks}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "num_tokens_matrix", matrix, {num_ranks, num_ranks}));
  return expect_shape(op, "pair_expert_rows", pair_expert_rows,
                      {expert_layout ? num_ranks * num_tokens : 1, num_topk});
}

// The hook rule, kept on the host: no op of the Buffer may run while a hooked send waits for
// its receive (`expected` = 0), and a receive needs its send in flight (`expected` = its op).
ffi::Error check_in_flight(const char* op, const InternodeGroup& group, int expected) {
  const int in_flight = group.hooked_in_flight.load(std::memory_order_acquire);
  if (in_flight == expected) return ffi::Error::Success();
  const char* sent = in_flight == kOpCombine ? "combine" : "dispatch";
  const std::string rule =
      " Receive each hooked send exactly once, with no other jax_ep operation of the Buffer "
      "between the send and its receive (inside one jitted function XLA may move a send ahead "
      "of an earlier receive it does not depend on: make the send's inputs depend on that "
      "receive, e.g. through jax.lax.optimization_barrier).";
  if (expected == 0) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      std::string(op) + ": a hooked " + sent + "_send of Buffer " +
                          std::to_string(group.buffer_id) + " is still in flight; call " + sent +
                          "_recv on it first." + rule);
  }
  return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                    std::string(op) + ": no matching send is in flight on Buffer " +
                        std::to_string(group.buffer_id) +
                        (in_flight == 0 ? std::string(" (it was received already?)")
                                        : std::string(" (a ") + sent + "_send is)") + "." + rule);
}

// The dispatch inputs (x, its FP8 scales, the routing) into `a`, checked.
ffi::Error dispatch_inputs(const char* op, const InternodeGroup& group, int64_t num_experts,
                           int64_t num_sms, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> x_scales,
                           ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> topk_weights,
                           InternodeDispatchArgs* a) {
  const ffi::DataType dtype = x.element_type();
  if (dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F32 && dtype != ffi::DataType::F8E4M3FN) {
    return ffi::Error::InvalidArgument(std::string(op) + ": x has dtype " + dtype_name(dtype) +
                                       "; use bfloat16, float32 or float8_e4m3fn.");
  }
  if (x.dimensions().size() != 2 || topk_idx.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument(std::string(op) + ": x must be [T, H] and topk_idx [T, K].");
  }
  const int64_t T = x.dimensions()[0], H = x.dimensions()[1], K = topk_idx.dimensions()[1];
  JAX_EP_RETURN_IF_ERROR(check_common(op, group, T, H, K, num_sms));
  if (num_experts != group.num_experts) {
    return ffi::Error::InvalidArgument(std::string(op) + ": num_experts=" + std::to_string(num_experts) +
                                       " differs from the Buffer's " + std::to_string(group.num_experts) + ".");
  }
  const int64_t num_scales = dtype == ffi::DataType::F8E4M3FN ? H / 128 : 0;
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "topk_weights", topk_weights.dimensions(), {T, K}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "x_scales", x_scales.dimensions(), {T, num_scales}));
  a->x = x.untyped_data();
  a->x_scales = x_scales.typed_data();
  a->topk_idx = topk_idx.typed_data();
  a->topk_weights = topk_weights.typed_data();
  a->num_tokens = static_cast<int>(T);
  a->hidden_bytes = static_cast<int>(H * ffi::ByteWidth(dtype));
  a->num_scales = static_cast<int>(num_scales);
  a->num_topk = static_cast<int>(K);
  a->num_blocks = static_cast<int>(num_sms);
  return ffi::Error::Success();
}

// The dispatch outputs (all but send_pos) into `a`, checked against T, H, K and the dtype.
ffi::Error dispatch_outputs(const char* op, const InternodeGroup& group, int64_t T, int64_t H,
                            int64_t K, ffi::DataType dtype, int64_t capacity, bool expert_layout,
                            ffi::Result<ffi::AnyBuffer> recv_x, ffi::ResultBuffer<ffi::F32> recv_x_scales,
                            ffi::ResultBuffer<ffi::S32> recv_topk_idx,
                            ffi::ResultBuffer<ffi::F32> recv_topk_weights,
                            ffi::ResultBuffer<ffi::S32> num_recv_tokens,
                            ffi::ResultBuffer<ffi::S32> num_recv_tokens_per_expert,
                            ffi::ResultBuffer<ffi::S32> num_dropped,
                            ffi::ResultBuffer<ffi::S32> num_tokens_matrix,
                            ffi::ResultBuffer<ffi::S32> pair_expert_rows, InternodeDispatchArgs* a) {
  const int R = group.view.num_ranks;
  const int64_t num_scales = dtype == ffi::DataType::F8E4M3FN ? H / 128 : 0;
  const int64_t L = group.num_experts / R;
  if (recv_x->element_type() != dtype) {
    return ffi::Error::InvalidArgument(std::string(op) + ": recv_x has dtype " +
                                       dtype_name(recv_x->element_type()) + "; it must be " +
                                       dtype_name(dtype) + ".");
  }
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "recv_x", recv_x->dimensions(), {capacity, H}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "recv_x_scales", recv_x_scales->dimensions(), {capacity, num_scales}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "recv_topk_idx", recv_topk_idx->dimensions(), {capacity, K}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "recv_topk_weights", recv_topk_weights->dimensions(), {capacity, K}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "num_recv_tokens_per_expert", num_recv_tokens_per_expert->dimensions(), {L}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "num_tokens_matrix", num_tokens_matrix->dimensions(), {R, R}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "pair_expert_rows", pair_expert_rows->dimensions(),
                                      {expert_layout ? R * T : 1, K}));
  a->recv_x = recv_x->untyped_data();
  a->recv_x_scales = recv_x_scales->typed_data();
  a->recv_topk_idx = recv_topk_idx->typed_data();
  a->recv_topk_weights = recv_topk_weights->typed_data();
  a->num_recv_tokens = num_recv_tokens->typed_data();
  a->num_recv_tokens_per_expert = num_recv_tokens_per_expert->typed_data();
  a->num_dropped = num_dropped->typed_data();
  a->num_tokens_matrix = num_tokens_matrix->typed_data();
  a->pair_expert_rows = pair_expert_rows->typed_data();
  a->capacity = static_cast<int>(capacity);
  a->num_pair_rows = static_cast<int>(pair_expert_rows->dimensions()[0]);
  a->expert_layout = expert_layout;
  return ffi::Error::Success();
}

ffi::Error DispatchImpl(cudaStream_t stream, InternodeState* state, int32_t ordinal, int64_t,
                        int64_t num_experts, int64_t capacity, bool expert_layout, int64_t num_sms,
                        ffi::AnyBuffer x, ffi::Buffer<ffi::F32> x_scales,
                        ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> topk_weights,
                        ffi::Result<ffi::AnyBuffer> recv_x, ffi::ResultBuffer<ffi::F32> recv_x_scales,
                        ffi::ResultBuffer<ffi::S32> recv_topk_idx,
                        ffi::ResultBuffer<ffi::F32> recv_topk_weights,
                        ffi::ResultBuffer<ffi::S32> num_recv_tokens,
                        ffi::ResultBuffer<ffi::S32> num_recv_tokens_per_expert,
                        ffi::ResultBuffer<ffi::S32> num_dropped, ffi::ResultBuffer<ffi::S32> send_pos,
                        ffi::ResultBuffer<ffi::S32> num_tokens_matrix,
                        ffi::ResultBuffer<ffi::S32> pair_expert_rows) {
  constexpr const char* kOp = "jax_ep internode dispatch";
  const InternodeGroup* group = nullptr;
  JAX_EP_RETURN_IF_ERROR(find_group(kOp, state, ordinal, &group));
  JAX_EP_RETURN_IF_ERROR(check_in_flight(kOp, *group, 0));
  InternodeDispatchArgs a{};
  JAX_EP_RETURN_IF_ERROR(dispatch_inputs(kOp, *group, num_experts, num_sms, x, x_scales, topk_idx,
                                         topk_weights, &a));
  const int64_t T = x.dimensions()[0], H = x.dimensions()[1], K = topk_idx.dimensions()[1];
  JAX_EP_RETURN_IF_ERROR(dispatch_outputs(kOp, *group, T, H, K, x.element_type(), capacity,
                                          expert_layout, recv_x, recv_x_scales, recv_topk_idx,
                                          recv_topk_weights, num_recv_tokens,
                                          num_recv_tokens_per_expert, num_dropped,
                                          num_tokens_matrix, pair_expert_rows, &a));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "send_pos", send_pos->dimensions(), {T, group->view.num_ranks}));
  a.send_pos = send_pos->typed_data();
  return launched(kOp, launch_internode_dispatch(group->view, a, kPhaseBoth, stream));
}

// Hooked dispatch, send half: plans the routing (send_pos) and puts the rows on their way.
ffi::Error DispatchSendImpl(cudaStream_t stream, InternodeState* state, int32_t ordinal, int64_t,
                            int64_t num_experts, int64_t num_sms, ffi::AnyBuffer x,
                            ffi::Buffer<ffi::F32> x_scales, ffi::Buffer<ffi::S32> topk_idx,
                            ffi::Buffer<ffi::F32> topk_weights, ffi::ResultBuffer<ffi::S32> pending,
                            ffi::ResultBuffer<ffi::S32> send_pos) {
  constexpr const char* kOp = "jax_ep internode dispatch_send";
  const InternodeGroup* group = nullptr;
  JAX_EP_RETURN_IF_ERROR(find_group(kOp, state, ordinal, &group));
  JAX_EP_RETURN_IF_ERROR(check_in_flight(kOp, *group, 0));
  InternodeDispatchArgs a{};
  JAX_EP_RETURN_IF_ERROR(dispatch_inputs(kOp, *group, num_experts, num_sms, x, x_scales, topk_idx,
                                         topk_weights, &a));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "pending", pending->dimensions(), {2}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "send_pos", send_pos->dimensions(),
                                      {x.dimensions()[0], group->view.num_ranks}));
  a.send_pos = send_pos->typed_data();
  a.pending = pending->typed_data();
  JAX_EP_RETURN_IF_ERROR(launched(kOp, launch_internode_dispatch(group->view, a, kPhaseSend, stream)));
  group->hooked_in_flight.store(kOpDispatch, std::memory_order_release);
  return ffi::Error::Success();
}

// Hooked dispatch, receive half: forwards the arrived rows inside the node and writes the
// outputs (those of the fused dispatch but send_pos, which the send half returned).
ffi::Error DispatchRecvImpl(cudaStream_t stream, InternodeState* state, int32_t ordinal, int64_t,
                            int64_t capacity, bool expert_layout, int64_t num_sms,
                            ffi::Buffer<ffi::S32> pending, ffi::Buffer<ffi::S32> send_pos,
                            ffi::Result<ffi::AnyBuffer> recv_x, ffi::ResultBuffer<ffi::F32> recv_x_scales,
                            ffi::ResultBuffer<ffi::S32> recv_topk_idx,
                            ffi::ResultBuffer<ffi::F32> recv_topk_weights,
                            ffi::ResultBuffer<ffi::S32> num_recv_tokens,
                            ffi::ResultBuffer<ffi::S32> num_recv_tokens_per_expert,
                            ffi::ResultBuffer<ffi::S32> num_dropped,
                            ffi::ResultBuffer<ffi::S32> num_tokens_matrix,
                            ffi::ResultBuffer<ffi::S32> pair_expert_rows) {
  constexpr const char* kOp = "jax_ep internode dispatch_recv";
  const InternodeGroup* group = nullptr;
  JAX_EP_RETURN_IF_ERROR(find_group(kOp, state, ordinal, &group));
  JAX_EP_RETURN_IF_ERROR(check_in_flight(kOp, *group, kOpDispatch));
  const ffi::DataType dtype = recv_x->element_type();
  if (recv_x->dimensions().size() != 2 || recv_topk_idx->dimensions().size() != 2 ||
      send_pos.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": recv_x must be [C, H], recv_topk_idx [C, K], send_pos [T, R].");
  }
  const int64_t T = send_pos.dimensions()[0], H = recv_x->dimensions()[1];
  const int64_t K = recv_topk_idx->dimensions()[1];
  JAX_EP_RETURN_IF_ERROR(check_common(kOp, *group, T, H, K, num_sms));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "pending", pending.dimensions(), {2}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "send_pos", send_pos.dimensions(), {T, group->view.num_ranks}));
  InternodeDispatchArgs a{};
  JAX_EP_RETURN_IF_ERROR(dispatch_outputs(kOp, *group, T, H, K, dtype, capacity, expert_layout,
                                          recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights,
                                          num_recv_tokens, num_recv_tokens_per_expert, num_dropped,
                                          num_tokens_matrix, pair_expert_rows, &a));
  a.send_pos = const_cast<int*>(send_pos.typed_data());
  a.pending = const_cast<int*>(pending.typed_data());
  a.num_tokens = static_cast<int>(T);
  a.hidden_bytes = static_cast<int>(H * ffi::ByteWidth(dtype));
  a.num_scales = dtype == ffi::DataType::F8E4M3FN ? static_cast<int>(H / 128) : 0;
  a.num_topk = static_cast<int>(K);
  a.num_blocks = static_cast<int>(num_sms);
  group->hooked_in_flight.store(0, std::memory_order_release);
  return launched(kOp, launch_internode_dispatch(group->view, a, kPhaseRecv, stream));
}

// The combine inputs (y and the handle) into `a`, checked.
ffi::Error combine_inputs(const char* op, const InternodeGroup& group, bool expert_layout,
                          int64_t num_sms, ffi::AnyBuffer y, ffi::Buffer<ffi::S32> send_pos,
                          ffi::Buffer<ffi::S32> num_tokens_matrix,
                          ffi::Buffer<ffi::S32> pair_expert_rows, InternodeCombineArgs* a) {
  const ffi::DataType dtype = y.element_type();
  if ((dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F32) || y.dimensions().size() != 2 ||
      send_pos.dimensions().size() != 2 || pair_expert_rows.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument(std::string(op) + ": y must be bfloat16 or float32 [capacity, hidden].");
  }
  const int64_t C = y.dimensions()[0], H = y.dimensions()[1];
  const int64_t T = send_pos.dimensions()[0], K = pair_expert_rows.dimensions()[1];
  JAX_EP_RETURN_IF_ERROR(check_common(op, group, T, H, K, num_sms));
  JAX_EP_RETURN_IF_ERROR(check_handle(op, T, group.view.num_ranks, K, expert_layout,
                                      send_pos.dimensions(), num_tokens_matrix.dimensions(),
                                      pair_expert_rows.dimensions()));
  a->y = y.untyped_data();
  a->send_pos = send_pos.typed_data();
  a->num_tokens_matrix = num_tokens_matrix.typed_data();
  a->pair_expert_rows = pair_expert_rows.typed_data();
  a->num_tokens = static_cast<int>(T);
  a->hidden = static_cast<int>(H);
  a->capacity = static_cast<int>(C);
  a->num_topk = static_cast<int>(K);
  a->is_bf16 = dtype == ffi::DataType::BF16;
  a->expert_layout = expert_layout;
  a->num_blocks = static_cast<int>(num_sms);
  return ffi::Error::Success();
}

// The combine output and its optional bias into `a`, checked: out [T, H], bias [T, H] or
// [0, H] (none), both of `dtype`.
ffi::Error combine_output(const char* op, int64_t T, int64_t H, ffi::DataType dtype,
                          ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> out,
                          InternodeCombineArgs* a) {
  const auto bias_dims = bias.dimensions();
  if (bias.element_type() != dtype || bias_dims.size() != 2 ||
      (bias_dims[0] != 0 && bias_dims[0] != T) || bias_dims[1] != H) {
    return ffi::Error::InvalidArgument(std::string(op) + ": bias must be " + dtype_name(dtype) +
                                       " " + shape_str({T, H}) + " or " + shape_str({0, H}) + ".");
  }
  if (out->element_type() != dtype) {
    return ffi::Error::InvalidArgument(std::string(op) + ": out must be " + dtype_name(dtype) + ".");
  }
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "out", out->dimensions(), {T, H}));
  a->bias = bias_dims[0] != 0 ? bias.untyped_data() : nullptr;
  a->out = out->untyped_data();
  return ffi::Error::Success();
}

ffi::Error CombineImpl(cudaStream_t stream, InternodeState* state, int32_t ordinal, int64_t,
                       bool expert_layout, int64_t num_sms, ffi::AnyBuffer y,
                       ffi::Buffer<ffi::S32> send_pos, ffi::Buffer<ffi::S32> num_tokens_matrix,
                       ffi::Buffer<ffi::S32> pair_expert_rows, ffi::AnyBuffer bias,
                       ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kOp = "jax_ep internode combine";
  const InternodeGroup* group = nullptr;
  JAX_EP_RETURN_IF_ERROR(find_group(kOp, state, ordinal, &group));
  JAX_EP_RETURN_IF_ERROR(check_in_flight(kOp, *group, 0));
  InternodeCombineArgs a{};
  JAX_EP_RETURN_IF_ERROR(combine_inputs(kOp, *group, expert_layout, num_sms, y, send_pos,
                                        num_tokens_matrix, pair_expert_rows, &a));
  JAX_EP_RETURN_IF_ERROR(combine_output(kOp, a.num_tokens, a.hidden, y.element_type(), bias, out, &a));
  return launched(kOp, launch_internode_combine(group->view, a, kPhaseBoth, stream));
}

// Hooked combine, send half: sums inside the node and puts the partial sums on their way.
ffi::Error CombineSendImpl(cudaStream_t stream, InternodeState* state, int32_t ordinal, int64_t,
                           bool expert_layout, int64_t num_sms, ffi::AnyBuffer y,
                           ffi::Buffer<ffi::S32> send_pos, ffi::Buffer<ffi::S32> num_tokens_matrix,
                           ffi::Buffer<ffi::S32> pair_expert_rows,
                           ffi::ResultBuffer<ffi::S32> pending) {
  constexpr const char* kOp = "jax_ep internode combine_send";
  const InternodeGroup* group = nullptr;
  JAX_EP_RETURN_IF_ERROR(find_group(kOp, state, ordinal, &group));
  JAX_EP_RETURN_IF_ERROR(check_in_flight(kOp, *group, 0));
  InternodeCombineArgs a{};
  JAX_EP_RETURN_IF_ERROR(combine_inputs(kOp, *group, expert_layout, num_sms, y, send_pos,
                                        num_tokens_matrix, pair_expert_rows, &a));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "pending", pending->dimensions(), {2}));
  a.pending = pending->typed_data();
  JAX_EP_RETURN_IF_ERROR(launched(kOp, launch_internode_combine(group->view, a, kPhaseSend, stream)));
  group->hooked_in_flight.store(kOpCombine, std::memory_order_release);
  return ffi::Error::Success();
}

// Hooked combine, receive half: adds bias and the nodes' partial sums once they arrived.
ffi::Error CombineRecvImpl(cudaStream_t stream, InternodeState* state, int32_t ordinal, int64_t,
                           int64_t num_sms, ffi::Buffer<ffi::S32> pending, ffi::AnyBuffer bias,
                           ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kOp = "jax_ep internode combine_recv";
  const InternodeGroup* group = nullptr;
  JAX_EP_RETURN_IF_ERROR(find_group(kOp, state, ordinal, &group));
  JAX_EP_RETURN_IF_ERROR(check_in_flight(kOp, *group, kOpCombine));
  const ffi::DataType dtype = out->element_type();
  if ((dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F32) || out->dimensions().size() != 2) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": out must be bfloat16 or float32 [T, hidden].");
  }
  const int64_t T = out->dimensions()[0], H = out->dimensions()[1];
  JAX_EP_RETURN_IF_ERROR(check_common(kOp, *group, T, H, 1, num_sms));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "pending", pending.dimensions(), {2}));
  InternodeCombineArgs a{};
  JAX_EP_RETURN_IF_ERROR(combine_output(kOp, T, H, dtype, bias, out, &a));
  a.pending = const_cast<int*>(pending.typed_data());
  a.num_tokens = static_cast<int>(T);
  a.hidden = static_cast<int>(H);
  a.is_bf16 = dtype == ffi::DataType::BF16;
  a.num_blocks = static_cast<int>(num_sms);
  group->hooked_in_flight.store(0, std::memory_order_release);
  return launched(kOp, launch_internode_combine(group->view, a, kPhaseRecv, stream));
}

ffi::Error CachedDispatchImpl(cudaStream_t stream, InternodeState* state, int32_t ordinal, int64_t,
                              bool expert_layout, int64_t num_sms, ffi::AnyBuffer g,
                              ffi::Buffer<ffi::S32> send_pos, ffi::Buffer<ffi::S32> num_tokens_matrix,
                              ffi::Buffer<ffi::S32> pair_expert_rows, ffi::Result<ffi::AnyBuffer> recv) {
  constexpr const char* kOp = "jax_ep internode cached_dispatch";
  const InternodeGroup* group = nullptr;
  JAX_EP_RETURN_IF_ERROR(find_group(kOp, state, ordinal, &group));
  JAX_EP_RETURN_IF_ERROR(check_in_flight(kOp, *group, 0));
  const ffi::DataType dtype = g.element_type();
  if ((dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F32) || g.dimensions().size() != 2 ||
      pair_expert_rows.dimensions().size() != 2 || recv->dimensions().size() != 2) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": g must be bfloat16 or float32 [T, hidden].");
  }
  const int64_t T = g.dimensions()[0], H = g.dimensions()[1], K = pair_expert_rows.dimensions()[1];
  const int64_t C = recv->dimensions()[0];
  JAX_EP_RETURN_IF_ERROR(check_common(kOp, *group, T, H, K, num_sms));
  JAX_EP_RETURN_IF_ERROR(check_handle(kOp, T, group->view.num_ranks, K, expert_layout,
                                      send_pos.dimensions(), num_tokens_matrix.dimensions(),
                                      pair_expert_rows.dimensions()));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "recv", recv->dimensions(), {C, H}));
  const size_t row_bytes = static_cast<size_t>(H) * ffi::ByteWidth(dtype);
  // Rows no pair writes are zero.
  cudaError_t err = cudaMemsetAsync(recv->untyped_data(), 0, C * row_bytes, stream);
  if (err != cudaSuccess) return cuda_error(kOp, err);
  InternodeDispatchArgs a{};
  a.x = g.untyped_data();
  a.recv_x = recv->untyped_data();
  a.send_pos = const_cast<int*>(send_pos.typed_data());
  a.num_tokens_matrix = const_cast<int*>(num_tokens_matrix.typed_data());
  a.pair_expert_rows = const_cast<int*>(pair_expert_rows.typed_data());
  a.num_tokens = static_cast<int>(T);
  a.hidden_bytes = static_cast<int>(row_bytes);
  a.num_topk = static_cast<int>(K);
  a.capacity = static_cast<int>(C);
  a.num_pair_rows = static_cast<int>(pair_expert_rows.dimensions()[0]);
  a.expert_layout = expert_layout;
  a.cached = true;
  a.num_blocks = static_cast<int>(num_sms);
  err = launch_internode_dispatch(group->view, a, kPhaseBoth, stream);
  return launched(kOp, err);
}

}  // namespace
}  // namespace jax_ep

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_internode_state_instantiate, jax_ep::InstantiateInternodeState,
                              ffi::Ffi::BindInstantiate().Attrs<ffi::Dictionary>());

extern "C" const XLA_FFI_TypeId* jax_ep_internode_state_type_id() {
  return &jax_ep::InternodeState::id;
}
extern "C" const XLA_FFI_TypeInfo* jax_ep_internode_state_type_info() {
  static const XLA_FFI_TypeInfo info = ffi::MakeTypeInfo<jax_ep::InternodeState>();
  return &info;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_internode_dispatch, jax_ep::DispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::State<jax_ep::InternodeState>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("capacity")
                                  .Attr<bool>("expert_layout")
                                  .Attr<int64_t>("num_sms")
                                  .Arg<ffi::AnyBuffer>()             // x
                                  .Arg<ffi::Buffer<ffi::F32>>()      // x_scales
                                  .Arg<ffi::Buffer<ffi::S32>>()      // topk_idx
                                  .Arg<ffi::Buffer<ffi::F32>>()      // topk_weights
                                  .Ret<ffi::AnyBuffer>()             // recv_x
                                  .Ret<ffi::Buffer<ffi::F32>>()      // recv_x_scales
                                  .Ret<ffi::Buffer<ffi::S32>>()      // recv_topk_idx
                                  .Ret<ffi::Buffer<ffi::F32>>()      // recv_topk_weights
                                  .Ret<ffi::Buffer<ffi::S32>>()      // num_recv_tokens
                                  .Ret<ffi::Buffer<ffi::S32>>()      // num_recv_tokens_per_expert
                                  .Ret<ffi::Buffer<ffi::S32>>()      // num_dropped
                                  .Ret<ffi::Buffer<ffi::S32>>()      // send_pos
                                  .Ret<ffi::Buffer<ffi::S32>>()      // num_tokens_matrix
                                  .Ret<ffi::Buffer<ffi::S32>>());    // pair_expert_rows

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_internode_combine, jax_ep::CombineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::State<jax_ep::InternodeState>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<bool>("expert_layout")
                                  .Attr<int64_t>("num_sms")
                                  .Arg<ffi::AnyBuffer>()             // y
                                  .Arg<ffi::Buffer<ffi::S32>>()      // send_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()      // num_tokens_matrix
                                  .Arg<ffi::Buffer<ffi::S32>>()      // pair_expert_rows
                                  .Arg<ffi::AnyBuffer>()             // bias
                                  .Ret<ffi::AnyBuffer>());           // out

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_internode_cached_dispatch, jax_ep::CachedDispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::State<jax_ep::InternodeState>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<bool>("expert_layout")
                                  .Attr<int64_t>("num_sms")
                                  .Arg<ffi::AnyBuffer>()             // g
                                  .Arg<ffi::Buffer<ffi::S32>>()      // send_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()      // num_tokens_matrix
                                  .Arg<ffi::Buffer<ffi::S32>>()      // pair_expert_rows
                                  .Ret<ffi::AnyBuffer>());           // recv

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_internode_dispatch_send, jax_ep::DispatchSendImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::State<jax_ep::InternodeState>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("num_sms")
                                  .Arg<ffi::AnyBuffer>()             // x
                                  .Arg<ffi::Buffer<ffi::F32>>()      // x_scales
                                  .Arg<ffi::Buffer<ffi::S32>>()      // topk_idx
                                  .Arg<ffi::Buffer<ffi::F32>>()      // topk_weights
                                  .Ret<ffi::Buffer<ffi::S32>>()      // pending
                                  .Ret<ffi::Buffer<ffi::S32>>());    // send_pos

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_internode_dispatch_recv, jax_ep::DispatchRecvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::State<jax_ep::InternodeState>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("capacity")
                                  .Attr<bool>("expert_layout")
                                  .Attr<int64_t>("num_sms")
                                  .Arg<ffi::Buffer<ffi::S32>>()      // pending
                                  .Arg<ffi::Buffer<ffi::S32>>()      // send_pos
                                  .Ret<ffi::AnyBuffer>()             // recv_x
                                  .Ret<ffi::Buffer<ffi::F32>>()      // recv_x_scales
                                  .Ret<ffi::Buffer<ffi::S32>>()      // recv_topk_idx
                                  .Ret<ffi::Buffer<ffi::F32>>()      // recv_topk_weights
                                  .Ret<ffi::Buffer<ffi::S32>>()      // num_recv_tokens
                                  .Ret<ffi::Buffer<ffi::S32>>()      // num_recv_tokens_per_expert
                                  .Ret<ffi::Buffer<ffi::S32>>()      // num_dropped
                                  .Ret<ffi::Buffer<ffi::S32>>()      // num_tokens_matrix
                                  .Ret<ffi::Buffer<ffi::S32>>());    // pair_expert_rows

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_internode_combine_send, jax_ep::CombineSendImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::State<jax_ep::InternodeState>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<bool>("expert_layout")
                                  .Attr<int64_t>("num_sms")
                                  .Arg<ffi::AnyBuffer>()             // y
                                  .Arg<ffi::Buffer<ffi::S32>>()      // send_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()      // num_tokens_matrix
                                  .Arg<ffi::Buffer<ffi::S32>>()      // pair_expert_rows
                                  .Ret<ffi::Buffer<ffi::S32>>());    // pending

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_internode_combine_recv, jax_ep::CombineRecvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::State<jax_ep::InternodeState>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("num_sms")
                                  .Arg<ffi::Buffer<ffi::S32>>()      // pending
                                  .Arg<ffi::AnyBuffer>()             // bias
                                  .Ret<ffi::AnyBuffer>());           // out
