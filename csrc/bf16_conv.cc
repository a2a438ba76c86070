// Convolutions with bfloat16 products for x86 CPUs with AVX512-BF16, as XLA
// FFI handlers (drdd_jax/bf16_conv.py).
//
// XLA:CPU computes bfloat16 convolutions by converting them to float32: no
// faster than float32 (docs/performance.md). VDPBF16PS multiplies 32 pairs
// of bfloat16 and adds them into 16 float32 lanes, twice the float32 FMA's
// arithmetic per instruction. Two handlers, both NHWC, stride 1, with
// `xpad` = x with pad_top/pad_bottom zero rows and pad_left/pad_right zero
// columns, operands rounded to bfloat16 (float32 or bfloat16 in), sums in
// float32:
//
//   drdd_bf16_conv:        y[b, i, j, o]  = sum_{a, c, k} xpad[b, i + a, j + c, k] * w[a, c, k, o]
//                          (float32 or bfloat16 out; with transpose_kernel,
//                          w[kh - 1 - a, kw - 1 - c, o, k]: the input gradient)
//   drdd_bf16_conv_wgrad:  dw[a, c, k, o] = sum_{b, i, j} xpad[b, i + a, j + c, k] * g[b, i, j, o]
//                          (float32 out)
//
// Both are one matrix product out[m, n] = sum_q A[m, q] B[q, n] computed in
// tiles of up to kRows x kCols float32 accumulators (Tile), where q runs over
// pairs of the contracted axis (one 32-bit word of A, broadcast to all
// lanes, against a packed pair-interleaved row of B). The convolution's m is
// the output pixel and q = (tap, channel pair): A is read in place from the
// padded bfloat16 input. The weight gradient's m is (tap, input channel) and
// q = (b, i, pair of columns j): A comes from a copy of xpad whose every word
// holds a pixel's channel with the same channel of its right neighbour.
// Where dw is small and the images large (the network's high resolutions),
// the weight gradient is split over q: each task packs A and B for its own
// block of output rows (they stay in cache; x and gy are read once) and sums
// into its group's copy of dw (fixed groups of consecutive blocks, added in
// order at the end); elsewhere it is split over dw's rows, from A and B
// packed for all of q. Every sum runs in an order fixed by the shapes and
// the pool's size, not by which thread took which task: a call returns the
// same bits every time.
// On CPUs with AMX (AmxSupported()), products whose contracted channels
// come in multiples of 32 run on AMX tiles instead (AmxConv, AmxWeightGrad:
// 32 x 32 blocks of TDPBF16PS over flat positions of the padded image); the
// rest (the network's 3- and 6-channel ends) stay on the tiles above.
// Work is split into tasks over XLA's intra-op thread pool; the caller works
// too, so a call never waits for a pool thread that is busy elsewhere.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define DRDD_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace ffi = xla::ffi;

namespace {

using drdd::CeilDiv;
using drdd::IsF32;
using drdd::ParallelFor;
using drdd::ParallelForWorkers;
using drdd::Scratch;
using drdd::Workers;
using drdd::WithType;
using drdd::bf16;
constexpr int kRows = 6;        // accumulator rows per tile
constexpr int kCols = 64;       // accumulator columns per tile: 4 vectors
constexpr int kTileGroup = 8;   // tiles of rows per task
constexpr int64_t kAmxUnits = 4;  // AMX: blocks of 32 positions per task
// AMX weight gradient: steps of 32 positions per block.
constexpr int64_t kAmxChunks = 64;
constexpr int kPairsPerBlock = 256;  // weight gradient: q per cache block
constexpr int64_t kCachedB = 256 << 10;  // bytes of packed B that stay in L2
// Weight gradient: the largest dw summed per worker (split over the
// contracted axis).
constexpr int64_t kSplitSumBytes = 1 << 20;

#if defined(DRDD_TARGET)

bool CpuSupported() {
  return __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bf16");
}

// acc[r, :cols] (+)= sum_s sum_{k < seg_len} A(r, s, k) * B[q], q = s *
// seg_len + k, with A(r, s, k) the bf16 pair at rows[r] + seg[s] + k * step
// and B packed as [q][NV * 16 columns][2]; acc is out (ld elements per row),
// float32 or bfloat16, loaded first when kAccumulate.
template <int MR, int NV, bool kAccumulate, typename Out>
DRDD_TARGET void Tile(const bf16* const* rows, const int64_t* seg,
                      int64_t num_segments, int64_t seg_len, int64_t step,
                      const bf16* b, Out* out, int64_t ld, int cols) {
  __mmask16 mask[NV];
  for (int j = 0; j < NV; ++j) {
    int left = std::clamp(cols - 16 * j, 0, 16);
    mask[j] = static_cast<__mmask16>((1u << left) - 1);
  }
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NV; ++j) {
      if constexpr (kAccumulate) {
        acc[r][j] = _mm512_maskz_loadu_ps(mask[j], out + r * ld + 16 * j);
      } else {
        acc[r][j] = _mm512_setzero_ps();
      }
    }
  }
  // Callers pass num_segments, seg_len >= 1: do-while loops, so that the
  // compiler need not merge a path that skips them (it did so through the
  // stack, storing and reloading every accumulator).
  int64_t s = 0;
  do {
    const bf16* a[MR];
    for (int r = 0; r < MR; ++r) a[r] = rows[r] + seg[s];
    int64_t k = 0;
    do {
      __m512bh bv[NV];
      for (int j = 0; j < NV; ++j) {
        bv[j] = (__m512bh)_mm512_loadu_si512(b + 32 * j);
      }
      b += 32 * NV;
      for (int r = 0; r < MR; ++r) {
        int32_t word;
        std::memcpy(&word, a[r] + k * step, sizeof(word));
        __m512bh av = (__m512bh)_mm512_set1_epi32(word);
        for (int j = 0; j < NV; ++j) {
          acc[r][j] = _mm512_dpbf16_ps(acc[r][j], av, bv[j]);
        }
      }
    } while (++k < seg_len);
  } while (++s < num_segments);
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NV; ++j) {
      if constexpr (sizeof(Out) == 2) {
        __m256i h = (__m256i)_mm512_cvtneps_pbh(acc[r][j]);
        _mm256_mask_storeu_epi16(out + r * ld + 16 * j, mask[j], h);
      } else {
        _mm512_mask_storeu_ps(out + r * ld + 16 * j, mask[j], acc[r][j]);
      }
    }
  }
}

