// Per-element math of MaQD round-clip quantization (SPEC.md section 2; Sawada et al., arXiv
// 2403.14999): codes, packed-word decoding and the low-bit matmul's epilogue. Shared by the
// kernels in quant.cu and lowbit_gemm.cu and by their host entry points, so that CI holds exactly
// this math against maqd_kernels/quant/reference.py.
#pragma once

#include <cmath>

#include "common.cuh"

namespace maqd {

// Bits one packed code occupies (reference.storage_bits): 1, 2, 4 or 8.
MAQD_HD int storage_bits(int bits) { return bits <= 1 ? 1 : bits <= 2 ? 2 : bits <= 4 ? 4 : 8; }
MAQD_HD int codes_per_word(int bits) { return 32 / storage_bits(bits); }
MAQD_HD int64_t packed_words(int64_t cols, int bits) {
  const int per_word = codes_per_word(bits);
  return (cols + per_word - 1) / per_word;
}

// (q_min, q_max) of the round-clip grid (reference.code_range); signed 1 bit is {-1, +1}.
struct CodeRange {
  int lo;
  int hi;
};

MAQD_HD CodeRange code_range(int bits, bool is_signed) {
  if (is_signed) {
    if (bits == 1) return {-1, 1};
    const int top = (1 << (bits - 1)) - 1;
    return {-top, top};
  }
  return {0, (1 << bits) - 1};
}

// clamp(round_half_even(x / scale), lo, hi) as a float; signed 1 bit: +1 if x >= 0 else -1.
// rintf rounds half to even in the default rounding mode, like torch.round.
MAQD_HD float round_clip_code(float x, float scale, int bits, bool is_signed) {
  if (is_signed && bits == 1) return x >= 0.0f ? 1.0f : -1.0f;
  const CodeRange range = code_range(bits, is_signed);
  const float q = rintf(div_rn(x, scale));
  return fminf(fmaxf(q, static_cast<float>(range.lo)), static_cast<float>(range.hi));
}

// The stored field of signed code q (reference.pack_codes): offset binary q + 2^(w-1), binary (q + 1) / 2.
MAQD_HD uint32_t stored_field(int q, int bits) {
  if (bits == 1) return static_cast<uint32_t>((q + 1) / 2);
  return static_cast<uint32_t>(q + (1 << (storage_bits(bits) - 1)));
}

// Signed code of a stored field; the inverse of stored_field.
MAQD_HD int field_code(uint32_t field, int bits) {
  if (bits == 1) return static_cast<int>(field) * 2 - 1;
  return static_cast<int>(field) - (1 << (storage_bits(bits) - 1));
}

// The signed code at position `slot` (0 .. codes_per_word - 1) of a packed word.
MAQD_HD int word_code(uint32_t word, int slot, int bits) {
  const int width = storage_bits(bits);
  const uint32_t field = (word >> (slot * width)) & ((1u << width) - 1u);
  return field_code(field, bits);
}

// Four consecutive codes of a packed word, from slot `first` on, as four int8 lanes of one 32-bit
// register (lane i = code first + i): the operand form of the int8 tensor-core instructions.
// Fields are spread into bytes, then the offset is removed per byte without borrows between
// lanes: each byte is raised to 128 + field before subtracting the offset, and 128 + q is q with
// its sign bit flipped.
MAQD_HD uint32_t decode_four_codes(uint32_t word, int first, int bits) {
  const int width = storage_bits(bits);
  if (width == 8) return word ^ 0x80808080u;
  const uint32_t field_mask = (1u << width) - 1u;
  uint32_t spread = 0;
  for (int i = 0; i < 4; ++i) {
    spread |= ((word >> ((first + i) * width)) & field_mask) << (8 * i);
  }
  uint32_t offset = 1u << (width - 1);
  if (bits == 1) {
    spread <<= 1;  // binary: q = 2 field - 1
    offset = 1u;
  }
  return ((spread | 0x80808080u) - offset * 0x01010101u) ^ 0x80808080u;
}

// Output dtypes of the low-bit matmul: the float storage codes of FloatDType, plus uint8 codes.
constexpr int kOutUint8 = 3;

// The fused epilogue of lowbit_linear (SPEC.md section 2), per output channel o:
//   y = acc * combined_scale[o] + bias[o];  y = y * out_scale[o] + out_shift[o];
//   out = quantize(y, out_bits, out_act_scale, unsigned) when out_bits > 0.
// combined_scale is alpha_w[o] * act_scale (integer path) or alpha_w[o] (weight-only), computed
// by the launcher in float32 as the reference does. All vectors are float32 (N,); null when absent.
struct Epilogue {
  const float* combined_scale;
  const float* bias;
  const float* out_scale;
  const float* out_shift;
  int out_bits;  // 0: float output
  float out_act_scale;
};

// y of one accumulator (already rounded to float32), each operation rounded once, in the
// reference's order.
MAQD_HD float epilogue_value(const Epilogue& e, float acc, int64_t o) {
  float y = mul_rn(acc, e.combined_scale[o]);
  if (e.bias != nullptr) y = add_rn(y, e.bias[o]);
  if (e.out_scale != nullptr) y = add_rn(mul_rn(y, e.out_scale[o]), e.out_shift[o]);
  return y;
}

// Stores y at out[index] as `out_dtype` (FloatDType code, or kOutUint8: the unsigned code).
MAQD_HD void store_epilogue(void* out, int64_t index, int out_dtype, const Epilogue& e, float y) {
  switch (out_dtype) {
    case kOutUint8:
      static_cast<uint8_t*>(out)[index] = static_cast<uint8_t>(round_clip_code(y, e.out_act_scale, e.out_bits, false));
      return;
    case static_cast<int>(FloatDType::kFloat16):
      store_float(static_cast<__half*>(out) + index, y);
      return;
    case static_cast<int>(FloatDType::kBFloat16):
      store_float(static_cast<__nv_bfloat16*>(out) + index, y);
      return;
    default:
      static_cast<float*>(out)[index] = y;
  }
}

// ---- Round-clip backward and weight standardization (reference.round_clip_backward,
// reference.weight_standardize_backward): shared by quant.cu's kernels and host twins.

// Surrogate codes of the round-clip backward (quant.fused.SURROGATE_CODES).
constexpr int kSurrogateSte = 0;
constexpr int kSurrogateSigmoid = 1;

// Whether v = x / scale lies in [q_min, q_max], where STE passes the gradient and LSQ's scale
// gradient is q - v; the binary grid has no clipping.
MAQD_HD bool round_clip_inside(float v, int bits, bool is_signed) {
  if (is_signed && bits == 1) return true;
  const CodeRange range = code_range(bits, is_signed);
  return v >= static_cast<float>(range.lo) && v <= static_cast<float>(range.hi);
}

// alpha g (1 - g), g = sigmoid(t), rounded as the reference's alpha * sig * (1.0 - sig).
MAQD_HD float sigmoid_slope(float t, float alpha) {
  const float g = div_rn(1.0f, add_rn(1.0f, expf(-t)));
  return mul_rn(mul_rn(alpha, g), sub_rn(1.0f, g));
}

// d q / d v of the round-clip surrogate at v = x / scale: STE's indicator, or the smooth
// staircase summed over thresholds k + 1/2, k = q_min .. q_max - 1, in the reference's order
// (binary: its one threshold at 0, of height 2).
MAQD_HD float round_clip_surrogate(float v, int bits, bool is_signed, int surrogate, float alpha) {
  const bool binary = is_signed && bits == 1;
  if (surrogate == kSurrogateSte) return round_clip_inside(v, bits, is_signed) ? 1.0f : 0.0f;
  if (binary) return sigmoid_slope(mul_rn(alpha, v), mul_rn(2.0f, alpha));
  const CodeRange range = code_range(bits, is_signed);
  float dx = 0.0f;
  for (int k = range.lo; k < range.hi; ++k) {
    dx = add_rn(dx, sigmoid_slope(mul_rn(alpha, sub_rn(v, static_cast<float>(k) + 0.5f)), alpha));
  }
  return dx;
}

// LSQ's per-element scale gradient term g * dscale: g (q - v) inside the range, g q outside
// (binary: always g q).
MAQD_HD float lsq_scale_term(float g, float q, float v, int bits, bool is_signed) {
  return mul_rn(g, round_clip_inside(v, bits, is_signed) && !(is_signed && bits == 1) ? sub_rn(q, v) : q);
}

// Per-row statistics of weight standardization: w_hat = (w - mean) / std, std = sqrt(var + eps).
struct RowStats {
  float mean;
  float std;
};

MAQD_HD float standardized(float w, const RowStats& s) { return div_rn(sub_rn(w, s.mean), s.std); }

}  // namespace maqd
