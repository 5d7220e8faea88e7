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

// ---- MaQD round-clip quantization (SPEC.md section 2); the math is in quant.cuh.
//
// Scales of the elementwise round-clip ops: `scale_mode` 0 uses the float `scale`; 1 reads one
// float32 at `scale_ptr`; 2 reads a float32 per element (scale_ptr[i], the launcher expands a
// broadcast scale tensor). Surrogates are 0 "ste", 1 "sigmoid" (reference.round_clip_backward).

// `x` has `numel` elements of float `dtype`. output 0 writes int8 (signed) or uint8 codes to
// `out`; output 1 writes scale * q in `dtype`.
void round_clip_forward_cuda(uintptr_t x, uintptr_t out, uintptr_t scale_ptr, int scale_mode, float scale,
                             int64_t numel, int dtype, int bits, bool is_signed, int output, uintptr_t stream);
void round_clip_forward_host(uintptr_t x, uintptr_t out, uintptr_t scale_ptr, int scale_mode, float scale,
                             int64_t numel, int dtype, int bits, bool is_signed, int output);

// dL/dx into `grad_x` (`dtype`); when `grad_scale` is not 0, the per-element float32 LSQ terms
// g * dscale into it (the launcher sums them to the scale's shape).
void round_clip_backward_cuda(uintptr_t grad, uintptr_t x, uintptr_t scale_ptr, int scale_mode, float scale,
                              uintptr_t grad_x, uintptr_t grad_scale, int64_t numel, int dtype, int bits,
                              bool is_signed, int surrogate, float alpha, uintptr_t stream);
void round_clip_backward_host(uintptr_t grad, uintptr_t x, uintptr_t scale_ptr, int scale_mode, float scale,
                              uintptr_t grad_x, uintptr_t grad_scale, int64_t numel, int dtype, int bits,
                              bool is_signed, int surrogate, float alpha);

// Standardizes (when `standardize`) each row of the (rows, cols) weight `w` in `dtype`, round-clips
// it with the float32 per-row `channel_scale` to signed `bits`-bit codes and writes them packed as
// reference.pack_codes into `packed`, (rows, packed_words(cols, bits)) int32. One pass per row.
void pack_weight_cuda(uintptr_t w, uintptr_t channel_scale, uintptr_t packed, int64_t rows, int64_t cols, int dtype,
                      int bits, bool standardize, float eps, uintptr_t stream);
void pack_weight_host(uintptr_t w, uintptr_t channel_scale, uintptr_t packed, int64_t rows, int64_t cols, int dtype,
                      int bits, bool standardize, float eps);

// out[o, k] = channel_scale[o] * q[o, k] in `dtype`, (rows, cols); channel_scale 0 writes the bare codes.
void dequantize_weight_cuda(uintptr_t packed, uintptr_t channel_scale, uintptr_t out, int64_t rows, int64_t cols,
                            int dtype, int bits, uintptr_t stream);
void dequantize_weight_host(uintptr_t packed, uintptr_t channel_scale, uintptr_t out, int64_t rows, int64_t cols,
                            int dtype, int bits);

// The weight side of quant_linear's backward, fused per row of the (rows, cols) weight: from
// dL/dw_q (`grad_wq`) and the float weight `w`, both `dtype`, recomputes w_hat, applies the
// round-clip surrogate (signed `bits`, float `scale`) and the standardization backward into `grad_w`.
void weight_quant_backward_cuda(uintptr_t grad_wq, uintptr_t w, uintptr_t grad_w, int64_t rows, int64_t cols,
                                int dtype, int bits, float scale, int surrogate, float alpha, float eps,
                                uintptr_t stream);
void weight_quant_backward_host(uintptr_t grad_wq, uintptr_t w, uintptr_t grad_w, int64_t rows, int64_t cols,
                                int dtype, int bits, float scale, int surrogate, float alpha, float eps);