template <typename Out>
using TileFn = void (*)(const bf16* const*, const int64_t*, int64_t, int64_t,
                        int64_t, const bf16*, Out*, int64_t, int);

template <bool kAccumulate, typename Out, int MR>
TileFn<Out> PickColumns(int nv) {
  switch (nv) {
    case 1: return Tile<MR, 1, kAccumulate, Out>;
    case 2: return Tile<MR, 2, kAccumulate, Out>;
    case 3: return Tile<MR, 3, kAccumulate, Out>;
    default: return Tile<MR, 4, kAccumulate, Out>;
  }
}

template <bool kAccumulate, typename Out>
TileFn<Out> PickTile(int mr, int nv) {
  switch (mr) {
    case 1: return PickColumns<kAccumulate, Out, 1>(nv);
    case 2: return PickColumns<kAccumulate, Out, 2>(nv);
    case 3: return PickColumns<kAccumulate, Out, 3>(nv);
    case 4: return PickColumns<kAccumulate, Out, 4>(nv);
    case 5: return PickColumns<kAccumulate, Out, 5>(nv);
    default: return PickColumns<kAccumulate, Out, 6>(nv);
  }
}

// Up to 16 values from p (lanes outside `mask` zero) as bfloat16, rounded
// to nearest even.
DRDD_TARGET __m256i Load16(const bf16* p, __mmask16 mask) {
  return _mm256_maskz_loadu_epi16(mask, p);
}
DRDD_TARGET __m256i Load16(const float* p, __mmask16 mask) {
  return (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, p));
}

DRDD_TARGET __mmask16 FirstLanes(int64_t n) {
  return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
}

// dst[i] = src[i] as bfloat16, i < n.
template <typename T>
DRDD_TARGET void ToBf16(const T* src, int64_t n, bf16* dst) {
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = FirstLanes(n - i);
    _mm256_mask_storeu_epi16(dst + i, m, Load16(src + i, m));
  }
}

// out[2 i] = a[i], out[2 i + 1] = b[i] as bfloat16 for i < n; a or b null
// reads zeros.
template <typename T>
DRDD_TARGET void Interleave(const T* a, const T* b, int64_t n, bf16* out) {
  // Lane 2 i takes lane i of the first operand, lane 2 i + 1 lane i of the
  // second (index 32 + i).
  alignas(64) static constexpr uint16_t kIndex[32] = {
      0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
      8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i index = _mm512_load_si512(kIndex);
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 in = FirstLanes(n - i);
    __mmask32 both = static_cast<__mmask32>(
        (uint64_t{1} << (2 * std::min<int64_t>(16, n - i))) - 1);
    __m256i va = a ? Load16(a + i, in) : _mm256_setzero_si256();
    __m256i vb = b ? Load16(b + i, in) : _mm256_setzero_si256();
    _mm512_mask_storeu_epi16(
        out + 2 * i, both,
        _mm512_permutex2var_epi16(_mm512_castsi256_si512(va), index,
                                  _mm512_castsi256_si512(vb)));
  }
}

// AMX (Intel Sapphire Rapids and later): TDPBF16PS multiplies a tile of
// 16 rows x 16 pairs of bfloat16 by one of 16 pairs x 16 columns (the
// pair-interleaved layout of B above) into 16 x 16 float32 accumulators,
// 16 times VDPBF16PS's work per instruction. Every tile here is 16 rows of
// 64 bytes, one configuration for all: tmm0-3 accumulate a 32 x 32 block
// (2 x 2 tiles), tmm4-5 hold its two A tiles, tmm6-7 its two B tiles.
#define DRDD_AMX \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))

// Whether this CPU and kernel run AMX tiles: CPUID says AMX-TILE and
// AMX-BF16, and Linux grants the process the tile data state (asked once).
// DRDD_JAX_AMX=0 in the environment keeps the AVX512-BF16 tiles (tests
// compare the two).
bool AmxSupported() {
  static const bool supported = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1) || !((d >> 24) & 1)) return false;  // BF16, TILE
#if defined(__linux__)
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
#else
    return false;
#endif
  }();
  if (!supported) return false;
  const char* env = std::getenv("DRDD_JAX_AMX");
  return !(env && env[0] == '0' && env[1] == 0);
}

// Palette 1, tiles 0-7 of 16 rows x 64 bytes. (Static: GCC 12 drops stores
// to a local configuration that only LDTILECFG reads.)
alignas(64) constexpr uint8_t kTileConfig[64] = {
    1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,            // palette
    64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0,    // bytes per row
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0};  // rows

