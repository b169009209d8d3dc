// The merge kernels' arithmetic, without torch: element conversions and the
// weighted sum's block loops, shared by the torch ops (merge_cpu.cpp, in
// tailorkit._C, which adds TIES and the gathers) and the torch-free build path
// (merge_buffers.cpp, tailorkit._kernels), so that both write the same bits.
//
// Each loop is a plain element-wise loop over contiguous arrays that -O3
// vectorises; the arithmetic mirrors the PyTorch references in
// tailorkit/ops.py step by step: float32 accumulation in source order, one
// rounding per multiply and per add (every file including this one is built
// with -ffp-contract=off, so no FMAs), and one cast to the output dtype.
//
// Everything here has internal linkage: each extension gets its own copy.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

namespace tailorkit {
namespace {

// Elements per inner block: a few float32 buffers of this size fit in L1, and
// re-reading K source blocks (ties_merge reads each twice) hits L2, not RAM.
constexpr int64_t kBlock = 2048;
// Minimum elements per parallel task; smaller tensors run on the calling thread
// because waking other threads costs more than the work.
constexpr int64_t kGrain = 32 * 1024;

// The element types the kernels read and write. bfloat16 and float16 are their
// bits; the loops convert them to float32 with the functions below.
struct BFloat16 {
  uint16_t bits;
};
struct Half {
  uint16_t bits;
};
enum class Dtype : uint8_t { Float32, BFloat16, Float16 };

// Calls f with the data pointer cast to its element type, so one generic lambda
// serves every dtype combination.
template <typename F>
void with_typed_input(const void* data, Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::Float32:
      return f(static_cast<const float*>(data));
    case Dtype::BFloat16:
      return f(static_cast<const BFloat16*>(data));
    case Dtype::Float16:
      break;
  }
  return f(static_cast<const Half*>(data));
}

template <typename F>
void with_typed_output(void* data, Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::Float32:
      return f(static_cast<float*>(data));
    case Dtype::BFloat16:
      return f(static_cast<BFloat16*>(data));
    case Dtype::Float16:
      break;
  }
  return f(static_cast<Half*>(data));
}

// ---- Element conversions --------------------------------------------------
// Written without branches (selects on bit masks) so that the loops calling
// them vectorise (c10::Half's own conversions branch and keep loops scalar).
// They round to nearest even exactly as Tensor.to() does; the half ones were
// checked against c10's conversions for all 2^16 halves and all 2^32 float bit
// patterns, and the tests compare every kernel with its PyTorch reference.

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

// Round to nearest even; any NaN becomes the quiet NaN 0x7fc0, as c10::BFloat16 does.
inline uint16_t float_to_bfloat16(float f) {
  const uint32_t bits = float_bits(f);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(select_bits((bits & 0x7fffffffu) > 0x7f800000u, 0x7fc0u, rounded));
}

inline float to_f32(float x) {
  return x;
}
inline float to_f32(BFloat16 x) {
  return bits_float(static_cast<uint32_t>(x.bits) << 16);
}
inline float to_f32(Half x) {
  return half_to_float(x.bits);
}

inline void put(float v, float* dst) {
  *dst = v;
}
inline void put(float v, BFloat16* dst) {
  dst->bits = float_to_bfloat16(v);
}
inline void put(float v, Half* dst) {
  dst->bits = float_to_half(v);
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

// The smallest float32 magnitude that T cannot hold finitely: from it on, put()
// writes inf (NaN compares false with it too). bfloat16 and float16 round the
// midpoint between their largest finite value and the next power of two up,
// to even, which is inf.
inline float overflow_limit(float*) {
  return std::numeric_limits<float>::infinity();
}
inline float overflow_limit(BFloat16*) {
  return bits_float(0x7f7f8000u);  // halfway from 0x7f7f (3.3895e38) to inf
}
inline float overflow_limit(Half*) {
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

// One input of a merge, resolved before the parallel region.
struct Operand {
  const void* data;
  Dtype dtype;
  float scalar;  // weight (weighted_sum) or magnitude threshold (ties_merge)
};

// Elements [begin, end) of out = sum_i in[i].scalar * float(in[i]), accumulated in
// float32 in source order and cast once. Each block is read from every source
// before it is written, so out may be one of the sources. Returns how many of
// the values written are not finite.
inline int64_t weighted_sum_range(
    const Operand* in, size_t count, void* dst, Dtype out_dtype, int64_t begin, int64_t end) {
  float acc[kBlock];
  int64_t nonfinite = 0;
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t n = std::min(kBlock, end - start);
    for (size_t i = 0; i < count; ++i) {
      with_typed_input(in[i].data, in[i].dtype, [&](auto* src) {
        if (i == 0) {
          scale(src + start, in[i].scalar, acc, n);
        } else {
          scale_add(src + start, in[i].scalar, acc, n);
        }
      });
    }
    with_typed_output(dst, out_dtype, [&](auto* d) { nonfinite += store(acc, d + start, n); });
  }
  return nonfinite;
}

}  // namespace
}  // namespace tailorkit
