// The two softmax products of unet.LinearAttention and their gradients,
// float32, as XLA FFI handlers for x86 CPUs with AVX-512
// (drdd_jax/bf16_conv.py). With qk [B, N, 2W] bfloat16 (the qk projection's
// output: q = qk[..., :W], k = qk[..., W:]), h [B, N, D] float32:
//
//   drdd_la_context:  kh[b, c, d] = sum_n e[b, n, c] h[b, n, d] for d < D,
//                     kh[b, c, D] = sum_n e[b, n, c], with e = exp(k - m),
//                     m[b, c] = max_n k[b, n, c] (also returned);
//   drdd_la_output:   out[b, n, f] = sum_c p[b, n, c] ctx[b, c, f] + bias[f],
//                     p = the softmax of q over each head's `head_dim`
//                     channels times head_dim^-1/2; ctx [B, W, F];
//   drdd_la_output_grad:   given g = d out: dq (bfloat16) and
//                     dctx[b, c, f] = sum_n p[b, n, c] g[b, n, f];
//   drdd_la_context_grad:  given dkh and dq: dqk = [dq, e * (h dkh[:, :D]^T
//                     + dkh[:, D])] (bfloat16) and dh = e dkh[:, :D].
//
// XLA:CPU runs these as several passes over [N, W] float32 arrays (the
// casts, the maxima, the exponentials, the softmax's sums and quotients) and
// products over the pixel axis that it transposes first; here each pixel's
// row of qk is read once per product and p and e are recomputed in cache.
// The sums over the pixels run in fixed groups of pixel blocks, added in
// order: the same bits on every call.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace drdd {
namespace {

constexpr int kRows = 6;  // output: pixels per tile

#if defined(DRDD_AVX512)

// acc[r, 16 j + i] (ld floats per row r < 4) += sum_{p < np} e[p w + r]
// h[p d + 16 j + i], j < NJ.
template <int NJ>
DRDD_AVX512 void ContextTileN(const float* e, int64_t w, const float* h,
                                 int64_t d, int64_t np, float* acc,
                                 int64_t ld) {
  __m512 a[4][NJ];
  for (int r = 0; r < 4; ++r) {
    for (int j = 0; j < NJ; ++j) {
      a[r][j] = _mm512_loadu_ps(acc + r * ld + 16 * j);
    }
  }
  int64_t p = 0;  // np >= 1: a do-while, as in bf16_conv.cc's Tile
  do {
    __m512 hv[NJ];
    for (int j = 0; j < NJ; ++j) hv[j] = _mm512_loadu_ps(h + p * d + 16 * j);
    for (int r = 0; r < 4; ++r) {
      __m512 ev = _mm512_set1_ps(e[p * w + r]);
      for (int j = 0; j < NJ; ++j) {
        a[r][j] = _mm512_fmadd_ps(ev, hv[j], a[r][j]);
      }
    }
  } while (++p < np);
  for (int r = 0; r < 4; ++r) {
    for (int j = 0; j < NJ; ++j) {
      _mm512_storeu_ps(acc + r * ld + 16 * j, a[r][j]);
    }
  }
}

DRDD_AVX512 void ContextTile(int nj, const float* e, int64_t w,
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
DRDD_AVX512 void OutputTileN(const float* prob, int64_t w, const float* ctx,
                                int64_t f, const float* bias, float* out,
                                int rows) {
  __m512 a[kRows][NJ];
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < NJ; ++j) a[r][j] = _mm512_loadu_ps(bias + 16 * j);
  }
  int64_t c = 0;  // w >= 16
  do {
    __m512 cv[NJ];
    for (int j = 0; j < NJ; ++j) cv[j] = _mm512_loadu_ps(ctx + c * f + 16 * j);
    for (int r = 0; r < kRows; ++r) {
      __m512 pv = _mm512_set1_ps(prob[r * w + c]);
      for (int j = 0; j < NJ; ++j) {
        a[r][j] = _mm512_fmadd_ps(pv, cv[j], a[r][j]);
      }
    }
  } while (++c < w);
  for (int r = 0; r < kRows; ++r) {
    if (r >= rows) break;
    for (int j = 0; j < NJ; ++j) {
      _mm512_storeu_ps(out + r * f + 16 * j, a[r][j]);
    }
  }
}

