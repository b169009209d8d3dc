// CPU kernels for tailorkit's layer merges, registered as `tailorkit::*` ops.
//
// The schemas are declared once, in tailorkit/ops.py; this file only provides
// the CPU implementations. Each kernel has a plain-PyTorch reference beside it
// in ops.py (`_weighted_sum_reference`, `_ties_merge_reference`) and the tests
// compare the two with torch.equal, so the arithmetic below mirrors the
// reference step by step: float32 accumulation in source order, one rounding
// per multiply and per add (built with -ffp-contract=off so the compiler does
// not fuse them into FMAs), and a single cast to the output dtype at the end.
//
// Memory traffic is what matters for merging multi-GB checkpoints, so each
// kernel makes one pass over memory: every source element is read from RAM
// once and every output element is written once. Work is split into blocks of
// kBlock elements whose float32 working set stays in L1/L2; the inner loops are
// plain element-wise loops over contiguous arrays so that -O3 vectorises them
// (bf16 -> fp32 is a 16-bit shift; fp16 uses the branch-free conversions below).
//
// gather_weighted_sum_out serves width pruning: the same weighted sum over K
// sources, but of selected rows (dim 0) or columns (dim 1) of 2-D sources,
// gathered in the same pass so that no gathered copy of a source is ever made
// (the sources are often memory-mapped checkpoints). Its reference is
// `_gather_weighted_sum_reference`, index_select followed by the weighted sum.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "tailorkit.h"

namespace tailorkit {

// Declared in tailorkit.h: merge_cuda.cu checks its sources with it too.
// At least one source, and one scalar (weight, threshold) per source.
void check_source_count(
    at::TensorList sources, at::ArrayRef<double> scalars, const char* scalar_name) {
  TORCH_CHECK(!sources.empty(), "tailorkit: need at least one source tensor");
  TORCH_CHECK(
      scalars.size() == sources.size(),
      "tailorkit: got ",
      sources.size(),
      " sources but ",
      scalars.size(),
      " ",
      scalar_name);
}

namespace {

// Elements per inner block: a few float32 buffers of this size fit in L1, and
// re-reading K source blocks (ties_merge reads each twice) hits L2, not RAM.
constexpr int64_t kBlock = 2048;
// Minimum elements per parallel task; smaller tensors run on the calling thread
// because waking the OpenMP team costs more than the work.
constexpr int64_t kGrain = 32 * 1024;

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Calls f with the data pointer cast to its element type (float, c10::BFloat16
// or c10::Half), so one generic lambda serves every dtype combination.
template <typename F>
void with_typed_input(const void* data, at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(static_cast<const float*>(data));
    case at::kBFloat16:
      return f(static_cast<const c10::BFloat16*>(data));
    case at::kHalf:
      return f(static_cast<const c10::Half*>(data));
    default:
      TORCH_CHECK(false, "tailorkit: unsupported dtype ", dtype);
  }
}

// Calls f with the index data cast to its element type (int32_t or int64_t).
template <typename F>
void with_typed_index(const void* data, at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kInt:
      return f(static_cast<const int32_t*>(data));
    case at::kLong:
      return f(static_cast<const int64_t*>(data));
    default:
      TORCH_CHECK(false, "tailorkit: index dtype must be int32 or int64, got ", dtype);
  }
}

template <typename F>
void with_typed_output(void* data, at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(static_cast<float*>(data));
    case at::kBFloat16:
      return f(static_cast<c10::BFloat16*>(data));
    case at::kHalf:
      return f(static_cast<c10::Half*>(data));
    default:
      TORCH_CHECK(false, "tailorkit: unsupported dtype ", dtype);
  }
}

// ---- Element conversions --------------------------------------------------
// Written without branches (selects on bit masks) so that the loops calling
// them vectorise; c10::Half's own conversions branch and keep loops scalar.
// Both round to nearest even exactly as Tensor.to() does; checked against
// c10's conversions for all 2^16 halves and all 2^32 float bit patterns.

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// cond ? a : b, as bit operations.
inline uint32_t select_bits(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return (a & mask) | (b & ~mask);
}

