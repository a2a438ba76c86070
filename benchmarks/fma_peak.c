/* The CPU's arithmetic ceilings: fused multiply-adds from registers, no memory.

     gcc -O2 -pthread benchmarks/fma_peak.c -o /tmp/fma_peak
     /tmp/fma_peak 2            # 2 threads, every mode this CPU has
     /tmp/fma_peak 1 avx2       # one mode: avx2 | avx512 | bf16

   Modes: `avx2`, 8-wide float32 FMAs; `avx512`, 16-wide float32 FMAs;
   `bf16`, VDPBF16PS (AVX512-BF16: 32 bfloat16 products summed pairwise
   into 16 float32 lanes). Each thread runs 12 independent chains (enough to
   cover the latency on two pipes) and the program prints GFLOP/s, a
   multiply and an add counting 2, one JSON line per mode. Modes the CPU
   lacks are skipped. docs/performance.md compares the kernels with it.
*/
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

static const struct {
  const char *name, *feature;
  void *(*work)(void *);
  double flops_per_op;
} kModes[] = {{"avx2", "fma", avx2, 16},
              {"avx512", "avx512f", avx512, 32},
              {"bf16", "avx512bf16", bf16, 64}};

static int supported(const char *feature) {
  __builtin_cpu_init();
  if (!strcmp(feature, "fma")) return __builtin_cpu_supports("fma");
  if (!strcmp(feature, "avx512f")) return __builtin_cpu_supports("avx512f");
  return __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bf16");
}

int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 1;
  const char *only = argc > 2 ? argv[2] : NULL;
  if (threads < 1 || threads > 64) {
    fprintf(stderr, "usage: %s THREADS (1-64) [avx2|avx512|bf16]\n", argv[0]);
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
    double flops = kModes[m].flops_per_op * CHAINS * ITERATIONS * threads;
    printf("{\"mode\": \"%s\", \"threads\": %d, \"seconds\": %.3f, "
           "\"gflops\": %.1f}\n",
           kModes[m].name, threads, seconds, flops / seconds / 1e9);
  }
  return 0;
}
