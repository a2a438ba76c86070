/* The CPU's arithmetic ceilings: fused multiply-adds from registers, no memory.

     gcc -O2 -pthread benchmarks/fma_peak.c -o /tmp/fma_peak
     /tmp/fma_peak 2            # 2 threads, every mode this CPU has
     /tmp/fma_peak 1 avx2       # one mode: avx2 | avx512 | bf16 | amx

   Modes: `avx2`, 8-wide float32 FMAs; `avx512`, 16-wide float32 FMAs;
   `bf16`, VDPBF16PS (AVX512-BF16: 32 bfloat16 products summed pairwise
   into 16 float32 lanes); `amx`, TDPBF16PS (AMX-BF16: a 16 x 32 by 32 x 16
   bfloat16 tile product into 16 x 16 float32 tiles). Each thread runs 12
   independent chains (enough to cover the latency on two pipes; `amx`: 4
   accumulator tiles, as csrc/bf16_conv.cc's blocks) and the program prints
   GFLOP/s, a multiply and an add counting 2, one JSON line per mode. Modes the CPU
   lacks are skipped. docs/performance.md compares the kernels with it.
*/
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define CHAINS 12
#define ITERATIONS 400000000L

static volatile float sink;

__attribute__((target("avx2,fma"))) static void *avx2(void *unused) {
  (void)unused;
  __m256 acc[CHAINS];
  const __m256 mul = _mm256_set1_ps(0.999999f), add = _mm256_set1_ps(1e-7f);
  for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_set1_ps((float)i);
  for (long k = 0; k < ITERATIONS; k++) {
#pragma GCC unroll 12
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_fmadd_ps(acc[i], mul, add);
  }
  float out[8], sum = 0;
  for (int i = 0; i < CHAINS; i++) {
    _mm256_storeu_ps(out, acc[i]);
    sum += out[0];
  }
  sink = sum;
  return NULL;
}

__attribute__((target("avx512f"))) static void *avx512(void *unused) {
  (void)unused;
  __m512 acc[CHAINS];
  const __m512 mul = _mm512_set1_ps(0.999999f), add = _mm512_set1_ps(1e-7f);
  for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
  for (long k = 0; k < ITERATIONS; k++) {
#pragma GCC unroll 12
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_fmadd_ps(acc[i], mul, add);
  }
  float sum = 0;
  for (int i = 0; i < CHAINS; i++) sum += _mm512_reduce_add_ps(acc[i]);
  sink = sum;
  return NULL;
}

__attribute__((target("avx512f,avx512bf16"))) static void *bf16(void *unused) {
  (void)unused;
  __m512 acc[CHAINS];
  /* bfloat16 1.0 and 2^-24 in every lane. */
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80);
  const __m512bh b = (__m512bh)_mm512_set1_epi16(0x3380);
  for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
  for (long k = 0; k < ITERATIONS; k++) {
#pragma GCC unroll 12
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  }
  float sum = 0;
  for (int i = 0; i < CHAINS; i++) sum += _mm512_reduce_add_ps(acc[i]);
  sink = sum;
  return NULL;
}

#define AMX_ITERATIONS (ITERATIONS / 8)

/* Palette 1, tiles 0-7 of 16 rows x 64 bytes. */
static const unsigned char kTileConfig[64] __attribute__((aligned(64))) = {
    1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    16, 16, 16, 16, 16, 16, 16, 16};

__attribute__((target("amx-tile,amx-bf16"))) static void *amx(void *unused) {
  (void)unused;
  static const unsigned short zeros[512] __attribute__((aligned(64)));
  float out[256];
  _tile_loadconfig(kTileConfig);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, zeros, 64);
  _tile_loadd(5, zeros, 64);
  _tile_loadd(6, zeros, 64);
  _tile_loadd(7, zeros, 64);
  for (long k = 0; k < AMX_ITERATIONS; k++) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, 64);
  _tile_release();
  sink = out[0];
  return NULL;
}

/* Each mode's FLOPs per thread. */
static const struct {
  const char *name, *feature;
  void *(*work)(void *);
  double flops;
} kModes[] = {{"avx2", "fma", avx2, 16.0 * CHAINS * ITERATIONS},
              {"avx512", "avx512f", avx512, 32.0 * CHAINS * ITERATIONS},
              {"bf16", "avx512bf16", bf16, 64.0 * CHAINS * ITERATIONS},
              {"amx", "amx-bf16", amx, 4 * 16384.0 * AMX_ITERATIONS}};

static int supported(const char *feature) {
  __builtin_cpu_init();
  if (!strcmp(feature, "fma")) return __builtin_cpu_supports("fma");
  if (!strcmp(feature, "avx512f")) return __builtin_cpu_supports("avx512f");
  if (!strcmp(feature, "amx-bf16")) {
    /* CPUID.7.0:EDX bits 22 (AMX-BF16) and 24 (AMX-TILE), then Linux's
       permission for the tile data state. */
    unsigned a, b, c, d;
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
#if defined(__linux__)
    return ((d >> 22) & 1) && ((d >> 24) & 1) &&
           syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                   18 /* XFEATURE_XTILEDATA */) == 0;
#else
    return 0;
#endif
  }
  return __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bf16");
}

int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 1;
  const char *only = argc > 2 ? argv[2] : NULL;
  if (threads < 1 || threads > 64) {
    fprintf(stderr, "usage: %s THREADS (1-64) [avx2|avx512|bf16|amx]\n", argv[0]);
    return 1;
  }
  for (size_t m = 0; m < sizeof(kModes) / sizeof(kModes[0]); m++) {
    if ((only && strcmp(only, kModes[m].name)) ||
        !supported(kModes[m].feature)) {
      continue;
    }
    pthread_t ids[64];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < threads; i++)
      pthread_create(&ids[i], NULL, kModes[m].work, NULL);
    for (int i = 0; i < threads; i++) pthread_join(ids[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double seconds =
        (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    double flops = kModes[m].flops * threads;
    printf("{\"mode\": \"%s\", \"threads\": %d, \"seconds\": %.3f, "
           "\"gflops\": %.1f}\n",
           kModes[m].name, threads, seconds, flops / seconds / 1e9);
  }
  return 0;
}
