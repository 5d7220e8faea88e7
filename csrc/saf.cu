// CUDA kernels of spike accumulation forwarding (SPEC.md section 1).
//
// Tensors are (steps, neurons), time-first and contiguous, so neuron n at step t sits at
// t * neurons + n. Every kernel gives a thread one neuron (consecutive threads, consecutive neurons),
// which keeps each step's loads and stores coalesced across the warp, and walks that neuron's time
// axis. All of them stream: per neuron and step they move
//   saf_neuron forward      2 x sizeof(T), plus 1/8 byte of mask with grad_mask
//   SAF-E backward          3 x sizeof(T) (grad_trace, u_hat in; grad out)
//   SAF-F backward          2 x sizeof(T) + 1/8 byte of mask
//   spike_trace             2 x sizeof(T)
//   saf_readout             2 x sizeof(T), plus sizeof(T) per kChunk steps for U_hat[t0 - 1]
#include <algorithm>

#include "launchers.h"
#include "saf.cuh"

namespace maqd {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
// Steps whose loads a thread issues before it uses any of them. One load in flight per thread
// cannot cover HBM latency at full occupancy (H200: ~36 bytes/ns per SM against ~8 KiB in flight
// from 2048 threads of float32), and within one neuron only the arithmetic is sequential in t, not
// the loads.
constexpr int kChunk = 8;
static_assert(kChunk <= kWarpSize, "the forward hands a chunk's SAF-F bounds round a warp, one per lane");
// Resident blocks per SM that __launch_bounds__ budgets registers for (40 a thread): 6 x 256 threads,
// each with kChunk loads in flight, keep ~12k loads outstanding per SM, about what HBM latency
// needs. Left to itself the compiler takes up to 64 registers, which leaves room for 4 blocks.
constexpr int kMinBlocks = 6;
// The largest gridDim.y; the elementwise kernels stride over longer sequences.
constexpr int64_t kMaxGridY = 65535;

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Adds the block's per-thread counts to `total` with one atomic.
__device__ __forceinline__ void block_sum_to(unsigned long long value, unsigned long long* total) {
  __shared__ unsigned long long warp_totals[kThreads / kWarpSize];
  value = warp_sum(value);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  if (lane == 0) warp_totals[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kThreads / kWarpSize ? warp_totals[lane] : 0;
    value = warp_sum(value);
    if (lane == 0 && value != 0) atomicAdd(total, value);
  }
}

// Loads row[i * stride] for the first `count` of the next kChunk steps, all before any is used;
// the rest (and everything on an inactive lane) read as zero.
template <typename T>
__device__ __forceinline__ void load_steps(const T* __restrict__ row, int64_t stride, int count, bool active,
                                           float (&out)[kChunk]) {
#pragma unroll
  for (int i = 0; i < kChunk; ++i, row += stride) out[i] = active && i < count ? load_float(*row) : 0.0f;
}

__device__ __forceinline__ int steps_in_chunk(int64_t t0, int64_t steps) {
  return steps - t0 < kChunk ? static_cast<int>(steps - t0) : kChunk;
}

// The grid of the elementwise kernels: x over neurons, y over chunks of kChunk steps.
dim3 elementwise_grid(int64_t steps, int64_t neurons) {
  const int64_t chunks = (steps + kChunk - 1) / kChunk;
  return dim3(blocks_for(neurons, kThreads), static_cast<unsigned int>(std::min(chunks, kMaxGridY)));
}

// The trace is recurrent in t, so each thread walks its neuron's whole sequence and the trace never
// leaves a register. With a gradient mask, lane 0 of each warp writes the word of the warp's 32
// neurons, gathered with a ballot; kGradMask keeps that path's registers out of the plain forward.
template <typename T, bool kGradMask>
__global__ void __launch_bounds__(kThreads, kMinBlocks) saf_neuron_forward_kernel(
    const T* __restrict__ u_hat, T* __restrict__ trace_out, const float* __restrict__ state,
    const float* __restrict__ upper, int32_t* __restrict__ grad_mask, unsigned long long* __restrict__ spike_count,
    int64_t steps, int64_t neurons, SafNeuronParams p) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % kWarpSize;
  const bool active = n < neurons;
  unsigned long long spikes = 0;
  // The ballot needs every lane of the warp, so there lanes past the last neuron walk the steps too
  // (with a zero trace, loading and storing nothing); only warps without any neuron sit out.
  if (kGradMask ? n - lane < neurons : active) {
    const int64_t words = mask_words(neurons);
    float trace = active && state != nullptr ? state[n] : 0.0f;
    T* out = trace_out + n;
    int32_t* word = kGradMask ? grad_mask + n / kMaskWordBits : nullptr;
    for (int64_t t0 = 0; t0 < steps; t0 += kChunk) {
      const int count = steps_in_chunk(t0, steps);
      float u[kChunk];
      load_steps(u_hat + t0 * neurons + n, neurons, count, active, u);
      // Lane i holds the chunk's bound for step t0 + i and hands it round with a shuffle: one
      // register instead of kChunk.
      const float lane_bound = kGradMask && lane < count ? upper[t0 + lane] : 0.0f;
#pragma unroll
      for (int i = 0; i < kChunk; ++i, out += neurons) {
        if (i >= count) break;
        if (active) {
          spikes += static_cast<unsigned int>(saf_step(u[i], trace, p));
          store_float(out, trace);
        }
        if (kGradMask) {
          const float bound = __shfl_sync(0xffffffffu, lane_bound, i);
          const unsigned int bits = __ballot_sync(0xffffffffu, active && saf_f_inside(trace, bound));
          if (lane == 0) *word = static_cast<int32_t>(bits);
          word += words;
        }
      }
    }
  }
  block_sum_to(spikes, spike_count);
}

