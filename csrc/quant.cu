// CUDA kernels of MaQD round-clip quantization (SPEC.md section 2), all but the tensor-core matmul
// (lowbit_gemm.cu). The per-element math is in quant.cuh; each kernel's host twin runs the same
// functions in plain loops on CPU memory.
//
//   round_clip_forward / backward   elementwise, grid-stride, one element per thread and step
//   pack_weight                     one block per weight row: mean, variance, then packed words
//   dequantize_weight               elementwise over (row, column), blocks along y take rows
//   weight_quant_backward           one block per weight row: mean, variance, two sums, write
//   lowbit_gemv                     one warp per output channel, lanes on consecutive packed words
#include <algorithm>

#include "launchers.h"
#include "quant.cuh"

namespace maqd {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr unsigned int kFullMask = 0xffffffffu;
// Grid-stride kernels stop adding blocks here: far more than fill any GPU, few enough that no
// grid dimension overflows.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;
constexpr int64_t kMaxGridY = 65535;
// The most activation rows lowbit_gemv keeps accumulators for (quant/cuda.py GEMV_MAX_ROWS).
constexpr int kGemvMaxRows = 16;

unsigned int grid_for(int64_t items) {
  return static_cast<unsigned int>(std::min<int64_t>(blocks_for(items, kThreads), kMaxBlocks));
}

// The round-clip scale of element i (launchers.h: mode 0 a value, 1 one float32, 2 one per element).
struct ScaleArg {
  const float* ptr;
  int mode;
  float value;

  MAQD_HD float at(int64_t i) const { return mode == 2 ? ptr[i] : mode == 1 ? ptr[0] : value; }
};

// log2(codes_per_word(bits)): codes per word are a power of two, so column -> (word, slot) is a
// shift and a mask rather than a 64-bit division.
MAQD_HD int codes_per_word_log2(int bits) {
  const int width = storage_bits(bits);
  return 5 - (width == 1 ? 0 : width == 2 ? 1 : width == 4 ? 2 : 3);
}

// v rounded to the storage dtype T and back: the reference standardizes in float32 and returns
// w_hat in the weight's dtype before round-clipping it.
template <typename T>
MAQD_HD float round_to_storage(float v) {
  T stored;
  store_float(&stored, v);
  return load_float(stored);
}

// Output 0: the code, int8 (signed) or uint8; output 1: scale * q in T.
template <typename T>
MAQD_HD void store_round_clip(void* out, int64_t i, int output, bool is_signed, float scale, float q) {
  if (output == 1) {
    store_float(static_cast<T*>(out) + i, mul_rn(scale, q));
  } else if (is_signed) {
    static_cast<int8_t*>(out)[i] = static_cast<int8_t>(static_cast<int>(q));
  } else {
    static_cast<uint8_t*>(out)[i] = static_cast<uint8_t>(static_cast<int>(q));
  }
}

template <typename T>
MAQD_HD void round_clip_backward_element(const T* grad, const T* x, const ScaleArg& scale, T* grad_x,
                                         float* grad_scale, int64_t i, int bits, bool is_signed, int surrogate,
                                         float alpha) {
  const float s = scale.at(i);
  const float xv = load_float(x[i]);
  const float g = load_float(grad[i]);
  const float v = div_rn(xv, s);
  store_float(grad_x + i, mul_rn(g, round_clip_surrogate(v, bits, is_signed, surrogate, alpha)));
  if (grad_scale != nullptr) {
    grad_scale[i] = lsq_scale_term(g, round_clip_code(xv, s, bits, is_signed), v, bits, is_signed);
  }
}

// The stored field of weight element w of a row with statistics `stats` (pack_weight).
template <typename T>
MAQD_HD uint32_t weight_field(T w, const RowStats& stats, bool standardize, float scale, int bits) {
  const float v = standardize ? round_to_storage<T>(standardized(load_float(w), stats)) : load_float(w);
  return stored_field(static_cast<int>(round_clip_code(v, scale, bits, true)), bits);
}

// dL/dw_hat of one weight element: the upstream gradient times the signed round-clip surrogate.
MAQD_HD float weight_hat_grad(float g, float w_hat, int bits, float scale, int surrogate, float alpha) {
  return mul_rn(g, round_clip_surrogate(div_rn(w_hat, scale), bits, true, surrogate, alpha));
}

// The standardization backward of one element: (gh - mean(gh) - w_hat mean(gh w_hat)) / std.
MAQD_HD float standardize_grad(float gh, float w_hat, float mean_gh, float mean_ghw, float inv_std) {
  return mul_rn(inv_std, sub_rn(sub_rn(gh, mean_gh), mul_rn(w_hat, mean_ghw)));
}

MAQD_HD float dequantized(const int32_t* packed_row, int64_t col, int bits, const float* channel_scale, int64_t row) {
  const int shift = codes_per_word_log2(bits);
  const uint32_t word = static_cast<uint32_t>(packed_row[col >> shift]);
  const float q = static_cast<float>(word_code(word, static_cast<int>(col & ((1 << shift) - 1)), bits));
  return channel_scale != nullptr ? mul_rn(channel_scale[row], q) : q;
}

// ---------------------------------------------------------------------------------------- kernels

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// The sum of every thread's `v`, returned to every thread in the same order of additions; `scratch`
// (kWarps floats) is free again on return.
__device__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// Two-pass mean and biased variance of one row, shared by the whole block. The row is re-read
// from L2 rather than held in shared memory: rows of any length work, and it is small.
template <typename T>
__device__ RowStats row_stats(const T* __restrict__ row, int64_t cols, float eps, float* scratch) {
  const float n = static_cast<float>(cols);
  float sum = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += kThreads) sum += load_float(row[c]);
  const float mean = div_rn(block_sum(sum, scratch), n);
  float squares = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += kThreads) {
    const float d = sub_rn(load_float(row[c]), mean);
    squares += d * d;
  }
  const float var = div_rn(block_sum(squares, scratch), n);
  return {mean, sqrt_rn(add_rn(var, eps))};
}