DRDD_AMX void ConfigureTiles() { _tile_loadconfig(kTileConfig); }

// C (+)= sum_{s < steps} A_s B_s for a 32 x 16 NB block of float32 C (rows
// c_ld bytes apart; loaded first when `accumulate`, else zero). A_s is two
// tiles of 16 rows x 16 pairs, at a + a_off[s] and a_next elements after
// it (rows a_ld bytes apart), B_s 16 pairs x 16 NB columns at b + s *
// b_step (rows b_ld bytes apart, the second tile b_next elements after the
// first). The tiles must be configured.
template <int NB>
DRDD_AMX void AmxBlock(const bf16* a, int64_t a_next, int64_t a_ld,
                       const int64_t* a_off, int64_t steps, const bf16* b,
                       int64_t b_next, int64_t b_ld, int64_t b_step, float* c,
                       int64_t c_ld, bool accumulate) {
  float* c1 = reinterpret_cast<float*>(reinterpret_cast<char*>(c) + 16 * c_ld);
  if (accumulate) {
    _tile_loadd(0, c, c_ld);
    _tile_loadd(2, c1, c_ld);
    if constexpr (NB > 1) _tile_loadd(1, c + 16, c_ld);
    if constexpr (NB > 1) _tile_loadd(3, c1 + 16, c_ld);
  } else {
    _tile_zero(0);
    _tile_zero(2);
    if constexpr (NB > 1) _tile_zero(1);
    if constexpr (NB > 1) _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s, b += b_step) {
    const bf16* as = a + a_off[s];
    _tile_loadd(4, as, a_ld);
    _tile_loadd(5, as + a_next, a_ld);
    _tile_loadd(6, b, b_ld);
    if constexpr (NB > 1) _tile_loadd(7, b + b_next, b_ld);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (NB > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (NB > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, c_ld);
  _tile_stored(2, c1, c_ld);
  if constexpr (NB > 1) _tile_stored(1, c + 16, c_ld);
  if constexpr (NB > 1) _tile_stored(3, c1 + 16, c_ld);
}

// AmxBlock<NB> for nb >= 2 or 1.
DRDD_AMX void AmxBlock(int nb, const bf16* a, int64_t a_next, int64_t a_ld,
                       const int64_t* a_off, int64_t steps, const bf16* b,
                       int64_t b_next, int64_t b_ld, int64_t b_step, float* c,
                       int64_t c_ld, bool accumulate) {
  (nb > 1 ? AmxBlock<2> : AmxBlock<1>)(a, a_next, a_ld, a_off, steps, b,
                                       b_next, b_ld, b_step, c, c_ld,
                                       accumulate);
}

DRDD_AMX void ReleaseTiles() { _tile_release(); }

// Row r of a 32 x 32 float32 block (rows 128 bytes apart) into out +
// out_row[r] * ld as Out, its first n <= 32 columns; rows with out_row[r]
// < 0 are dropped.
template <typename Out>
DRDD_TARGET void StoreBlock(const float* acc, const int64_t* out_row, int n,
                            Out* out, int64_t ld) {
  const __mmask16 mask[2] = {FirstLanes(n), FirstLanes(std::max(0, n - 16))};
  for (int r = 0; r < 32; ++r, acc += 32) {
    if (out_row[r] < 0) continue;
    Out* dst = out + out_row[r] * ld;
    for (int h = 0; h < 2 && mask[h]; ++h) {
      __m512 v = _mm512_loadu_ps(acc + 16 * h);
      if constexpr (sizeof(Out) == 2) {
        _mm256_mask_storeu_epi16(dst + 16 * h, mask[h],
                                 (__m256i)_mm512_cvtneps_pbh(v));
      } else {
        _mm512_mask_storeu_ps(dst + 16 * h, mask[h], v);
      }
    }
  }
}

#else  // not x86-64: CpuSupported() is false and no handler computes.

bool CpuSupported() { return false; }
bool AmxSupported() { return false; }

#endif

// Column blocks of the output (kCols wide, the last one narrower) and where
// each one's packed B starts, for B with `pairs` rows of pairs.
struct ColumnBlocks {
  ColumnBlocks(int64_t columns, int64_t pairs) {
    for (int64_t c0 = 0, offset = 0; c0 < columns; c0 += kCols) {
      int cols = static_cast<int>(std::min<int64_t>(kCols, columns - c0));
      int nv = static_cast<int>(CeilDiv(cols, 16));
      blocks.push_back({c0, cols, nv, offset});
      offset += pairs * nv * 32;
      size = offset;
    }
  }
  struct Block {
    int64_t start;
    int cols, nv;
    int64_t offset;
  };
  std::vector<Block> blocks;
  int64_t size = 0;
};

struct Geometry {
  int64_t batch, height, width, channels;  // x
  int64_t kh, kw, top, bottom, left, right;
  int64_t hp() const { return height + top + bottom; }
  int64_t wp() const { return width + left + right; }
  int64_t ho() const { return hp() - kh + 1; }
  int64_t wo() const { return wp() - kw + 1; }
};

bool Float(const ffi::AnyBuffer& a) {
  return a.element_type() == ffi::DataType::F32 ||
         a.element_type() == ffi::DataType::BF16;
}

ffi::Error Check(const Geometry& g, std::initializer_list<const ffi::AnyBuffer*> bufs) {
  if (!CpuSupported()) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "drdd_bf16_conv needs a CPU with AVX512-BF16.");
  }
  for (const ffi::AnyBuffer* b : bufs) {
    if (!Float(*b) || b->dimensions().size() != 4) {
      return ffi::Error::InvalidArgument(
          "drdd_bf16_conv: operands must be float32 or bfloat16, rank 4.");
    }
  }
  if (std::min({g.top, g.bottom, g.left, g.right}) < 0 || g.ho() < 1 ||
      g.wo() < 1) {
    return ffi::Error::InvalidArgument(
        "drdd_bf16_conv: negative padding or an empty output.");
  }
  return ffi::Error::Success();
}

