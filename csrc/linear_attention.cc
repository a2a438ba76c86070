// The two softmax products of unet.LinearAttention, float32, as XLA FFI
// handlers for x86 CPUs with AVX-512 (drdd_jax/bf16_conv.py), used where the
// network is evaluated without a gradient (the sampler). With qk [B, N, 2W]
// bfloat16 (the qk projection's output: q = qk[..., :W], k = qk[..., W:]):
//
//   drdd_la_context: kh[b, c, d] = sum_n exp(k[b, n, c] - m[b, c]) h[b, n, d]
//                    for d < D, kh[b, c, D] = sum_n exp(k[b, n, c] - m[b, c]),
//                    m[b, c] = max_n k[b, n, c]; h [B, N, D] float32.
//   drdd_la_output:  out[b, n, f] = sum_c p[b, n, c] ctx[b, c, f] + bias[f],
//                    p = softmax of q over each head's `head_dim` channels,
//                    times head_dim^-1/2; ctx [B, W, F], bias [F], float32.
//
// XLA:CPU runs these as several passes over [N, W] float32 arrays (the
// casts, the maxima, the exponentials, the softmax's sums and quotients) and
// a product over the pixel axis that it transposes first; here each pixel's
// row of qk is read once per product and its exponentials stay in cache.
// The sums over the pixels run in fixed groups of pixel blocks, added in
// order: the same bits on every call.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define DRDD_LA_TARGET __attribute__((target("avx512f")))
#endif

namespace ffi = xla::ffi;

