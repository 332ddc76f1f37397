// pybind11 module cqil_kernels._C: raw-pointer entry points, no torch headers.
//
// Pointers are Python ints (tensor.data_ptr()), strides are in elements, the CUDA stream is an
// int (torch.cuda.current_stream().cuda_stream). The Python side (cqil_kernels/compiled.py)
// checks tensors and wraps the CUDA launcher in the torch custom op cqil::decode_attention_cuda.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "decode_attention.h"

namespace py = pybind11;
using cqil::DecodeAttnParams;

namespace {

// A pointer field read and written as a Python int.
template <typename Ptr>
void def_pointer(py::class_<DecodeAttnParams>& cls, const char* name, Ptr DecodeAttnParams::*field) {
  cls.def_property(
      name,
      [field](const DecodeAttnParams& p) { return reinterpret_cast<uintptr_t>(p.*field); },
      [field](DecodeAttnParams& p, uintptr_t value) { p.*field = reinterpret_cast<Ptr>(value); });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cqil_kernels compiled kernels (split-KV decode attention for CQIL groups)";

  // module_local: another extension binding a type of the same name cannot clash with this one.
  py::class_<DecodeAttnParams> params(m, "DecodeAttnParams", py::module_local(),
                                      "Parameter block of decode_attention_{cpu,cuda}; see "
                                      "csrc/decode_attention.h. Pointers are ints, strides in "
                                      "elements.");
  params.def(py::init<>());
  def_pointer(params, "q", &DecodeAttnParams::q);
  def_pointer(params, "k", &DecodeAttnParams::k);
  def_pointer(params, "v", &DecodeAttnParams::v);
  def_pointer(params, "kv_mask", &DecodeAttnParams::kv_mask);
  def_pointer(params, "out", &DecodeAttnParams::out);
  def_pointer(params, "workspace", &DecodeAttnParams::workspace);
#define CQIL_FIELD(name) params.def_readwrite(#name, &DecodeAttnParams::name)
  CQIL_FIELD(q_stride_b);
  CQIL_FIELD(q_stride_h);
  CQIL_FIELD(k_stride_layer);
  CQIL_FIELD(k_stride_b);
  CQIL_FIELD(k_stride_h);
  CQIL_FIELD(k_stride_s);
  CQIL_FIELD(v_stride_layer);
  CQIL_FIELD(v_stride_b);
  CQIL_FIELD(v_stride_h);
  CQIL_FIELD(v_stride_s);
  CQIL_FIELD(mask_stride_b);
  CQIL_FIELD(mask_stride_s);
  CQIL_FIELD(out_stride_b);
  CQIL_FIELD(out_stride_h);
  CQIL_FIELD(batch);
  CQIL_FIELD(num_layers);
  CQIL_FIELD(num_heads);
  CQIL_FIELD(num_kv_heads);
  CQIL_FIELD(seq_len);
  CQIL_FIELD(head_dim);
  CQIL_FIELD(kv_len);
  CQIL_FIELD(num_splits);
  CQIL_FIELD(scale);
  CQIL_FIELD(dtype);
#undef CQIL_FIELD

  m.attr("DTYPE_FLOAT32") = static_cast<int>(cqil::kFloat32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(cqil::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(cqil::kBFloat16);
  m.attr("MAX_HEAD_DIM") = cqil::kMaxHeadDim;

  m.def("decode_attention_num_splits", &cqil::decode_attention_num_splits,
        py::arg("batch_heads"), py::arg("kv_len"), py::arg("num_sms"),
        "Split count for the CUDA launch: about 4 CTAs per SM, >= 64 keys per split, <= 128.");
  m.def("workspace_floats", &cqil::workspace_floats, py::arg("batch"), py::arg("total_heads"),
        py::arg("head_dim"), py::arg("num_splits"),
        "fp32 elements of the partials workspace: B * H * num_splits * (D + 2).");
  m.def("check_params", &cqil::check_params, py::arg("params"),
        "Raises ValueError if the parameter block is inconsistent.");
  m.def("decode_attention_cpu", &cqil::decode_attention_cpu, py::arg("params"),
        py::call_guard<py::gil_scoped_release>(),
        "Split-KV decode attention on the CPU (float32 only, synchronous).");

#if defined(CQIL_WITH_CUDA)
  m.attr("has_cuda") = true;
  m.def("decode_attention_cuda", &cqil::decode_attention_cuda, py::arg("params"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Split-KV decode attention on the GPU: launches both phases on `stream` (a "
        "cudaStream_t as int), asynchronously. Pointers must be device pointers.");
#else
  m.attr("has_cuda") = false;
#endif
}