#if defined(DRDD_TARGET)

// x [B, H, W, C] into xpad [B, Hp, Wp, Cp] bfloat16 with zero borders (Cp =
// C rounded up to even); the padded rows run as tasks.
template <typename T>
void Pad(ffi::ThreadPool& pool, const Geometry& g, const T* x, int64_t cp,
         bf16* xpad) {
  const int64_t hp = g.hp(), wp = g.wp(), c = g.channels;
  ParallelFor(pool, g.batch * hp, [&](int64_t row) {
    int64_t b = row / hp, h = row % hp - g.top;
    bf16* dst = xpad + row * wp * cp;
    if (h < 0 || h >= g.height) {
      std::memset(dst, 0, wp * cp * sizeof(bf16));
      return;
    }
    const T* src = x + (b * g.height + h) * g.width * c;
    std::memset(dst, 0, g.left * cp * sizeof(bf16));
    std::memset(dst + (g.left + g.width) * cp, 0, g.right * cp * sizeof(bf16));
    if (cp == c) {
      ToBf16(src, g.width * c, dst + g.left * cp);
    } else {
      for (int64_t j = 0; j < g.width; ++j) {
        bf16* d = dst + (g.left + j) * cp;
        ToBf16(src + j * c, c, d);
        d[c] = 0;
      }
    }
  });
}

// B of the convolution: [column block][tap][channel pair][nv * 16][2], from
// w [kh, kw, C, O], or with `transpose` from w [kh, kw, O, C] flipped.
template <typename T>
void PackKernel(ffi::ThreadPool& pool, const T* w, const Geometry& g,
                int64_t out_ch, bool transpose, const ColumnBlocks& blocks,
                bf16* packed) {
  const int64_t c = g.channels, pairs = CeilDiv(c, 2), taps = g.kh * g.kw;
  ParallelFor(pool, blocks.blocks.size() * taps, [&](int64_t task) {
    const auto& blk = blocks.blocks[task / taps];
    int64_t t = task % taps, width = blk.nv * 16;
    bf16* dst = packed + blk.offset + t * pairs * width * 2;
    std::memset(dst, 0, pairs * width * 2 * sizeof(bf16));
    if (!transpose) {
      for (int64_t k = 0; k < c; k += 2, dst += width * 2) {
        const T* src = w + (t * c + k) * out_ch + blk.start;
        Interleave(src, k + 1 < c ? src + out_ch : nullptr, blk.cols, dst);
      }
      return;
    }
    // Pair q of column col is w[flipped tap, blk.start + col, 2q : 2q + 2].
    const T* src = w + ((taps - 1 - t) * out_ch + blk.start) * c;
    std::vector<bf16> row(2 * pairs, 0);
    for (int col = 0; col < blk.cols; ++col, src += c) {
      ToBf16(src, c, row.data());
      for (int64_t q = 0; q < pairs; ++q) {
        std::memcpy(dst + q * width * 2 + 2 * col, row.data() + 2 * q, 4);
      }
    }
  });
}

// The convolution on AMX. Its A tiles are 16 consecutive positions of the
// padded image (flat index f = i * wp + j, one row stride apart in xpad
// whatever the row), of which those with j < wo and i < ho are output
// pixels and the rest are computed and dropped: every tile is whole, at the
// cost of the kw - 1 padding columns per row. Per image, f runs over
// `units` of 32 positions (two A tiles), reading up to 31 positions past
// the image (xs holds that much after the last one).
template <typename Out>
void AmxConv(ffi::ThreadPool& pool, const Geometry& g, const bf16* xs,
             int64_t cp, const int64_t* seg, const ColumnBlocks& blocks,
             const bf16* packed, int64_t out_ch, Out* y) {
  const int64_t hp = g.hp(), wp = g.wp(), ho = g.ho(), wo = g.wo();
  const int64_t taps = g.kh * g.kw, chunks = cp / 32;
  const int64_t units = CeilDiv((ho - 1) * wp + wo, 32);
  // Step s = (tap, 16 channel pairs) of the contracted axis: where its A
  // tile starts from the tile's first position.
  std::vector<int64_t> a_off(taps * chunks);
  for (int64_t s = 0; s < taps * chunks; ++s) {
    a_off[s] = seg[s / chunks] + 32 * (s % chunks);
  }
  const int64_t total = g.batch * units;
  const int64_t groups = CeilDiv(total, kAmxUnits);
  ParallelFor(pool, blocks.blocks.size() * groups, [&](int64_t task) {
    const auto& blk = blocks.blocks[task / groups];
    const int64_t u0 = task % groups * kAmxUnits;
    const int64_t u1 = std::min(total, u0 + kAmxUnits);
    alignas(64) float acc[32 * 32];
    int64_t out_row[32];
    ConfigureTiles();
    for (int64_t unit = u0; unit < u1; ++unit) {
      const int64_t b = unit / units, f0 = unit % units * 32;
      for (int r = 0; r < 32; ++r) {
        const int64_t i = (f0 + r) / wp, j = (f0 + r) % wp;
        out_row[r] = i < ho && j < wo ? (b * ho + i) * wo + j : -1;
      }
      const bf16* a = xs + (b * hp * wp + f0) * cp;
      for (int v = 0; v < blk.nv; v += 2) {
        AmxBlock(blk.nv - v, a, 16 * cp, 2 * cp, a_off.data(),
                 taps * chunks, packed + blk.offset + 32 * v, 32,
                 blk.nv * 64, blk.nv * 512, acc, 128, false);
        StoreBlock(acc, out_row, blk.cols - 16 * v, y + blk.start + 16 * v,
                   out_ch);
      }
    }
    ReleaseTiles();
  });
}