template <typename T>
__global__ void __launch_bounds__(kThreads) round_clip_forward_kernel(const T* __restrict__ x, void* __restrict__ out,
                                                                      ScaleArg scale, int64_t numel, int bits,
                                                                      bool is_signed, int output) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < numel; i += stride) {
    const float s = scale.at(i);
    store_round_clip<T>(out, i, output, is_signed, s, round_clip_code(load_float(x[i]), s, bits, is_signed));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) round_clip_backward_kernel(const T* __restrict__ grad,
                                                                       const T* __restrict__ x, ScaleArg scale,
                                                                       T* __restrict__ grad_x,
                                                                       float* __restrict__ grad_scale, int64_t numel,
                                                                       int bits, bool is_signed, int surrogate,
                                                                       float alpha) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < numel; i += stride) {
    round_clip_backward_element(grad, x, scale, grad_x, grad_scale, i, bits, is_signed, surrogate, alpha);
  }
}

// Thread t of a block takes column c0 + t, so loads are coalesced; the codes of one packed word
// sit in consecutive lanes of a warp (warps start at multiples of 32 columns, and codes per word
// divide 32) and are OR-ed together with shuffles, and the word's first lane stores it.
template <typename T>
__global__ void __launch_bounds__(kThreads) pack_weight_kernel(const T* __restrict__ w,
                                                               const float* __restrict__ channel_scale,
                                                               int32_t* __restrict__ packed, int64_t rows,
                                                               int64_t cols, int bits, bool standardize, float eps) {
  __shared__ float scratch[kWarps];
  const int width = storage_bits(bits);
  const int per_word = codes_per_word(bits);
  const int64_t words = packed_words(cols, bits);
  const int64_t padded = words * per_word;
  const int slot = threadIdx.x % per_word;
  const uint32_t padding = stored_field(0, bits);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = w + r * cols;
    const RowStats stats = standardize ? row_stats(row, cols, eps, scratch) : RowStats{0.0f, 1.0f};
    const float scale = channel_scale[r];
    for (int64_t c0 = 0; c0 < padded; c0 += kThreads) {
      const int64_t c = c0 + threadIdx.x;
      const uint32_t field = c < cols ? weight_field(row[c], stats, standardize, scale, bits) : padding;
      uint32_t word = field << (slot * width);
      for (int offset = 1; offset < per_word; offset <<= 1) word |= __shfl_xor_sync(kFullMask, word, offset);
      if (slot == 0 && c < padded) packed[r * words + c / per_word] = static_cast<int32_t>(word);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dequantize_weight_kernel(const int32_t* __restrict__ packed,
                                                                     const float* __restrict__ channel_scale,
                                                                     T* __restrict__ out, int64_t rows, int64_t cols,
                                                                     int bits) {
  const int64_t words = packed_words(cols, bits);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < cols; c += stride) {
      store_float(out + r * cols + c, dequantized(packed + r * words, c, bits, channel_scale, r));
    }
  }
}

