// Helpers for input validation messages. Messages follow Python's spelling of shapes, dtypes and
// devices ("(12, 4)", "torch.float32", "cuda:0") so that the C++ checks and the Python fake
// kernels (pncc_cuda/_messages.py, _<op>_checks.py) raise word-for-word the same errors.
#pragma once

#include <ATen/core/Tensor.h>

#include <sstream>
#include <string>

namespace pncc {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << "(";
  for (int64_t d = 0; d < t.dim(); ++d) os << (d ? ", " : "") << t.size(d);
  os << (t.dim() == 1 ? ",)" : ")");
  return os.str();
}

inline std::string dtype_str(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t.scalar_type());
  }
}

inline std::string device_str(const at::Tensor& t) { return t.device().str(); }

}  // namespace pncc
