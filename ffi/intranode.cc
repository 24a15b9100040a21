// FFI handlers of the intranode mode: dispatch, combine, cached dispatch (both process
// models). Instantiate looks up the groups of the call's buffer_id once (ffi/state.h);
// execute decodes its arguments, checks shapes and dtypes, and launches one kernel
// (cuda/intranode.cu). No allocation, lookup under a lock, or synchronisation. Every handler
// is command-buffer compatible: its launch depends only on its attributes and buffers.
#include <cuda_runtime_api.h>

#include <memory>
#include <string>

#include "cuda/kernels.h"
#include "ffi/ffi_util.h"
#include "ffi/handlers.h"
#include "ffi/state.h"

namespace jax_ep {
namespace {

ffi::Error check_num_sms(const char* op, int64_t num_sms, const DeviceResources& device) {
  if (num_sms < 2 || num_sms % 2 || num_sms > device.num_sms_on_device) {
    return ffi::Error::InvalidArgument(
        std::string(op) + ": num_sms=" + std::to_string(num_sms) + " must be even and between 2 and " +
        std::to_string(device.num_sms_on_device) +
        " (half of the num_sms blocks send, half receive, all resident at once, on a device "
        "with " + std::to_string(device.num_sms_on_device) + " SMs).");
  }
  return ffi::Error::Success();
}

// Row width checks shared by every op: rows fit the group's staging and are whole 16-byte
// vectors.
ffi::Error check_rows(const char* op, const char* name, int64_t num_tokens, int64_t hidden,
                      ffi::DataType dtype, const Group& group) {
  if (num_tokens > group.max_tokens) {
    return ffi::Error::InvalidArgument(
        std::string(op) + ": " + name + " has " + std::to_string(num_tokens) +
        " tokens but the group holds at most max_tokens=" + std::to_string(group.max_tokens) +
        "; create the group with a larger max_tokens.");
  }
  if (hidden > group.hidden) {
    return ffi::Error::InvalidArgument(
        std::string(op) + ": " + name + " rows have " + std::to_string(hidden) +
        " channels but the group was created with hidden=" + std::to_string(group.hidden) +
        "; create the group with a larger hidden.");
  }
  const int64_t bytes = hidden * static_cast<int64_t>(ffi::ByteWidth(dtype));
  if (bytes % 16 != 0) {
    return ffi::Error::InvalidArgument(
        std::string(op) + ": a row of " + name + " is " + std::to_string(bytes) +
        " bytes; it must be a multiple of 16 bytes (pad hidden to a multiple of " +
        std::to_string(16 / ffi::ByteWidth(dtype)) + ").");
  }
  return ffi::Error::Success();
}

// A matrix operand of bf16 or f32 rows (combine's y, cached dispatch's g); `shape` names
// its dimensions in the error.
ffi::Error check_float_rows(const char* op, const char* name, const char* shape,
                            const ffi::AnyBuffer& operand) {
  const ffi::DataType dtype = operand.element_type();
  if (dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument(std::string(op) + ": " + name + " has dtype " +
                                       dtype_name(dtype) + "; use bfloat16 or float32.");
  }
  if (operand.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument(std::string(op) + ": " + name + " has shape " +
                                       shape_str(operand.dimensions()) + "; it must be " + shape +
                                       ".");
  }
  return ffi::Error::Success();
}

// send_pos [T, R], num_tokens_matrix [R, R], pair_expert_rows [R * T, K] (expert layout) or a
// [1, K] placeholder (rank layout: XLA:GPU mishandled zero-size custom-call operands).
ffi::Error check_handle(const char* op, int64_t num_tokens, int num_ranks, bool expert_layout,
                        ffi::Span<const int64_t> send_pos, ffi::Span<const int64_t> matrix,
                        ffi::Span<const int64_t> pair_expert_rows) {
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "send_pos", send_pos, {num_tokens, num_ranks}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(op, "num_tokens_matrix", matrix, {num_ranks, num_ranks}));
  if (pair_expert_rows.size() != 2 ||
      pair_expert_rows[0] != (expert_layout ? num_ranks * num_tokens : 1) ||
      pair_expert_rows[1] < 1 || pair_expert_rows[1] > kMaxTopk) {
    return ffi::Error::InvalidArgument(
        std::string(op) + ": pair_expert_rows has shape " + shape_str(pair_expert_rows) +
        "; it must be [" + std::to_string(expert_layout ? num_ranks * num_tokens : 1) +
        ", K] with 1 <= K <= " + std::to_string(kMaxTopk) +
        " (use the handle returned by the dispatch with the same expert_layout).");
  }
  return ffi::Error::Success();
}

ffi::Error DispatchImpl(cudaStream_t stream, GroupState* state, int32_t ordinal, int64_t buffer_id,
                        int64_t num_experts, int64_t capacity, bool expert_layout,
                        int64_t num_sms, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> x_scales,
                        ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> topk_weights,
                        ffi::Result<ffi::AnyBuffer> recv_x,
                        ffi::ResultBuffer<ffi::F32> recv_x_scales,
                        ffi::ResultBuffer<ffi::S32> recv_topk_idx,
                        ffi::ResultBuffer<ffi::F32> recv_topk_weights,
                        ffi::ResultBuffer<ffi::S32> num_recv_tokens,
                        ffi::ResultBuffer<ffi::S32> num_recv_tokens_per_expert,
                        ffi::ResultBuffer<ffi::S32> num_dropped,
                        ffi::ResultBuffer<ffi::S32> send_pos,
                        ffi::ResultBuffer<ffi::S32> num_tokens_matrix,
                        ffi::ResultBuffer<ffi::S32> pair_expert_rows) {
  constexpr const char* kOp = "jax_ep dispatch";
  DeviceContext ctx;
  JAX_EP_RETURN_IF_ERROR(find_device(kOp, state, ordinal, &ctx));
  const Group& group = *ctx.group;
  const int num_ranks = group.num_ranks();

  const ffi::DataType dtype = x.element_type();
  if (dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F32 &&
      dtype != ffi::DataType::F8E4M3FN) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": x has dtype " + dtype_name(dtype) +
                                       "; use bfloat16, float32 or float8_e4m3fn.");
  }
  const auto x_dims = x.dimensions();
  if (x_dims.size() != 2) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": x has shape " + shape_str(x_dims) +
                                       "; it must be [num_tokens, hidden].");
  }
  const int64_t num_tokens = x_dims[0], hidden = x_dims[1];
  JAX_EP_RETURN_IF_ERROR(check_rows(kOp, "x", num_tokens, hidden, dtype, group));
  const bool fp8 = dtype == ffi::DataType::F8E4M3FN;
  if (fp8 && hidden % 128 != 0) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": FP8 x needs hidden (" +
                                       std::to_string(hidden) + ") to be a multiple of 128.");
  }
  const int64_t num_scales = fp8 ? hidden / 128 : 0;
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "x_scales", x_scales.dimensions(), {num_tokens, num_scales}));

  const auto idx_dims = topk_idx.dimensions();
  if (idx_dims.size() != 2 || idx_dims[0] != num_tokens || idx_dims[1] < 1 ||
      idx_dims[1] > group.max_topk) {
    return ffi::Error::InvalidArgument(
        std::string(kOp) + ": topk_idx has shape " + shape_str(idx_dims) + "; it must be [" +
        std::to_string(num_tokens) + ", K] with 1 <= K <= max_topk=" +
        std::to_string(group.max_topk) + " of the group.");
  }
  const int64_t num_topk = idx_dims[1];
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "topk_weights", topk_weights.dimensions(), {num_tokens, num_topk}));
  if (num_experts != group.num_experts) {
    return ffi::Error::InvalidArgument(
        std::string(kOp) + ": num_experts=" + std::to_string(num_experts) +
        " differs from the group's num_experts=" + std::to_string(group.num_experts) +
        "; create the group with the model's number of experts.");
  }
  if (capacity < 0 || capacity > (int64_t{1} << 30)) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": capacity=" + std::to_string(capacity) +
                                       " must be between 0 and 2^30.");
  }
  JAX_EP_RETURN_IF_ERROR(check_num_sms(kOp, num_sms, *ctx.device));

  if (recv_x->element_type() != dtype) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": recv_x has dtype " +
                                       dtype_name(recv_x->element_type()) + "; it must be x's " +
                                       dtype_name(dtype) + ".");
  }
  const int64_t experts_per_rank = num_experts / num_ranks;
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "recv_x", recv_x->dimensions(), {capacity, hidden}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "recv_x_scales", recv_x_scales->dimensions(), {capacity, num_scales}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "recv_topk_idx", recv_topk_idx->dimensions(), {capacity, num_topk}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "recv_topk_weights", recv_topk_weights->dimensions(), {capacity, num_topk}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "num_recv_tokens", num_recv_tokens->dimensions(), {}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "num_recv_tokens_per_expert", num_recv_tokens_per_expert->dimensions(), {experts_per_rank}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "num_dropped", num_dropped->dimensions(), {}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "pair_expert_rows", pair_expert_rows->dimensions(),
                                      {expert_layout ? num_ranks * num_tokens : 1, num_topk}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "send_pos", send_pos->dimensions(), {num_tokens, num_ranks}));
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "num_tokens_matrix", num_tokens_matrix->dimensions(), {num_ranks, num_ranks}));

  DispatchArgs a{};
  a.x = x.untyped_data();
  a.x_scales = x_scales.typed_data();
  a.topk_idx = topk_idx.typed_data();
  a.topk_weights = topk_weights.typed_data();
  a.recv_x = recv_x->untyped_data();
  a.recv_x_scales = recv_x_scales->typed_data();
  a.recv_topk_idx = recv_topk_idx->typed_data();
  a.recv_topk_weights = recv_topk_weights->typed_data();
  a.num_recv_tokens = num_recv_tokens->typed_data();
  a.num_recv_tokens_per_expert = num_recv_tokens_per_expert->typed_data();
  a.num_dropped = num_dropped->typed_data();
  a.send_pos = send_pos->typed_data();
  a.num_tokens_matrix = num_tokens_matrix->typed_data();
  a.pair_expert_rows = pair_expert_rows->typed_data();
  a.num_tokens = static_cast<int>(num_tokens);
  a.hidden_bytes = static_cast<int>(hidden * ffi::ByteWidth(dtype));
  a.num_scales = static_cast<int>(num_scales);
  a.num_topk = static_cast<int>(num_topk);
  a.num_experts = static_cast<int>(num_experts);
  a.capacity = static_cast<int>(capacity);
  a.num_pair_rows = static_cast<int>(pair_expert_rows->dimensions()[0]);
  a.expert_layout = expert_layout;
  a.num_channels = static_cast<int>(num_sms / 2);
  const cudaError_t err = launch_dispatch(ctx.device->view, a, stream);
  if (err != cudaSuccess) return cuda_error(kOp, err);
  return ffi::Error::Success();
}

