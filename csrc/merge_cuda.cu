// CUDA implementations of tailorkit's merge ops (schemas: tailorkit/ops.py).
//
// Same arithmetic as csrc/merge_cpu.cpp and the PyTorch references, so the
// three agree bit for bit: every source element is widened to float32,
// multiplied by its float32 weight and added in source order, each multiply
// and add rounded separately (__fmul_rn / __fadd_rn: never contracted to an
// FMA), and the float32 result is rounded once to the output dtype.
//
// Memory traffic is all that matters here, so each kernel makes one pass:
// each thread takes groups of kVec = 8 consecutive elements, which for every
// dtype is a whole number of 16-byte vectors (one for bfloat16/float16, two for
// float32). Sources may mix dtypes and start at any element offset; the host
// picks a "head" of h < 8 elements after which every pointer is 16-byte
// aligned, and the head and the tail (< 8 elements) take the scalar path. When
// no such h exists (pointers misaligned relative to each other), every element
// takes the scalar path, still coalesced.
//
// One kernel template per output dtype; source dtypes are read at run time
// (a warp-uniform branch), which keeps the number of instantiations, and the
// compile time, small.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "tailorkit.h"

namespace tailorkit {
namespace {

// Sources per launch. weighted_sum chains launches through a float32 buffer
// for more (exactly: 1.0f * x == x); ties_merge needs all sources at once.
constexpr int kMaxSources = 32;
constexpr int kVec = 8;  // elements per group: 16 bytes of a 16-bit dtype, 32 of float32
constexpr int kThreads = 256;
constexpr int kUnroll = 2;  // groups per thread per iteration: more loads in flight
constexpr int kBlocksPerSM = 8;

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct MergeArgs {
  const void* src[kMaxSources];
  float scalar[kMaxSources];  // weight (weighted_sum) or magnitude threshold (ties_merge)
  int dtype[kMaxSources];
  int k;
  const void* base;  // ties_merge only
  int base_dtype;
  float lam;
  void* out;
  unsigned long long* nonfinite;  // weighted_sum: adds its count of non-finite outputs; may be null
  int64_t n;
  int64_t head;  // scalar elements before the aligned body
  int64_t groups;  // aligned groups of kVec elements after the head
};

// ---- Element conversions -----------------------------------------------------
// Rounding to nearest even, as Tensor.to() does; NaNs become the same quiet NaN
// the CPU kernel writes, so the CPU and CUDA kernels agree byte for byte.

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits) {
  return __uint_as_float(bits << 16);
}

__device__ __forceinline__ float half_bits_to_float(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

__device__ __forceinline__ uint32_t float_to_bf16_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  if (isnan(f)) {
    return 0x7fc0u;  // c10::BFloat16's NaN
  }
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

__device__ __forceinline__ uint32_t float_to_half_bits(float f) {
  if (isnan(f)) {
    return 0x7e00u | ((__float_as_uint(f) >> 16) & 0x8000u);  // the CPU kernel's NaN
  }
  return __half_as_ushort(__float2half_rn(f));
}

// One element of a source, widened to float32.
__device__ __forceinline__ float load1(const void* p, int dtype, int64_t i) {
  if (dtype == kF32) {
    return static_cast<const float*>(p)[i];
  }
  const uint32_t bits = static_cast<const uint16_t*>(p)[i];
  return dtype == kBF16 ? bf16_bits_to_float(bits) : half_bits_to_float(bits);
}

// kVec elements of a source starting at element i (16-byte aligned), widened.
__device__ __forceinline__ void load_group(const void* p, int dtype, int64_t i, float (&x)[kVec]) {
  if (dtype == kF32) {
    const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
    const float4 a = q[0];
    const float4 b = q[1];
    x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w;
    x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
    return;
  }
  const uint4 r = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + i);
  const uint32_t words[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {  // little-endian: element 2j is the low half
    if (dtype == kBF16) {
      x[2 * j] = __uint_as_float(words[j] << 16);
      x[2 * j + 1] = __uint_as_float(words[j] & 0xffff0000u);
    } else {
      x[2 * j] = half_bits_to_float(words[j] & 0xffffu);
      x[2 * j + 1] = half_bits_to_float(words[j] >> 16);
    }
  }
}

template <int OUT>
__device__ __forceinline__ void store1(void* p, int64_t i, float v) {
  if constexpr (OUT == kF32) {
    static_cast<float*>(p)[i] = v;
  } else if constexpr (OUT == kBF16) {
    static_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(float_to_bf16_bits(v));
  } else {
    static_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(float_to_half_bits(v));
  }
}

// The smallest float32 magnitude the output dtype cannot hold finitely (see
// overflow_limit in merge_cpu.cpp); NaN compares false with it too.
template <int OUT>
__device__ __forceinline__ float overflow_limit() {
  if constexpr (OUT == kF32) {
    return __uint_as_float(0x7f800000u);  // inf
  } else if constexpr (OUT == kBF16) {
    return __uint_as_float(0x7f7f8000u);
  } else {
    return 65520.0f;
  }
}

template <int OUT>
__device__ __forceinline__ void store_group(void* p, int64_t i, const float (&v)[kVec]) {
  if constexpr (OUT == kF32) {
    float4* q = reinterpret_cast<float4*>(static_cast<float*>(p) + i);
    q[0] = make_float4(v[0], v[1], v[2], v[3]);
    q[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint32_t words[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t lo = OUT == kBF16 ? float_to_bf16_bits(v[2 * j]) : float_to_half_bits(v[2 * j]);
      const uint32_t hi =
          OUT == kBF16 ? float_to_bf16_bits(v[2 * j + 1]) : float_to_half_bits(v[2 * j + 1]);
      words[j] = lo | (hi << 16);
    }
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(p) + i) =
        make_uint4(words[0], words[1], words[2], words[3]);
  }
}

// ---- weighted_sum ----------------------------------------------------------------

__device__ __forceinline__ float weighted_sum_element(const MergeArgs& a, int64_t i) {
  float acc = __fmul_rn(load1(a.src[0], a.dtype[0], i), a.scalar[0]);
  for (int s = 1; s < a.k; ++s) {
    acc = __fadd_rn(acc, __fmul_rn(load1(a.src[s], a.dtype[s], i), a.scalar[s]));
  }
  return acc;
}

// Scalar elements: the head and the tail, or every element when head == n.
// Maps j in [0, head + tail) to an element index.
__host__ __device__ __forceinline__ int64_t edge_index(const MergeArgs& a, int64_t j) {
  return j < a.head ? j : a.head + a.groups * kVec + (j - a.head);
}

__host__ __device__ __forceinline__ int64_t edge_count(const MergeArgs& a) {
  return a.n - a.groups * kVec;
}

template <int OUT>
__global__ void __launch_bounds__(kThreads) weighted_sum_kernel(const __grid_constant__ MergeArgs a) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;

  const float limit = overflow_limit<OUT>();
  unsigned int nonfinite = 0;  // outputs of this thread that are NaN or inf
  const int64_t edges = edge_count(a);
  for (int64_t j = tid; j < edges; j += nthreads) {
    const int64_t i = edge_index(a, j);
    const float v = weighted_sum_element(a, i);
    nonfinite += !(fabsf(v) < limit);
    store1<OUT>(a.out, i, v);
  }

  for (int64_t g0 = tid; g0 < a.groups; g0 += nthreads * kUnroll) {
    float acc[kUnroll][kVec];
    for (int s = 0; s < a.k; ++s) {
      float x[kUnroll][kVec] = {};
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t g = g0 + u * nthreads;
        if (g < a.groups) {
          load_group(a.src[s], a.dtype[s], a.head + g * kVec, x[u]);
        }
      }
      const float w = a.scalar[s];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float term = __fmul_rn(x[u][j], w);
          acc[u][j] = s == 0 ? term : __fadd_rn(acc[u][j], term);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t g = g0 + u * nthreads;
      if (g < a.groups) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          nonfinite += !(fabsf(acc[u][j]) < limit);
        }
        store_group<OUT>(a.out, a.head + g * kVec, acc[u]);
      }
    }
  }
  if (nonfinite != 0 && a.nonfinite != nullptr) {  // rare: one atomic per thread that saw any
    atomicAdd(a.nonfinite, static_cast<unsigned long long>(nonfinite));
  }
}