namespace {

using bf16 = uint16_t;
using drdd::CeilDiv;
using drdd::ParallelFor;
using drdd::Scratch;
using drdd::Workers;

constexpr int64_t kBlock = 64;  // pixels per block of the context's sums
constexpr int kRows = 6;        // output: pixels per tile

#if defined(DRDD_LA_TARGET)

// 16 bfloat16 values as float32.
DRDD_LA_TARGET __m512 Load16(const bf16* p) {
  __m512i wide = _mm512_cvtepu16_epi32(
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// exp(x) for x <= 0 (shifted logits), within 2 ulp; 0 below -87.
DRDD_LA_TARGET __m512 Exp(__m512 x) {
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
  for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kCoef[i]));
  return _mm512_scalef_ps(p, n);
}

// acc[r, 16 j + i] (ld floats per row r < 4) += sum_{p < np} e[p w + r]
// h[p d + 16 j + i], j < NJ.
template <int NJ>
DRDD_LA_TARGET void ContextTileN(const float* e, int64_t w, const float* h,
                                 int64_t d, int64_t np, float* acc,
                                 int64_t ld) {
  __m512 a[4][NJ];
  for (int r = 0; r < 4; ++r) {
    for (int j = 0; j < NJ; ++j) a[r][j] = _mm512_loadu_ps(acc + r * ld + 16 * j);
  }
  for (int64_t p = 0; p < np; ++p) {
    __m512 hv[NJ];
    for (int j = 0; j < NJ; ++j) hv[j] = _mm512_loadu_ps(h + p * d + 16 * j);
    for (int r = 0; r < 4; ++r) {
      __m512 ev = _mm512_set1_ps(e[p * w + r]);
      for (int j = 0; j < NJ; ++j) a[r][j] = _mm512_fmadd_ps(ev, hv[j], a[r][j]);
    }
  }
  for (int r = 0; r < 4; ++r) {
    for (int j = 0; j < NJ; ++j) _mm512_storeu_ps(acc + r * ld + 16 * j, a[r][j]);
  }
}

DRDD_LA_TARGET void ContextTile(int nj, const float* e, int64_t w,
                                const float* h, int64_t d, int64_t np,
                                float* acc, int64_t ld) {
  switch (nj) {
    case 1: return ContextTileN<1>(e, w, h, d, np, acc, ld);
    case 2: return ContextTileN<2>(e, w, h, d, np, acc, ld);
    case 3: return ContextTileN<3>(e, w, h, d, np, acc, ld);
    default: return ContextTileN<4>(e, w, h, d, np, acc, ld);
  }
}

// out[r, 16 j + i] (f floats per row, r < rows) = bias[16 j + i] + sum_c
// prob[r w + c] ctx[c f + 16 j + i], j < NJ.
template <int NJ>
DRDD_LA_TARGET void OutputTileN(const float* prob, int64_t w, const float* ctx,
                                int64_t f, const float* bias, float* out,
                                int rows) {
  __m512 a[kRows][NJ];
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < NJ; ++j) a[r][j] = _mm512_loadu_ps(bias + 16 * j);
  }
  for (int64_t c = 0; c < w; ++c) {
    __m512 cv[NJ];
    for (int j = 0; j < NJ; ++j) cv[j] = _mm512_loadu_ps(ctx + c * f + 16 * j);
    for (int r = 0; r < kRows; ++r) {
      __m512 pv = _mm512_set1_ps(prob[r * w + c]);
      for (int j = 0; j < NJ; ++j) a[r][j] = _mm512_fmadd_ps(pv, cv[j], a[r][j]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    if (r >= rows) break;
    for (int j = 0; j < NJ; ++j) _mm512_storeu_ps(out + r * f + 16 * j, a[r][j]);
  }
}

DRDD_LA_TARGET void OutputTile(int nj, const float* prob, int64_t w,
                               const float* ctx, int64_t f, const float* bias,
                               float* out, int rows) {
  switch (nj) {
    case 1: return OutputTileN<1>(prob, w, ctx, f, bias, out, rows);
    case 2: return OutputTileN<2>(prob, w, ctx, f, bias, out, rows);
    case 3: return OutputTileN<3>(prob, w, ctx, f, bias, out, rows);
    default: return OutputTileN<4>(prob, w, ctx, f, bias, out, rows);
  }
}

bool CpuSupported() { return __builtin_cpu_supports("avx512f"); }

// m[c] = max over pixels [lo, hi) of k[p, c] (rows 2 w apart).
DRDD_LA_TARGET void ColumnMaxima(const bf16* k, int64_t w, int64_t lo,
                                 int64_t hi, float* m) {
  for (int64_t j = 0; j < w / 16; ++j) {
    __m512 v = _mm512_set1_ps(-INFINITY);
    for (int64_t p = lo; p < hi; ++p) {
      v = _mm512_max_ps(v, Load16(k + p * 2 * w + 16 * j));
    }
    _mm512_storeu_ps(m + 16 * j, v);
  }
}

// acc [w, d + 1] = the sums of kh over pixels [lo, hi), block by block: e
// (kBlock x w scratch) = exp(k - m), its column sums into column d, then e^T h.
DRDD_LA_TARGET void ContextSums(const bf16* k, const float* h, const float* m,
                                int64_t w, int64_t d, int64_t lo, int64_t hi,
                                float* e, float* acc) {
  const int64_t ld = d + 1, dv = d / 16;
  std::memset(acc, 0, w * ld * sizeof(float));
  for (int64_t p0 = lo; p0 < hi; p0 += kBlock) {
    const int64_t np = std::min(kBlock, hi - p0);
    for (int64_t j = 0; j < w / 16; ++j) {
      __m512 mj = _mm512_loadu_ps(m + 16 * j);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t p = 0; p < np; ++p) {
        __m512 v = Exp(_mm512_sub_ps(Load16(k + (p0 + p) * 2 * w + 16 * j), mj));
        _mm512_storeu_ps(e + p * w + 16 * j, v);
        sum = _mm512_add_ps(sum, v);
      }
      alignas(64) float s[16];
      _mm512_store_ps(s, sum);
      for (int i = 0; i < 16; ++i) acc[(16 * j + i) * ld + d] += s[i];
    }
    // acc[c, :d] += sum_p e[p, c] h[p, :], four channels at a time.
    for (int64_t c = 0; c < w; c += 4) {
      for (int64_t j0 = 0; j0 < dv; j0 += 4) {
        ContextTile(static_cast<int>(std::min<int64_t>(4, dv - j0)), e + c, w,
                    h + p0 * d + 16 * j0, d, np, acc + c * ld + 16 * j0, ld);
      }
    }
  }
}