ffi::Error CombineImpl(cudaStream_t stream, GroupState* state, int32_t ordinal, int64_t buffer_id,
                       bool expert_layout, int64_t num_sms, ffi::AnyBuffer y,
                       ffi::Buffer<ffi::S32> send_pos, ffi::Buffer<ffi::S32> num_tokens_matrix,
                       ffi::Buffer<ffi::S32> pair_expert_rows, ffi::AnyBuffer bias,
                       ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kOp = "jax_ep combine";
  DeviceContext ctx;
  JAX_EP_RETURN_IF_ERROR(find_device(kOp, state, ordinal, &ctx));
  const Group& group = *ctx.group;
  const int num_ranks = group.num_ranks();

  JAX_EP_RETURN_IF_ERROR(check_float_rows(kOp, "y", "[capacity, hidden]", y));
  const ffi::DataType dtype = y.element_type();
  const int64_t capacity = y.dimensions()[0], hidden = y.dimensions()[1];
  const auto pos_dims = send_pos.dimensions();
  const int64_t num_tokens = pos_dims.size() == 2 ? pos_dims[0] : -1;
  JAX_EP_RETURN_IF_ERROR(check_handle(kOp, num_tokens, num_ranks, expert_layout, pos_dims,
                                      num_tokens_matrix.dimensions(), pair_expert_rows.dimensions()));
  JAX_EP_RETURN_IF_ERROR(check_rows(kOp, "y", num_tokens, hidden, dtype, group));
  JAX_EP_RETURN_IF_ERROR(check_num_sms(kOp, num_sms, *ctx.device));
  const auto bias_dims = bias.dimensions();
  const bool has_bias = bias_dims.size() == 2 && bias_dims[0] != 0;
  if (bias.element_type() != dtype || bias_dims.size() != 2 ||
      (bias_dims[0] != 0 && bias_dims[0] != num_tokens) || bias_dims[1] != hidden) {
    return ffi::Error::InvalidArgument(
        std::string(kOp) + ": bias is " + dtype_name(bias.element_type()) + " " +
        shape_str(bias_dims) + "; it must be " + dtype_name(dtype) + " " +
        shape_str({num_tokens, hidden}) + " or " + shape_str({0, hidden}) + " for no bias.");
  }
  if (out->element_type() != dtype) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": out has dtype " +
                                       dtype_name(out->element_type()) + "; it must be y's " +
                                       dtype_name(dtype) + ".");
  }
  JAX_EP_RETURN_IF_ERROR(expect_shape(kOp, "out", out->dimensions(), {num_tokens, hidden}));

  CombineArgs a{};
  a.y = y.untyped_data();
  a.send_pos = send_pos.typed_data();
  a.num_tokens_matrix = num_tokens_matrix.typed_data();
  a.pair_expert_rows = pair_expert_rows.typed_data();
  a.bias = has_bias ? bias.untyped_data() : nullptr;
  a.out = out->untyped_data();
  a.num_tokens = static_cast<int>(num_tokens);
  a.hidden = static_cast<int>(hidden);
  a.capacity = static_cast<int>(capacity);
  a.num_topk = static_cast<int>(pair_expert_rows.dimensions()[1]);
  a.is_bf16 = dtype == ffi::DataType::BF16;
  a.expert_layout = expert_layout;
  a.num_channels = static_cast<int>(num_sms / 2);
  const cudaError_t err = launch_combine(ctx.device->view, a, stream);
  if (err != cudaSuccess) return cuda_error(kOp, err);
  return ffi::Error::Success();
}