template <typename T, typename Out>
void Conv(ffi::ThreadPool& pool, const Geometry& g, const T* x, const void* w,
          bool w_f32, int64_t out_ch, bool transpose, Out* y) {
  const int64_t c = g.channels, cp = c + (c & 1), pairs = cp / 2;
  const int64_t hp = g.hp(), wp = g.wp(), ho = g.ho(), wo = g.wo();
  const int64_t taps = g.kh * g.kw;
  // AMX takes the contracted axis 16 channel pairs at a time.
  const bool amx = pairs % 16 == 0 && AmxSupported();
  const int64_t slack = amx ? 32 : 0;  // positions AmxConv reads past xpad

  // A: the bfloat16 input itself when no padding is needed (on AMX: nor
  // positions past the end).
  const bf16* xs = reinterpret_cast<const bf16*>(x);
  drdd::ScratchPtr<bf16> padded;
  if (sizeof(T) != 2 || g.top || g.bottom || g.left || g.right || cp != c ||
      (amx && (taps > 1 || ho * wo % 32))) {
    const int64_t size = g.batch * hp * wp * cp;
    padded = Scratch<bf16>(size + slack * cp);
    Pad(pool, g, x, cp, padded.get());
    std::memset(padded.get() + size, 0, slack * cp * sizeof(bf16));
    xs = padded.get();
  }
  std::vector<int64_t> seg(taps);
  for (int64_t t = 0; t < taps; ++t) {
    seg[t] = ((t / g.kw) * wp + t % g.kw) * cp;
  }

  ColumnBlocks blocks(out_ch, taps * pairs);
  auto packed = Scratch<bf16>(blocks.size);
  if (w_f32) {
    PackKernel(pool, static_cast<const float*>(w), g, out_ch, transpose,
               blocks, packed.get());
  } else {
    PackKernel(pool, static_cast<const bf16*>(w), g, out_ch, transpose,
               blocks, packed.get());
  }

  if (amx) {
    AmxConv(pool, g, xs, cp, seg.data(), blocks, packed.get(), out_ch, y);
    return;
  }

  const int64_t pixels = g.batch * ho * wo;
  const int64_t chunk = kTileGroup * kRows;
  const int64_t chunks = CeilDiv(pixels, chunk);
  const int64_t num_blocks = blocks.blocks.size();
  // Consecutive tasks share a column block, whose packed B then stays in
  // cache, or, where all of B fits in cache anyway, a chunk of pixels: its
  // rows of A stay in cache and its output rows are written at once.
  const bool chunk_major = blocks.size * sizeof(bf16) <= kCachedB;
  ParallelFor(pool, num_blocks * chunks, [&](int64_t task) {
    int64_t c0 = chunk_major ? task / num_blocks : task % chunks;
    const auto& blk =
        blocks.blocks[chunk_major ? task % num_blocks : task / chunks];
    int64_t m_begin = c0 * chunk, m_end = std::min(pixels, m_begin + chunk);
    // Output pixel (b, i, j) of row m, advanced row by row.
    int64_t b = m_begin / (ho * wo), i = m_begin / wo % ho, j = m_begin % wo;
    for (int64_t m = m_begin; m < m_end; m += kRows) {
      int mr = static_cast<int>(std::min<int64_t>(kRows, m_end - m));
      const bf16* rows[kRows];
      for (int r = 0; r < mr; ++r) {
        rows[r] = xs + ((b * hp + i) * wp + j) * cp;
        if (++j == wo) {
          j = 0;
          if (++i == ho) i = 0, ++b;
        }
      }
      PickTile<false, Out>(mr, blk.nv)(
          rows, seg.data(), taps, pairs, 2, packed.get() + blk.offset,
          y + m * out_ch + blk.start, out_ch, blk.cols);
    }
  });
}

// Rows [r0, r1) of image b of xpair, padded x with each channel paired
// with the same channel of its right neighbour ([B, Hp, Wp, C, 2]), into
// dst.
template <typename TX>
void PairRows(const Geometry& g, const TX* x, int64_t b, int64_t r0,
              int64_t r1, bf16* dst) {
  const int64_t c = g.channels, wp = g.wp();
  for (int64_t r = r0; r < r1; ++r) {
    int64_t h = r - g.top;
    if (h < 0 || h >= g.height) {
      std::memset(dst, 0, wp * c * 2 * sizeof(bf16));
      dst += wp * c * 2;
      continue;
    }
    const TX* src = x + (b * g.height + h) * g.width * c;
    auto pixel = [&](int64_t j) {
      j -= g.left;
      return j >= 0 && j < g.width ? src + j * c : nullptr;
    };
    for (int64_t j = 0; j < wp; ++j, dst += 2 * c) {
      Interleave(pixel(j), pixel(j + 1), c, dst);
    }
  }
}

