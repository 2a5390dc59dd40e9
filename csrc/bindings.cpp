// pybind11 entry points of imm_kernels._C (CPU) and, compiled again with IMM_BUILD_CUDA, of imm_kernels._cuda:
// raw pointers, sizes, strides and codes in, no logic beyond turning integer codes into enums (checked) and
// releasing the GIL around the work. The two modules take the same arguments except the last: the CPU
// thread count, or the CUDA stream (torch's cuda_stream).
#include <pybind11/pybind11.h>

#include "common/problems.h"

#if defined(IMM_BUILD_CUDA)
#include "cuda/kernels.h"
#define IMM_MODULE _cuda
namespace backend = imm::cuda;
using LaunchArg = uintptr_t;
constexpr const char* kLaunchArg = "stream";
constexpr const char* kDoc = "imm_kernels CUDA backend";
#else
#include "cpu/kernels.h"
#define IMM_MODULE _C
namespace backend = imm::cpu;
using LaunchArg = int;
constexpr const char* kLaunchArg = "num_threads";
constexpr const char* kDoc = "imm_kernels C++ CPU backend (OpenMP)";
#endif

namespace py = pybind11;

namespace imm {
namespace {

template <class Enum>
Enum to_enum(int code, int count, const char* what) {
  require(code >= 0 && code < count, std::string("unknown ") + what + " code " + std::to_string(code));
  return static_cast<Enum>(code);
}

const void* cptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }
void* mptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

MmdProblem make_mmd(uintptr_t y_t, uintptr_t y_r, int64_t stride_t, int64_t stride_r, int64_t groups,
                    int64_t group_size, int64_t features, int dtype, int kernel, int estimator, double eps,
                    uintptr_t bandwidth, uintptr_t weight, uintptr_t loss, uintptr_t grad_t, uintptr_t grad_r,
                    uintptr_t workspace) {
  MmdProblem p{cptr(y_t),
               cptr(y_r),
               stride_t,
               stride_r,
               groups,
               group_size,
               features,
               to_enum<DType>(dtype, 4, "dtype"),
               to_enum<Kernel>(kernel, 3, "kernel"),
               to_enum<Estimator>(estimator, 2, "estimator"),
               eps,
               cptr(bandwidth),
               cptr(weight),
               mptr(loss),
               mptr(grad_t),
               mptr(grad_r),
               mptr(workspace)};
  check(p);
  return p;
}

CombineProblem make_combine(int64_t rows, int64_t features, int dtype, int kind, int schedule, int param,
                            double sigma_data, uintptr_t time0, int64_t time0_stride, uintptr_t time1,
                            int64_t time1_stride, int outputs) {
  CombineProblem p{rows,
                   features,
                   to_enum<DType>(dtype, 4, "dtype"),
                   to_enum<CombineKind>(kind, 2, "combine kind"),
                   to_enum<Schedule>(schedule, 2, "schedule"),
                   to_enum<Param>(param, 3, "param"),
                   sigma_data,
                   cptr(time0),
                   cptr(time1),
                   time0_stride,
                   time1_stride,
                   outputs};
  check(p);
  return p;
}

}  // namespace
}  // namespace imm

PYBIND11_MODULE(IMM_MODULE, m) {
  using namespace imm;
  m.doc() = kDoc;
  m.def(
      "mmd_workspace_bytes",
      [](int64_t groups, int64_t group_size, int64_t features, int dtype) {
        return backend::mmd_workspace_bytes(groups, group_size, features, to_enum<DType>(dtype, 4, "dtype"));
      },
      py::arg("groups"), py::arg("group_size"), py::arg("features"), py::arg("dtype"));
  m.def(
      "mmd_fused",
      [](uintptr_t y_t, uintptr_t y_r, int64_t stride_t, int64_t stride_r, int64_t groups, int64_t group_size,
         int64_t features, int dtype, int kernel, int estimator, double eps, uintptr_t bandwidth, uintptr_t weight,
         uintptr_t loss, uintptr_t grad_t, uintptr_t grad_r, uintptr_t workspace, LaunchArg launch) {
        const MmdProblem p = make_mmd(y_t, y_r, stride_t, stride_r, groups, group_size, features, dtype, kernel,
                                      estimator, eps, bandwidth, weight, loss, grad_t, grad_r, workspace);
        py::gil_scoped_release release;
        backend::mmd_fused(p, launch);
      },
      py::arg("y_t"), py::arg("y_r"), py::arg("stride_t"), py::arg("stride_r"), py::arg("groups"),
      py::arg("group_size"), py::arg("features"), py::arg("dtype"), py::arg("kernel"), py::arg("estimator"),
      py::arg("eps"), py::arg("bandwidth"), py::arg("weight"), py::arg("loss"), py::arg("grad_t"),
      py::arg("grad_r"), py::arg("workspace"), py::arg(kLaunchArg));
  m.def(
      "combine",
      [](int64_t rows, int64_t features, int dtype, int kind, int schedule, int param, double sigma_data,
         uintptr_t time0, int64_t time0_stride, uintptr_t time1, int64_t time1_stride, int outputs, uintptr_t src0,
         uintptr_t src1, uintptr_t dst0, uintptr_t dst1, bool transpose, LaunchArg launch) {
        const CombineProblem p = make_combine(rows, features, dtype, kind, schedule, param, sigma_data, time0,
                                              time0_stride, time1, time1_stride, outputs);
        const void* const src[2] = {cptr(src0), cptr(src1)};
        void* const dst[2] = {mptr(dst0), mptr(dst1)};
        py::gil_scoped_release release;
        backend::combine(p, src, dst, transpose, launch);
      },
      py::arg("rows"), py::arg("features"), py::arg("dtype"), py::arg("kind"), py::arg("schedule"), py::arg("param"),
      py::arg("sigma_data"), py::arg("time0"), py::arg("time0_stride"), py::arg("time1"), py::arg("time1_stride"),
      py::arg("outputs"), py::arg("src0"), py::arg("src1"), py::arg("dst0"), py::arg("dst1"), py::arg("transpose"),
      py::arg(kLaunchArg));
#if defined(IMM_BUILD_CUDA)
  m.def("device_available", &cuda::device_available,
        "Whether the CUDA runtime finds a driver and at least one device (False, never an error, without them).");
#endif
}