inline float half_to_float(uint16_t h) {
  const uint32_t exp_mask = 0x7c00u << 13;
  // Exponent and mantissa moved to float32's bit positions.
  const uint32_t magnitude = (static_cast<uint32_t>(h) & 0x7fffu) << 13;
  const uint32_t exp = magnitude & exp_mask;
  const uint32_t normal = magnitude + ((127u - 15u) << 23);  // rebias the exponent
  const uint32_t inf_nan = normal + ((128u - 16u) << 23);  // exponent all ones
  // Subnormal halves: let the FPU normalise them (exact: at most 11 significant bits).
  const uint32_t subnormal = float_bits(bits_float(normal + (1u << 23)) - bits_float(113u << 23));
  const uint32_t out =
      select_bits(exp == exp_mask, inf_nan, select_bits(exp == 0, subnormal, normal));
  return bits_float(out | ((static_cast<uint32_t>(h) & 0x8000u) << 16));
}

inline uint16_t float_to_half(float f) {
  const uint32_t bits = float_bits(f);
  const uint32_t sign = bits & 0x80000000u;
  const uint32_t a = bits ^ sign;  // |f|
  // |f| >= 2^16 (after rounding everything from 65520 up overflows too): inf, or a quiet NaN.
  const uint32_t overflow = select_bits(a > (255u << 23), 0x7e00u, 0x7c00u);
  // |f| < 2^-14: adding 0.5 makes the FPU round the mantissa into the subnormal half's bits.
  const uint32_t magic = 126u << 23;
  const uint32_t subnormal = float_bits(bits_float(a) + bits_float(magic)) - magic;
  // Normal: rebias the exponent and round the mantissa to nearest even by hand.
  const uint32_t normal = (a - ((127u - 15u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  const uint32_t out =
      select_bits(a >= (143u << 23), overflow, select_bits(a < (113u << 23), subnormal, normal));
  return static_cast<uint16_t>(out | (sign >> 16));
}

inline float to_f32(float x) {
  return x;
}
inline float to_f32(c10::BFloat16 x) {
  return static_cast<float>(x);  // a 16-bit shift
}
inline float to_f32(c10::Half x) {
  return half_to_float(x.x);
}

inline void put(float v, float* dst) {
  *dst = v;
}
inline void put(float v, c10::BFloat16* dst) {
  *dst = c10::BFloat16(v);  // round to nearest even; vectorises as is
}
inline void put(float v, c10::Half* dst) {
  *dst = c10::Half(float_to_half(v), c10::Half::from_bits());
}

// ---- Block loops -------------------------------------------------------------
// On x86-64 with GCC each loop is compiled twice, for AVX2 and for the baseline
// (SSE2), and the dynamic loader picks the one the CPU supports: wider vectors
// without giving up portable wheels. The arithmetic is IEEE either way and
// -ffp-contract=off applies to both, so the results are identical.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define TAILORKIT_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TAILORKIT_VECTOR_CLONES
#endif

// acc = float(src) * w
template <typename T>
TAILORKIT_VECTOR_CLONES void scale(
    const T* __restrict__ src, float w, float* __restrict__ acc, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    acc[j] = to_f32(src[j]) * w;
  }
}

// acc = acc + float(src) * w   (two roundings: no FMA, as in the reference)
template <typename T>
TAILORKIT_VECTOR_CLONES void scale_add(
    const T* __restrict__ src, float w, float* __restrict__ acc, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    acc[j] = acc[j] + to_f32(src[j]) * w;
  }
}

// acc = float(row[idx]) * w   (a gather: row[idx[j]] for each j)
template <typename T, typename I>
TAILORKIT_VECTOR_CLONES void gather_scale(
    const T* __restrict__ row, const I* __restrict__ idx, float w, float* __restrict__ acc,
    int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    acc[j] = to_f32(row[idx[j]]) * w;
  }
}

// acc = acc + float(row[idx]) * w   (two roundings, as in scale_add)
template <typename T, typename I>
TAILORKIT_VECTOR_CLONES void gather_scale_add(
    const T* __restrict__ row, const I* __restrict__ idx, float w, float* __restrict__ acc,
    int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    acc[j] = acc[j] + to_f32(row[idx[j]]) * w;
  }
}

template <typename T>
TAILORKIT_VECTOR_CLONES void to_float(
    const T* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    dst[j] = to_f32(src[j]);
  }
}

