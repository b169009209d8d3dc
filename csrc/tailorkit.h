// Declarations shared by the translation units of tailorkit._C.
//
// The op schemas live in tailorkit/ops.py; the C++/CUDA files only register
// implementations (TORCH_LIBRARY_IMPL). This header carries the few host
// functions one file defines and another calls.

#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace tailorkit {

// The part of hsic_all_pairs after the element-wise pass, shared by the CPU and
// CUDA implementations (defined in cka_cpu.cpp; at::mm dispatches to BLAS or
// cuBLAS by device).
//   zero_diag: (L, n, n) Gram matrices with their diagonals set to 0, float32 or float64
//   row_sums:  (L, n) float64 row sums of zero_diag
// Returns the (L, L) float64 HSIC matrix, symmetric.
at::Tensor hsic_from_zero_diag(const at::Tensor& zero_diag, const at::Tensor& row_sums);

// Shape and dtype checks of hsic_all_pairs' input, shared by both devices.
void check_grams(const at::Tensor& grams);

// At least one source, and one scalar (weight, threshold) per source; the merge ops'
// check on both devices (defined in merge_cpu.cpp).
void check_source_count(
    at::TensorList sources, at::ArrayRef<double> scalars, const char* scalar_name);

#ifdef TAILORKIT_WITH_CUDA
// What the CUDA kernels were built for, e.g. "CUDA kernels for sm 8.0, 9.0 (CUDA 13.0)"
// (defined in merge_cuda.cu).
std::string cuda_build_info();

// How many sources the CUDA TIES kernel takes in one launch (defined in merge_cuda.cu).
int cuda_ties_max_sources();
#endif

}  // namespace tailorkit