// Epilogue arguments of both low-bit matmuls (quant.cuh, Epilogue): float32 (n,) vectors, 0 when
// absent; out_bits 0 for float output. `out` is (m, n) in `out_dtype`: a FloatDType code, or 3 for
// uint8 codes (then out_bits > 0).
//
// Integer path on int8 tensor cores: `x` is (m, lda) codes, uint8 (`x_signed` false) or int8,
// lda a multiple of 16 bytes with zeros in columns k .. lda - 1; `packed` is (n, words) int32
// (reference.pack_codes of `bits`-bit codes, words = packed_words(k, bits)). acc = x @ q^T in int32.
void lowbit_gemm_cuda(uintptr_t x, bool x_signed, int64_t lda, uintptr_t packed, int64_t m, int64_t n, int64_t k,
                      int bits, uintptr_t combined_scale, uintptr_t bias, uintptr_t out_scale, uintptr_t out_shift,
                      int out_bits, float out_act_scale, uintptr_t out, int out_dtype, uintptr_t stream);
void lowbit_gemm_host(uintptr_t x, bool x_signed, int64_t lda, uintptr_t packed, int64_t m, int64_t n, int64_t k,
                      int bits, uintptr_t combined_scale, uintptr_t bias, uintptr_t out_scale, uintptr_t out_shift,
                      int out_bits, float out_act_scale, uintptr_t out, int out_dtype);

// Weight-only path for small m: float `x` (m, k) contiguous in `x_dtype` times the codes decoded in
// registers, accumulated in float32; bandwidth-bound on the packed weight.
void lowbit_gemv_cuda(uintptr_t x, int x_dtype, uintptr_t packed, int64_t m, int64_t n, int64_t k, int bits,
                      uintptr_t combined_scale, uintptr_t bias, uintptr_t out_scale, uintptr_t out_shift,
                      int out_bits, float out_act_scale, uintptr_t out, int out_dtype, uintptr_t stream);
void lowbit_gemv_host(uintptr_t x, int x_dtype, uintptr_t packed, int64_t m, int64_t n, int64_t k, int bits,
                      uintptr_t combined_scale, uintptr_t bias, uintptr_t out_scale, uintptr_t out_shift,
                      int out_bits, float out_act_scale, uintptr_t out, int out_dtype);

// ---- Layer-Batch Normalization (SPEC.md section 3); the partitions and math are in lbn.cuh.
//
// x is viewed as (n, c, s) contiguous in `dtype`, its c channels split into `groups` groups. Small
// vectors come in their own FloatDType codes: weight and bias (c,), running statistics (groups,),
// each 0 when absent. `mean` and `rstd` are float32 (groups,). `sm_count` sizes the grid (the host
// twins take the H200's 132, so that they run the partition the benchmark GPU gets); `workspace`
// holds layer_batch_norm_workspace(...) float32 values, written before read.
int64_t layer_batch_norm_workspace(int64_t n, int64_t c, int64_t s, int64_t groups, int dtype, bool backward,
                                   bool training, int sm_count);

// Training: the group statistics into mean / rstd and, when running_mean is given, the updated
// statistics into new_running_mean / new_running_var (stats_dtype, momentum as torch rounds it);
// x must have elements. Eval: mean / rstd from the running statistics. Then y (x's dtype).
void layer_batch_norm_forward_cuda(uintptr_t x, uintptr_t weight, int weight_dtype, uintptr_t bias, int bias_dtype,
                                   uintptr_t running_mean, uintptr_t running_var, int stats_dtype, uintptr_t y,
                                   uintptr_t mean, uintptr_t rstd, uintptr_t new_running_mean,
                                   uintptr_t new_running_var, uintptr_t workspace, int64_t n, int64_t c, int64_t s,
                                   int64_t groups, int dtype, bool training, double momentum, float eps, int sm_count,
                                   uintptr_t stream);
