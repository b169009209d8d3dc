// CUDA implementation of hsic_all_pairs (schema: tailorkit/ops.py).
//
// One fused pass copies the (L, n, n) Gram matrices with their diagonals set
// to zero and takes every row sum (float64 accumulation), one warp per row
// with 16-byte loads where the rows allow; the rest -- the two products, done
// by cuBLAS through at::mm, and the float64 combination -- is shared with the
// CPU implementation (hsic_from_zero_diag in cka_cpu.cpp).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "tailorkit.h"

namespace tailorkit {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kBlocksPerSM = 16;

// V consecutive elements as one access: 16 bytes when V * sizeof(T) == 16.
template <typename T, int V>
struct Pack;
template <typename T>
struct Pack<T, 1> {
  T v[1];
  __device__ __forceinline__ void load(const T* p) { v[0] = *p; }
  __device__ __forceinline__ void store(T* p) const { *p = v[0]; }
};
template <>
struct Pack<float, 4> {
  float v[4];
  __device__ __forceinline__ void load(const float* p) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  }
  __device__ __forceinline__ void store(float* p) const {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};
template <>
struct Pack<double, 2> {
  double v[2];
  __device__ __forceinline__ void load(const double* p) {
    const double2 q = *reinterpret_cast<const double2*>(p);
    v[0] = q.x, v[1] = q.y;
  }
  __device__ __forceinline__ void store(double* p) const {
    *reinterpret_cast<double2*>(p) = make_double2(v[0], v[1]);
  }
};

// Row r of the (L * n) rows: out = row with element r % n set to 0; sums[r] = its sum.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) zero_diag_row_sums_kernel(
    const T* __restrict__ in,
    T* __restrict__ out,
    double* __restrict__ sums,
    int64_t rows,
    int64_t n) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  for (int64_t r = warp; r < rows; r += warps) {
    const int64_t diagonal = r % n;
    const T* src = in + r * n;
    T* dst = out + r * n;
    double sum = 0.0;
    for (int64_t c = static_cast<int64_t>(lane) * V; c < n; c += kWarp * V) {
      Pack<T, V> p;
      p.load(src + c);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (c + j == diagonal) {
          p.v[j] = T(0);
        }
        sum += static_cast<double>(p.v[j]);
      }
      p.store(dst + c);
    }
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      sum += __shfl_down_sync(0xffffffffu, sum, offset);
    }
    if (lane == 0) {
      sums[r] = sum;
    }
  }
}

template <typename T, int V>
void launch_zero_diag(const at::Tensor& grams, at::Tensor& zero_diag, at::Tensor& row_sums) {
  const int64_t rows = grams.size(0) * grams.size(1);
  const int64_t n = grams.size(1);
  int device = 0;
  int sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t wanted = (rows * kWarp + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t{sms} * kBlocksPerSM)));
  zero_diag_row_sums_kernel<T, V><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      grams.const_data_ptr<T>(),
      zero_diag.mutable_data_ptr<T>(),
      row_sums.mutable_data_ptr<double>(),
      rows,
      n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// 16-byte accesses when every row starts 16-byte aligned, else one element at a time.
template <typename T>
void zero_diag_row_sums(const at::Tensor& grams, at::Tensor& zero_diag, at::Tensor& row_sums) {
  constexpr int V = 16 / sizeof(T);
  const bool vector = grams.size(1) % V == 0 && aligned16(grams.const_data_ptr()) &&
      aligned16(zero_diag.const_data_ptr());
  if (vector) {
    launch_zero_diag<T, V>(grams, zero_diag, row_sums);
  } else {
    launch_zero_diag<T, 1>(grams, zero_diag, row_sums);
  }
}

at::Tensor hsic_all_pairs_cuda(const at::Tensor& grams) {
  check_grams(grams);
  TORCH_CHECK(grams.is_cuda(), "tailorkit: grams must be a CUDA tensor, got ", grams.device());
  const c10::cuda::CUDAGuard guard(grams.device());
  at::Tensor zero_diag = at::empty_like(grams);
  at::Tensor row_sums =
      at::empty({grams.size(0), grams.size(1)}, grams.options().dtype(at::kDouble));
  if (grams.numel() > 0) {
    if (grams.scalar_type() == at::kFloat) {
      zero_diag_row_sums<float>(grams, zero_diag, row_sums);
    } else {
      zero_diag_row_sums<double>(grams, zero_diag, row_sums);
    }
  }
  return hsic_from_zero_diag(zero_diag, row_sums);
}

}  // namespace
}  // namespace tailorkit

TORCH_LIBRARY_IMPL(tailorkit, CUDA, m) {
  m.impl("hsic_all_pairs", TORCH_FN(tailorkit::hsic_all_pairs_cuda));
}