// The smallest float32 magnitude that T cannot hold finitely: from it on, put()
// writes inf (NaN compares false with it too). bfloat16 and float16 round the
// midpoint between their largest finite value and the next power of two up,
// to even, which is inf.
inline float overflow_limit(float*) {
  return std::numeric_limits<float>::infinity();
}
inline float overflow_limit(c10::BFloat16*) {
  return bits_float(0x7f7f8000u);  // halfway from 0x7f7f (3.3895e38) to inf
}
inline float overflow_limit(c10::Half*) {
  return 65520.0f;  // halfway from 65504 to 65536
}

// The one rounding to the output dtype. Returns how many of the values written
// are not finite (NaN or inf in T): the merges' finiteness check, made in the
// same pass instead of a second one over the output.
template <typename T>
TAILORKIT_VECTOR_CLONES int store(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  const float limit = overflow_limit(dst);
  int nonfinite = 0;
  for (int64_t j = 0; j < n; ++j) {
    put(src[j], dst + j);
    nonfinite += static_cast<int>(!(std::fabs(src[j]) < limit));
  }
  return nonfinite;
}

// TIES pass 1 over one source block: total += kept(tau), where
// tau = float(src) - base and kept(tau) = tau if |tau| >= threshold else 0.
template <typename T>
TAILORKIT_VECTOR_CLONES void ties_total(
    const T* __restrict__ src,
    const float* __restrict__ base,
    float threshold,
    float* __restrict__ total,
    int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float tau = to_f32(src[j]) - base[j];
    const float kept = std::fabs(tau) >= threshold ? tau : 0.0f;
    total[j] = total[j] + kept;
  }
}

// TIES pass 2 over the same (now cached) block: sum and count the kept values
// whose sign agrees with the elected sign, sign(total). A total of 0 elects no
// sign, so nothing is selected there. (Integer products instead of && and ||
// keep the loop free of branches, so it vectorises.)
template <typename T>
TAILORKIT_VECTOR_CLONES void ties_select(
    const T* __restrict__ src,
    const float* __restrict__ base,
    float threshold,
    const float* __restrict__ total,
    float* __restrict__ num,
    float* __restrict__ cnt,
    int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float tau = to_f32(src[j]) - base[j];
    const float kept = std::fabs(tau) >= threshold ? tau : 0.0f;
    const float t = total[j];
    const int agree = int(kept > 0.0f) * int(t > 0.0f) + int(kept < 0.0f) * int(t < 0.0f);
    num[j] = num[j] + (agree ? kept : 0.0f);
    cnt[j] = cnt[j] + static_cast<float>(agree);
  }
}

// TIES final step: out = base + lam * mean, mean = num / cnt where cnt > 0,
// else 0. num is 0 wherever cnt is, so dividing by max(cnt, 1) gives the same
// values without a branch.
TAILORKIT_VECTOR_CLONES void ties_finish(
    const float* __restrict__ base,
    const float* __restrict__ num,
    const float* __restrict__ cnt,
    float lam,
    float* __restrict__ merged,
    int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float mean = num[j] / (cnt[j] < 1.0f ? 1.0f : cnt[j]);
    merged[j] = base[j] + mean * lam;
  }
}

// One input of a merge, resolved before the parallel region.
struct Operand {
  const void* data;
  at::ScalarType dtype;
  float scalar;  // weight (weighted_sum) or magnitude threshold (ties_merge)
};

void check_output(const at::Tensor& out) {
  TORCH_CHECK(out.device().is_cpu(), "tailorkit: out must be a CPU tensor, got ", out.device());
  TORCH_CHECK(out.is_contiguous(), "tailorkit: out must be contiguous");
  TORCH_CHECK(
      is_supported_dtype(out.scalar_type()),
      "tailorkit: out dtype must be float32, bfloat16 or float16, got ",
      out.scalar_type());
}

void check_input(const at::Tensor& t, const at::Tensor& out, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "tailorkit: ", what, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "tailorkit: ", what, " must be contiguous");
  TORCH_CHECK(
      is_supported_dtype(t.scalar_type()),
      "tailorkit: ",
      what,
      " dtype must be float32, bfloat16 or float16, got ",
      t.scalar_type());
  TORCH_CHECK(
      t.sizes() == out.sizes(),
      "tailorkit: ",
      what,
      " has shape ",
      t.sizes(),
      " but out has shape ",
      out.sizes());
}