// SAF-E recomputes each step's trace from u_hat in registers instead of reading a saved one.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) saf_e_backward_kernel(
    const T* __restrict__ grad_trace, const float* __restrict__ grad_count, const T* __restrict__ u_hat,
    const float* __restrict__ state, T* __restrict__ grad_out, int64_t steps, int64_t neurons, SafNeuronParams p,
    SurrogateParams s) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= neurons) return;
  const float count_grad = *grad_count;
  float trace = state != nullptr ? state[n] : 0.0f;
  T* out = grad_out + n;
  for (int64_t t0 = 0; t0 < steps; t0 += kChunk) {
    const int count = steps_in_chunk(t0, steps);
    float u[kChunk], g[kChunk];
    load_steps(u_hat + t0 * neurons + n, neurons, count, true, u);
    load_steps(grad_trace + t0 * neurons + n, neurons, count, true, g);
#pragma unroll
    for (int i = 0; i < kChunk; ++i, out += neurons) {
      if (i >= count) break;
      store_float(out, saf_e_backward_step(u[i], add_rn(g[i], count_grad), trace, p, s));
    }
  }
}

// SAF-F is elementwise: blocks along y take separate chunks of steps, so short layers with long
// sequences still fill the GPU.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) saf_f_backward_kernel(
    const T* __restrict__ grad_trace, const float* __restrict__ grad_count, const int32_t* __restrict__ grad_mask,
    T* __restrict__ grad_out, int64_t steps, int64_t neurons, float inv_threshold) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= neurons) return;
  const int64_t words = mask_words(neurons);
  const float count_grad = *grad_count;
  const int64_t chunk_stride = static_cast<int64_t>(gridDim.y) * kChunk;
  for (int64_t t0 = static_cast<int64_t>(blockIdx.y) * kChunk; t0 < steps; t0 += chunk_stride) {
    const int count = steps_in_chunk(t0, steps);
    float g[kChunk];
    int32_t bits[kChunk];
    load_steps(grad_trace + t0 * neurons + n, neurons, count, true, g);
    // Every lane of a warp reads the same word: one transaction per warp and step.
    const int32_t* word = grad_mask + t0 * words + n / kMaskWordBits;
#pragma unroll
    for (int i = 0; i < kChunk; ++i, word += words) bits[i] = i < count ? *word : 0;
    T* out = grad_out + t0 * neurons + n;
#pragma unroll
    for (int i = 0; i < kChunk; ++i, out += neurons) {
      if (i >= count) break;
      store_float(out, saf_f_grad(add_rn(g[i], count_grad), mask_bit(bits[i], n), inv_threshold));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) spike_trace_kernel(
    const T* __restrict__ x, T* __restrict__ trace_out, const float* __restrict__ state, int64_t steps,
    int64_t neurons, float decay) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= neurons) return;
  float trace = state != nullptr ? state[n] : 0.0f;
  T* out = trace_out + n;
  for (int64_t t0 = 0; t0 < steps; t0 += kChunk) {
    const int count = steps_in_chunk(t0, steps);
    float v[kChunk];
    load_steps(x + t0 * neurons + n, neurons, count, true, v);
#pragma unroll
    for (int i = 0; i < kChunk; ++i, out += neurons) {
      if (i >= count) break;
      spike_trace_step(v[i], trace, decay);
      store_float(out, trace);
    }
  }
}