// ---- ties_merge ------------------------------------------------------------------
// tau = float(source) - base, kept = tau if |tau| >= threshold else 0; elect
// sign(sum kept); average the kept values agreeing with it; base + mean * lam.
// Pass 2 re-reads each source (from L1/L2: the same thread just read it), so
// device memory is still read once.

__device__ __forceinline__ float ties_kept(float x, float b, float threshold) {
  const float tau = __fsub_rn(x, b);
  return fabsf(tau) >= threshold ? tau : 0.0f;
}

__device__ __forceinline__ bool ties_agree(float kept, float total) {
  return (kept > 0.0f && total > 0.0f) || (kept < 0.0f && total < 0.0f);
}

__device__ __forceinline__ float ties_finish(float b, float num, float cnt, float lam) {
  // num is 0 wherever cnt is, so dividing by max(cnt, 1) gives the reference's 0 there.
  const float mean = __fdiv_rn(num, cnt < 1.0f ? 1.0f : cnt);
  return __fadd_rn(b, __fmul_rn(mean, lam));
}

__device__ __forceinline__ float ties_element(const MergeArgs& a, int64_t i) {
  const float b = load1(a.base, a.base_dtype, i);
  float total = 0.0f;
  for (int s = 0; s < a.k; ++s) {
    total = __fadd_rn(total, ties_kept(load1(a.src[s], a.dtype[s], i), b, a.scalar[s]));
  }
  float num = 0.0f;
  float cnt = 0.0f;
  for (int s = 0; s < a.k; ++s) {
    const float kept = ties_kept(load1(a.src[s], a.dtype[s], i), b, a.scalar[s]);
    const bool agree = ties_agree(kept, total);
    num = __fadd_rn(num, agree ? kept : 0.0f);
    cnt = __fadd_rn(cnt, agree ? 1.0f : 0.0f);
  }
  return ties_finish(b, num, cnt, a.lam);
}

