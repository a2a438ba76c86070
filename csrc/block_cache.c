/* Keeps the large blocks that XLA:CPU allocates for every call's temporaries.
 *
 * XLA:CPU takes each call's temporaries (685 MiB for the aio5 train step at
 * 64x64) from `posix_memalign` and frees them when the call ends; glibc maps
 * a block that large afresh each time and unmaps it on `free`, so the kernel
 * faults in and zeroes every page of it again on every call (`perf`: 9 % of
 * the train step's CPU time on this project's CPU machine, in the kernel's
 * `clear_page_erms`; docs/performance.md, "Kept per-call blocks"). Loaded
 * with LD_PRELOAD (drdd_jax/host_memory.py), this library serves aligned
 * allocations of at least 64 MiB from its own mappings (on transparent huge
 * pages) and keeps a freed one for the next request of the same size: the
 * next call of the same program gets the same pages back, already faulted
 * in.
 *
 * What it keeps never adds to the resident peak of the calls themselves: a
 * freed block is unmapped at once if a block of its size taken after it is
 * in use (the next call was dispatched before this one ended: glibc would
 * have unmapped it too), and all kept blocks are unmapped as soon as a large
 * request of another size arrives (another program). Between calls the kept
 * blocks stay resident (at most `kKeep`); `drdd_block_cache_release()`
 * unmaps them (`host_memory.release_freed`, which the training loop calls
 * before other work). Calls overlap when a program is dispatched again
 * before the last call ends, so a caller that wants the reuse waits for each
 * call first (`train.wait_each_step`); a request that finds its size in use
 * waits up to 2 ms for it, since XLA frees a call's temporaries just after
 * its outputs are ready. Everything else goes to glibc.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

extern void *__libc_memalign(size_t alignment, size_t size);
extern void *__libc_realloc(void *ptr, size_t size);
extern void *__libc_malloc(size_t size);
extern void __libc_free(void *ptr);

enum { kSlots = 16, kKeep = 4, kWaitUs = 2000 };
static const size_t kMinBytes = (size_t)64 << 20;
static const size_t kHuge = (size_t)2 << 20;  /* Transparent huge page. */

typedef struct {
  _Atomic(void *) ptr;  /* NULL: slot empty. */
  size_t bytes;         /* Mapped length (a multiple of kHuge). */
  int in_use;
  uint64_t taken_at;    /* Order of takes: which block came after which. */
  uint64_t freed_at;    /* Order of frees, to drop the oldest first. */
} Slot;

static Slot slots[kSlots];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t freed = PTHREAD_COND_INITIALIZER;
static uint64_t takes, frees;

/* A child forked while another thread held `mu` must not inherit it held. */
static void lock(void) { pthread_mutex_lock(&mu); }
static void unlock(void) { pthread_mutex_unlock(&mu); }
__attribute__((constructor)) static void init(void) {
  pthread_atfork(lock, unlock, unlock);
}

