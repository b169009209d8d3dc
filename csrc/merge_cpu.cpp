// CPU kernels for tailorkit's layer merges, registered as `tailorkit::*` ops.
//
// The schemas are declared once, in tailorkit/ops.py; this file only provides
// the CPU implementations. Each kernel has a plain-PyTorch reference beside it
// in ops.py (`_weighted_sum_reference`, `_ties_merge_reference`) and the tests
// compare the two with torch.equal. The arithmetic (conversions and block
// loops) is in merge_kernels.h, shared with the torch-free build path; this
// file checks tensors, splits the work across threads and registers the ops.
//
// Memory traffic is what matters for merging multi-GB checkpoints, so each
// kernel makes one pass over memory: every source element is read from RAM
// once and every output element is written once. Work is split into blocks of
// kBlock elements whose float32 working set stays in L1/L2.
//
// gather_weighted_sum_out serves width pruning: the same weighted sum over K
// sources, but of selected rows (dim 0) or columns (dim 1) of 2-D sources,
// gathered in the same pass so that no gathered copy of a source is ever made
// (the sources are often memory-mapped checkpoints). Its reference is
// `_gather_weighted_sum_reference`, index_select followed by the weighted sum.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "merge_kernels.h"
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

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// The kernels' name for a dtype is_supported_dtype accepted.
Dtype kernel_dtype(at::ScalarType t) {
  return t == at::kFloat ? Dtype::Float32 : t == at::kBFloat16 ? Dtype::BFloat16 : Dtype::Float16;
}

// ---- Block loops of TIES and the gathers (merge_kernels.h has the weighted sum's) ----

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
        {sources[i].const_data_ptr(),
         kernel_dtype(sources[i].scalar_type()),
         static_cast<float>(scalars[i])});
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
  const Dtype out_dtype = kernel_dtype(out.scalar_type());
  std::atomic<int64_t> bad{0};

  at::parallel_for(0, out.numel(), kGrain, [&](int64_t begin, int64_t end) {
    bad += weighted_sum_range(in.data(), in.size(), dst, out_dtype, begin, end);
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
  const Dtype base_dtype = kernel_dtype(base.scalar_type());
  void* dst = out.mutable_data_ptr();
  const Dtype out_dtype = kernel_dtype(out.scalar_type());
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
  Dtype dtype;
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
        {s.const_data_ptr(),
         kernel_dtype(s.scalar_type()),
         static_cast<float>(weights[i]),
         s.stride(0)});
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
  const Dtype out_dtype = kernel_dtype(out.scalar_type());
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
