// FFI handler of get_dispatch_layout: a purely local computation on topk_idx (no group).
#include <cuda_runtime_api.h>

#include <string>

#include "cuda/kernels.h"
#include "ffi/ffi_util.h"
#include "ffi/handlers.h"

namespace jax_ep {
namespace {

ffi::Error GetDispatchLayoutImpl(cudaStream_t stream, int64_t num_experts, int64_t num_ranks,
                                 int64_t num_ranks_per_node, ffi::Buffer<ffi::S32> topk_idx,
                                 ffi::ResultBuffer<ffi::S32> num_tokens_per_rank,
                                 ffi::ResultBuffer<ffi::S32> num_tokens_per_rdma_rank,
                                 ffi::ResultBuffer<ffi::S32> num_tokens_per_expert,
                                 ffi::ResultBuffer<ffi::PRED> is_token_in_rank) {
  constexpr const char* kOp = "jax_ep get_dispatch_layout";
  const auto dims = topk_idx.dimensions();
  if (dims.size() != 2) {
    return ffi::Error::InvalidArgument(std::string(kOp) + ": topk_idx has shape " +
                                       shape_str(dims) + "; it must be [num_tokens, num_topk].");
  }
  if (num_ranks < 1 || num_experts < num_ranks || num_experts % num_ranks != 0) {
    return ffi::Error::InvalidArgument(
        std::string(kOp) + ": num_experts=" + std::to_string(num_experts) +
        " must be a positive multiple of num_ranks=" + std::to_string(num_ranks) + ".");
  }
  if (num_ranks_per_node < 1 || num_ranks % num_ranks_per_node != 0) {
    return ffi::Error::InvalidArgument(
        std::string(kOp) + ": num_ranks_per_node=" + std::to_string(num_ranks_per_node) +
        " must divide num_ranks=" + std::to_string(num_ranks) + ".");
  }
  const int64_t num_nodes = num_ranks / num_ranks_per_node;
  if ((num_ranks + num_nodes + num_experts) * 4 > 48 * 1024) {
    return ffi::Error::InvalidArgument(std::string(kOp) +
                                       ": num_ranks + num_experts is too large (at most about "
                                       "12000 counters fit in one block's shared memory).");
  }
  const int64_t num_tokens = dims[0];
  ffi::Error err = expect_shape(kOp, "num_tokens_per_rank", num_tokens_per_rank->dimensions(), {num_ranks});
  if (err.success()) err = expect_shape(kOp, "num_tokens_per_rdma_rank", num_tokens_per_rdma_rank->dimensions(), {num_nodes});
  if (err.success()) err = expect_shape(kOp, "num_tokens_per_expert", num_tokens_per_expert->dimensions(), {num_experts});
  if (err.success()) err = expect_shape(kOp, "is_token_in_rank", is_token_in_rank->dimensions(), {num_tokens, num_ranks});
  if (err.failure()) return err;

  const cudaError_t status = launch_get_dispatch_layout(
      topk_idx.typed_data(), static_cast<int>(num_tokens), static_cast<int>(dims[1]),
      static_cast<int>(num_experts), static_cast<int>(num_ranks),
      static_cast<int>(num_ranks_per_node), num_tokens_per_rank->typed_data(),
      num_tokens_per_rdma_rank->typed_data(), num_tokens_per_expert->typed_data(),
      static_cast<bool*>(is_token_in_rank->untyped_data()), stream);
  if (status != cudaSuccess) return cuda_error(kOp, status);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_ep

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_get_dispatch_layout, jax_ep::GetDispatchLayoutImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("num_ranks")
                                  .Attr<int64_t>("num_ranks_per_node")
                                  .Arg<ffi::Buffer<ffi::S32>>()     // topk_idx
                                  .Ret<ffi::Buffer<ffi::S32>>()     // num_tokens_per_rank
                                  .Ret<ffi::Buffer<ffi::S32>>()     // num_tokens_per_rdma_rank
                                  .Ret<ffi::Buffer<ffi::S32>>()     // num_tokens_per_expert
                                  .Ret<ffi::Buffer<ffi::PRED>>(),   // is_token_in_rank
                              {ffi::Traits::kCmdBufferCompatible});
