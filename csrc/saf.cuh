// Per-neuron math of spike accumulation forwarding (SPEC.md section 1; Saiin et al., TMLR 2024).
// Shared by the CUDA kernels in saf.cu and their host entry points.
#pragma once

#include <cmath>

#include "common.cuh"

namespace maqd {

struct SafNeuronParams {
  float decay;      // leak lambda, 0 < decay <= 1
  float threshold;  // V > 0
  int spike_bits;   // b >= 1: spikes take levels 0 .. 2^b - 1
};

// Surrogate derivatives sigma' of the spike function, numbered as SURROGATE_CODES in
// maqd_kernels/saf/reference.py.
enum class Surrogate : int { kSigmoid = 0, kS2nn = 1, kRectangle = 2 };

struct SurrogateParams {
  Surrogate kind;
  float alpha;       // steepness; the rectangle's height
  float half_width;  // the rectangle's half width 1 / (2 alpha), rounded once in Python as the reference does
};

// Advances one neuron by one step: consumes U_hat[t], updates `trace` from a_hat[t-1] to a_hat[t]
// and returns the spike level s[t].
MAQD_HD float saf_step(float u_hat, float& trace, const SafNeuronParams& p) {
  const float leaked = mul_rn(p.decay, trace);
  float spike;
  if (p.spike_bits == 1) {
    // x_t = U_hat[t] - V (lambda a_hat[t-1] + 1), the distance of the LIF membrane above threshold.
    const float x = sub_rn(u_hat, mul_rn(p.threshold, add_rn(leaked, 1.0f)));
    spike = x >= 0.0f ? 1.0f : 0.0f;
  } else {
    // m_t = U_hat[t] - V lambda a_hat[t-1]; s = clip(floor(m_t / V), 0, 2^b - 1).
    const float membrane = sub_rn(u_hat, mul_rn(p.threshold, leaked));
    const float top_level = static_cast<float>((1 << p.spike_bits) - 1);
    spike = fminf(fmaxf(floorf(div_rn(membrane, p.threshold)), 0.0f), top_level);
  }
  trace = add_rn(leaked, spike);
  return spike;
}

// SAF-F's derivative support, 0 < a_hat[t] < (2^b - 1) S_t, judged on the float32 trace: rounding
// it to a 16-bit storage dtype first could land it on either bound.
MAQD_HD bool saf_f_inside(float trace, float upper) { return trace > 0.0f && trace < upper; }

// The SAF-F gradient mask is (steps, mask_words(neurons)) int32, one bit per neuron and step, laid
// out as reference.pack_bits: bit j of word w of a row is neuron 32 w + j.
constexpr int kMaskWordBits = 32;

MAQD_HD int64_t mask_words(int64_t neurons) { return (neurons + kMaskWordBits - 1) / kMaskWordBits; }

// Neuron n's bit in the mask word that holds it.
MAQD_HD bool mask_bit(int32_t word, int64_t n) {
  return (static_cast<uint32_t>(word) >> (n & (kMaskWordBits - 1))) & 1u;
}

// SAF-F's dL/dU_hat[t]: the upstream gradient times 1/V inside the support, times zero outside (not
// a plain zero, so that an infinite or NaN upstream propagates as it does in the reference).
MAQD_HD float saf_f_grad(float upstream, bool inside, float inv_threshold) {
  return mul_rn(upstream, inside ? inv_threshold : 0.0f);
}

MAQD_HD float sigmoid_surrogate(float x, float alpha) {
  const float g = div_rn(1.0f, add_rn(1.0f, expf(-mul_rn(alpha, x))));
  return mul_rn(mul_rn(alpha, g), sub_rn(1.0f, g));
}

MAQD_HD float surrogate_derivative(float x, const SurrogateParams& s) {
  switch (s.kind) {
    case Surrogate::kSigmoid:
      return sigmoid_surrogate(x, s.alpha);
    case Surrogate::kS2nn:
      // Here x >= 0 or NaN, so the reference's clamp(x, min=0) changes nothing and is left out: a
      // NaN propagates through the division as it does through the clamp.
      return x < 0.0f ? sigmoid_surrogate(x, s.alpha) : div_rn(1.0f, add_rn(x, 1.0f));
    case Surrogate::kRectangle:
      return fabsf(x) < s.half_width ? s.alpha : 0.0f;
  }
  return 0.0f;
}

// SAF-E's da_hat[t]/dU_hat[t] = sum_{k=1}^{2^b-1} sigma'(m_t - kV), with `leaked` = lambda a_hat[t-1]
// (detached). Each term is x_k = U_hat[t] - V (leaked + k) and the sum runs from k = 1 up, as in the
// reference, so that the roundings agree.
MAQD_HD float saf_e_derivative(float u_hat, float leaked, const SafNeuronParams& p, const SurrogateParams& s) {
  const int top_level = (1 << p.spike_bits) - 1;
  float sum = 0.0f;
  for (int k = 1; k <= top_level; ++k) {
    const float x = sub_rn(u_hat, mul_rn(p.threshold, add_rn(leaked, static_cast<float>(k))));
    sum = add_rn(sum, surrogate_derivative(x, s));
  }
  return sum;
}

// One step of SAF-E's backward: returns dL/dU_hat[t] for the upstream gradient of a_hat[t] and
// advances `trace` to a_hat[t] exactly as the forward does, so the trace is recomputed, not stored.
MAQD_HD float saf_e_backward_step(float u_hat, float upstream, float& trace, const SafNeuronParams& p,
                                  const SurrogateParams& s) {
  const float derivative = saf_e_derivative(u_hat, mul_rn(p.decay, trace), p, s);
  saf_step(u_hat, trace, p);
  return mul_rn(upstream, derivative);
}

// spike_trace: a_hat[t] = lambda a_hat[t-1] + x[t].
MAQD_HD void spike_trace_step(float x, float& trace, float decay) { trace = add_rn(mul_rn(decay, trace), x); }

// saf_readout: o[t] = U_hat[t] - lambda U_hat[t-1].
MAQD_HD float saf_readout(float u_hat, float previous, float decay) { return sub_rn(u_hat, mul_rn(decay, previous)); }

}  // namespace maqd