// Passes over a row: sum, squares (row_stats); the two sums of dL/dw_hat; the write. dL/dw_hat
// is recomputed in the last pass instead of being stored.
template <typename T>
__global__ void __launch_bounds__(kThreads) weight_quant_backward_kernel(const T* __restrict__ grad_wq,
                                                                         const T* __restrict__ w,
                                                                         T* __restrict__ grad_w, int64_t rows,
                                                                         int64_t cols, int bits, float scale,
                                                                         int surrogate, float alpha, float eps) {
  __shared__ float scratch[kWarps];
  const float n = static_cast<float>(cols);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = w + r * cols;
    const T* g = grad_wq + r * cols;
    const RowStats stats = row_stats(row, cols, eps, scratch);
    float sum_gh = 0.0f;
    float sum_ghw = 0.0f;
    for (int64_t c = threadIdx.x; c < cols; c += kThreads) {
      const float w_hat = standardized(load_float(row[c]), stats);
      const float gh = weight_hat_grad(load_float(g[c]), w_hat, bits, scale, surrogate, alpha);
      sum_gh += gh;
      sum_ghw += gh * w_hat;
    }
    const float mean_gh = div_rn(block_sum(sum_gh, scratch), n);
    const float mean_ghw = div_rn(block_sum(sum_ghw, scratch), n);
    const float inv_std = div_rn(1.0f, stats.std);
    for (int64_t c = threadIdx.x; c < cols; c += kThreads) {
      const float w_hat = standardized(load_float(row[c]), stats);
      const float gh = weight_hat_grad(load_float(g[c]), w_hat, bits, scale, surrogate, alpha);
      store_float(grad_w + r * cols + c, standardize_grad(gh, w_hat, mean_gh, mean_ghw, inv_std));
    }
  }
}

// Element i of a 32-bit chunk of T values, as float32.
template <typename T>
__device__ __forceinline__ float chunk_element(uint32_t raw, int i);

template <>
__device__ __forceinline__ float chunk_element<float>(uint32_t raw, int) {
  return __uint_as_float(raw);
}

template <>
__device__ __forceinline__ float chunk_element<__half>(uint32_t raw, int i) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(raw >> (16 * i))));
}

template <>
__device__ __forceinline__ float chunk_element<__nv_bfloat16>(uint32_t raw, int i) {
  return __uint_as_float(i == 0 ? raw << 16 : raw & 0xffff0000u);
}