// Segments [s0, s0 + ns) of gy (segment = (b, output row)) in one column
// block as B of the weight gradient: [segment][j / 2][nv * 16][2], a zero
// column when wo is odd, zero lanes past blk.cols.
template <typename TG>
void PackGradRows(const TG* gy, int64_t wo, int64_t out_ch,
                  const ColumnBlocks::Block& blk, int64_t s0, int64_t ns,
                  bf16* dst) {
  const int64_t width = blk.nv * 16, wo2 = CeilDiv(wo, 2);
  if (blk.cols < width) {
    std::memset(dst, 0, ns * wo2 * width * 2 * sizeof(bf16));
  }
  for (int64_t s = s0; s < s0 + ns; ++s) {
    for (int64_t j = 0; j < wo; j += 2, dst += width * 2) {
      const TG* src = gy + (s * wo + j) * out_ch + blk.start;
      Interleave(src, j + 1 < wo ? src + out_ch : nullptr, blk.cols, dst);
    }
  }
}

// Rows [m0, m1) of dw (m = (tap, input channel)) in one column block: the
// sums over ns segments of wo2 pairs, A from xpair rows at `a` (segment s
// at a + seg[s]), B at `b`; with `accumulate`, added to what `dw` holds.
void WeightGradRows(const Geometry& g, const bf16* a, const int64_t* seg,
                    int64_t ns, int64_t wo2, const bf16* b,
                    const ColumnBlocks::Block& blk, int64_t m0, int64_t m1,
                    bool accumulate, float* dw, int64_t out_ch) {
  const int64_t c = g.channels, wp = g.wp();
  // Tap (ti, tj) and channel k of row m, advanced row by row.
  int64_t k = m0 % c, ti = m0 / c / g.kw, tj = m0 / c % g.kw;
  for (int64_t m = m0; m < m1; m += kRows) {
    int mr = static_cast<int>(std::min<int64_t>(kRows, m1 - m));
    const bf16* rows[kRows];
    for (int r = 0; r < mr; ++r) {
      rows[r] = a + (ti * wp + tj) * c * 2 + 2 * k;
      if (++k == c) {
        k = 0;
        if (++tj == g.kw) tj = 0, ++ti;
      }
    }
    auto tile = accumulate ? PickTile<true, float>(mr, blk.nv)
                           : PickTile<false, float>(mr, blk.nv);
    tile(rows, seg, ns, wo2, 4 * c, b, dw + m * out_ch + blk.start, out_ch,
         blk.cols);
  }
}

// The weight gradient on AMX, as a product over the flat positions F = (b
// hp + i) wp + j of the padded images: dw[(tap, k), o] = sum_F xt[k, F +
// a wp + c] gq[F, o] for tap (a, c), with xt the padded input channel-major
// (one row of positions per channel, zeros past the last image) and gq gy
// at its pixels' positions and zero at the others (the padding rows and
// columns), pair-interleaved as B. A task owns 32 channels x 32 columns of
// dw for every tap (one sum per element, in a fixed order) and runs over
// the positions in blocks of kAmxChunks x 32, whose xt and gq stay in cache
// across the taps.
template <typename TX, typename TG>
void AmxWeightGrad(ffi::ThreadPool& pool, const Geometry& g, const TX* x,
                   const TG* gy, int64_t out_ch, float* dw) {
  const int64_t c = g.channels, hp = g.hp(), wp = g.wp(), ho = g.ho();
  const int64_t wo = g.wo(), image = hp * wp, positions = g.batch * image;
  const int64_t chunks = CeilDiv(positions, 32);  // of 32 positions
  const int64_t stride =
      CeilDiv(chunks * 32 + (g.kh - 1) * wp + g.kw - 1, 32) * 32;
  auto xt = Scratch<bf16>(c * stride);
  auto gq = Scratch<bf16>(chunks * 32 * out_ch);
  // xt, kSpan positions per task: each pixel (or zeros) rounded to
  // bfloat16 into the worker's buffer, then transposed into the channels'
  // rows.
  constexpr int64_t kSpan = 64;
  const int64_t spans = CeilDiv(stride, kSpan);
  auto pixel_buf = Scratch<bf16>(Workers(pool, spans) * kSpan * c);
  ParallelForWorkers(pool, spans, [&](int64_t task, int64_t worker) {
    const int64_t f0 = task * kSpan, n = std::min(kSpan, stride - f0);
    bf16* pixels = pixel_buf.get() + worker * kSpan * c;
    for (int64_t f = f0; f < f0 + n; ++f) {
      const int64_t h = f % image / wp - g.top, w = f % wp - g.left;
      bf16* dst = pixels + (f - f0) * c;
      if (f < positions && h >= 0 && h < g.height && w >= 0 && w < g.width) {
        ToBf16(x + ((f / image * g.height + h) * g.width + w) * c, c, dst);
      } else {
        std::memset(dst, 0, c * sizeof(bf16));
      }
    }
    for (int64_t k = 0; k < c; ++k) {
      bf16* dst = xt.get() + k * stride + f0;
      for (int64_t j = 0; j < n; ++j) dst[j] = pixels[j * c + k];
    }
  });
  // gq, kSpan pairs of positions per task.
  auto output_pixel = [&](int64_t f) -> const TG* {
    const int64_t i = f % image / wp, j = f % wp;
    return f < positions && i < ho && j < wo
               ? gy + ((f / image * ho + i) * wo + j) * out_ch
               : nullptr;
  };
  ParallelFor(pool, CeilDiv(chunks * 16, kSpan), [&](int64_t task) {
    const int64_t p1 = std::min(chunks * 16, (task + 1) * kSpan);
    for (int64_t p = task * kSpan; p < p1; ++p) {
      Interleave(output_pixel(2 * p), output_pixel(2 * p + 1), out_ch,
                 gq.get() + p * out_ch * 2);
    }
  });
  std::vector<int64_t> a_off(kAmxChunks);
  for (int64_t s = 0; s < kAmxChunks; ++s) a_off[s] = 32 * s;
  const int64_t units = CeilDiv(out_ch, 32);
  ParallelFor(pool, c / 32 * units, [&](int64_t task) {
    const int64_t k0 = task / units * 32, o0 = task % units * 32;
    const int nb = static_cast<int>(std::min<int64_t>(2, (out_ch - o0) / 16));
    ConfigureTiles();
    for (int64_t q0 = 0; q0 < chunks; q0 += kAmxChunks) {
      const int64_t steps = std::min(kAmxChunks, chunks - q0);
      for (int64_t t = 0; t < g.kh * g.kw; ++t) {
        const int64_t shift = t / g.kw * wp + t % g.kw;
        AmxBlock(nb, xt.get() + k0 * stride + 32 * q0 + shift,
                 16 * stride, stride * 2, a_off.data(), steps,
                 gq.get() + (32 * q0 * out_ch + 2 * o0), 32, out_ch * 4,
                 32 * out_ch, dw + (t * c + k0) * out_ch + o0, out_ch * 4,
                 q0 > 0);
      }
    }
    ReleaseTiles();
  });
}