// The optional counter a kernel adds its output's non-finite values to.
void check_counter(const std::optional<at::Tensor>& nonfinite) {
  if (!nonfinite.has_value()) {
    return;
  }
  const at::Tensor& c = *nonfinite;
  TORCH_CHECK(c.device().is_cpu(), "tailorkit: nonfinite must be a CPU tensor, got ", c.device());
  TORCH_CHECK(
      c.scalar_type() == at::kLong && c.numel() == 1,
      "tailorkit: nonfinite must be one int64 element, got ",
      c.scalar_type(),
      " of shape ",
      c.sizes());
}

void add_to_counter(const std::optional<at::Tensor>& nonfinite, int64_t count) {
  if (nonfinite.has_value() && count != 0) {
    *nonfinite->mutable_data_ptr<int64_t>() += count;
  }
}

std::vector<Operand> resolve_sources(
    at::TensorList sources,
    at::ArrayRef<double> scalars,
    const at::Tensor& out,
    const char* scalar_name) {
  check_source_count(sources, scalars, scalar_name);
  std::vector<Operand> operands;
  operands.reserve(sources.size());
  for (size_t i = 0; i < sources.size(); ++i) {
    check_input(sources[i], out, "source");
    operands.push_back(
        {sources[i].const_data_ptr(), sources[i].scalar_type(), static_cast<float>(scalars[i])});
  }
  return operands;
}

// out = sum_i weights[i] * float(sources[i]), accumulated in float32 in
// source order, then cast once to out's dtype. Each block is read from every
// source before it is written, so out may be one of the sources. The number of
// non-finite values written is added to `nonfinite`, if given.
void weighted_sum_out_cpu(
    at::TensorList sources,
    at::ArrayRef<double> weights,
    const at::Tensor& out,
    const std::optional<at::Tensor>& nonfinite) {
  check_output(out);
  check_counter(nonfinite);
  const std::vector<Operand> in = resolve_sources(sources, weights, out, "weights");
  void* dst = out.mutable_data_ptr();
  const at::ScalarType out_dtype = out.scalar_type();
  std::atomic<int64_t> bad{0};

  at::parallel_for(0, out.numel(), kGrain, [&](int64_t begin, int64_t end) {
    float acc[kBlock];
    int64_t task_bad = 0;
    for (int64_t start = begin; start < end; start += kBlock) {
      const int64_t n = std::min(kBlock, end - start);
      for (size_t i = 0; i < in.size(); ++i) {
        with_typed_input(in[i].data, in[i].dtype, [&](auto* src) {
          if (i == 0) {
            scale(src + start, in[i].scalar, acc, n);
          } else {
            scale_add(src + start, in[i].scalar, acc, n);
          }
        });
      }
      with_typed_output(dst, out_dtype, [&](auto* d) { task_bad += store(acc, d + start, n); });
    }
    bad += task_bad;
  });
  add_to_counter(nonfinite, bad);
}

// TIES merge: tau_i = float(source_i) - float(base), trimmed to |tau_i| >=
// thresholds[i]; elect sign(sum_i kept_i); average the kept values that agree
// with it (0 where none do); out = base + lam * mean, cast once.
void ties_merge_out_cpu(
    const at::Tensor& base,
    at::TensorList sources,
    at::ArrayRef<double> thresholds,
    double lam,
    const at::Tensor& out) {
  check_output(out);
  check_input(base, out, "base");
  const std::vector<Operand> in = resolve_sources(sources, thresholds, out, "thresholds");
  const void* base_data = base.const_data_ptr();
  const at::ScalarType base_dtype = base.scalar_type();
  void* dst = out.mutable_data_ptr();
  const at::ScalarType out_dtype = out.scalar_type();
  const float lam_f = static_cast<float>(lam);

  at::parallel_for(0, out.numel(), kGrain, [&](int64_t begin, int64_t end) {
    float b[kBlock];
    float total[kBlock];
    float num[kBlock];
    float cnt[kBlock];
    for (int64_t start = begin; start < end; start += kBlock) {
      const int64_t n = std::min(kBlock, end - start);
      with_typed_input(base_data, base_dtype, [&](auto* p) { to_float(p + start, b, n); });
      std::fill(total, total + n, 0.0f);
      std::fill(num, num + n, 0.0f);
      std::fill(cnt, cnt + n, 0.0f);
      for (const Operand& s : in) {
        with_typed_input(
            s.data, s.dtype, [&](auto* src) { ties_total(src + start, b, s.scalar, total, n); });
      }
      for (const Operand& s : in) {
        with_typed_input(s.data, s.dtype, [&](auto* src) {
          ties_select(src + start, b, s.scalar, total, num, cnt, n);
        });
      }
      ties_finish(b, num, cnt, lam_f, total, n);  // `total` is free again: reuse it
      with_typed_output(dst, out_dtype, [&](auto* d) { store(total, d + start, n); });
    }
  });
}

