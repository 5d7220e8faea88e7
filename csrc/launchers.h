// Entry points of _C, in plain C++ types so that bindings.cpp needs neither CUDA nor PyTorch
// headers. Pointers travel as integers (torch.Tensor.data_ptr()); `stream` is the cudaStream_t of
// torch.cuda.current_stream().cuda_stream. Each *_host twin runs the same per-element math on CPU
// memory, so that CI, which has no GPU, can hold it against the eager reference.
#pragma once

#include <cstdint>

namespace maqd {

// SAF neuron forward (SPEC.md section 1). `u_hat` and `trace_out` are (steps, neurons) in the
// storage dtype `dtype` (0 float32, 1 float16, 2 bfloat16); `state` is a float32 (neurons,)
// initial trace or 0 for zeros; `spike_count` is one zeroed int64 that receives the spike total.
// `grad_mask`, or 0 for none, receives SAF-F's (steps, ceil(neurons / 32)) int32 gradient mask
// (reference.pack_bits), judged against the float32 (steps,) bounds `upper`
// (reference.saf_f_upper_bounds); the host twin ORs bits into a zeroed mask, the device writes
// every word.
void saf_neuron_forward_cuda(uintptr_t u_hat, uintptr_t trace_out, uintptr_t state, uintptr_t upper,
                             uintptr_t grad_mask, uintptr_t spike_count, int64_t steps, int64_t neurons, int dtype,
                             float decay, float threshold, int spike_bits, uintptr_t stream);
void saf_neuron_forward_host(uintptr_t u_hat, uintptr_t trace_out, uintptr_t state, uintptr_t upper,
                             uintptr_t grad_mask, uintptr_t spike_count, int64_t steps, int64_t neurons, int dtype,
                             float decay, float threshold, int spike_bits);

// SAF-E backward: `grad_trace`, `u_hat` and `grad_out` are (steps, neurons) in `dtype`;
// `grad_count` is one float32 (the spike count's gradient, read on the device, so no host sync);
// `state` as in the forward. `surrogate` is 0 sigmoid, 1 s2nn, 2 rectangle; `half_width` the
// rectangle's half width, rounded to float32 by the caller.
void saf_e_backward_cuda(uintptr_t grad_trace, uintptr_t grad_count, uintptr_t u_hat, uintptr_t state,
                         uintptr_t grad_out, int64_t steps, int64_t neurons, int dtype, float decay, float threshold,
                         int spike_bits, int surrogate, float alpha, float half_width, uintptr_t stream);
void saf_e_backward_host(uintptr_t grad_trace, uintptr_t grad_count, uintptr_t u_hat, uintptr_t state,
                         uintptr_t grad_out, int64_t steps, int64_t neurons, int dtype, float decay, float threshold,
                         int spike_bits, int surrogate, float alpha, float half_width);

// SAF-F backward from the forward's `grad_mask` alone; other arguments as in SAF-E.
void saf_f_backward_cuda(uintptr_t grad_trace, uintptr_t grad_count, uintptr_t grad_mask, uintptr_t grad_out,
                         int64_t steps, int64_t neurons, int dtype, float threshold, uintptr_t stream);
void saf_f_backward_host(uintptr_t grad_trace, uintptr_t grad_count, uintptr_t grad_mask, uintptr_t grad_out,
                         int64_t steps, int64_t neurons, int dtype, float threshold);

// spike_trace: `x` and `trace_out` (steps, neurons) in `dtype`, `state` as in the SAF neuron.
void spike_trace_forward_cuda(uintptr_t x, uintptr_t trace_out, uintptr_t state, int64_t steps, int64_t neurons,
                              int dtype, float decay, uintptr_t stream);
void spike_trace_forward_host(uintptr_t x, uintptr_t trace_out, uintptr_t state, int64_t steps, int64_t neurons,
                              int dtype, float decay);

// saf_readout: `u_hat` and `out` (steps, neurons) in `dtype`; `state` is a float32 (neurons,)
// U_hat[-1] or 0 for zeros.
void saf_readout_forward_cuda(uintptr_t u_hat, uintptr_t out, uintptr_t state, int64_t steps, int64_t neurons,
                              int dtype, float decay, uintptr_t stream);
void saf_readout_forward_host(uintptr_t u_hat, uintptr_t out, uintptr_t state, int64_t steps, int64_t neurons,
                              int dtype, float decay);

// The CUDA runtime version _C was built against, as cudaRuntimeGetVersion reports it.
int cuda_runtime_version();

}  // namespace maqd
