// The Python module: qwen35.ops.cpu builds every .cpp file here (gemv, dequant, fused, attention,
// prefill_attention, chunk_rule, decode, memory) into one extension.
#include "decode.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &qwen35::available, "True when built with AVX-512 BF16 or AVX2 (the GEMV kernels work)");
  m.def("isa", &qwen35::isa, "The instruction set the kernels were built for: avx512, avx2 or empty");
  m.def("amx", &qwen35::amx, "True when the prefill attention can run on AMX tiles (built for them, granted by the OS)");
  m.def("linear_bf16", &qwen35::linear_bf16);
  m.def("linear_int8", &qwen35::linear_int8);
  m.def("linear_int4", &qwen35::linear_int4);
  m.def("int8_dequantize", &qwen35::int8_dequantize);
  m.def("int4_dequantize", &qwen35::int4_dequantize);
  m.def("rms_norm", &qwen35::rms_norm);
  m.def("deltanet_decode", &qwen35::deltanet_decode);
  m.def("attention_decode", &qwen35::attention_decode);
  m.def("attention_prefill", &qwen35::attention_prefill);
  m.def("chunk_delta_rule", &qwen35::chunk_delta_rule);
  m.def("huge_page_empty", &qwen35::huge_page_empty);
  py::class_<qwen35::DecodePlan>(m, "DecodePlan")
      .def(py::init<double>())
      .def("add_deltanet", &qwen35::DecodePlan::add_deltanet)
      .def("add_attention", &qwen35::DecodePlan::add_attention)
      .def("run", &qwen35::DecodePlan::run, py::call_guard<py::gil_scoped_release>());
}
