// Shared pieces of every maqd kernel: element loads and stores in float32, arithmetic that rounds
// exactly like PyTorch's eager float32 ops, and CUDA error reporting.
//
// Everything here is __host__ __device__ so that the per-element math of each kernel can also be
// run on the CPU through the host entry points in bindings.cpp, where CI (which has no GPU) holds
// it against the eager reference.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#define MAQD_HD __host__ __device__ __forceinline__

namespace maqd {

// Storage dtypes of float tensors, numbered as in maqd_kernels/_cuda.py.
enum class FloatDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

MAQD_HD float load_float(float v) { return v; }
MAQD_HD float load_float(__half v) { return __half2float(v); }
MAQD_HD float load_float(__nv_bfloat16 v) { return __bfloat162float(v); }

MAQD_HD void store_float(float* p, float v) { *p = v; }
MAQD_HD void store_float(__half* p, float v) { *p = __float2half_rn(v); }
MAQD_HD void store_float(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// One rounding per operation and never a fused multiply-add: the eager reference runs each
// operation as its own PyTorch op, so contracting a*b+c into an FMA would move threshold ties.
// The host side is compiled with -ffp-contract=off for the same reason.
#ifdef __CUDA_ARCH__
MAQD_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
MAQD_HD float add_rn(float a, float b) { return __fadd_rn(a, b); }
MAQD_HD float sub_rn(float a, float b) { return __fsub_rn(a, b); }
MAQD_HD float div_rn(float a, float b) { return __fdiv_rn(a, b); }
MAQD_HD float sqrt_rn(float x) { return __fsqrt_rn(x); }
#else
MAQD_HD float mul_rn(float a, float b) { return a * b; }
MAQD_HD float add_rn(float a, float b) { return a + b; }
MAQD_HD float sub_rn(float a, float b) { return a - b; }
MAQD_HD float div_rn(float a, float b) { return a / b; }
MAQD_HD float sqrt_rn(float x) { return std::sqrt(x); }
#endif

// Calls fn with a value of the storage type that `dtype` names, so one templated body serves
// float32, float16 and bfloat16 tensors.
template <typename Fn>
void dispatch_float_dtype(int dtype, const char* op, Fn&& fn) {
  switch (static_cast<FloatDType>(dtype)) {
    case FloatDType::kFloat32: fn(float{}); return;
    case FloatDType::kFloat16: fn(__half{}); return;
    case FloatDType::kBFloat16: fn(__nv_bfloat16{}); return;
  }
  throw std::invalid_argument(std::string(op) + ": unsupported dtype code " + std::to_string(dtype));
}

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
  }
}

// The launchers' integer arguments (launchers.h) as what they point to.
inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

template <typename T>
const T* as_const(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}

template <typename T>
T* as_mutable(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

inline unsigned int blocks_for(int64_t items, int threads) {
  return static_cast<unsigned int>((items + threads - 1) / threads);
}

}  // namespace maqd
