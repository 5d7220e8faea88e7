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
void saf_neuron_forward_cuda(uintptr_t u_hat, uintptr_t trace_out, uintptr_t state, uintptr_t spike_count,
                             int64_t steps, int64_t neurons, int dtype, float decay, float threshold,
                             int spike_bits, uintptr_t stream);
void saf_neuron_forward_host(uintptr_t u_hat, uintptr_t trace_out, uintptr_t state, uintptr_t spike_count,
                             int64_t steps, int64_t neurons, int dtype, float decay, float threshold,
                             int spike_bits);

// The CUDA runtime version _C was built against, as cudaRuntimeGetVersion reports it.
int cuda_runtime_version();

}  // namespace maqd