// kCount consecutive elements of x from p as float32: one 8- or 16-byte load when `vector` (p is
// then aligned to the load's size), else element by element, zero past the `valid` first.
template <typename T, int kCount>
__device__ __forceinline__ void load_x(const T* __restrict__ p, bool vector, int valid, float (&out)[kCount]) {
  constexpr int kBytes = kCount * static_cast<int>(sizeof(T));
  static_assert(kBytes == 8 || kBytes == 16, "x is read in 8- or 16-byte pieces");
  constexpr int kPerChunk = 4 / static_cast<int>(sizeof(T));
  if (vector) {
    uint32_t raw[kBytes / 4];
    if constexpr (kBytes == 16) {
      const uint4 v = *reinterpret_cast<const uint4*>(p);
      raw[0] = v.x, raw[1] = v.y, raw[2] = v.z, raw[3] = v.w;
    } else {
      const uint2 v = *reinterpret_cast<const uint2*>(p);
      raw[0] = v.x, raw[1] = v.y;
    }
#pragma unroll
    for (int i = 0; i < kCount; ++i) out[i] = chunk_element<T>(raw[i / kPerChunk], i % kPerChunk);
  } else {
#pragma unroll
    for (int i = 0; i < kCount; ++i) out[i] = i < valid ? load_float(p[i]) : 0.0f;
  }
}

// acc[r] += sum_s x[r, col0 + s] q_s over the codes q_s of one packed word. The word's columns
// are read in groups of up to 16 bytes of x per row.
template <typename T, int kWidth, int kRows>
__device__ __forceinline__ void accumulate_word(uint32_t word, int64_t col0, const T* __restrict__ x, int64_t m,
                                                int64_t k, bool vector_x, float (&acc)[kRows]) {
  constexpr int kPerWord = 32 / kWidth;
  constexpr int kGroup = kPerWord * sizeof(T) > 16 ? 16 / static_cast<int>(sizeof(T)) : kPerWord;
  constexpr uint32_t kFieldMask = (1u << kWidth) - 1u;
#pragma unroll
  for (int g = 0; g < kPerWord; g += kGroup) {
    const int64_t col = col0 + g;
    const int valid = k - col < kGroup ? static_cast<int>(k - col) : kGroup;
    float q[kGroup];
#pragma unroll
    for (int i = 0; i < kGroup; ++i) {
      // kWidth stands in for bits: it selects the same decoding (1 is the binary grid).
      q[i] = static_cast<float>(field_code((word >> ((g + i) * kWidth)) & kFieldMask, kWidth));
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= m) break;
      float xv[kGroup];
      load_x<T, kGroup>(x + r * k + col, vector_x, valid, xv);
#pragma unroll
      for (int i = 0; i < kGroup; ++i) acc[r] = fmaf(xv[i], q[i], acc[r]);
    }
  }
}

// Packed words each lane keeps in flight ahead of the one it decodes.
constexpr int kGemvPrefetch = 8;

// One warp per output channel o. Lane l takes words l, l + 32, ...: the warp's weight loads are
// 128 contiguous bytes, and so are its x loads per row (lane l's word covers the 32 / width
// columns next to lane l - 1's), each 8 or 16 bytes when `vector_x`. The weight is streamed once,
// with kGemvPrefetch words per lane in flight; x is small and stays in L1/L2. A butterfly
// reduction leaves the sums in every lane, and lane r finishes row r.
template <typename T, int kWidth, int kRows>
__global__ void __launch_bounds__(kThreads) lowbit_gemv_kernel(const T* __restrict__ x,
                                                               const int32_t* __restrict__ packed, int64_t m,
                                                               int64_t n, int64_t k, Epilogue e,
                                                               void* __restrict__ out, int out_dtype, bool vector_x) {
  constexpr int kPerWord = 32 / kWidth;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t words = (k + kPerWord - 1) / kPerWord;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize; o < n; o += warp_stride) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(packed + o * words);
    float acc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
    uint32_t ahead[kGemvPrefetch];