// One 2-D source of a gather: its rows are contiguous, `row_stride` elements apart.
struct RowOperand {
  const void* data;
  at::ScalarType dtype;
  float weight;
  int64_t row_stride;
};

// Checks the inputs of gather_weighted_sum_out (ops.py checks them first, with
// friendlier errors; these guard direct calls of the op) and resolves the sources.
std::vector<RowOperand> resolve_gather(
    at::TensorList sources,
    at::ArrayRef<double> weights,
    const at::Tensor& index,
    int64_t dim,
    const at::Tensor& out) {
  check_output(out);
  TORCH_CHECK(dim == 0 || dim == 1, "tailorkit: dim must be 0 or 1, got ", dim);
  check_source_count(sources, weights, "weights");
  const at::IntArrayRef shape = sources[0].sizes();
  TORCH_CHECK(shape.size() == 2, "tailorkit: sources must be 2-D, got shape ", shape);
  std::vector<RowOperand> operands;
  operands.reserve(sources.size());
  for (size_t i = 0; i < sources.size(); ++i) {
    const at::Tensor& s = sources[i];
    TORCH_CHECK(s.device().is_cpu(), "tailorkit: source must be a CPU tensor, got ", s.device());
    TORCH_CHECK(
        is_supported_dtype(s.scalar_type()),
        "tailorkit: source dtype must be float32, bfloat16 or float16, got ",
        s.scalar_type());
    TORCH_CHECK(
        s.sizes() == shape,
        "tailorkit: source has shape ",
        s.sizes(),
        " but source 0 has shape ",
        shape);
    TORCH_CHECK(
        s.size(1) <= 1 || s.stride(1) == 1,
        "tailorkit: each source's rows must be contiguous (stride(1) == 1)");
    operands.push_back(
        {s.const_data_ptr(), s.scalar_type(), static_cast<float>(weights[i]), s.stride(0)});
  }
  TORCH_CHECK(index.device().is_cpu(), "tailorkit: index must be a CPU tensor");
  TORCH_CHECK(index.dim() == 1, "tailorkit: index must be 1-D, got shape ", index.sizes());
  TORCH_CHECK(index.is_contiguous(), "tailorkit: index must be contiguous");
  const int64_t n_index = index.numel();
  const int64_t out_rows = dim == 0 ? n_index : shape[0];
  const int64_t out_cols = dim == 0 ? shape[1] : n_index;
  TORCH_CHECK(
      out.dim() == 2 && out.size(0) == out_rows && out.size(1) == out_cols,
      "tailorkit: out has shape ",
      out.sizes(),
      " but the gather produces [",
      out_rows,
      ", ",
      out_cols,
      "]");
  const int64_t size = shape[dim];
  with_typed_index(index.const_data_ptr(), index.scalar_type(), [&](auto* idx) {
    for (int64_t j = 0; j < n_index; ++j) {
      TORCH_CHECK(
          idx[j] >= 0 && idx[j] < size,
          "tailorkit: index[",
          j,
          "] = ",
          idx[j],
          " is out of range for dim ",
          dim,
          " of size ",
          size);
    }
  });
  return operands;
}

