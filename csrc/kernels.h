// What the FFI handlers of csrc/*.cc share: operand checks and element-type
// dispatch, the fixed pixel groups that sums over the pixels run in, and
// float32 AVX-512 vector helpers (csrc/linear_attention.cc,
// csrc/group_norm.cc).
#ifndef DRDD_JAX_CSRC_KERNELS_H_
#define DRDD_JAX_CSRC_KERNELS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define DRDD_AVX512 __attribute__((target("avx512f")))
#endif

namespace drdd {

using bf16 = uint16_t;

constexpr int64_t kBlock = 64;  // pixels per block of the sums over pixels

// The pixels of fixed group g of `groups` over n pixels in blocks of kBlock.
inline int64_t GroupStart(int64_t g, int64_t groups, int64_t n) {
  return std::min(n, g * CeilDiv(n, kBlock) / groups * kBlock);
}

// The fixed number of groups of pixel blocks that the sums over n pixels
// run in: twice the threads, at most one per block.
inline int64_t SumGroups(ffi::ThreadPool& pool, int64_t n) {
  const int64_t blocks = CeilDiv(n, kBlock);
  return std::min(blocks, 2 * Workers(pool, blocks));
}

// out[i] = partials[0][i] + ... + partials[groups - 1][i], i < size, in
// that order.
inline void AddInOrder(const float* partials, int64_t groups, int64_t size,
                       float* out) {
  std::memcpy(out, partials, size * sizeof(float));
  for (int64_t g = 1; g < groups; ++g) {
    const float* part = partials + g * size;
    for (int64_t i = 0; i < size; ++i) out[i] += part[i];
  }
}

inline bool IsF32(const ffi::AnyBuffer& a) {
  return a.element_type() == ffi::DataType::F32;
}

// f(T{}) with T float or bf16, the element type of a (float32 or bfloat16).
template <typename F>
void WithType(const ffi::AnyBuffer& a, const F& f) {
  if (IsF32(a)) {
    f(float{});
  } else {
    f(bf16{});
  }
}

// Whether dims are exactly `want`.
inline bool Dims(ffi::Span<const int64_t> dims,
                 std::initializer_list<int64_t> want) {
  return dims.size() == want.size() &&
         std::equal(want.begin(), want.end(), dims.begin());
}

#if defined(DRDD_AVX512)

inline bool CpuSupported() { return __builtin_cpu_supports("avx512f"); }

// 16 bfloat16 values as float32.
DRDD_AVX512 inline __m512 Load16(const bf16* p) {
  __m512i wide = _mm512_cvtepu16_epi32(
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

DRDD_AVX512 inline __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }

// v rounded to bfloat16 (to nearest even; NaN stays NaN), stored at p.
DRDD_AVX512 inline void Store16(bf16* p, __m512 v) {
  __m512i b = _mm512_castps_si512(v);
  __m512i lsb =
      _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  b = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), b,
                              _mm512_set1_epi32(0x7FC00000));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16)));
}

// exp(x) for x <= 0, within 2 ulp; exp(-87) below -87.
DRDD_AVX512 inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);  // NaN stays NaN
  // x = n ln2 + r, |r| <= ln2 / 2; exp(x) = 2^n exp(r).
  __m512 n = _mm512_roundscale_ps(
      _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  // Taylor series to r^7: relative error < 1e-8 on |r| <= ln2 / 2.
  constexpr float kCoef[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24,
                             1.0f / 6,    0.5f,       1.0f,       1.0f};
  __m512 p = _mm512_set1_ps(kCoef[0]);
  for (int i = 1; i < 8; ++i) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kCoef[i]));
  }
  return _mm512_scalef_ps(p, n);
}

#else  // not x86-64: CpuSupported() is false and no handler computes.

inline bool CpuSupported() { return false; }

#endif  // DRDD_AVX512

}  // namespace drdd

#endif  // DRDD_JAX_CSRC_KERNELS_H_