#pragma unroll
    for (int u = 0; u < kGemvPrefetch; ++u) {
      const int64_t j = lane + u * kWarpSize;
      ahead[u] = j < words ? row[j] : 0u;
    }
    for (int64_t j = lane; j < words; j += kWarpSize) {
      const uint32_t word = ahead[0];
#pragma unroll
      for (int u = 0; u + 1 < kGemvPrefetch; ++u) ahead[u] = ahead[u + 1];
      const int64_t next = j + kGemvPrefetch * kWarpSize;
      ahead[kGemvPrefetch - 1] = next < words ? row[next] : 0u;
      accumulate_word<T, kWidth, kRows>(word, j * kPerWord, x, m, k, vector_x, acc);
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      acc[r] = warp_sum(acc[r]);
      if (r < m && lane == r) store_epilogue(out, r * n + o, out_dtype, e, epilogue_value(e, acc[r], o));
    }
  }
}

template <typename T, int kWidth, int kRows>
void launch_gemv(const T* x, const int32_t* packed, int64_t m, int64_t n, int64_t k, const Epilogue& e, void* out,
                 int out_dtype, cudaStream_t stream) {
  constexpr int kPerWord = 32 / kWidth;
  // Whole words per row keep every row's groups of columns aligned like the first row's.
  const bool vector_x = k % kPerWord == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const auto blocks = static_cast<unsigned int>(std::min<int64_t>((n + kWarps - 1) / kWarps, kMaxBlocks));
  lowbit_gemv_kernel<T, kWidth, kRows><<<blocks, kThreads, 0, stream>>>(x, packed, m, n, k, e, out, out_dtype,
                                                                        vector_x);
}

// Picks the accumulator count: the smallest of 1, 2, 4, 8, 16 that holds m rows.
template <typename T, int kWidth>
void launch_gemv_rows(const T* x, const int32_t* packed, int64_t m, int64_t n, int64_t k, const Epilogue& e,
                      void* out, int out_dtype, cudaStream_t stream) {
  if (m <= 1) {
    launch_gemv<T, kWidth, 1>(x, packed, m, n, k, e, out, out_dtype, stream);
  } else if (m <= 2) {
    launch_gemv<T, kWidth, 2>(x, packed, m, n, k, e, out, out_dtype, stream);
  } else if (m <= 4) {
    launch_gemv<T, kWidth, 4>(x, packed, m, n, k, e, out, out_dtype, stream);
  } else if (m <= 8) {
    launch_gemv<T, kWidth, 8>(x, packed, m, n, k, e, out, out_dtype, stream);
  } else {
    launch_gemv<T, kWidth, kGemvMaxRows>(x, packed, m, n, k, e, out, out_dtype, stream);
  }
}

Epilogue make_epilogue(uintptr_t combined_scale, uintptr_t bias, uintptr_t out_scale, uintptr_t out_shift,
                       int out_bits, float out_act_scale) {
  return Epilogue{as_const<float>(combined_scale), as_const<float>(bias), as_const<float>(out_scale),
                  as_const<float>(out_shift), out_bits, out_act_scale};
}

// Host twins of the per-row reductions: sums in double, so that they sit closer to the reference's
// than a float32 running sum would; the results are rounded to float32 as the kernel's are.
template <typename T>
RowStats row_stats_host(const T* row, int64_t cols, float eps) {
  const float n = static_cast<float>(cols);
  double sum = 0.0;
  for (int64_t c = 0; c < cols; ++c) sum += load_float(row[c]);
  const float mean = div_rn(static_cast<float>(sum), n);
  double squares = 0.0;
  for (int64_t c = 0; c < cols; ++c) {
    const double d = sub_rn(load_float(row[c]), mean);
    squares += d * d;
  }
  const float var = div_rn(static_cast<float>(squares), n);
  return {mean, sqrt_rn(add_rn(var, eps))};
}

}  // namespace

// ------------------------------------------------------------------------------------ entry points