DRDD_AVX512 void OutputTile(int nj, const float* prob, int64_t w,
                               const float* ctx, int64_t f, const float* bias,
                               float* out, int rows) {
  switch (nj) {
    case 1: return OutputTileN<1>(prob, w, ctx, f, bias, out, rows);
    case 2: return OutputTileN<2>(prob, w, ctx, f, bias, out, rows);
    case 3: return OutputTileN<3>(prob, w, ctx, f, bias, out, rows);
    default: return OutputTileN<4>(prob, w, ctx, f, bias, out, rows);
  }
}

// out [rows, cols] (cols floats per row) = a [kRows, inner] (inner floats
// per row; rows past `rows` read, not stored) times b [inner, cols] + bias.
DRDD_AVX512 void RowsTimes(const float* a, int64_t inner, const float* b,
                              int64_t cols, const float* bias, float* out,
                              int rows) {
  for (int64_t j0 = 0; j0 < cols / 16; j0 += 4) {
    OutputTile(static_cast<int>(std::min<int64_t>(4, cols / 16 - j0)), a,
               inner, b + 16 * j0, cols, bias + 16 * j0, out + 16 * j0, rows);
  }
}

// acc [w, cols] (ld floats per row) += e^T h over np pixels: e [np, w], h
// [np, cols] (cols floats per row).
DRDD_AVX512 void TransposeTimes(const float* e, int64_t w, const float* h,
                                   int64_t cols, int64_t np, float* acc,
                                   int64_t ld) {
  for (int64_t c = 0; c < w; c += 4) {
    for (int64_t j0 = 0; j0 < cols / 16; j0 += 4) {
      ContextTile(static_cast<int>(std::min<int64_t>(4, cols / 16 - j0)),
                  e + c, w, h + 16 * j0, cols, np, acc + c * ld + 16 * j0, ld);
    }
  }
}

// The kRows rows of src (ld floats apart) from row 0, or, with fewer rows
// left, their copy in pad followed by zero rows.
const float* PaddedRows(const float* src, int64_t ld, int rows, float* pad) {
  if (rows == kRows) return src;
  std::memset(pad, 0, kRows * ld * sizeof(float));
  std::memcpy(pad, src, rows * ld * sizeof(float));
  return pad;
}

// m[c] = max over pixels [lo, hi) of k[p, c] (rows 2 w apart).
DRDD_AVX512 void ColumnMaxima(const bf16* k, int64_t w, int64_t lo,
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
DRDD_AVX512 void ContextSums(const bf16* k, const float* h, const float* m,
                                int64_t w, int64_t d, int64_t lo, int64_t hi,
                                float* e, float* acc) {
  const int64_t ld = d + 1;
  std::memset(acc, 0, w * ld * sizeof(float));
  for (int64_t p0 = lo; p0 < hi; p0 += kBlock) {
    const int64_t np = std::min(kBlock, hi - p0);
    for (int64_t j = 0; j < w / 16; ++j) {
      __m512 mj = _mm512_loadu_ps(m + 16 * j);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t p = 0; p < np; ++p) {
        __m512 v =
            Exp(_mm512_sub_ps(Load16(k + (p0 + p) * 2 * w + 16 * j), mj));
        _mm512_storeu_ps(e + p * w + 16 * j, v);
        sum = _mm512_add_ps(sum, v);
      }
      alignas(64) float s[16];
      _mm512_store_ps(s, sum);
      for (int i = 0; i < 16; ++i) acc[(16 * j + i) * ld + d] += s[i];
    }
    TransposeTimes(e, w, h + p0 * d, d, np, acc, ld);  // acc[:, :d]
  }
}

