// pybind11 entry points of imm_kernels._C (CPU) and, compiled again with IMM_BUILD_CUDA, of imm_kernels._cuda:
// raw pointers, sizes, strides and codes in (positional, the calls are on the hot path), no logic beyond turning
// integer codes into enums (checked) and releasing the GIL around the work. The last argument is the CPU
// thread count, or the CUDA stream (torch's cuda_stream). pybind11 turns std::invalid_argument into ValueError
// and std::bad_alloc into MemoryError.
#include <pybind11/pybind11.h>

#include "common/problems.h"

#if defined(IMM_BUILD_CUDA)
#include "cuda/kernels.h"
#include "cuda/next/kernels.h"
#define IMM_MODULE _cuda
namespace backend = imm::cuda::next;  // opt-in (IMM_CUDA_KERNELS=next) until a GPU run passes the suite with it
using LaunchArg = uintptr_t;
constexpr const char* kDoc = "imm_kernels CUDA backend";
#else
#include "cpu/kernels.h"
#define IMM_MODULE _C
namespace backend = imm::cpu;
using LaunchArg = int;
constexpr const char* kDoc = "imm_kernels C++ CPU backend (OpenMP)";
#endif

namespace py = pybind11;

namespace imm {
namespace {

template <class Enum>
Enum to_enum(int code, int count, const char* what) {
  if (code < 0 || code >= count) fail(std::string("unknown ") + what + " code " + std::to_string(code));
  return static_cast<Enum>(code);
}

const void* cptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }
void* mptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

ScalarArg scalar(uintptr_t data, int64_t stride, bool is_double, double value) {
  return {cptr(data), stride, is_double, value};
}

OutputMix output_mix(uintptr_t f_t, uintptr_t f_r, int64_t stride_ft, int64_t stride_fr, uintptr_t coefficients) {
  return {cptr(f_t), cptr(f_r), stride_ft, stride_fr, static_cast<const double*>(cptr(coefficients))};
}

// The current contract (common/problems.h), the same in both modules.
void define_current_contract(py::module_& m) {
  m.def("mmd_forward",
        [](uintptr_t y_t, uintptr_t y_r, int64_t stride_t, int64_t stride_r, int64_t groups, int64_t group_size,
           int64_t features, int dtype, int kernel, int estimator, int reduction, double eps, uintptr_t bandwidth,
           int64_t bandwidth_stride, bool bandwidth_double, double bandwidth_value, uintptr_t weight,
           int64_t weight_stride, bool weight_double, double weight_value, uintptr_t out, uintptr_t coefficients,
           bool check_values, uintptr_t workspace, uintptr_t counter, uintptr_t f_t, uintptr_t f_r,
           int64_t stride_ft, int64_t stride_fr, uintptr_t mix, LaunchArg launch) {
          const MmdForwardProblem p{cptr(y_t),
                                    cptr(y_r),
                                    stride_t,
                                    stride_r,
                                    groups,
                                    group_size,
                                    features,
                                    to_enum<DType>(dtype, 4, "dtype"),
                                    to_enum<Kernel>(kernel, 3, "kernel"),
                                    to_enum<Estimator>(estimator, 3, "estimator"),
                                    to_enum<Reduction>(reduction, 3, "reduction"),
                                    eps,
                                    scalar(bandwidth, bandwidth_stride, bandwidth_double, bandwidth_value),
                                    scalar(weight, weight_stride, weight_double, weight_value),
                                    mptr(out),
                                    mptr(coefficients),
                                    check_values,
                                    mptr(workspace),
                                    mptr(counter),
                                    output_mix(f_t, f_r, stride_ft, stride_fr, mix)};
          py::gil_scoped_release release;
          backend::mmd_forward(p, launch);
        });
  m.def("mmd_backward", [](uintptr_t y_t, uintptr_t y_r, int64_t stride_t, int64_t stride_r, int64_t groups,
                           int64_t group_size, int64_t features, int dtype, uintptr_t grad_output,
                           int64_t grad_output_stride, uintptr_t coefficients, uintptr_t grad_t, uintptr_t grad_r,
                           uintptr_t f_t, uintptr_t f_r, int64_t stride_ft, int64_t stride_fr, uintptr_t mix,
                           LaunchArg launch) {
    const MmdBackwardProblem p{cptr(y_t),        cptr(y_r),          stride_t,           stride_r,
                               groups,           group_size,         features,           to_enum<DType>(dtype, 4, "dtype"),
                               cptr(grad_output), grad_output_stride, cptr(coefficients), mptr(grad_t),
                               mptr(grad_r),     output_mix(f_t, f_r, stride_ft, stride_fr, mix)};
    py::gil_scoped_release release;
    backend::mmd_backward(p, launch);
  });
  m.def("combine", [](int64_t rows, int64_t features, int dtype, int kind, int schedule, int param, double sigma_data,
                      uintptr_t time0, int64_t time0_stride, bool time0_double, double time0_value, uintptr_t time1,
                      int64_t time1_stride, bool time1_double, double time1_value, int outputs, bool transpose,
                      bool check_values, uintptr_t src0, int64_t src0_row_stride, int64_t src0_feature_stride,
                      uintptr_t src1, int64_t src1_row_stride, int64_t src1_feature_stride, uintptr_t dst0,
                      uintptr_t dst1, LaunchArg launch) {
    const CombineProblem p{rows,
                           features,
                           to_enum<DType>(dtype, 4, "dtype"),
                           to_enum<CombineKind>(kind, 2, "combine kind"),
                           to_enum<Schedule>(schedule, 2, "schedule"),
                           to_enum<Param>(param, 3, "param"),
                           sigma_data,
                           scalar(time0, time0_stride, time0_double, time0_value),
                           scalar(time1, time1_stride, time1_double, time1_value),
                           outputs,
                           transpose,
                           check_values,
                           {{cptr(src0), src0_row_stride, src0_feature_stride},
                            {cptr(src1), src1_row_stride, src1_feature_stride}},
                           {mptr(dst0), mptr(dst1)}};
    py::gil_scoped_release release;
    backend::combine(p, launch);
  });
}

#if defined(IMM_BUILD_CUDA)
// The GPU-verified kernels (cuda/verified.h).
void define_verified_contract(py::module_& m) {
  m.def("verified_mmd_workspace_bytes", [](int64_t groups, int64_t group_size, int64_t features, int dtype) {
    return cuda::mmd_workspace_bytes(groups, group_size, features, to_enum<DType>(dtype, 4, "dtype"));
  });
  m.def("verified_mmd_fused", [](uintptr_t y_t, uintptr_t y_r, int64_t stride_t, int64_t stride_r, int64_t groups,
                                 int64_t group_size, int64_t features, int dtype, int kernel, int estimator, double eps,
                                 uintptr_t bandwidth, uintptr_t weight, uintptr_t loss, uintptr_t grad_t,
                                 uintptr_t grad_r, uintptr_t workspace, uintptr_t stream) {
    const cuda::MmdProblem p{cptr(y_t),
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
    py::gil_scoped_release release;
    cuda::mmd_fused(p, stream);
  });
  m.def("verified_combine", [](int64_t rows, int64_t features, int dtype, int kind, int schedule, int param,
                               double sigma_data, uintptr_t time0, int64_t time0_stride, uintptr_t time1,
                               int64_t time1_stride, int outputs, uintptr_t src0, uintptr_t src1, uintptr_t dst0,
                               uintptr_t dst1, bool transpose, uintptr_t stream) {
    const cuda::CombineProblem p{rows,
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
    const void* const src[2] = {cptr(src0), cptr(src1)};
    void* const dst[2] = {mptr(dst0), mptr(dst1)};
    py::gil_scoped_release release;
    cuda::combine(p, src, dst, transpose, stream);
  });
  m.def("mmd_workspace_bytes", [](int64_t groups, int64_t group_size, int64_t features, int dtype) {
    return cuda::next::mmd_workspace_bytes(groups, group_size, features, to_enum<DType>(dtype, 4, "dtype"));
  });
  m.def("device_available", &cuda::device_available,
        "Whether the CUDA runtime finds a driver and at least one device (False, never an error, without them).");
}
#endif

}  // namespace
}  // namespace imm

PYBIND11_MODULE(IMM_MODULE, m) {
  m.doc() = kDoc;
  imm::define_current_contract(m);
#if defined(IMM_BUILD_CUDA)
  imm::define_verified_contract(m);
#endif
}