template <typename TX, typename TG>
void WeightGrad(ffi::ThreadPool& pool, const Geometry& g, const TX* x,
                const TG* gy, int64_t out_ch, float* dw) {
  if (g.channels % 32 == 0 && out_ch % 16 == 0 && AmxSupported()) {
    AmxWeightGrad(pool, g, x, gy, out_ch, dw);
    return;
  }
  const int64_t c = g.channels, hp = g.hp(), wp = g.wp();
  const int64_t ho = g.ho(), wo = g.wo(), wo2 = CeilDiv(wo, 2);
  const int64_t rows_total = g.kh * g.kw * c, size = rows_total * out_ch;
  // Segments (output rows) per block of ~kPairsPerBlock pairs of the
  // contracted axis.
  const int64_t seg_block = std::max<int64_t>(1, kPairsPerBlock / wo2);
  const int64_t image_block = std::min(seg_block, ho);  // within one image
  const int64_t row_blocks = CeilDiv(ho, image_block);
  const int64_t q_blocks = g.batch * row_blocks;
  const int64_t workers = Workers(pool, q_blocks);

  if (size * int64_t{sizeof(float)} <= kSplitSumBytes &&
      image_block * wo2 >= kPairsPerBlock / 2 && q_blocks >= 2 * workers) {
    // Split over the contracted axis: a task sums one block of output rows
    // of one image, from A and B packed for that block alone (they stay in
    // cache, and x and gy are read once). The blocks are summed in a fixed
    // number of groups of consecutive blocks, each into its own copy of dw
    // (group 0 into dw itself), and the groups' sums are added in order at
    // the end: the result does not depend on which thread took which group.
    const int64_t groups = std::min(q_blocks, 2 * workers);
    const int64_t a_size = (image_block + g.kh - 1) * wp * c * 2;
    const int64_t b_size = image_block * wo2 * kCols * 2;
    auto a_buf = Scratch<bf16>(workers * a_size);
    auto b_buf = Scratch<bf16>(workers * b_size);
    auto sums = Scratch<float>((groups - 1) * size);
    std::vector<int64_t> seg(image_block);
    for (int64_t s = 0; s < image_block; ++s) seg[s] = s * wp * c * 2;
    ColumnBlocks blocks(out_ch, 0);
    ParallelForWorkers(pool, groups, [&](int64_t group, int64_t w) {
      bf16* a = a_buf.get() + w * a_size;
      bf16* packed = b_buf.get() + w * b_size;
      float* out = group ? sums.get() + (group - 1) * size : dw;
      const int64_t first = group * q_blocks / groups;
      const int64_t last = (group + 1) * q_blocks / groups;
      for (int64_t task = first; task < last; ++task) {
        const int64_t b = task / row_blocks;
        const int64_t i0 = task % row_blocks * image_block;
        const int64_t ns = std::min(image_block, ho - i0);
        PairRows(g, x, b, i0, i0 + ns + g.kh - 1, a);
        for (const auto& blk : blocks.blocks) {
          PackGradRows(gy, wo, out_ch, blk, b * ho + i0, ns, packed);
          WeightGradRows(g, a, seg.data(), ns, wo2, packed, blk, 0,
                         rows_total, task > first, out, out_ch);
        }
      }
    });
    const int64_t span = 1 << 14;  // floats of dw per task of the sum
    ParallelFor(pool, CeilDiv(size, span), [&](int64_t task) {
      const int64_t i0 = task * span, i1 = std::min(size, i0 + span);
      for (int64_t group = 1; group < groups; ++group) {
        const float* part = sums.get() + (group - 1) * size;
        for (int64_t i = i0; i < i1; ++i) dw[i] += part[i];
      }
    });
    return;
  }

  // Split over dw: each task sums all of the contracted axis for a block of
  // dw's rows in one column block, from xpair and B packed for all of it.
  auto xpair = Scratch<bf16>(g.batch * hp * wp * c * 2);
  ParallelFor(pool, g.batch * hp, [&](int64_t row) {
    PairRows(g, x, row / hp, row % hp, row % hp + 1,
             xpair.get() + row * wp * c * 2);
  });
  const int64_t segments = g.batch * ho;
  ColumnBlocks blocks(out_ch, segments * wo2);
  auto packed = Scratch<bf16>(blocks.size);
  ParallelFor(pool, blocks.blocks.size() * segments, [&](int64_t task) {
    const auto& blk = blocks.blocks[task / segments];
    int64_t s = task % segments;
    PackGradRows(gy, wo, out_ch, blk, s, 1,
                 packed.get() + blk.offset + s * wo2 * blk.nv * 32);
  });
  std::vector<int64_t> seg(segments);
  for (int64_t s = 0; s < segments; ++s) {
    seg[s] = ((s / ho) * hp + s % ho) * wp * c * 2;
  }
  const int64_t chunk = kTileGroup * kRows;
  const int64_t chunks = CeilDiv(rows_total, chunk);
  ParallelFor(pool, blocks.blocks.size() * chunks, [&](int64_t task) {
    const auto& blk = blocks.blocks[task / chunks];
    int64_t m0 = (task % chunks) * chunk;
    int64_t m1 = std::min(rows_total, m0 + chunk);
    // The contracted axis in blocks of seg_block segments, whose B stays
    // in cache across the rows.
    for (int64_t s0 = 0; s0 < segments; s0 += seg_block) {
      WeightGradRows(g, xpair.get(), seg.data() + s0,
                     std::min(seg_block, segments - s0), wo2,
                     packed.get() + blk.offset + s0 * wo2 * blk.nv * 32, blk,
                     m0, m1, s0 > 0, dw, out_ch);
    }
  });
}