// out = sum_i weights[i] * float(sources[i].index_select(dim, index)), with
// weighted_sum_out_cpu's arithmetic (float32, source order, one cast). The
// work is split by output row: for dim 0 output row r is a weighted sum of
// source rows index[r] (contiguous, vectorised); for dim 1 it gathers
// index[0..n) from row r of every source. Each output row is written in blocks
// of kBlock elements accumulated in an L1-resident float32 buffer. Counts
// non-finite outputs into `nonfinite` as weighted_sum_out_cpu does.
void gather_weighted_sum_out_cpu(
    at::TensorList sources,
    at::ArrayRef<double> weights,
    const at::Tensor& index,
    int64_t dim,
    const at::Tensor& out,
    const std::optional<at::Tensor>& nonfinite) {
  check_counter(nonfinite);
  const std::vector<RowOperand> in = resolve_gather(sources, weights, index, dim, out);
  if (out.numel() == 0) {
    return;
  }
  const void* index_data = index.const_data_ptr();
  const at::ScalarType index_dtype = index.scalar_type();
  void* dst = out.mutable_data_ptr();
  const at::ScalarType out_dtype = out.scalar_type();
  const int64_t out_rows = out.size(0);
  const int64_t out_cols = out.size(1);
  // Whole rows per task, about kGrain elements each: small outputs stay on one thread.
  const int64_t grain = std::max<int64_t>(1, kGrain / out_cols);
  std::atomic<int64_t> bad{0};

  at::parallel_for(0, out_rows, grain, [&](int64_t begin, int64_t end) {
    float acc[kBlock];
    int64_t task_bad = 0;
    with_typed_index(index_data, index_dtype, [&](auto* idx) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t start = 0; start < out_cols; start += kBlock) {
          const int64_t n = std::min(kBlock, out_cols - start);
          for (size_t i = 0; i < in.size(); ++i) {
            with_typed_input(in[i].data, in[i].dtype, [&](auto* src) {
              if (dim == 0) {
                const auto* row = src + static_cast<int64_t>(idx[r]) * in[i].row_stride + start;
                if (i == 0) {
                  scale(row, in[i].weight, acc, n);
                } else {
                  scale_add(row, in[i].weight, acc, n);
                }
              } else {
                const auto* row = src + r * in[i].row_stride;
                if (i == 0) {
                  gather_scale(row, idx + start, in[i].weight, acc, n);
                } else {
                  gather_scale_add(row, idx + start, in[i].weight, acc, n);
                }
              }
            });
          }
          with_typed_output(dst, out_dtype, [&](auto* d) {
            task_bad += store(acc, d + r * out_cols + start, n);
          });
        }
      }
    });
    bad += task_bad;
  });
  add_to_counter(nonfinite, bad);
}

std::string parallel_info() {
#ifdef _OPENMP
  const int threads = at::get_num_threads();
  return "OpenMP, " + std::to_string(threads) + (threads == 1 ? " thread" : " threads");
#else
  return "built without OpenMP, 1 thread";
#endif
}

}  // namespace
}  // namespace tailorkit

// CPU implementations of the ops whose schemas tailorkit/ops.py declares.
// gather_weighted_sum_out has no CUDA implementation: CUDA tensors take its
// PyTorch reference.
// ops.py imports tailorkit._C (running this registration) *before* it declares
// the schemas, so if they ever disagree with these C++ signatures (an extension
// built from older sources), torch raises a Python error at the declaration,
// which ops.py reports before falling back to the reference path. (The other
// order would fail inside the library's static initialisers and abort.)
// The CUDA implementations register with TORCH_LIBRARY_IMPL(tailorkit, CUDA, m)
// in merge_cuda.cu and cka_cuda.cu, compiled in when setup.py finds a CUDA torch
// and nvcc (TAILORKIT_WITH_CUDA is then defined for every file).
TORCH_LIBRARY_IMPL(tailorkit, CPU, m) {
  m.impl("weighted_sum_out", TORCH_FN(tailorkit::weighted_sum_out_cpu));
  m.impl("ties_merge_out", TORCH_FN(tailorkit::ties_merge_out_cpu));
  m.impl("gather_weighted_sum_out", TORCH_FN(tailorkit::gather_weighted_sum_out_cpu));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tailorkit C++ kernels; use them through tailorkit.ops.";
  m.def(
      "parallel_info",
      &tailorkit::parallel_info,
      "How the kernels run in parallel, e.g. 'OpenMP, 8 threads'.");
  m.def(
      "cuda_info",
      []() -> std::string {
#ifdef TAILORKIT_WITH_CUDA
        return tailorkit::cuda_build_info();
#else
        return "";
#endif
      },
      "What the CUDA kernels were built for; empty when the extension has none.");
  m.def(
      "cuda_ties_max_sources",
      []() -> int {
#ifdef TAILORKIT_WITH_CUDA
        return tailorkit::cuda_ties_max_sources();
#else
        return 0;
#endif
      },
      "How many sources the CUDA TIES kernel takes; 0 when the extension has no CUDA.");
}
