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
}