template <int OUT>
__global__ void __launch_bounds__(kThreads) ties_merge_kernel(const __grid_constant__ MergeArgs a) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;

  const int64_t edges = edge_count(a);
  for (int64_t j = tid; j < edges; j += nthreads) {
    const int64_t i = edge_index(a, j);
    store1<OUT>(a.out, i, ties_element(a, i));
  }

  for (int64_t g = tid; g < a.groups; g += nthreads) {
    const int64_t e = a.head + g * kVec;
    float b[kVec];
    load_group(a.base, a.base_dtype, e, b);
    float total[kVec] = {};
    for (int s = 0; s < a.k; ++s) {
      float x[kVec];
      load_group(a.src[s], a.dtype[s], e, x);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        total[j] = __fadd_rn(total[j], ties_kept(x[j], b[j], a.scalar[s]));
      }
    }
    float num[kVec] = {};
    float cnt[kVec] = {};
    for (int s = 0; s < a.k; ++s) {
      float x[kVec];
      load_group(a.src[s], a.dtype[s], e, x);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float kept = ties_kept(x[j], b[j], a.scalar[s]);
        const bool agree = ties_agree(kept, total[j]);
        num[j] = __fadd_rn(num[j], agree ? kept : 0.0f);
        cnt[j] = __fadd_rn(cnt[j], agree ? 1.0f : 0.0f);
      }
    }
    float merged[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      merged[j] = ties_finish(b[j], num[j], cnt[j], a.lam);
    }
    store_group<OUT>(a.out, e, merged);
  }
}

// ---- Host side -------------------------------------------------------------------

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kF32;
    case at::kBFloat16:
      return kBF16;
    case at::kHalf:
      return kF16;
    default:
      break;
  }
  TORCH_CHECK(false, "tailorkit: dtype must be float32, bfloat16 or float16, got ", t);
  return -1;
}

void check_output(const at::Tensor& out) {
  TORCH_CHECK(out.is_cuda(), "tailorkit: out must be a CUDA tensor, got ", out.device());
  TORCH_CHECK(out.is_contiguous(), "tailorkit: out must be contiguous");
  dtype_code(out.scalar_type());
}

void check_input(const at::Tensor& t, const at::Tensor& out, const char* what) {
  TORCH_CHECK(
      t.device() == out.device(),
      "tailorkit: ",
      what,
      " is on ",
      t.device(),
      " but out is on ",
      out.device(),
      "; put every tensor of a merge on the same device");
  TORCH_CHECK(t.is_contiguous(), "tailorkit: ", what, " must be contiguous");
  dtype_code(t.scalar_type());
  TORCH_CHECK(
      t.sizes() == out.sizes(),
      "tailorkit: ",
      what,
      " has shape ",
      t.sizes(),
      " but out has shape ",
      out.sizes());
}

