// Python bindings of _C: device launchers and their host twins (see launchers.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "build_info.h"
#include "launchers.h"

namespace py = pybind11;

namespace {

std::vector<std::string> built_archs() {
  std::vector<std::string> archs;
  std::string spec = MAQD_CUDA_ARCHS;
  size_t start = 0;
  while (start <= spec.size()) {
    const size_t end = spec.find(';', start);
    const std::string arch = spec.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (!arch.empty()) archs.push_back(arch);
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return archs;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "maqd_kernels CUDA kernels (device launchers and host entry points)";
  m.def("built_archs", &built_archs, "SM architectures compiled into _C, e.g. ['80', '90a'].");
  m.attr("ptx_arch") = MAQD_PTX_ARCH;
  m.def("cuda_runtime_version", &maqd::cuda_runtime_version);

  m.def("saf_neuron_forward_cuda", &maqd::saf_neuron_forward_cuda, py::arg("u_hat"), py::arg("trace_out"),
        py::arg("state"), py::arg("upper"), py::arg("grad_mask"), py::arg("spike_count"), py::arg("steps"),
        py::arg("neurons"), py::arg("dtype"), py::arg("decay"), py::arg("threshold"), py::arg("spike_bits"),
        py::arg("stream"));
  m.def("saf_neuron_forward_host", &maqd::saf_neuron_forward_host, py::arg("u_hat"), py::arg("trace_out"),
        py::arg("state"), py::arg("upper"), py::arg("grad_mask"), py::arg("spike_count"), py::arg("steps"),
        py::arg("neurons"), py::arg("dtype"), py::arg("decay"), py::arg("threshold"), py::arg("spike_bits"),
        py::call_guard<py::gil_scoped_release>());

  m.def("saf_e_backward_cuda", &maqd::saf_e_backward_cuda, py::arg("grad_trace"), py::arg("grad_count"),
        py::arg("u_hat"), py::arg("state"), py::arg("grad_out"), py::arg("steps"), py::arg("neurons"),
        py::arg("dtype"), py::arg("decay"), py::arg("threshold"), py::arg("spike_bits"), py::arg("surrogate"),
        py::arg("alpha"), py::arg("half_width"), py::arg("stream"));
  m.def("saf_e_backward_host", &maqd::saf_e_backward_host, py::arg("grad_trace"), py::arg("grad_count"),
        py::arg("u_hat"), py::arg("state"), py::arg("grad_out"), py::arg("steps"), py::arg("neurons"),
        py::arg("dtype"), py::arg("decay"), py::arg("threshold"), py::arg("spike_bits"), py::arg("surrogate"),
        py::arg("alpha"), py::arg("half_width"), py::call_guard<py::gil_scoped_release>());

  m.def("saf_f_backward_cuda", &maqd::saf_f_backward_cuda, py::arg("grad_trace"), py::arg("grad_count"),
        py::arg("grad_mask"), py::arg("grad_out"), py::arg("steps"), py::arg("neurons"), py::arg("dtype"),
        py::arg("threshold"), py::arg("stream"));
  m.def("saf_f_backward_host", &maqd::saf_f_backward_host, py::arg("grad_trace"), py::arg("grad_count"),
        py::arg("grad_mask"), py::arg("grad_out"), py::arg("steps"), py::arg("neurons"), py::arg("dtype"),
        py::arg("threshold"), py::call_guard<py::gil_scoped_release>());

  m.def("spike_trace_forward_cuda", &maqd::spike_trace_forward_cuda, py::arg("x"), py::arg("trace_out"),
        py::arg("state"), py::arg("steps"), py::arg("neurons"), py::arg("dtype"), py::arg("decay"),
        py::arg("stream"));
  m.def("spike_trace_forward_host", &maqd::spike_trace_forward_host, py::arg("x"), py::arg("trace_out"),
        py::arg("state"), py::arg("steps"), py::arg("neurons"), py::arg("dtype"), py::arg("decay"),
        py::call_guard<py::gil_scoped_release>());

  m.def("saf_readout_forward_cuda", &maqd::saf_readout_forward_cuda, py::arg("u_hat"), py::arg("out"),
        py::arg("state"), py::arg("steps"), py::arg("neurons"), py::arg("dtype"), py::arg("decay"),
        py::arg("stream"));
  m.def("saf_readout_forward_host", &maqd::saf_readout_forward_host, py::arg("u_hat"), py::arg("out"),
        py::arg("state"), py::arg("steps"), py::arg("neurons"), py::arg("dtype"), py::arg("decay"),
        py::call_guard<py::gil_scoped_release>());

  m.def("round_clip_forward_cuda", &maqd::round_clip_forward_cuda, py::arg("x"), py::arg("out"), py::arg("scale_ptr"), py::arg("scale_mode"), py::arg("scale"), py::arg("numel"), py::arg("dtype"), py::arg("bits"), py::arg("is_signed"), py::arg("output"), py::arg("stream"));
  m.def("round_clip_forward_host", &maqd::round_clip_forward_host, py::arg("x"), py::arg("out"), py::arg("scale_ptr"), py::arg("scale_mode"), py::arg("scale"), py::arg("numel"), py::arg("dtype"), py::arg("bits"), py::arg("is_signed"), py::arg("output"),
        py::call_guard<py::gil_scoped_release>());

  m.def("round_clip_backward_cuda", &maqd::round_clip_backward_cuda, py::arg("grad"), py::arg("x"), py::arg("scale_ptr"), py::arg("scale_mode"), py::arg("scale"), py::arg("grad_x"), py::arg("grad_scale"), py::arg("numel"), py::arg("dtype"), py::arg("bits"), py::arg("is_signed"), py::arg("surrogate"), py::arg("alpha"), py::arg("stream"));
  m.def("round_clip_backward_host", &maqd::round_clip_backward_host, py::arg("grad"), py::arg("x"), py::arg("scale_ptr"), py::arg("scale_mode"), py::arg("scale"), py::arg("grad_x"), py::arg("grad_scale"), py::arg("numel"), py::arg("dtype"), py::arg("bits"), py::arg("is_signed"), py::arg("surrogate"), py::arg("alpha"),
        py::call_guard<py::gil_scoped_release>());

  m.def("pack_weight_cuda", &maqd::pack_weight_cuda, py::arg("w"), py::arg("channel_scale"), py::arg("packed"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("bits"), py::arg("standardize"), py::arg("eps"), py::arg("stream"));
  m.def("pack_weight_host", &maqd::pack_weight_host, py::arg("w"), py::arg("channel_scale"), py::arg("packed"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("bits"), py::arg("standardize"), py::arg("eps"),
        py::call_guard<py::gil_scoped_release>());

  m.def("dequantize_weight_cuda", &maqd::dequantize_weight_cuda, py::arg("packed"), py::arg("channel_scale"), py::arg("out"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("bits"), py::arg("stream"));
  m.def("dequantize_weight_host", &maqd::dequantize_weight_host, py::arg("packed"), py::arg("channel_scale"), py::arg("out"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("bits"),
        py::call_guard<py::gil_scoped_release>());

  m.def("weight_quant_backward_cuda", &maqd::weight_quant_backward_cuda, py::arg("grad_wq"), py::arg("w"), py::arg("grad_w"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("bits"), py::arg("scale"), py::arg("surrogate"), py::arg("alpha"), py::arg("eps"), py::arg("stream"));
  m.def("weight_quant_backward_host", &maqd::weight_quant_backward_host, py::arg("grad_wq"), py::arg("w"), py::arg("grad_w"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("bits"), py::arg("scale"), py::arg("surrogate"), py::arg("alpha"), py::arg("eps"),
        py::call_guard<py::gil_scoped_release>());

  m.def("lowbit_gemm_cuda", &maqd::lowbit_gemm_cuda, py::arg("x"), py::arg("x_signed"), py::arg("lda"), py::arg("packed"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("bits"), py::arg("combined_scale"), py::arg("bias"), py::arg("out_scale"), py::arg("out_shift"), py::arg("out_bits"), py::arg("out_act_scale"), py::arg("out"), py::arg("out_dtype"), py::arg("stream"));
  m.def("lowbit_gemm_host", &maqd::lowbit_gemm_host, py::arg("x"), py::arg("x_signed"), py::arg("lda"), py::arg("packed"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("bits"), py::arg("combined_scale"), py::arg("bias"), py::arg("out_scale"), py::arg("out_shift"), py::arg("out_bits"), py::arg("out_act_scale"), py::arg("out"), py::arg("out_dtype"),
        py::call_guard<py::gil_scoped_release>());

  m.def("lowbit_gemv_cuda", &maqd::lowbit_gemv_cuda, py::arg("x"), py::arg("x_dtype"), py::arg("packed"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("bits"), py::arg("combined_scale"), py::arg("bias"), py::arg("out_scale"), py::arg("out_shift"), py::arg("out_bits"), py::arg("out_act_scale"), py::arg("out"), py::arg("out_dtype"), py::arg("stream"));
  m.def("lowbit_gemv_host", &maqd::lowbit_gemv_host, py::arg("x"), py::arg("x_dtype"), py::arg("packed"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("bits"), py::arg("combined_scale"), py::arg("bias"), py::arg("out_scale"), py::arg("out_shift"), py::arg("out_bits"), py::arg("out_act_scale"), py::arg("out"), py::arg("out_dtype"),
        py::call_guard<py::gil_scoped_release>());

  m.def("layer_batch_norm_workspace", &maqd::layer_batch_norm_workspace, py::arg("n"), py::arg("c"), py::arg("s"), py::arg("groups"), py::arg("dtype"), py::arg("backward"), py::arg("training"), py::arg("sm_count"));
  m.def("layer_batch_norm_forward_cuda", &maqd::layer_batch_norm_forward_cuda, py::arg("x"), py::arg("weight"), py::arg("weight_dtype"), py::arg("bias"), py::arg("bias_dtype"), py::arg("running_mean"), py::arg("running_var"), py::arg("stats_dtype"), py::arg("y"), py::arg("mean"), py::arg("rstd"), py::arg("new_running_mean"), py::arg("new_running_var"), py::arg("workspace"), py::arg("n"), py::arg("c"), py::arg("s"), py::arg("groups"), py::arg("dtype"), py::arg("training"), py::arg("momentum"), py::arg("eps"), py::arg("sm_count"), py::arg("stream"));
  m.def("layer_batch_norm_forward_host", &maqd::layer_batch_norm_forward_host, py::arg("x"), py::arg("weight"), py::arg("weight_dtype"), py::arg("bias"), py::arg("bias_dtype"), py::arg("running_mean"), py::arg("running_var"), py::arg("stats_dtype"), py::arg("y"), py::arg("mean"), py::arg("rstd"), py::arg("new_running_mean"), py::arg("new_running_var"), py::arg("workspace"), py::arg("n"), py::arg("c"), py::arg("s"), py::arg("groups"), py::arg("dtype"), py::arg("training"), py::arg("momentum"), py::arg("eps"), py::arg("sm_count"),
        py::call_guard<py::gil_scoped_release>());
  m.def("layer_batch_norm_backward_cuda", &maqd::layer_batch_norm_backward_cuda, py::arg("grad"), py::arg("x"), py::arg("weight"), py::arg("weight_dtype"), py::arg("mean"), py::arg("rstd"), py::arg("grad_x"), py::arg("grad_weight"), py::arg("grad_bias"), py::arg("bias_dtype"), py::arg("workspace"), py::arg("n"), py::arg("c"), py::arg("s"), py::arg("groups"), py::arg("dtype"), py::arg("training"), py::arg("sm_count"), py::arg("stream"));
  m.def("layer_batch_norm_backward_host", &maqd::layer_batch_norm_backward_host, py::arg("grad"), py::arg("x"), py::arg("weight"), py::arg("weight_dtype"), py::arg("mean"), py::arg("rstd"), py::arg("grad_x"), py::arg("grad_weight"), py::arg("grad_bias"), py::arg("bias_dtype"), py::arg("workspace"), py::arg("n"), py::arg("c"), py::arg("s"), py::arg("groups"), py::arg("dtype"), py::arg("training"), py::arg("sm_count"),
        py::call_guard<py::gil_scoped_release>());
  m.def("psp_norm_forward_cuda", &maqd::psp_norm_forward_cuda, py::arg("x"), py::arg("weight"), py::arg("weight_dtype"), py::arg("bias"), py::arg("bias_dtype"), py::arg("running_moment"), py::arg("stats_dtype"), py::arg("y"), py::arg("rstd"), py::arg("new_running_moment"), py::arg("workspace"), py::arg("n"), py::arg("c"), py::arg("s"), py::arg("groups"), py::arg("dtype"), py::arg("training"), py::arg("momentum"), py::arg("eps"), py::arg("sm_count"), py::arg("stream"));
  m.def("psp_norm_forward_host", &maqd::psp_norm_forward_host, py::arg("x"), py::arg("weight"), py::arg("weight_dtype"), py::arg("bias"), py::arg("bias_dtype"), py::arg("running_moment"), py::arg("stats_dtype"), py::arg("y"), py::arg("rstd"), py::arg("new_running_moment"), py::arg("workspace"), py::arg("n"), py::arg("c"), py::arg("s"), py::arg("groups"), py::arg("dtype"), py::arg("training"), py::arg("momentum"), py::arg("eps"), py::arg("sm_count"),
        py::call_guard<py::gil_scoped_release>());
  m.def("psp_norm_backward_cuda", &maqd::psp_norm_backward_cuda, py::arg("grad"), py::arg("x"), py::arg("weight"), py::arg("weight_dtype"), py::arg("rstd"), py::arg("grad_x"), py::arg("grad_weight"), py::arg("grad_bias"), py::arg("bias_dtype"), py::arg("workspace"), py::arg("n"), py::arg("c"), py::arg("s"), py::arg("groups"), py::arg("dtype"), py::arg("training"), py::arg("sm_count"), py::arg("stream"));
  m.def("psp_norm_backward_host", &maqd::psp_norm_backward_host, py::arg("grad"), py::arg("x"), py::arg("weight"), py::arg("weight_dtype"), py::arg("rstd"), py::arg("grad_x"), py::arg("grad_weight"), py::arg("grad_bias"), py::arg("bias_dtype"), py::arg("workspace"), py::arg("n"), py::arg("c"), py::arg("s"), py::arg("groups"), py::arg("dtype"), py::arg("training"), py::arg("sm_count"),
        py::call_guard<py::gil_scoped_release>());
}
