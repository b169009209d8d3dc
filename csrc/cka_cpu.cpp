// CPU implementation of hsic_all_pairs (schema: tailorkit/ops.py), and the
// device-independent second half it shares with the CUDA implementation.
//
// Unbiased HSIC (Song et al. 2012) between every pair of L Gram matrices, with
// Kt a Gram matrix with its diagonal set to zero:
//
//   HSIC(K, L) = [ tr(Kt Lt) + (1'Kt1)(1'Lt1) / ((n-1)(n-2)) - 2/(n-2) 1'Kt Lt 1 ] / (n(n-3))
//
// For all pairs at once: tr(Kt_i Kt_j) is the dot product of the flattened
// matrices, one (L, n^2) x (n^2, L) product; the Gram matrices being
// symmetric, 1'Kt_i Kt_j 1 is the dot product of their row sums, one (L, n) x
// (n, L) product. One OpenMP pass over the input makes Kt and the row sums
// (float64 accumulation); BLAS does the products.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "tailorkit.h"

namespace tailorkit {

void check_grams(const at::Tensor& grams) {
  TORCH_CHECK(
      grams.dim() == 3 && grams.size(1) == grams.size(2),
      "tailorkit: grams must be an (L, n, n) tensor of Gram matrices, got shape ",
      grams.sizes());
  TORCH_CHECK(
      grams.scalar_type() == at::kFloat || grams.scalar_type() == at::kDouble,
      "tailorkit: grams must be float32 or float64, got ",
      grams.scalar_type());
  TORCH_CHECK(
      grams.size(1) >= 4,
      "tailorkit: the unbiased HSIC estimator needs at least 4 examples, got ",
      grams.size(1));
  TORCH_CHECK(grams.is_contiguous(), "tailorkit: grams must be contiguous");
}

at::Tensor hsic_from_zero_diag(const at::Tensor& zero_diag, const at::Tensor& row_sums) {
  const int64_t layers = zero_diag.size(0);
  const int64_t n = zero_diag.size(1);
  const at::Tensor flat = zero_diag.view({layers, n * n});  // (L, n^2)
  const at::Tensor trace = at::mm(flat, flat.t()).to(at::kDouble);  // (L, L): tr(Kt_i Kt_j)
  const at::Tensor ones = at::mm(row_sums, row_sums.t());  // (L, L): 1'Kt_i Kt_j 1
  const at::Tensor totals = row_sums.sum(1);  // (L,): 1'Kt_i 1
  const double nd = static_cast<double>(n);
  const at::Tensor hsic =
      (trace + at::outer(totals, totals) / ((nd - 1) * (nd - 2)) - ones * (2.0 / (nd - 2))) /
      (nd * (nd - 3));
  // The products are symmetric in exact arithmetic; make the result exactly so.
  return (hsic + hsic.t()) * 0.5;
}

namespace {

// out = in with the diagonal element of each row set to 0; sums = row sums in float64.
template <typename T>
void zero_diag_row_sums(const T* in, T* out, double* sums, int64_t rows, int64_t n) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / n);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* src = in + r * n;
      T* dst = out + r * n;
      std::copy(src, src + n, dst);
      dst[r % n] = T(0);
      double sum = 0.0;
      for (int64_t j = 0; j < n; ++j) {
        sum += static_cast<double>(dst[j]);
      }
      sums[r] = sum;
    }
  });
}

at::Tensor hsic_all_pairs_cpu(const at::Tensor& grams) {
  check_grams(grams);
  TORCH_CHECK(grams.device().is_cpu(), "tailorkit: grams must be a CPU tensor, got ", grams.device());
  at::Tensor zero_diag = at::empty_like(grams);
  at::Tensor row_sums =
      at::empty({grams.size(0), grams.size(1)}, grams.options().dtype(at::kDouble));
  const int64_t rows = grams.size(0) * grams.size(1);
  if (grams.scalar_type() == at::kFloat) {
    zero_diag_row_sums(
        grams.const_data_ptr<float>(),
        zero_diag.mutable_data_ptr<float>(),
        row_sums.mutable_data_ptr<double>(),
        rows,
        grams.size(1));
  } else {
    zero_diag_row_sums(
        grams.const_data_ptr<double>(),
        zero_diag.mutable_data_ptr<double>(),
        row_sums.mutable_data_ptr<double>(),
        rows,
        grams.size(1));
  }
  return hsic_from_zero_diag(zero_diag, row_sums);
}

}  // namespace
}  // namespace tailorkit

TORCH_LIBRARY_IMPL(tailorkit, CPU, m) {
  m.impl("hsic_all_pairs", TORCH_FN(tailorkit::hsic_all_pairs_cpu));
}