// At least one source, one scalar (weight, threshold) per source, each a valid input.
void check_sources(
    at::TensorList sources,
    at::ArrayRef<double> scalars,
    const at::Tensor& out,
    const char* scalar_name) {
  check_source_count(sources, scalars, scalar_name);
  for (const at::Tensor& s : sources) {
    check_input(s, out, "source");
  }
}

int64_t itemsize(int dtype) {
  return dtype == kF32 ? 4 : 2;
}

// Sets head and groups: the smallest h < kVec after which every pointer is
// 16-byte aligned, or head = n (all scalar) if there is none.
void plan_alignment(MergeArgs& a, const std::vector<std::pair<const void*, int>>& pointers) {
  a.head = a.n;
  a.groups = 0;
  for (int64_t h = 0; h < kVec && h + kVec <= a.n; ++h) {
    bool aligned = true;
    for (const auto& [ptr, dtype] : pointers) {
      const uintptr_t address = reinterpret_cast<uintptr_t>(ptr) + h * itemsize(dtype);
      aligned = aligned && address % 16 == 0;
    }
    if (aligned) {
      a.head = h;
      a.groups = (a.n - h) / kVec;
      return;
    }
  }
}

int blocks_for(const MergeArgs& a, int64_t groups_per_thread) {
  int device = 0;
  int sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t work = std::max(a.groups / groups_per_thread, edge_count(a));
  const int64_t wanted = (work + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t{sms} * kBlocksPerSM)));
}

template <template <int> class Launcher>
void launch_for_output(int out_dtype, const MergeArgs& a) {
  switch (out_dtype) {
    case kF32:
      return Launcher<kF32>::run(a);
    case kBF16:
      return Launcher<kBF16>::run(a);
    default:
      return Launcher<kF16>::run(a);
  }
}

