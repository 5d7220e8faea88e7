// CUDA kernels of spike accumulation forwarding (SPEC.md section 1).
#include "launchers.h"
#include "saf.cuh"

namespace maqd {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// One thread per neuron walks the time axis, so each step's loads and stores are coalesced across
// the warp and the trace never leaves a register. The spike count is reduced per block and added
// with one atomic.
template <typename T>
__global__ void __launch_bounds__(kThreads) saf_neuron_forward_kernel(
    const T* __restrict__ u_hat, T* __restrict__ trace_out, const float* __restrict__ state,
    unsigned long long* __restrict__ spike_count, int64_t steps, int64_t neurons, SafNeuronParams p) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  unsigned long long spikes = 0;
  if (n < neurons) {
    const float initial = state != nullptr ? state[n] : 0.0f;
    spikes = saf_neuron_forward_one(u_hat + n, trace_out + n, neurons, steps, initial, p);
  }
  __shared__ unsigned long long warp_totals[kThreads / 32];
  spikes = warp_sum(spikes);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) warp_totals[warp] = spikes;
  __syncthreads();
  if (warp == 0) {
    spikes = lane < kThreads / 32 ? warp_totals[lane] : 0;
    spikes = warp_sum(spikes);
    if (lane == 0 && spikes != 0) atomicAdd(spike_count, spikes);
  }
}

}  // namespace

void saf_neuron_forward_cuda(uintptr_t u_hat, uintptr_t trace_out, uintptr_t state, uintptr_t spike_count,
                             int64_t steps, int64_t neurons, int dtype, float decay, float threshold,
                             int spike_bits, uintptr_t stream) {
  if (neurons == 0 || steps == 0) return;
  const SafNeuronParams params{decay, threshold, spike_bits};
  dispatch_float_dtype(dtype, "saf_neuron_forward", [&](auto tag) {
    using T = decltype(tag);
    saf_neuron_forward_kernel<T><<<blocks_for(neurons, kThreads), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const T*>(u_hat), reinterpret_cast<T*>(trace_out), reinterpret_cast<const float*>(state),
        reinterpret_cast<unsigned long long*>(spike_count), steps, neurons, params);
  });
  check_cuda(cudaGetLastError(), "saf_neuron_forward kernel launch");
}

void saf_neuron_forward_host(uintptr_t u_hat, uintptr_t trace_out, uintptr_t state, uintptr_t spike_count,
                             int64_t steps, int64_t neurons, int dtype, float decay, float threshold,
                             int spike_bits) {
  const SafNeuronParams params{decay, threshold, spike_bits};
  const float* initial = reinterpret_cast<const float*>(state);
  uint64_t total = 0;
  dispatch_float_dtype(dtype, "saf_neuron_forward_host", [&](auto tag) {
    using T = decltype(tag);
    const T* in = reinterpret_cast<const T*>(u_hat);
    T* out = reinterpret_cast<T*>(trace_out);
    for (int64_t n = 0; n < neurons; ++n) {
      total += saf_neuron_forward_one(in + n, out + n, neurons, steps, initial != nullptr ? initial[n] : 0.0f, params);
    }
  });
  *reinterpret_cast<int64_t*>(spike_count) += static_cast<int64_t>(total);
}

int cuda_runtime_version() {
  int version = 0;
  check_cuda(cudaRuntimeGetVersion(&version), "cudaRuntimeGetVersion");
  return version;
}

}  // namespace maqd