// Elementwise like SAF-F; within its chunk a thread keeps U_hat[t-1] in a register, so only the
// step before the chunk is read twice.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) saf_readout_kernel(
    const T* __restrict__ u_hat, T* __restrict__ out, const float* __restrict__ state, int64_t steps,
    int64_t neurons, float decay) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= neurons) return;
  const int64_t chunk_stride = static_cast<int64_t>(gridDim.y) * kChunk;
  for (int64_t t0 = static_cast<int64_t>(blockIdx.y) * kChunk; t0 < steps; t0 += chunk_stride) {
    const int count = steps_in_chunk(t0, steps);
    float u[kChunk];
    load_steps(u_hat + t0 * neurons + n, neurons, count, true, u);
    float previous = t0 > 0 ? load_float(u_hat[(t0 - 1) * neurons + n]) : state != nullptr ? state[n] : 0.0f;
    T* row = out + t0 * neurons + n;
#pragma unroll
    for (int i = 0; i < kChunk; ++i, row += neurons) {
      if (i >= count) break;
      store_float(row, saf_readout(u[i], previous, decay));
      previous = u[i];
    }
  }
}

}  // namespace

void saf_neuron_forward_cuda(uintptr_t u_hat, uintptr_t trace_out, uintptr_t state, uintptr_t upper,
                             uintptr_t grad_mask, uintptr_t spike_count, int64_t steps, int64_t neurons, int dtype,
                             float decay, float threshold, int spike_bits, uintptr_t stream) {
  if (neurons == 0 || steps == 0) return;
  const SafNeuronParams params{decay, threshold, spike_bits};
  dispatch_float_dtype(dtype, "saf_neuron_forward", [&](auto tag) {
    using T = decltype(tag);
    const auto kernel =
        grad_mask != 0 ? saf_neuron_forward_kernel<T, true> : saf_neuron_forward_kernel<T, false>;
    kernel<<<blocks_for(neurons, kThreads), kThreads, 0, as_stream(stream)>>>(
        as_const<T>(u_hat), as_mutable<T>(trace_out), as_const<float>(state), as_const<float>(upper),
        as_mutable<int32_t>(grad_mask), as_mutable<unsigned long long>(spike_count), steps, neurons, params);
  });
  check_cuda(cudaGetLastError(), "saf_neuron_forward kernel launch");
}

void saf_neuron_forward_host(uintptr_t u_hat, uintptr_t trace_out, uintptr_t state, uintptr_t upper,
                             uintptr_t grad_mask, uintptr_t spike_count, int64_t steps, int64_t neurons, int dtype,
                             float decay, float threshold, int spike_bits) {
  const SafNeuronParams params{decay, threshold, spike_bits};
  const float* initial = as_const<float>(state);
  const float* bounds = as_const<float>(upper);
  uint32_t* mask = as_mutable<uint32_t>(grad_mask);
  const int64_t words = mask_words(neurons);
  uint64_t total = 0;
  dispatch_float_dtype(dtype, "saf_neuron_forward_host", [&](auto tag) {
    using T = decltype(tag);
    const T* in = as_const<T>(u_hat);
    T* out = as_mutable<T>(trace_out);
    for (int64_t n = 0; n < neurons; ++n) {
      float trace = initial != nullptr ? initial[n] : 0.0f;
      for (int64_t t = 0; t < steps; ++t) {
        total += static_cast<uint64_t>(saf_step(load_float(in[t * neurons + n]), trace, params));
        store_float(out + t * neurons + n, trace);
        if (mask != nullptr && saf_f_inside(trace, bounds[t])) {
          mask[t * words + n / kMaskWordBits] |= 1u << (n % kMaskWordBits);
        }
      }
    }
  });
  *as_mutable<int64_t>(spike_count) += static_cast<int64_t>(total);
}