// Per example: the keys' column maxima m, then kh's sums over fixed groups
// of pixel blocks, each into its own [w, d + 1] partial, added in order.
void Context(ffi::ThreadPool& pool, const bf16* qk, const float* h,
             int64_t batch, int64_t n, int64_t w, int64_t d, float* kh,
             float* m_out) {
  const int64_t groups = SumGroups(pool, n), ld = d + 1;
  auto maxima = Scratch<float>(groups * w);
  auto partial = Scratch<float>(groups * w * ld);
  auto e_buf = Scratch<float>(groups * kBlock * w);
  for (int64_t b = 0; b < batch; ++b) {
    const bf16* k = qk + b * n * 2 * w + w;
    const float* hb = h + b * n * d;
    auto lo = [&](int64_t g) { return GroupStart(g, groups, n); };
    auto hi = [&](int64_t g) { return GroupStart(g + 1, groups, n); };
    ParallelFor(pool, groups, [&](int64_t g) {
      ColumnMaxima(k, w, lo(g), hi(g), maxima.get() + g * w);
    });
    float* m = m_out + b * w;
    std::fill(m, m + w, -INFINITY);
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t c = 0; c < w; ++c) m[c] = std::max(m[c], maxima[g * w + c]);
    }
    ParallelFor(pool, groups, [&](int64_t g) {
      ContextSums(k, hb, m, w, d, lo(g), hi(g), e_buf.get() + g * kBlock * w,
                  partial.get() + g * w * ld);
    });
    AddInOrder(partial.get(), groups, w * ld, kh + b * w * ld);
  }
}

// prob[c] for c < w = the softmax of q (bfloat16) over each head's
// head_dim channels, times scale.
DRDD_AVX512 void HeadSoftmax(const bf16* q, int64_t w, int64_t head_dim,
                                float scale, float* prob) {
  const int64_t hv = head_dim / 16;
  for (int64_t h0 = 0; h0 < w; h0 += head_dim) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < hv; ++j) {
      m = _mm512_max_ps(m, Load16(q + h0 + 16 * j));
    }
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
      RowsTimes(prob.data(), w, ctx + b * w * f, f, bias,
                out + (b * n + p0) * f, rows);
    }
  });
}

// One block of np pixels of one example for drdd_la_output_grad: per tile,
// p (into pb, kBlock x w), dp = g ctx^T (ctx_t [f, w]) and dq; then
// acc [w, f] += p^T g.
DRDD_AVX512 void OutputGradBlock(const bf16* qk, const float* g,
                                    const float* ctx_t, const float* zeros,
                                    int64_t np, int64_t w, int64_t f,
                                    int64_t head_dim, float scale, float* pb,
                                    float* dp, float* pad, bf16* dq,
                                    float* acc) {
  for (int64_t t = 0; t < np; t += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, np - t));
    for (int r = 0; r < rows; ++r) {
      HeadSoftmax(qk + (t + r) * 2 * w, w, head_dim, scale, pb + (t + r) * w);
    }
    RowsTimes(PaddedRows(g + t * f, f, rows, pad), f, ctx_t, w, zeros, dp,
              rows);
    // dq = p (dp - sum over the head of p dp / scale): the softmax's
    // gradient, p being scale times the softmax.
    for (int r = 0; r < rows; ++r) {
      const float* pr = pb + (t + r) * w;
      for (int64_t h0 = 0; h0 < w; h0 += head_dim) {
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = h0; j < h0 + head_dim; j += 16) {
          sum = _mm512_fmadd_ps(_mm512_loadu_ps(pr + j),
                                _mm512_loadu_ps(dp + r * w + j), sum);
        }
        __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / scale);
        for (int64_t j = h0; j < h0 + head_dim; j += 16) {
          Store16(dq + (t + r) * w + j,
                  _mm512_mul_ps(_mm512_loadu_ps(pr + j),
                                _mm512_sub_ps(_mm512_loadu_ps(dp + r * w + j),
                                              dot)));
        }
      }
    }
  }
  TransposeTimes(pb, w, g, f, np, acc, f);
}