/* Maps `bytes` (a multiple of kHuge) aligned to kHuge, or returns NULL. */
static void *map_block(size_t bytes) {
  char *p = mmap(NULL, bytes + kHuge, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return NULL;
  char *start = (char *)(((uintptr_t)p + kHuge - 1) & ~(uintptr_t)(kHuge - 1));
  if (start > p) munmap(p, start - p);
  munmap(start + bytes, p + kHuge - start);
  madvise(start, bytes, MADV_HUGEPAGE);
  return start;
}

/* Unmaps slot `i`; `mu` held. The slot is emptied first, so that `find`
 * never matches an address the kernel may hand out again. */
static void drop(int i) {
  void *p = atomic_exchange(&slots[i].ptr, NULL);
  munmap(p, slots[i].bytes);
}

/* The slot holding `p` as an allocation in use, or -1 (lock-free first). */
static int find(void *p) {
  if (p == NULL) return -1;
  for (int i = 0; i < kSlots; ++i)
    if (atomic_load_explicit(&slots[i].ptr, memory_order_acquire) == p)
      return i;
  return -1;
}

/* A kept block of `bytes`, now in use, or NULL; `mu` held. */
static void *reuse(size_t bytes) {
  for (int i = 0; i < kSlots; ++i)
    if (slots[i].ptr && !slots[i].in_use && slots[i].bytes == bytes) {
      slots[i].in_use = 1;
      slots[i].taken_at = ++takes;
      return slots[i].ptr;
    }
  return NULL;
}

/* Whether a block of `bytes` is in use; `mu` held. */
static int in_use(size_t bytes) {
  for (int i = 0; i < kSlots; ++i)
    if (slots[i].ptr && slots[i].in_use && slots[i].bytes == bytes) return 1;
  return 0;
}

static void *take(size_t alignment, size_t size) {
  if (size < kMinBytes || alignment > kHuge) return NULL;
  size_t bytes = (size + kHuge - 1) & ~(kHuge - 1);
  lock();
  void *out = reuse(bytes);
  if (!out && in_use(bytes)) {
    /* The last call of this program may be just ending: XLA frees its
     * temporaries shortly after its outputs are ready, so a caller that
     * waited for them can be here first. Wait up to kWaitUs for that block;
     * a call still running keeps it, and this one gets a new block. */
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_nsec += kWaitUs * 1000L;
    until.tv_sec += until.tv_nsec / 1000000000L;
    until.tv_nsec %= 1000000000L;
    int waiting = 1;
    while (!out && waiting && in_use(bytes)) {
      waiting = pthread_cond_timedwait(&freed, &mu, &until) == 0;
      out = reuse(bytes);
    }
  }
  if (!out) {
    for (int i = 0; i < kSlots; ++i)  /* Another program's: let them go. */
      if (slots[i].ptr && !slots[i].in_use) drop(i);
    for (int i = 0; i < kSlots && !out; ++i)
      if (!slots[i].ptr && (out = map_block(bytes)) != NULL) {
        slots[i].bytes = bytes;
        slots[i].in_use = 1;
        slots[i].taken_at = ++takes;
        atomic_store_explicit(&slots[i].ptr, out, memory_order_release);
      }
  }
  unlock();
  return out;  /* NULL: no free slot or no mapping; glibc serves it. */
}

/* Returns 1 if `p` was ours (now kept for reuse), 0 if it is glibc's. */
static int give_back(void *p) {
  if (find(p) < 0) return 0;
  lock();
  int i = find(p);
  if (i >= 0) {
    slots[i].in_use = 0;
    slots[i].freed_at = ++frees;
    int kept = 0, oldest = -1, successor = 0;
    for (int j = 0; j < kSlots; ++j) {
      if (!slots[j].ptr) continue;
      if (slots[j].in_use) {
        successor |= slots[j].bytes == slots[i].bytes &&
                     slots[j].taken_at > slots[i].taken_at;
      } else {
        ++kept;
        if (oldest < 0 || slots[j].freed_at < slots[oldest].freed_at)
          oldest = j;
      }
    }
    /* A block of this size, taken after this one, already serves the next
     * call (the calls overlapped): keeping this one too would hold two
     * resident. */
    if (successor) drop(i);
    else if (kept > kKeep) drop(oldest);
    pthread_cond_broadcast(&freed);
  }
  unlock();
  return i >= 0;
}

int posix_memalign(void **out, size_t alignment, size_t size) {
  if (alignment < sizeof(void *) || (alignment & (alignment - 1)))
    return EINVAL;
  void *p = take(alignment, size);
  if (!p) p = __libc_memalign(alignment, size);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}

void *aligned_alloc(size_t alignment, size_t size) {
  void *p = take(alignment, size);
  return p ? p : __libc_memalign(alignment, size);
}

void *memalign(size_t alignment, size_t size) {
  void *p = take(alignment, size);
  return p ? p : __libc_memalign(alignment, size);
}

void free(void *p) {
  if (!give_back(p)) __libc_free(p);
}

void *realloc(void *p, size_t size) {
  int i = find(p);
  if (i < 0) return __libc_realloc(p, size);
  void *q = __libc_malloc(size);
  if (!q) return NULL;
  size_t keep = slots[i].bytes < size ? slots[i].bytes : size;
  memcpy(q, p, keep);
  give_back(p);
  return q;
}

size_t malloc_usable_size(void *p) {
  static size_t (*libc_usable_size)(void *);
  int i = find(p);
  if (i >= 0) return slots[i].bytes;
  if (!libc_usable_size)
    libc_usable_size = (size_t (*)(void *))dlsym(RTLD_NEXT,
                                                 "malloc_usable_size");
  return libc_usable_size(p);
}

/* Unmaps every kept block; returns how many bytes it released. */
size_t drdd_block_cache_release(void) {
  size_t released = 0;
  lock();
  for (int i = 0; i < kSlots; ++i)
    if (slots[i].ptr && !slots[i].in_use) {
      released += slots[i].bytes;
      drop(i);
    }
  unlock();
  return released;
}
