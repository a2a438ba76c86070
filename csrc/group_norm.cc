// The backward pass of unet.GroupNorm followed by SiLU, as XLA FFI handlers
// for x86 CPUs with AVX-512 (drdd_jax/bf16_conv.py). The forward pass is
// y = silu(z), z = x mul + add, with per-(example, channel) factors mul and
// add; with x [B, N, C] bfloat16 (a bfloat16 convolution's output), the
// cotangent g [B, N, C] float32 or bfloat16 and mul, add, u, v [B, C]
// float32, and gh = g silu'(z):
//
//   drdd_gn_silu_sums:  sums[b, 0, c] = sum_n gh[b, n, c] (add's gradient),
//                       sums[b, 1, c] = sum_n gh[b, n, c] x[b, n, c] (mul's);
//   drdd_gn_silu_grad:  dx = gh mul + u + v x, rounded to bfloat16, where
//                       u, v carry the gradient through the statistics.
//
// XLA:CPU recomputes silu'(z) from a stored float32 sigmoid in each of its
// loops (both sums and dx), and sums over the pixels as chains of
// reduce-windows; here each pass reads the bfloat16 x and g once. The sums
// run in fixed groups of pixel blocks, added in order: the same bits on
// every call.

#include <algorithm>
#include <cstdint>

#include "kernels.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace drdd {
namespace {

constexpr int64_t kGradRows = 32;  // drdd_gn_silu_grad: pixels per task

#if defined(DRDD_AVX512)

// g silu'(z) = g s (1 + z (1 - s)), s = sigmoid(z). With e = exp(-|z|),
// s and 1 - s are 1 / (1 + e) and e / (1 + e), in the order the sign of z
// says: 1 - s is never computed as a difference.
DRDD_AVX512 inline __m512 SiluGrad(__m512 g, __m512 z) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 e = Exp(_mm512_castsi512_ps(_mm512_or_si512(
      _mm512_castps_si512(z), _mm512_set1_epi32(0x80000000))));  // -|z|
  __m512 r = _mm512_div_ps(one, _mm512_add_ps(one, e));
  __m512 er = _mm512_mul_ps(e, r);
  __mmask16 neg = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  __m512 s = _mm512_mask_blend_ps(neg, r, er);
  __m512 one_minus_s = _mm512_mask_blend_ps(neg, er, r);
  return _mm512_mul_ps(_mm512_mul_ps(g, s),
                       _mm512_fmadd_ps(z, one_minus_s, one));
}

// sums[0, 16 j + i] = sum over rows p < np of gh[p, 16 j + i] and
// sums[1, 16 j + i] of gh x, for j < NV; x and g rows ld elements apart,
// sums' rows ld floats apart.
template <int NV, typename G>
DRDD_AVX512 void SumsBlock(const bf16* x, const G* g, int64_t ld, int64_t np,
                           const float* mul, const float* add, float* sums) {
  __m512 m[NV], a[NV], s_add[NV], s_mul[NV];
  for (int j = 0; j < NV; ++j) {
    m[j] = _mm512_loadu_ps(mul + 16 * j);
    a[j] = _mm512_loadu_ps(add + 16 * j);
    s_add[j] = s_mul[j] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < np; ++p) {
    for (int j = 0; j < NV; ++j) {
      __m512 xv = Load16(x + p * ld + 16 * j);
      __m512 gh = SiluGrad(Load16(g + p * ld + 16 * j),
                           _mm512_fmadd_ps(xv, m[j], a[j]));
      s_add[j] = _mm512_add_ps(s_add[j], gh);
      s_mul[j] = _mm512_fmadd_ps(gh, xv, s_mul[j]);
    }
  }
  for (int j = 0; j < NV; ++j) {
    _mm512_storeu_ps(sums + 16 * j, s_add[j]);
    _mm512_storeu_ps(sums + ld + 16 * j, s_mul[j]);
  }
}

// Per example: the sums over fixed groups of pixel blocks, each into its
// own [2, C] partial, added in order.
template <typename G>
void Sums(ffi::ThreadPool& pool, const bf16* x, const G* g, const float* mul,
          const float* add, int64_t batch, int64_t n, int64_t c,
          float* sums) {
  const int64_t groups = SumGroups(pool, n);
  auto partial = Scratch<float>(batch * groups * 2 * c);
  ParallelFor(pool, batch * groups, [&](int64_t task) {
    const int64_t b = task / groups, grp = task % groups;
    const int64_t lo = GroupStart(grp, groups, n);
    const int64_t np = GroupStart(grp + 1, groups, n) - lo;
    const int64_t row = (b * n + lo) * c;
    float* out = partial.get() + task * 2 * c;
    for (int64_t c0 = 0; c0 < c; c0 += 64) {
      const bf16* xb = x + row + c0;
      const G* gb = g + row + c0;
      const float *mb = mul + b * c + c0, *ab = add + b * c + c0;
      switch (std::min<int64_t>(4, (c - c0) / 16)) {
        case 4: SumsBlock<4>(xb, gb, c, np, mb, ab, out + c0); break;
        case 3: SumsBlock<3>(xb, gb, c, np, mb, ab, out + c0); break;
        case 2: SumsBlock<2>(xb, gb, c, np, mb, ab, out + c0); break;
        default: SumsBlock<1>(xb, gb, c, np, mb, ab, out + c0);
      }
    }
  });
  for (int64_t b = 0; b < batch; ++b) {
    AddInOrder(partial.get() + b * groups * 2 * c, groups, 2 * c,
               sums + b * 2 * c);
  }
}