void OutputGrad(ffi::ThreadPool& pool, const bf16* qk, const float* g,
                const float* ctx, int64_t batch, int64_t n, int64_t w,
                int64_t f, int64_t head_dim, bf16* dq, float* dctx) {
  const int64_t groups = SumGroups(pool, n);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const int64_t scratch = kBlock * w + kRows * w + kRows * f;
  auto partial = Scratch<float>(groups * w * f);
  auto buf = Scratch<float>(groups * scratch);
  std::vector<float> ctx_t(f * w), zeros(w, 0.0f);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t c = 0; c < w; ++c) {
      for (int64_t j = 0; j < f; ++j) {
        ctx_t[j * w + c] = ctx[(b * w + c) * f + j];
      }
    }
    ParallelFor(pool, groups, [&](int64_t gr) {
      float* acc = partial.get() + gr * w * f;
      float* pb = buf.get() + gr * scratch;
      std::memset(acc, 0, w * f * sizeof(float));
      const int64_t hi = GroupStart(gr + 1, groups, n);
      for (int64_t p0 = GroupStart(gr, groups, n); p0 < hi; p0 += kBlock) {
        const int64_t row = b * n + p0;
        OutputGradBlock(qk + row * 2 * w, g + row * f, ctx_t.data(),
                        zeros.data(), std::min(kBlock, hi - p0), w, f,
                        head_dim, scale, pb, pb + kBlock * w,
                        pb + kBlock * w + kRows * w, dq + row * w, acc);
      }
    });
    AddInOrder(partial.get(), groups, w * f, dctx + b * w * f);
  }
}

// One tile of `rows` pixels of one example for drdd_la_context_grad: e, de
// = h dkh[:, :d]^T + dkh[:, d] (dkh_t [d, w], col [w]), dqk = [dq, e de],
// dh = e dkh[:, :d] (dkh_c [w, d]).
DRDD_AVX512 void ContextGradTile(const bf16* qk, const float* h,
                                    const float* m, const float* dkh_t,
                                    const float* col, const float* dkh_c,
                                    const float* zeros, const bf16* dq,
                                    int rows, int64_t w, int64_t d, float* e,
                                    float* de, float* pad, bf16* dqk,
                                    float* dh) {
  RowsTimes(PaddedRows(h, d, rows, pad), d, dkh_t, w, col, de, rows);
  for (int r = 0; r < rows; ++r) {
    const bf16* k = qk + r * 2 * w + w;
    bf16* out = dqk + r * 2 * w;
    std::memcpy(out, dq + r * w, w * sizeof(bf16));
    for (int64_t j = 0; j < w; j += 16) {
      __m512 v = Exp(_mm512_sub_ps(Load16(k + j), _mm512_loadu_ps(m + j)));
      _mm512_storeu_ps(e + r * w + j, v);
      Store16(out + w + j, _mm512_mul_ps(v, _mm512_loadu_ps(de + r * w + j)));
    }
  }
  if (rows < kRows) {
    std::memset(e + rows * w, 0, (kRows - rows) * w * sizeof(float));
  }
  RowsTimes(e, w, dkh_c, d, zeros, dh, rows);
}