template <int OUT>
struct WeightedSumLauncher {
  static void run(const MergeArgs& a) {
    weighted_sum_kernel<OUT>
        <<<blocks_for(a, kUnroll), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <int OUT>
struct TiesMergeLauncher {
  static void run(const MergeArgs& a) {
    ties_merge_kernel<OUT><<<blocks_for(a, 1), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// One launch over sources [first, first + count) plus an optional leading
// operand (the float32 partial sum of earlier launches, weight 1); adds the
// count of non-finite outputs to *nonfinite unless it is null.
void weighted_sum_launch(
    const std::vector<std::pair<const void*, int>>& operands,
    const std::vector<float>& weights,
    void* out,
    int out_dtype,
    int64_t n,
    unsigned long long* nonfinite) {
  MergeArgs a{};
  a.k = static_cast<int>(operands.size());
  std::vector<std::pair<const void*, int>> pointers = operands;
  for (int i = 0; i < a.k; ++i) {
    a.src[i] = operands[i].first;
    a.dtype[i] = operands[i].second;
    a.scalar[i] = weights[i];
  }
  a.out = out;
  a.nonfinite = nonfinite;
  a.n = n;
  pointers.emplace_back(out, out_dtype);
  plan_alignment(a, pointers);
  launch_for_output<WeightedSumLauncher>(out_dtype, a);
}

void weighted_sum_out_cuda(
    at::TensorList sources,
    at::ArrayRef<double> weights,
    const at::Tensor& out,
    const std::optional<at::Tensor>& nonfinite) {
  check_output(out);
  unsigned long long* counter = nullptr;
  if (nonfinite.has_value()) {
    TORCH_CHECK(
        nonfinite->device() == out.device(),
        "tailorkit: nonfinite is on ",
        nonfinite->device(),
        " but out is on ",
        out.device());
    TORCH_CHECK(
        nonfinite->scalar_type() == at::kLong && nonfinite->numel() == 1,
        "tailorkit: nonfinite must be one int64 element, got ",
        nonfinite->scalar_type(),
        " of shape ",
        nonfinite->sizes());
    counter = reinterpret_cast<unsigned long long*>(nonfinite->mutable_data_ptr<int64_t>());
  }
  check_sources(sources, weights, out, "weights");
  const int64_t n = out.numel();
  if (n == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(out.device());
  const int out_dtype = dtype_code(out.scalar_type());
  const int64_t total = static_cast<int64_t>(sources.size());

  // More sources than one launch takes: accumulate the first ones into a
  // float32 buffer, then carry it into the next launch as a source of weight
  // 1 (1.0f * x == x exactly), so the additions keep their order and rounding.
  at::Tensor partial;
  int64_t next = 0;
  while (true) {
    std::vector<std::pair<const void*, int>> operands;
    std::vector<float> w;
    if (partial.defined()) {
      operands.emplace_back(partial.const_data_ptr(), kF32);
      w.push_back(1.0f);
    }
    while (next < total && static_cast<int>(operands.size()) < kMaxSources) {
      operands.emplace_back(sources[next].const_data_ptr(), dtype_code(sources[next].scalar_type()));
      w.push_back(static_cast<float>(weights[next]));
      ++next;
    }
    if (next == total) {
      weighted_sum_launch(operands, w, out.mutable_data_ptr(), out_dtype, n, counter);
      return;
    }
    at::Tensor buffer = at::empty(out.sizes(), out.options().dtype(at::kFloat));
    weighted_sum_launch(operands, w, buffer.mutable_data_ptr(), kF32, n, nullptr);
    partial = buffer;  // the previous partial (if any) is freed after the launch, stream-ordered
  }
}

void ties_merge_out_cuda(
    const at::Tensor& base,
    at::TensorList sources,
    at::ArrayRef<double> thresholds,
    double lam,
    const at::Tensor& out) {
  check_output(out);
  check_input(base, out, "base");
  check_sources(sources, thresholds, out, "thresholds");
  TORCH_CHECK(
      static_cast<int64_t>(sources.size()) <= kMaxSources,
      "tailorkit: the CUDA TIES kernel takes at most ",
      kMaxSources,
      " sources, got ",
      sources.size());
  const int64_t n = out.numel();
  if (n == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(out.device());
  MergeArgs a{};
  a.k = static_cast<int>(sources.size());
  std::vector<std::pair<const void*, int>> pointers;
  for (int i = 0; i < a.k; ++i) {
    a.src[i] = sources[i].const_data_ptr();
    a.dtype[i] = dtype_code(sources[i].scalar_type());
    a.scalar[i] = static_cast<float>(thresholds[i]);
    pointers.emplace_back(a.src[i], a.dtype[i]);
  }
  a.base = base.const_data_ptr();
  a.base_dtype = dtype_code(base.scalar_type());
  a.lam = static_cast<float>(lam);
  a.out = out.mutable_data_ptr();
  a.n = n;
  const int out_dtype = dtype_code(out.scalar_type());
  pointers.emplace_back(a.base, a.base_dtype);
  pointers.emplace_back(a.out, out_dtype);
  plan_alignment(a, pointers);
  launch_for_output<TiesMergeLauncher>(out_dtype, a);
}

// Variadic: __CUDA_ARCH_LIST__ expands to a comma-separated list.
#define TAILORKIT_STRINGIFY2(...) #__VA_ARGS__
#define TAILORKIT_STRINGIFY(...) TAILORKIT_STRINGIFY2(__VA_ARGS__)

}  // namespace

int cuda_ties_max_sources() {
  return kMaxSources;
}

std::string cuda_build_info() {
  // __CUDA_ARCH_LIST__ (nvcc >= 11.5) lists the targets, e.g. 800,900.
  std::string archs;
#ifdef __CUDA_ARCH_LIST__
  const std::string list = TAILORKIT_STRINGIFY(__CUDA_ARCH_LIST__);
  size_t start = 0;
  while (start < list.size()) {
    size_t end = list.find(',', start);
    if (end == std::string::npos) {
      end = list.size();
    }
    const int code = std::stoi(list.substr(start, end - start));
    const std::string arch = std::to_string(code / 100) + "." + std::to_string((code / 10) % 10);
    if (archs.find(arch) == std::string::npos) {
      archs += (archs.empty() ? "" : ", ") + arch;
    }
    start = end + 1;
  }
#else
  archs = "unknown targets";
#endif
  return "CUDA kernels for compute capability " + archs + " (CUDA " +
      std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10) +
      ")";
}

}  // namespace tailorkit

// CUDA implementations of the ops tailorkit/ops.py declares (the CPU ones are
// in merge_cpu.cpp; hsic_all_pairs' are in cka_cpu.cpp and cka_cuda.cu).
TORCH_LIBRARY_IMPL(tailorkit, CUDA, m) {
  m.impl("weighted_sum_out", TORCH_FN(tailorkit::weighted_sum_out_cuda));
  m.impl("ties_merge_out", TORCH_FN(tailorkit::ties_merge_out_cuda));
}