void layer_batch_norm_forward_host(uintptr_t x, uintptr_t weight, int weight_dtype, uintptr_t bias, int bias_dtype,
                                   uintptr_t running_mean, uintptr_t running_var, int stats_dtype, uintptr_t y,
                                   uintptr_t mean, uintptr_t rstd, uintptr_t new_running_mean,
                                   uintptr_t new_running_var, uintptr_t workspace, int64_t n, int64_t c, int64_t s,
                                   int64_t groups, int dtype, bool training, double momentum, float eps,
                                   int sm_count);

// `grad` and `x` in `dtype` give `grad_x` (same dtype); `grad_weight` (weight_dtype) and
// `grad_bias` (bias_dtype) are written when not 0. `weight` 0 means the identity.
void layer_batch_norm_backward_cuda(uintptr_t grad, uintptr_t x, uintptr_t weight, int weight_dtype, uintptr_t mean,
                                    uintptr_t rstd, uintptr_t grad_x, uintptr_t grad_weight, uintptr_t grad_bias,
                                    int bias_dtype, uintptr_t workspace, int64_t n, int64_t c, int64_t s,
                                    int64_t groups, int dtype, bool training, int sm_count, uintptr_t stream);
void layer_batch_norm_backward_host(uintptr_t grad, uintptr_t x, uintptr_t weight, int weight_dtype, uintptr_t mean,
                                    uintptr_t rstd, uintptr_t grad_x, uintptr_t grad_weight, uintptr_t grad_bias,
                                    int bias_dtype, uintptr_t workspace, int64_t n, int64_t c, int64_t s,
                                    int64_t groups, int dtype, bool training, int sm_count);

// ---- Postsynaptic-potential normalization (SPEC.md section 4): the LBN passes above with mean 0 and
// the raw second moment E[x^2] per group in place of the variance (no n / (n - 1)); the workspace
// is layer_batch_norm_workspace(...)'s. running_moment / new_running_moment (groups,) in stats_dtype,
// 0 when absent; rstd float32 (groups,).
void psp_norm_forward_cuda(uintptr_t x, uintptr_t weight, int weight_dtype, uintptr_t bias, int bias_dtype,
                           uintptr_t running_moment, int stats_dtype, uintptr_t y, uintptr_t rstd,
                           uintptr_t new_running_moment, uintptr_t workspace, int64_t n, int64_t c, int64_t s,
                           int64_t groups, int dtype, bool training, double momentum, float eps, int sm_count,
                           uintptr_t stream);
void psp_norm_forward_host(uintptr_t x, uintptr_t weight, int weight_dtype, uintptr_t bias, int bias_dtype,
                           uintptr_t running_moment, int stats_dtype, uintptr_t y, uintptr_t rstd,
                           uintptr_t new_running_moment, uintptr_t workspace, int64_t n, int64_t c, int64_t s,
                           int64_t groups, int dtype, bool training, double momentum, float eps, int sm_count);
// In training dx = rstd (w dy - x_hat mean_g(w dy x_hat)), x_hat = x rstd; in eval w dy rstd.
void psp_norm_backward_cuda(uintptr_t grad, uintptr_t x, uintptr_t weight, int weight_dtype, uintptr_t rstd,
                            uintptr_t grad_x, uintptr_t grad_weight, uintptr_t grad_bias, int bias_dtype,
                            uintptr_t workspace, int64_t n, int64_t c, int64_t s, int64_t groups, int dtype,
                            bool training, int sm_count, uintptr_t stream);
void psp_norm_backward_host(uintptr_t grad, uintptr_t x, uintptr_t weight, int weight_dtype, uintptr_t rstd,
                            uintptr_t grad_x, uintptr_t grad_weight, uintptr_t grad_bias, int bias_dtype,
                            uintptr_t workspace, int64_t n, int64_t c, int64_t s, int64_t groups, int dtype,
                            bool training, int sm_count);

// The CUDA runtime version _C was built against, as cudaRuntimeGetVersion reports it.
int cuda_runtime_version();

}  // namespace maqd