void round_clip_forward_cuda(uintptr_t x, uintptr_t out, uintptr_t scale_ptr, int scale_mode, float scale,
                             int64_t numel, int dtype, int bits, bool is_signed, int output, uintptr_t stream) {
  if (numel == 0) return;
  const ScaleArg scale_arg{as_const<float>(scale_ptr), scale_mode, scale};
  dispatch_float_dtype(dtype, "round_clip_forward", [&](auto tag) {
    using T = decltype(tag);
    round_clip_forward_kernel<T><<<grid_for(numel), kThreads, 0, as_stream(stream)>>>(
        as_const<T>(x), as_mutable<void>(out), scale_arg, numel, bits, is_signed, output);
  });
  check_cuda(cudaGetLastError(), "round_clip_forward kernel launch");
}

void round_clip_forward_host(uintptr_t x, uintptr_t out, uintptr_t scale_ptr, int scale_mode, float scale,
                             int64_t numel, int dtype, int bits, bool is_signed, int output) {
  const ScaleArg scale_arg{as_const<float>(scale_ptr), scale_mode, scale};
  dispatch_float_dtype(dtype, "round_clip_forward_host", [&](auto tag) {
    using T = decltype(tag);
    const T* in = as_const<T>(x);
    for (int64_t i = 0; i < numel; ++i) {
      const float s = scale_arg.at(i);
      const float q = round_clip_code(load_float(in[i]), s, bits, is_signed);
      store_round_clip<T>(as_mutable<void>(out), i, output, is_signed, s, q);
    }
  });
}

void round_clip_backward_cuda(uintptr_t grad, uintptr_t x, uintptr_t scale_ptr, int scale_mode, float scale,
                              uintptr_t grad_x, uintptr_t grad_scale, int64_t numel, int dtype, int bits,
                              bool is_signed, int surrogate, float alpha, uintptr_t stream) {
  if (numel == 0) return;
  const ScaleArg scale_arg{as_const<float>(scale_ptr), scale_mode, scale};
  dispatch_float_dtype(dtype, "round_clip_backward", [&](auto tag) {
    using T = decltype(tag);
    round_clip_backward_kernel<T><<<grid_for(numel), kThreads, 0, as_stream(stream)>>>(
        as_const<T>(grad), as_const<T>(x), scale_arg, as_mutable<T>(grad_x), as_mutable<float>(grad_scale), numel,
        bits, is_signed, surrogate, alpha);
  });
  check_cuda(cudaGetLastError(), "round_clip_backward kernel launch");
}

void round_clip_backward_host(uintptr_t grad, uintptr_t x, uintptr_t scale_ptr, int scale_mode, float scale,
                              uintptr_t grad_x, uintptr_t grad_scale, int64_t numel, int dtype, int bits,
                              bool is_signed, int surrogate, float alpha) {
  const ScaleArg scale_arg{as_const<float>(scale_ptr), scale_mode, scale};
  dispatch_float_dtype(dtype, "round_clip_backward_host", [&](auto tag) {
    using T = decltype(tag);
    for (int64_t i = 0; i < numel; ++i) {
      round_clip_backward_element(as_const<T>(grad), as_const<T>(x), scale_arg, as_mutable<T>(grad_x),
                                  as_mutable<float>(grad_scale), i, bits, is_signed, surrogate, alpha);
    }
  });
}

void pack_weight_cuda(uintptr_t w, uintptr_t channel_scale, uintptr_t packed, int64_t rows, int64_t cols, int dtype,
                      int bits, bool standardize, float eps, uintptr_t stream) {
  if (rows == 0 || cols == 0) return;
  const auto blocks = static_cast<unsigned int>(std::min(rows, kMaxBlocks));
  dispatch_float_dtype(dtype, "pack_weight", [&](auto tag) {
    using T = decltype(tag);
    pack_weight_kernel<T><<<blocks, kThreads, 0, as_stream(stream)>>>(
        as_const<T>(w), as_const<float>(channel_scale), as_mutable<int32_t>(packed), rows, cols, bits, standardize,
        eps);
  });
  check_cuda(cudaGetLastError(), "pack_weight kernel launch");
}