void ContextGrad(ffi::ThreadPool& pool, const bf16* qk, const float* h,
                 const float* m, const float* dkh, const bf16* dq,
                 int64_t batch, int64_t n, int64_t w, int64_t d, bf16* dqk,
                 float* dh) {
  const int64_t tiles = CeilDiv(n, kRows), per_task = 8;
  const int64_t tasks = CeilDiv(tiles, per_task), ld = d + 1;
  std::vector<float> dkh_t(batch * d * w), col(batch * w), dkh_c(batch * w * d);
  std::vector<float> zeros(d, 0.0f);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t c = 0; c < w; ++c) {
      const float* src = dkh + (b * w + c) * ld;
      col[b * w + c] = src[d];
      for (int64_t j = 0; j < d; ++j) {
        dkh_t[(b * d + j) * w + c] = src[j];
        dkh_c[(b * w + c) * d + j] = src[j];
      }
    }
  }
  ParallelFor(pool, batch * tasks, [&](int64_t task) {
    const int64_t b = task / tasks, t0 = task % tasks * per_task;
    std::vector<float> buf(2 * kRows * w + kRows * d);
    for (int64_t t = t0; t < std::min(tiles, t0 + per_task); ++t) {
      const int64_t row = b * n + t * kRows;
      ContextGradTile(qk + row * 2 * w, h + row * d, m + b * w,
                      dkh_t.data() + b * d * w, col.data() + b * w,
                      dkh_c.data() + b * w * d, zeros.data(), dq + row * w,
                      static_cast<int>(std::min<int64_t>(kRows, n - t * kRows)),
                      w, d, buf.data(), buf.data() + kRows * w,
                      buf.data() + 2 * kRows * w, dqk + row * 2 * w,
                      dh + row * d);
    }
  });
}

#endif  // DRDD_AVX512

// Success where the CPU has AVX-512, qk is [B, N, 2W] with W a multiple of
// 16 and the other shapes are right (ok); else the error `what`.
ffi::Error Check(ffi::Span<const int64_t> qk, bool ok, const char* what) {
  if (!CpuSupported()) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "drdd_la_*: needs a CPU with AVX-512.");
  }
  if (qk.size() != 3 || qk[2] % 32 || !ok) {
    return ffi::Error::InvalidArgument(what);
  }
  return ffi::Error::Success();
}

ffi::Error ContextImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> qk,
                       ffi::Buffer<ffi::F32> h, ffi::ResultBuffer<ffi::F32> kh,
                       ffi::ResultBuffer<ffi::F32> m) {
  auto q = qk.dimensions(), hd = h.dimensions();
  if (auto e = Check(q, hd.size() == 3 && hd[2] % 16 == 0 &&
                            Dims(hd, {q[0], q[1], hd[2]}) &&
                            Dims(kh->dimensions(),
                                 {q[0], q[2] / 2, hd[2] + 1}) &&
                            Dims(m->dimensions(), {q[0], q[2] / 2}),
                     "drdd_la_context: qk [B, N, 2W], h [B, N, D], kh "
                     "[B, W, D + 1], m [B, W]; W, D multiples of 16.");
      e.failure()) {
    return e;
  }
#if defined(DRDD_AVX512)
  Context(pool, reinterpret_cast<const bf16*>(qk.typed_data()), h.typed_data(),
          q[0], q[1], q[2] / 2, hd[2], kh->typed_data(), m->typed_data());
#endif
  return ffi::Error::Success();
}

bool HeadsFit(ffi::Span<const int64_t> q, int64_t head_dim) {
  return head_dim >= 16 && head_dim % 16 == 0 && (q[2] / 2) % head_dim == 0;
}

ffi::Error OutputImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> qk,
                      ffi::Buffer<ffi::F32> ctx, ffi::Buffer<ffi::F32> bias,
                      ffi::ResultBuffer<ffi::F32> out, int64_t head_dim) {
  auto q = qk.dimensions(), cd = ctx.dimensions();
  if (auto e = Check(q, cd.size() == 3 && cd[2] % 16 == 0 &&
                            HeadsFit(q, head_dim) &&
                            Dims(cd, {q[0], q[2] / 2, cd[2]}) &&
                            Dims(bias.dimensions(), {cd[2]}) &&
                            Dims(out->dimensions(), {q[0], q[1], cd[2]}),
                     "drdd_la_output: qk [B, N, 2W], ctx [B, W, F], bias [F], "
                     "out [B, N, F]; heads of a multiple of 16 channels, F a "
                     "multiple of 16.");
      e.failure()) {
    return e;
  }
#if defined(DRDD_AVX512)
  Output(pool, reinterpret_cast<const bf16*>(qk.typed_data()),
         ctx.typed_data(), bias.typed_data(), q[0], q[1], q[2] / 2, cd[2],
         head_dim, out->typed_data());
#endif
  return ffi::Error::Success();
}

