/* The CPU's float32 arithmetic ceiling: AVX2 fused multiply-adds, no memory.

     gcc -O2 -mavx2 -mfma -pthread benchmarks/fma_peak.c -o /tmp/fma_peak
     /tmp/fma_peak 1 && /tmp/fma_peak 2      # threads

   Each thread runs 10 independent chains of 8-wide FMAs (enough to cover the
   FMA latency on two pipes) and the program prints GFLOP/s (an FMA counts
   2). docs/performance.md compares the calibration convolution and the
   train step with it.
*/
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define CHAINS 10
#define ITERATIONS 800000000L

static volatile float sink;

static void *work(void *unused) {
  (void)unused;
  __m256 acc[CHAINS];
  const __m256 mul = _mm256_set1_ps(0.999999f), add = _mm256_set1_ps(1e-7f);
  for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_set1_ps((float)i);
  for (long k = 0; k < ITERATIONS; k++) {
#pragma GCC unroll 10
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

int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 1;
  if (threads < 1 || threads > 64) {
    fprintf(stderr, "usage: %s THREADS (1-64)\n", argv[0]);
    return 1;
  }
  pthread_t ids[64];
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int i = 0; i < threads; i++) pthread_create(&ids[i], NULL, work, NULL);
  for (int i = 0; i < threads; i++) pthread_join(ids[i], NULL);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double seconds = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
  double flops = 2.0 * 8 * CHAINS * ITERATIONS * threads;
  printf("{\"threads\": %d, \"seconds\": %.3f, \"gflops\": %.1f}\n", threads,
         seconds, flops / seconds / 1e9);
  return 0;
}