#endif  // DRDD_TARGET

// f(A{}, B{}) with A and B float or bf16, the element types of two operands.
template <typename F>
void WithTypes(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b, const F& f) {
  WithType(a, [&](auto ta) { WithType(b, [&](auto tb) { f(ta, tb); }); });
}

ffi::Error ConvImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                    ffi::Result<ffi::AnyBuffer> y, int64_t pad_top,
                    int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                    int64_t transpose_kernel) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4) {
    return ffi::Error::InvalidArgument("drdd_bf16_conv: rank 4 operands.");
  }
  Geometry g{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1],
             pad_top, pad_bottom, pad_left, pad_right};
  if (ffi::Error e = Check(g, {&x, &w, &*y}); e.failure()) return e;
  const bool transpose = transpose_kernel != 0;
  const int64_t in_ch = transpose ? wd[3] : wd[2];
  const int64_t out_ch = transpose ? wd[2] : wd[3];
  if (in_ch != g.channels || yd[0] != g.batch || yd[1] != g.ho() ||
      yd[2] != g.wo() || yd[3] != out_ch) {
    return ffi::Error::InvalidArgument("drdd_bf16_conv: shapes disagree.");
  }
#if defined(DRDD_TARGET)
  WithTypes(x, *y, [&](auto tx, auto ty) {
    Conv(pool, g, static_cast<const decltype(tx)*>(x.untyped_data()),
         w.untyped_data(), IsF32(w), out_ch, transpose,
         static_cast<decltype(ty)*>(y->untyped_data()));
  });
#endif
  return ffi::Error::Success();
}

ffi::Error WeightGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                          ffi::AnyBuffer gy, ffi::Result<ffi::AnyBuffer> dw,
                          int64_t pad_top, int64_t pad_bottom,
                          int64_t pad_left, int64_t pad_right) {
  auto xd = x.dimensions(), gd = gy.dimensions(), dd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || dd.size() != 4) {
    return ffi::Error::InvalidArgument("drdd_bf16_conv_wgrad: rank 4 operands.");
  }
  Geometry g{xd[0], xd[1], xd[2], xd[3], dd[0], dd[1],
             pad_top, pad_bottom, pad_left, pad_right};
  if (ffi::Error e = Check(g, {&x, &gy}); e.failure()) return e;
  const int64_t out_ch = gd[3];
  if (!IsF32(*dw) || dd[2] != g.channels || dd[3] != out_ch ||
      gd[0] != g.batch || gd[1] != g.ho() || gd[2] != g.wo()) {
    return ffi::Error::InvalidArgument(
        "drdd_bf16_conv_wgrad: shapes disagree or dw is not float32.");
  }
#if defined(DRDD_TARGET)
  WithTypes(x, gy, [&](auto tx, auto tg) {
    WeightGrad(pool, g, static_cast<const decltype(tx)*>(x.untyped_data()),
               static_cast<const decltype(tg)*>(gy.untyped_data()), out_ch,
               static_cast<float*>(dw->untyped_data()));
  });
#endif
  return ffi::Error::Success();
}

// Both handlers: the thread pool, two operands, a result and the padding.
auto PaddedBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_bottom")
      .Attr<int64_t>("pad_left")
      .Attr<int64_t>("pad_right");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DrddBf16Conv, ConvImpl,
                              PaddedBinding().Attr<int64_t>("transpose_kernel"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DrddBf16ConvWeightGrad, WeightGradImpl,
                              PaddedBinding());

// 1 where this CPU runs the handlers (checked by drdd_jax.bf16_conv).
extern "C" int DrddBf16ConvSupported() { return CpuSupported() ? 1 : 0; }

// 1 where the convolutions run on AMX tiles (channel counts permitting).
extern "C" int DrddBf16ConvAmx() {
  return CpuSupported() && AmxSupported() ? 1 : 0;
}