// Per example: the keys' column maxima, then kh's sums over fixed groups of
// pixel blocks, each into its own [w, d + 1] partial, added in order.
void Context(ffi::ThreadPool& pool, const bf16* qk, const float* h,
             int64_t batch, int64_t n, int64_t w, int64_t d, float* kh) {
  const int64_t blocks = CeilDiv(n, kBlock);
  const int64_t groups = std::min(blocks, 2 * Workers(pool, blocks));
  const int64_t ld = d + 1;
  auto maxima = Scratch<float>(groups * w);
  auto partial = Scratch<float>(groups * w * ld);
  auto e_buf = Scratch<float>(groups * kBlock * w);
  std::vector<float> m(w);
  for (int64_t b = 0; b < batch; ++b) {
    const bf16* k = qk + b * n * 2 * w + w;
    const float* hb = h + b * n * d;
    auto lo = [&](int64_t g) { return g * blocks / groups * kBlock; };
    auto hi = [&](int64_t g) { return std::min(n, lo(g + 1)); };
    ParallelFor(pool, groups, [&](int64_t g) {
      ColumnMaxima(k, w, lo(g), hi(g), maxima.get() + g * w);
    });
    std::fill(m.begin(), m.end(), -INFINITY);
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t c = 0; c < w; ++c) m[c] = std::max(m[c], maxima[g * w + c]);
    }
    ParallelFor(pool, groups, [&](int64_t g) {
      ContextSums(k, hb, m.data(), w, d, lo(g), hi(g),
                  e_buf.get() + g * kBlock * w, partial.get() + g * w * ld);
    });
    float* out = kh + b * w * ld;
    std::memcpy(out, partial.get(), w * ld * sizeof(float));
    for (int64_t g = 1; g < groups; ++g) {
      const float* part = partial.get() + g * w * ld;
      for (int64_t i = 0; i < w * ld; ++i) out[i] += part[i];
    }
  }
}

// prob[c] for c < w = the softmax of q (bfloat16) over each head's
// head_dim channels, times scale.
DRDD_LA_TARGET void HeadSoftmax(const bf16* q, int64_t w, int64_t head_dim,
                                float scale, float* prob) {
  const int64_t hv = head_dim / 16;
  for (int64_t h0 = 0; h0 < w; h0 += head_dim) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < hv; ++j) m = _mm512_max_ps(m, Load16(q + h0 + 16 * j));
    m = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < hv; ++j) {
      __m512 v = Exp(_mm512_sub_ps(Load16(q + h0 + 16 * j), m));
      _mm512_storeu_ps(prob + h0 + 16 * j, v);
      sum = _mm512_add_ps(sum, v);
    }
    __m512 s = _mm512_set1_ps(scale / _mm512_reduce_add_ps(sum));
    for (int64_t j = 0; j < hv; ++j) {
      float* pv = prob + h0 + 16 * j;
      _mm512_storeu_ps(pv, _mm512_mul_ps(_mm512_loadu_ps(pv), s));
    }
  }
}