void pack_weight_host(uintptr_t w, uintptr_t channel_scale, uintptr_t packed, int64_t rows, int64_t cols, int dtype,
                      int bits, bool standardize, float eps) {
  const float* scales = as_const<float>(channel_scale);
  int32_t* words_out = as_mutable<int32_t>(packed);
  const int width = storage_bits(bits);
  const int per_word = codes_per_word(bits);
  const int64_t words = packed_words(cols, bits);
  dispatch_float_dtype(dtype, "pack_weight_host", [&](auto tag) {
    using T = decltype(tag);
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = as_const<T>(w) + r * cols;
      const RowStats stats = standardize ? row_stats_host(row, cols, eps) : RowStats{0.0f, 1.0f};
      for (int64_t j = 0; j < words; ++j) {
        uint32_t word = 0;
        for (int slot = 0; slot < per_word; ++slot) {
          const int64_t c = j * per_word + slot;
          const uint32_t field =
              c < cols ? weight_field(row[c], stats, standardize, scales[r], bits) : stored_field(0, bits);
          word |= field << (slot * width);
        }
        words_out[r * words + j] = static_cast<int32_t>(word);
      }
    }
  });
}

void dequantize_weight_cuda(uintptr_t packed, uintptr_t channel_scale, uintptr_t out, int64_t rows, int64_t cols,
                            int dtype, int bits, uintptr_t stream) {
  if (rows == 0 || cols == 0) return;
  const dim3 grid(grid_for(cols), static_cast<unsigned int>(std::min(rows, kMaxGridY)));
  dispatch_float_dtype(dtype, "dequantize_weight", [&](auto tag) {
    using T = decltype(tag);
    dequantize_weight_kernel<T><<<grid, kThreads, 0, as_stream(stream)>>>(
        as_const<int32_t>(packed), as_const<float>(channel_scale), as_mutable<T>(out), rows, cols, bits);
  });
  check_cuda(cudaGetLastError(), "dequantize_weight kernel launch");
}

void dequantize_weight_host(uintptr_t packed, uintptr_t channel_scale, uintptr_t out, int64_t rows, int64_t cols,
                            int dtype, int bits) {
  const int64_t words = packed_words(cols, bits);
  dispatch_float_dtype(dtype, "dequantize_weight_host", [&](auto tag) {
    using T = decltype(tag);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        store_float(as_mutable<T>(out) + r * cols + c,
                    dequantized(as_const<int32_t>(packed) + r * words, c, bits, as_const<float>(channel_scale), r));
      }
    }
  });
}

void weight_quant_backward_cuda(uintptr_t grad_wq, uintptr_t w, uintptr_t grad_w, int64_t rows, int64_t cols,
                                int dtype, int bits, float scale, int surrogate, float alpha, float eps,
                                uintptr_t stream) {
  if (rows == 0 || cols == 0) return;
  const auto blocks = static_cast<unsigned int>(std::min(rows, kMaxBlocks));
  dispatch_float_dtype(dtype, "weight_quant_backward", [&](auto tag) {
    using T = decltype(tag);
    weight_quant_backward_kernel<T><<<blocks, kThreads, 0, as_stream(stream)>>>(
        as_const<T>(grad_wq), as_const<T>(w), as_mutable<T>(grad_w), rows, cols, bits, scale, surrogate, alpha, eps);
  });
  check_cuda(cudaGetLastError(), "weight_quant_backward kernel launch");
}