ffi::Error OutputGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> qk,
                          ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> ctx,
                          ffi::ResultBuffer<ffi::BF16> dq,
                          ffi::ResultBuffer<ffi::F32> dctx, int64_t head_dim) {
  auto q = qk.dimensions(), cd = ctx.dimensions();
  if (auto e = Check(q, cd.size() == 3 && cd[2] % 16 == 0 &&
                            HeadsFit(q, head_dim) &&
                            Dims(cd, {q[0], q[2] / 2, cd[2]}) &&
                            Dims(g.dimensions(), {q[0], q[1], cd[2]}) &&
                            Dims(dq->dimensions(), {q[0], q[1], q[2] / 2}) &&
                            Dims(dctx->dimensions(), {q[0], q[2] / 2, cd[2]}),
                     "drdd_la_output_grad: qk [B, N, 2W], g [B, N, F], ctx "
                     "[B, W, F], dq [B, N, W], dctx [B, W, F].");
      e.failure()) {
    return e;
  }
#if defined(DRDD_AVX512)
  OutputGrad(pool, reinterpret_cast<const bf16*>(qk.typed_data()),
             g.typed_data(), ctx.typed_data(), q[0], q[1], q[2] / 2, cd[2],
             head_dim, reinterpret_cast<bf16*>(dq->typed_data()),
             dctx->typed_data());
#endif
  return ffi::Error::Success();
}

ffi::Error ContextGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> qk,
                           ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> m,
                           ffi::Buffer<ffi::F32> dkh,
                           ffi::Buffer<ffi::BF16> dq,
                           ffi::ResultBuffer<ffi::BF16> dqk,
                           ffi::ResultBuffer<ffi::F32> dh) {
  auto q = qk.dimensions(), hd = h.dimensions();
  const int64_t w = q.size() == 3 ? q[2] / 2 : 0;
  if (auto e = Check(q, hd.size() == 3 && hd[2] % 16 == 0 &&
                            Dims(hd, {q[0], q[1], hd[2]}) &&
                            Dims(m.dimensions(), {q[0], w}) &&
                            Dims(dkh.dimensions(), {q[0], w, hd[2] + 1}) &&
                            Dims(dq.dimensions(), {q[0], q[1], w}) &&
                            Dims(dqk->dimensions(), {q[0], q[1], 2 * w}) &&
                            Dims(dh->dimensions(), {q[0], q[1], hd[2]}),
                     "drdd_la_context_grad: qk [B, N, 2W], h [B, N, D], m "
                     "[B, W], dkh [B, W, D + 1], dq [B, N, W], dqk "
                     "[B, N, 2W], dh [B, N, D].");
      e.failure()) {
    return e;
  }
#if defined(DRDD_AVX512)
  ContextGrad(pool, reinterpret_cast<const bf16*>(qk.typed_data()),
              h.typed_data(), m.typed_data(), dkh.typed_data(),
              reinterpret_cast<const bf16*>(dq.typed_data()), q[0], q[1], w,
              hd[2], reinterpret_cast<bf16*>(dqk->typed_data()),
              dh->typed_data());
#endif
  return ffi::Error::Success();
}

}  // namespace
}  // namespace drdd

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DrddLinearAttentionContext, drdd::ContextImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::BF16>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DrddLinearAttentionOutput, drdd::OutputImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::BF16>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Attr<int64_t>("head_dim"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DrddLinearAttentionOutputGrad, drdd::OutputGradImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::BF16>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::BF16>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Attr<int64_t>("head_dim"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DrddLinearAttentionContextGrad, drdd::ContextGradImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::BF16>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::BF16>>()
        .Ret<ffi::Buffer<ffi::BF16>>()
        .Ret<ffi::Buffer<ffi::F32>>());