// Tiles of kRows pixels, 8 per task: prob = the heads' softmax of q, then
// out = prob ctx + bias.
void Output(ffi::ThreadPool& pool, const bf16* qk, const float* ctx,
            const float* bias, int64_t batch, int64_t n, int64_t w, int64_t f,
            int64_t head_dim, float* out) {
  const int64_t tiles = CeilDiv(n, kRows), per_task = 8;
  const int64_t tasks = CeilDiv(tiles, per_task);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  ParallelFor(pool, batch * tasks, [&](int64_t task) {
    const int64_t b = task / tasks, t0 = task % tasks * per_task;
    // Rows past the last pixel stay zero: the tile computes them unstored.
    std::vector<float> prob(kRows * w, 0.0f);
    for (int64_t t = t0; t < std::min(tiles, t0 + per_task); ++t) {
      const int64_t p0 = t * kRows;
      const int rows = static_cast<int>(std::min<int64_t>(kRows, n - p0));
      for (int r = 0; r < rows; ++r) {
        HeadSoftmax(qk + (b * n + p0 + r) * 2 * w, w, head_dim, scale,
                    prob.data() + r * w);
      }
      for (int64_t j0 = 0; j0 < f / 16; j0 += 4) {
        OutputTile(static_cast<int>(std::min<int64_t>(4, f / 16 - j0)),
                   prob.data(), w, ctx + b * w * f + 16 * j0, f,
                   bias + 16 * j0, out + (b * n + p0) * f + 16 * j0, rows);
      }
    }
  });
}

#else

bool CpuSupported() { return false; }

#endif  // DRDD_LA_TARGET

ffi::Error Unsupported(const char* what) {
  return ffi::Error::InvalidArgument(what);
}

ffi::Error ContextImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> qk,
                       ffi::Buffer<ffi::F32> h,
                       ffi::ResultBuffer<ffi::F32> kh) {
  auto qd = qk.dimensions(), hd = h.dimensions(), kd = kh->dimensions();
  if (!CpuSupported()) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "drdd_la_context needs a CPU with AVX-512.");
  }
  if (qd.size() != 3 || hd.size() != 3 || kd.size() != 3 || qd[2] % 32 ||
      hd[2] % 16 || hd[0] != qd[0] || hd[1] != qd[1] || kd[0] != qd[0] ||
      kd[1] != qd[2] / 2 || kd[2] != hd[2] + 1) {
    return Unsupported(
        "drdd_la_context: qk [B, N, 2W], h [B, N, D], kh [B, W, D + 1] with "
        "W and D multiples of 16.");
  }
#if defined(DRDD_LA_TARGET)
  Context(pool, reinterpret_cast<const bf16*>(qk.typed_data()), h.typed_data(),
          qd[0], qd[1], qd[2] / 2, hd[2], kh->typed_data());
#endif
  return ffi::Error::Success();
}

ffi::Error OutputImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> qk,
                      ffi::Buffer<ffi::F32> ctx, ffi::Buffer<ffi::F32> bias,
                      ffi::ResultBuffer<ffi::F32> out, int64_t head_dim) {
  auto qd = qk.dimensions(), cd = ctx.dimensions(), od = out->dimensions();
  if (!CpuSupported()) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "drdd_la_output needs a CPU with AVX-512.");
  }
  if (qd.size() != 3 || cd.size() != 3 || od.size() != 3 ||
      bias.dimensions().size() != 1 || head_dim % 16 || head_dim < 16 ||
      (qd[2] / 2) % head_dim || qd[2] % 2 || cd[0] != qd[0] ||
      cd[1] != qd[2] / 2 || cd[2] % 16 || bias.dimensions()[0] != cd[2] ||
      od[0] != qd[0] || od[1] != qd[1] || od[2] != cd[2]) {
    return Unsupported(
        "drdd_la_output: qk [B, N, 2W], ctx [B, W, F], bias [F], out "
        "[B, N, F] with heads of a multiple of 16 channels, F a multiple of "
        "16.");
  }
#if defined(DRDD_LA_TARGET)
  Output(pool, reinterpret_cast<const bf16*>(qk.typed_data()),
         ctx.typed_data(), bias.typed_data(), qd[0], qd[1], qd[2] / 2, cd[2],
         head_dim, out->typed_data());
#endif
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DrddLinearAttentionContext, ContextImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DrddLinearAttentionOutput, OutputImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("head_dim"));