void weight_quant_backward_host(uintptr_t grad_wq, uintptr_t w, uintptr_t grad_w, int64_t rows, int64_t cols,
                                int dtype, int bits, float scale, int surrogate, float alpha, float eps) {
  const float n = static_cast<float>(cols);
  dispatch_float_dtype(dtype, "weight_quant_backward_host", [&](auto tag) {
    using T = decltype(tag);
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = as_const<T>(w) + r * cols;
      const T* g = as_const<T>(grad_wq) + r * cols;
      const RowStats stats = row_stats_host(row, cols, eps);
      double sum_gh = 0.0;
      double sum_ghw = 0.0;
      for (int64_t c = 0; c < cols; ++c) {
        const float w_hat = standardized(load_float(row[c]), stats);
        const double gh = weight_hat_grad(load_float(g[c]), w_hat, bits, scale, surrogate, alpha);
        sum_gh += gh;
        sum_ghw += gh * w_hat;
      }
      const float mean_gh = div_rn(static_cast<float>(sum_gh), n);
      const float mean_ghw = div_rn(static_cast<float>(sum_ghw), n);
      const float inv_std = div_rn(1.0f, stats.std);
      for (int64_t c = 0; c < cols; ++c) {
        const float w_hat = standardized(load_float(row[c]), stats);
        const float gh = weight_hat_grad(load_float(g[c]), w_hat, bits, scale, surrogate, alpha);
        store_float(as_mutable<T>(grad_w) + r * cols + c, standardize_grad(gh, w_hat, mean_gh, mean_ghw, inv_std));
      }
    }
  });
}

void lowbit_gemv_cuda(uintptr_t x, int x_dtype, uintptr_t packed, int64_t m, int64_t n, int64_t k, int bits,
                      uintptr_t combined_scale, uintptr_t bias, uintptr_t out_scale, uintptr_t out_shift,
                      int out_bits, float out_act_scale, uintptr_t out, int out_dtype, uintptr_t stream) {
  if (m == 0 || n == 0) return;
  if (m > kGemvMaxRows) {
    throw std::invalid_argument("lowbit_gemv: m = " + std::to_string(m) + " rows, at most " +
                                std::to_string(kGemvMaxRows));
  }
  const Epilogue e = make_epilogue(combined_scale, bias, out_scale, out_shift, out_bits, out_act_scale);
  const int32_t* words = as_const<int32_t>(packed);
  void* result = as_mutable<void>(out);
  dispatch_float_dtype(x_dtype, "lowbit_gemv", [&](auto tag) {
    using T = decltype(tag);
    const T* in = as_const<T>(x);
    switch (storage_bits(bits)) {
      case 1: launch_gemv_rows<T, 1>(in, words, m, n, k, e, result, out_dtype, as_stream(stream)); break;
      case 2: launch_gemv_rows<T, 2>(in, words, m, n, k, e, result, out_dtype, as_stream(stream)); break;
      case 4: launch_gemv_rows<T, 4>(in, words, m, n, k, e, result, out_dtype, as_stream(stream)); break;
      default: launch_gemv_rows<T, 8>(in, words, m, n, k, e, result, out_dtype, as_stream(stream)); break;
    }
  });
  check_cuda(cudaGetLastError(), "lowbit_gemv kernel launch");
}

void lowbit_gemv_host(uintptr_t x, int x_dtype, uintptr_t packed, int64_t m, int64_t n, int64_t k, int bits,
                      uintptr_t combined_scale, uintptr_t bias, uintptr_t out_scale, uintptr_t out_shift,
                      int out_bits, float out_act_scale, uintptr_t out, int out_dtype) {
  const Epilogue e = make_epilogue(combined_scale, bias, out_scale, out_shift, out_bits, out_act_scale);
  const int64_t words = packed_words(k, bits);
  dispatch_float_dtype(x_dtype, "lowbit_gemv_host", [&](auto tag) {
    using T = decltype(tag);
    const T* in = as_const<T>(x);
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t o = 0; o < n; ++o) {
        const int32_t* row = as_const<int32_t>(packed) + o * words;
        float acc = 0.0f;
        for (int64_t c = 0; c < k; ++c) {
          acc = add_rn(acc, mul_rn(load_float(in[r * k + c]), dequantized(row, c, bits, nullptr, o)));
        }
        store_epilogue(as_mutable<void>(out), r * n + o, out_dtype, e, epilogue_value(e, acc, o));
      }
    }
  });
}

}  // namespace maqd
