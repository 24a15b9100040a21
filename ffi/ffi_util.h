// Small helpers shared by the FFI handlers: shape checks and error sentences.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace jax_ep {

namespace ffi = xla::ffi;

#define JAX_EP_RETURN_IF_ERROR(expr)                 \
  do {                                               \
    ffi::Error jax_ep_err_ = (expr);                 \
    if (jax_ep_err_.failure()) return jax_ep_err_;   \
  } while (0)

inline std::string shape_str(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

inline std::string shape_str(std::initializer_list<int64_t> dims) {
  std::string s = "[";
  size_t i = 0;
  for (int64_t d : dims) s += (i++ ? ", " : "") + std::to_string(d);
  return s + "]";
}

inline bool has_shape(ffi::Span<const int64_t> dims, std::initializer_list<int64_t> expected) {
  if (dims.size() != expected.size()) return false;
  size_t i = 0;
  for (int64_t d : expected) {
    if (dims[i++] != d) return false;
  }
  return true;
}

// InvalidArgument "<op>: <name> has shape [..]; it must be [..]." unless the shape matches.
inline ffi::Error expect_shape(const char* op, const char* name, ffi::Span<const int64_t> dims,
                               std::initializer_list<int64_t> expected) {
  if (has_shape(dims, expected)) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(op) + ": " + name + " has shape " +
                                     shape_str(dims) + "; it must be " + shape_str(expected) + ".");
}

inline const char* dtype_name(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::BF16:
      return "bfloat16";
    case ffi::DataType::F16:
      return "float16";
    case ffi::DataType::F32:
      return "float32";
    case ffi::DataType::F64:
      return "float64";
    case ffi::DataType::F8E4M3FN:
      return "float8_e4m3fn";
    case ffi::DataType::S32:
      return "int32";
    case ffi::DataType::PRED:
      return "bool";
    default:
      return "an unsupported dtype";
  }
}

inline ffi::Error cuda_error(const char* op, cudaError_t err) {
  return ffi::Error::Internal(std::string(op) + ": launching the kernels failed: " +
                              cudaGetErrorString(err) + ".");
}

// Success, or cuda_error for the launch's error.
inline ffi::Error launched(const char* op, cudaError_t err) {
  return err == cudaSuccess ? ffi::Error::Success() : cuda_error(op, err);
}

// What every low-latency op checks (both modes): the Buffer's sizes (`group`'s num_experts,
// max_tokens, hidden, max_topk) bound E, M, T, H and K.
template <typename Group>
ffi::Error check_low_latency_sizes(const char* op, const Group& group, int64_t num_tokens,
                                   int64_t hidden, int64_t num_topk, int64_t num_experts,
                                   int64_t max_tokens_per_rank) {
  if (num_experts != group.num_experts) {
    return ffi::Error::InvalidArgument(std::string(op) + ": num_experts=" + std::to_string(num_experts) +
                                       " differs from the Buffer's " + std::to_string(group.num_experts) + ".");
  }
  if (max_tokens_per_rank < 1 || max_tokens_per_rank > group.max_tokens) {
    return ffi::Error::InvalidArgument(
        std::string(op) + ": max_tokens_per_rank=" + std::to_string(max_tokens_per_rank) +
        " must be between 1 and the Buffer's max_tokens_per_rank=" + std::to_string(group.max_tokens) + ".");
  }
  if (num_tokens < 1 || num_tokens > max_tokens_per_rank) {
    return ffi::Error::InvalidArgument(
        std::string(op) + ": " + std::to_string(num_tokens) + " tokens; between 1 and max_tokens_per_rank=" +
        std::to_string(max_tokens_per_rank) + " are supported.");
  }
  if (hidden < 1 || hidden > group.hidden) {
    return ffi::Error::InvalidArgument(std::string(op) + ": hidden=" + std::to_string(hidden) +
                                       " exceeds the Buffer's hidden=" + std::to_string(group.hidden) + ".");
  }
  if (num_topk < 1 || num_topk > group.max_topk) {
    return ffi::Error::InvalidArgument(std::string(op) + ": top-k=" + std::to_string(num_topk) +
                                       " must be between 1 and " + std::to_string(group.max_topk) + ".");
  }
  return ffi::Error::Success();
}

}  // namespace jax_ep