void saf_e_backward_cuda(uintptr_t grad_trace, uintptr_t grad_count, uintptr_t u_hat, uintptr_t state,
                         uintptr_t grad_out, int64_t steps, int64_t neurons, int dtype, float decay, float threshold,
                         int spike_bits, int surrogate, float alpha, float half_width, uintptr_t stream) {
  if (neurons == 0 || steps == 0) return;
  const SafNeuronParams params{decay, threshold, spike_bits};
  const SurrogateParams surrogate_params{static_cast<Surrogate>(surrogate), alpha, half_width};
  dispatch_float_dtype(dtype, "saf_e_backward", [&](auto tag) {
    using T = decltype(tag);
    saf_e_backward_kernel<T><<<blocks_for(neurons, kThreads), kThreads, 0, as_stream(stream)>>>(
        as_const<T>(grad_trace), as_const<float>(grad_count), as_const<T>(u_hat), as_const<float>(state),
        as_mutable<T>(grad_out), steps, neurons, params, surrogate_params);
  });
  check_cuda(cudaGetLastError(), "saf_e_backward kernel launch");
}

void saf_e_backward_host(uintptr_t grad_trace, uintptr_t grad_count, uintptr_t u_hat, uintptr_t state,
                         uintptr_t grad_out, int64_t steps, int64_t neurons, int dtype, float decay, float threshold,
                         int spike_bits, int surrogate, float alpha, float half_width) {
  const SafNeuronParams params{decay, threshold, spike_bits};
  const SurrogateParams surrogate_params{static_cast<Surrogate>(surrogate), alpha, half_width};
  const float* initial = as_const<float>(state);
  const float count_grad = *as_const<float>(grad_count);
  dispatch_float_dtype(dtype, "saf_e_backward_host", [&](auto tag) {
    using T = decltype(tag);
    const T* g = as_const<T>(grad_trace);
    const T* u = as_const<T>(u_hat);
    T* out = as_mutable<T>(grad_out);
    for (int64_t n = 0; n < neurons; ++n) {
      float trace = initial != nullptr ? initial[n] : 0.0f;
      for (int64_t t = 0; t < steps; ++t) {
        const int64_t at = t * neurons + n;
        const float upstream = add_rn(load_float(g[at]), count_grad);
        store_float(out + at, saf_e_backward_step(load_float(u[at]), upstream, trace, params, surrogate_params));
      }
    }
  });
}

void saf_f_backward_cuda(uintptr_t grad_trace, uintptr_t grad_count, uintptr_t grad_mask, uintptr_t grad_out,
                         int64_t steps, int64_t neurons, int dtype, float threshold, uintptr_t stream) {
  if (neurons == 0 || steps == 0) return;
  const float inv_threshold = div_rn(1.0f, threshold);
  dispatch_float_dtype(dtype, "saf_f_backward", [&](auto tag) {
    using T = decltype(tag);
    saf_f_backward_kernel<T><<<elementwise_grid(steps, neurons), kThreads, 0, as_stream(stream)>>>(
        as_const<T>(grad_trace), as_const<float>(grad_count), as_const<int32_t>(grad_mask), as_mutable<T>(grad_out),
        steps, neurons, inv_threshold);
  });
  check_cuda(cudaGetLastError(), "saf_f_backward kernel launch");
}

