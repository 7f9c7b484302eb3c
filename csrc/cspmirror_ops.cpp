// The schemas of the cspmirror_ext operators. Kernels are registered per device in cpu_kernels.cpp and
// cuda_kernels.cu; fake (meta) implementations and autograd formulas in cspmirror/ops/extension.py.
#include <torch/library.h>

#include <string>

#include "common.h"

namespace cspmirror {
bool& poison_outputs() {
  static bool poison = false;
  return poison;
}
}  // namespace cspmirror

namespace {

bool set_poison_outputs(bool enable) {
  const bool previous = cspmirror::poison_outputs();
  cspmirror::poison_outputs() = enable;
  return previous;
}

std::string build_info() {
  std::string info = "cpu";
#if defined(__AVX2__)
  info += " (avx2)";
#endif
#if defined(CSPMIRROR_WITH_CUDA)
  info += " + cuda";
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY(cspmirror_ext, m) {
  // Sizes taken from the input shapes are SymInt (the kernels take int64_t): with int, torch.compile and
  // torch.export specialize on their values, recompiling for every new width (and batch, in training).
  m.def("mirror_split(Tensor x, SymInt width, int axis, bool mirror) -> Tensor");
  m.def("mirror_fuse(Tensor[] parts, SymInt length, int axis, bool mirror, bool mean) -> Tensor");
  m.def("mirror_fuse_backward(Tensor grad, SymInt[] channels, SymInt width, int axis, bool mirror, bool mean)"
        " -> Tensor[]");
  m.def("bn_mish_train(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor? residual)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("bn_mish_train_out(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor? residual,"
        " Tensor(a!) out) -> (Tensor, Tensor)");
  m.def("bn_mish_eval(Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var,"
        " float eps, Tensor? residual) -> Tensor");
  m.def("bn_mish_eval_out(Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var,"
        " float eps, Tensor? residual, Tensor(a!) out) -> ()");
  m.def("bn_mish_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var,"
        " float eps, bool training, bool param_grads) -> (Tensor, Tensor, Tensor)");
  m.def("bn_update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var,"
        " float momentum, SymInt count) -> ()");
  m.def("conv_bn_mish(Tensor x, Tensor weight, Tensor? bias, int stride, Tensor? residual) -> Tensor");
  m.def("conv_bn_mish_out(Tensor x, Tensor weight, Tensor? bias, int stride, Tensor? residual,"
        " Tensor(a!) out) -> ()");
  m.def("build_info() -> str", &build_info);
  m.def("set_poison_outputs(bool enable) -> bool", &set_poison_outputs);
}

#if defined(CSPMIRROR_PYTHON_MODULE)
// setup.py builds this library as the Python module cspmirror._C: importing it registers the operators.
#include <Python.h>

static PyModuleDef cspmirror_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&cspmirror_module); }
#endif