ffi::Error CachedDispatchImpl(cudaStream_t stream, GroupState* state, int32_t ordinal, int64_t buffer_id,
                              bool expert_layout, int64_t num_sms, ffi::AnyBuffer g,
                              ffi::Buffer<ffi::S32> send_pos,
                              ffi::Buffer<ffi::S32> num_tokens_matrix,
                              ffi::Buffer<ffi::S32> pair_expert_rows,
                              ffi::Result<ffi::AnyBuffer> recv) {
  constexpr const char* kOp = "jax_ep cached_dispatch";
  DeviceContext ctx;
  JAX_EP_RETURN_IF_ERROR(find_device(kOp, state, ordinal, &ctx));
  const Group& group = *ctx.group;
  const int num_ranks = group.num_ranks();

  JAX_EP_RETURN_IF_ERROR(check_float_rows(kOp, "g", "[num_tokens, hidden]", g));
  const ffi::DataType dtype = g.element_type();
  const int64_t num_tokens = g.dimensions()[0], hidden = g.dimensions()[1];
  JAX_EP_RETURN_IF_ERROR(check_rows(kOp, "g", num_tokens, hidden, dtype, group));
  JAX_EP_RETURN_IF_ERROR(check_handle(kOp, num_tokens, num_ranks, expert_layout,
                                      send_pos.dimensions(), num_tokens_matrix.dimensions(),
                                      pair_expert_rows.dimensions()));
  JAX_EP_RETURN_IF_ERROR(check_num_sms(kOp, num_sms, *ctx.device));
  const auto recv_dims = recv->dimensions();
  if (recv->element_type() != dtype || recv_dims.size() != 2 || recv_dims[1] != hidden) {
    return ffi::Error::InvalidArgument(
        std::string(kOp) + ": the result is " + dtype_name(recv->element_type()) + " " +
        shape_str(recv_dims) + "; it must be " + dtype_name(dtype) + " [capacity, " +
        std::to_string(hidden) + "].");
  }

  CachedDispatchArgs a{};
  a.g = g.untyped_data();
  a.send_pos = send_pos.typed_data();
  a.num_tokens_matrix = num_tokens_matrix.typed_data();
  a.pair_expert_rows = pair_expert_rows.typed_data();
  a.recv = recv->untyped_data();
  a.num_tokens = static_cast<int>(num_tokens);
  a.hidden_bytes = static_cast<int>(hidden * ffi::ByteWidth(dtype));
  a.capacity = static_cast<int>(recv_dims[0]);
  a.num_topk = static_cast<int>(pair_expert_rows.dimensions()[1]);
  a.num_pair_rows = static_cast<int>(pair_expert_rows.dimensions()[0]);
  a.expert_layout = expert_layout;
  a.num_channels = static_cast<int>(num_sms / 2);
  const cudaError_t err = launch_cached_dispatch(ctx.device->view, a, stream);
  if (err != cudaSuccess) return cuda_error(kOp, err);
  return ffi::Error::Success();
}