void saf_f_backward_host(uintptr_t grad_trace, uintptr_t grad_count, uintptr_t grad_mask, uintptr_t grad_out,
                         int64_t steps, int64_t neurons, int dtype, float threshold) {
  const float inv_threshold = div_rn(1.0f, threshold);
  const float count_grad = *as_const<float>(grad_count);
  const int32_t* mask = as_const<int32_t>(grad_mask);
  const int64_t words = mask_words(neurons);
  dispatch_float_dtype(dtype, "saf_f_backward_host", [&](auto tag) {
    using T = decltype(tag);
    const T* g = as_const<T>(grad_trace);
    T* out = as_mutable<T>(grad_out);
    for (int64_t t = 0; t < steps; ++t) {
      for (int64_t n = 0; n < neurons; ++n) {
        const int64_t at = t * neurons + n;
        const bool inside = mask_bit(mask[t * words + n / kMaskWordBits], n);
        store_float(out + at, saf_f_grad(add_rn(load_float(g[at]), count_grad), inside, inv_threshold));
      }
    }
  });
}

void spike_trace_forward_cuda(uintptr_t x, uintptr_t trace_out, uintptr_t state, int64_t steps, int64_t neurons,
                              int dtype, float decay, uintptr_t stream) {
  if (neurons == 0 || steps == 0) return;
  dispatch_float_dtype(dtype, "spike_trace_forward", [&](auto tag) {
    using T = decltype(tag);
    spike_trace_kernel<T><<<blocks_for(neurons, kThreads), kThreads, 0, as_stream(stream)>>>(
        as_const<T>(x), as_mutable<T>(trace_out), as_const<float>(state), steps, neurons, decay);
  });
  check_cuda(cudaGetLastError(), "spike_trace_forward kernel launch");
}

void spike_trace_forward_host(uintptr_t x, uintptr_t trace_out, uintptr_t state, int64_t steps, int64_t neurons,
                              int dtype, float decay) {
  const float* initial = as_const<float>(state);
  dispatch_float_dtype(dtype, "spike_trace_forward_host", [&](auto tag) {
    using T = decltype(tag);
    const T* in = as_const<T>(x);
    T* out = as_mutable<T>(trace_out);
    for (int64_t n = 0; n < neurons; ++n) {
      float trace = initial != nullptr ? initial[n] : 0.0f;
      for (int64_t t = 0; t < steps; ++t) {
        spike_trace_step(load_float(in[t * neurons + n]), trace, decay);
        store_float(out + t * neurons + n, trace);
      }
    }
  });
}

void saf_readout_forward_cuda(uintptr_t u_hat, uintptr_t out, uintptr_t state, int64_t steps, int64_t neurons,
                              int dtype, float decay, uintptr_t stream) {
  if (neurons == 0 || steps == 0) return;
  dispatch_float_dtype(dtype, "saf_readout_forward", [&](auto tag) {
    using T = decltype(tag);
    saf_readout_kernel<T><<<elementwise_grid(steps, neurons), kThreads, 0, as_stream(stream)>>>(
        as_const<T>(u_hat), as_mutable<T>(out), as_const<float>(state), steps, neurons, decay);
  });
  check_cuda(cudaGetLastError(), "saf_readout_forward kernel launch");
}

void saf_readout_forward_host(uintptr_t u_hat, uintptr_t out, uintptr_t state, int64_t steps, int64_t neurons,
                              int dtype, float decay) {
  const float* initial = as_const<float>(state);
  dispatch_float_dtype(dtype, "saf_readout_forward_host", [&](auto tag) {
    using T = decltype(tag);
    const T* in = as_const<T>(u_hat);
    T* result = as_mutable<T>(out);
    for (int64_t t = 0; t < steps; ++t) {
      for (int64_t n = 0; n < neurons; ++n) {
        const float previous =
            t > 0 ? load_float(in[(t - 1) * neurons + n]) : initial != nullptr ? initial[n] : 0.0f;
        store_float(result + t * neurons + n, saf_readout(load_float(in[t * neurons + n]), previous, decay));
      }
    }
  });
}

int cuda_runtime_version() {
  int version = 0;
  check_cuda(cudaRuntimeGetVersion(&version), "cudaRuntimeGetVersion");
  return version;
}

}  // namespace maqd