// dx for tasks of kGradRows pixels of one example.
template <typename G>
void Grad(ffi::ThreadPool& pool, const bf16* x, const G* g, const float* mul,
          const float* add, const float* u, const float* v, int64_t batch,
          int64_t n, int64_t c, bf16* dx) {
  const int64_t per_example = CeilDiv(n, kGradRows);
  ParallelFor(pool, batch * per_example, [&](int64_t task) DRDD_AVX512 {
    const int64_t b = task / per_example;
    const int64_t lo = task % per_example * kGradRows;
    const int64_t hi = std::min(n, lo + kGradRows);
    const float *mb = mul + b * c, *ab = add + b * c, *ub = u + b * c,
                *vb = v + b * c;
    for (int64_t i = (b * n + lo) * c; i < (b * n + hi) * c; i += c) {
      for (int64_t j = 0; j < c; j += 16) {
        __m512 m = _mm512_loadu_ps(mb + j);
        __m512 xv = Load16(x + i + j);
        __m512 gh = SiluGrad(Load16(g + i + j),
                             _mm512_fmadd_ps(xv, m, _mm512_loadu_ps(ab + j)));
        __m512 out = _mm512_fmadd_ps(
            _mm512_loadu_ps(vb + j), xv,
            _mm512_fmadd_ps(gh, m, _mm512_loadu_ps(ub + j)));
        Store16(dx + i + j, out);
      }
    }
  });
}

#endif  // DRDD_AVX512

// Success where the CPU has AVX-512, x is [B, N, C] with C a multiple of
// 16, g is like x (float32 or bfloat16) and the [B, C] factors are (ok);
// else the error `what`.
ffi::Error Check(ffi::Span<const int64_t> x, const ffi::AnyBuffer& g,
                 std::initializer_list<const ffi::Buffer<ffi::F32>*> factors,
                 bool ok, const char* what) {
  if (!CpuSupported()) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "drdd_gn_silu_*: needs a CPU with AVX-512.");
  }
  ok = ok && x.size() == 3 && x[2] % 16 == 0 &&
       Dims(g.dimensions(), {x[0], x[1], x[2]}) &&
       (IsF32(g) || g.element_type() == ffi::DataType::BF16);
  for (auto* f : factors) ok = ok && Dims(f->dimensions(), {x[0], x[2]});
  return ok ? ffi::Error::Success() : ffi::Error::InvalidArgument(what);
}

ffi::Error SumsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                    ffi::AnyBuffer g, ffi::Buffer<ffi::F32> mul,
                    ffi::Buffer<ffi::F32> add,
                    ffi::ResultBuffer<ffi::F32> sums) {
  auto d = x.dimensions();
  if (auto e = Check(d, g, {&mul, &add},
                     d.size() == 3 &&
                         Dims(sums->dimensions(), {d[0], 2, d[2]}),
                     "drdd_gn_silu_sums: x [B, N, C] bfloat16, g like x "
                     "(float32 or bfloat16), mul, add [B, C], sums "
                     "[B, 2, C]; C a multiple of 16.");
      e.failure()) {
    return e;
  }
#if defined(DRDD_AVX512)
  WithType(g, [&](auto tg) {
    Sums(pool, reinterpret_cast<const bf16*>(x.typed_data()),
         static_cast<const decltype(tg)*>(g.untyped_data()), mul.typed_data(),
         add.typed_data(), d[0], d[1], d[2], sums->typed_data());
  });
#endif
  return ffi::Error::Success();
}

ffi::Error GradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                    ffi::AnyBuffer g, ffi::Buffer<ffi::F32> mul,
                    ffi::Buffer<ffi::F32> add, ffi::Buffer<ffi::F32> u,
                    ffi::Buffer<ffi::F32> v,
                    ffi::ResultBuffer<ffi::BF16> dx) {
  auto d = x.dimensions();
  if (auto e = Check(d, g, {&mul, &add, &u, &v},
                     d.size() == 3 && Dims(dx->dimensions(),
                                           {d[0], d[1], d[2]}),
                     "drdd_gn_silu_grad: x [B, N, C] bfloat16, g like x "
                     "(float32 or bfloat16), mul, add, u, v [B, C], dx like "
                     "x; C a multiple of 16.");
      e.failure()) {
    return e;
  }
#if defined(DRDD_AVX512)
  WithType(g, [&](auto tg) {
    Grad(pool, reinterpret_cast<const bf16*>(x.typed_data()),
         static_cast<const decltype(tg)*>(g.untyped_data()), mul.typed_data(),
         add.typed_data(), u.typed_data(), v.typed_data(), d[0], d[1], d[2],
         reinterpret_cast<bf16*>(dx->typed_data()));
  });
#endif
  return ffi::Error::Success();
}

}  // namespace
}  // namespace drdd

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DrddGroupNormSiluSums, drdd::SumsImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::BF16>>()
        .Arg<ffi::AnyBuffer>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DrddGroupNormSiluGrad, drdd::GradImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::BF16>>()
        .Arg<ffi::AnyBuffer>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::BF16>>());