ffi::ErrorOr<std::unique_ptr<GroupState>> InstantiateGroupState(ffi::Dictionary attrs) {
  const ffi::ErrorOr<int64_t> buffer_id = attrs.get<int64_t>("buffer_id");
  if (buffer_id.has_error()) return ffi::Unexpected(buffer_id.error());
  auto state = std::make_unique<GroupState>();
  state->buffer_id = *buffer_id;
  const auto groups = find_groups(*buffer_id);
  if (groups.empty()) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "jax_ep: Buffer " + std::to_string(*buffer_id) + " has no EP group in this process (it "
        "was closed, or never created here); create the Buffer before compiling the "
        "computation that uses it."));
  }
  for (const auto& group : groups) {
    for (const DeviceResources& d : group->devices) {
      if (d.ordinal >= 0 && d.ordinal < kMaxDevices) state->by_ordinal[d.ordinal] = group;
    }
  }
  return state;
}

}  // namespace

ffi::TypeId GroupState::id = {};

}  // namespace jax_ep

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_group_state_instantiate, jax_ep::InstantiateGroupState,
                              ffi::Ffi::BindInstantiate().Attrs<ffi::Dictionary>());

extern "C" const XLA_FFI_TypeId* jax_ep_group_state_type_id() { return &jax_ep::GroupState::id; }

