// Per-neuron math of spike accumulation forwarding (SPEC.md section 1; Saiin et al., TMLR 2024).
// Shared by the CUDA kernels in saf.cu and their host entry points.
#pragma once

#include "common.cuh"

namespace maqd {

struct SafNeuronParams {
  float decay;      // leak lambda, 0 < decay <= 1
  float threshold;  // V > 0
  int spike_bits;   // b >= 1: spikes take levels 0 .. 2^b - 1
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

// Runs one neuron through `steps` time steps; element t sits at offset t * stride. Returns the
// number of spikes it emitted (a level-k spike counts k times).
template <typename T>
MAQD_HD uint64_t saf_neuron_forward_one(const T* u_hat, T* trace_out, int64_t stride, int64_t steps,
                                        float trace, const SafNeuronParams& p) {
  uint64_t spikes = 0;
  for (int64_t t = 0; t < steps; ++t) {
    const float spike = saf_step(load_float(u_hat[t * stride]), trace, p);
    store_float(trace_out + t * stride, trace);
    spikes += static_cast<uint64_t>(spike);
  }
  return spikes;
}

}  // namespace maqd
