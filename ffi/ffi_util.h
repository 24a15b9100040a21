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

}  // namespace jax_ep