extern "C" const XLA_FFI_TypeInfo* jax_ep_group_state_type_info() {
  static const XLA_FFI_TypeInfo info = ffi::MakeTypeInfo<jax_ep::GroupState>();
  return &info;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_dispatch, jax_ep::DispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::State<jax_ep::GroupState>>()
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
                                  .Ret<ffi::Buffer<ffi::S32>>(),     // pair_expert_rows
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_combine, jax_ep::CombineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::State<jax_ep::GroupState>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<bool>("expert_layout")
                                  .Attr<int64_t>("num_sms")
                                  .Arg<ffi::AnyBuffer>()             // y
                                  .Arg<ffi::Buffer<ffi::S32>>()      // send_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()      // num_tokens_matrix
                                  .Arg<ffi::Buffer<ffi::S32>>()      // pair_expert_rows
                                  .Arg<ffi::AnyBuffer>()             // bias
                                  .Ret<ffi::AnyBuffer>(),            // out
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_cached_dispatch, jax_ep::CachedDispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::State<jax_ep::GroupState>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<bool>("expert_layout")
                                  .Attr<int64_t>("num_sms")
                                  .Arg<ffi::AnyBuffer>()             // g
                                  .Arg<ffi::Buffer<ffi::S32>>()      // send_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()      // num_tokens_matrix
                                  .Arg<ffi::Buffer<ffi::S32>>()      // pair_expert_rows
                                  .Ret<ffi::AnyBuffer>(),            // recv
                              {ffi::Traits::kCmdBufferCompatible});
