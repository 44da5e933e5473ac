/* heap_peak.c — an LD_PRELOAD shim for benchmarks/bench_step.py's peak memory: counts
 * the bytes glibc's malloc family has handed out and not yet taken back (each block's
 * malloc_usable_size), and the largest that count reached, exactly — every malloc-family
 * allocation of torch, oneDNN, lowbit's kernels and Python's large objects, however
 * short-lived (a sampling thread misses what lives less than its period). Not counted:
 * Python's small objects (pymalloc maps its own arenas) and memory mapped directly, which
 * glibc's mallinfo2 does not count either. Preloaded alone: it forwards to glibc, so
 * another preloaded allocator would be bypassed (bench_step then samples instead).
 *
 * Every entry point forwards to glibc's own (__libc_malloc and friends), so nothing but
 * the count changes. Queried through ctypes: lowbit_heap_bytes(), lowbit_heap_peak(),
 * lowbit_heap_reset_peak() (the peak restarts from the bytes in use now).
 *
 *   cc -x c -O2 -shared -fPIC -o heap_peak.so heap_peak.c
 *   LD_PRELOAD=./heap_peak.so python benchmarks/bench_step.py --child ...   (bench_step does this)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stddef.h>
#include <stdlib.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);
extern void *__libc_valloc(size_t);
extern void *__libc_pvalloc(size_t);

static long long cur_bytes, peak_bytes;

static void counted(void *p) {
    if (!p) return;
    long long now = __atomic_add_fetch(&cur_bytes, (long long)malloc_usable_size(p), __ATOMIC_RELAXED);
    long long old = __atomic_load_n(&peak_bytes, __ATOMIC_RELAXED);
    while (now > old && !__atomic_compare_exchange_n(&peak_bytes, &old, now, 1, __ATOMIC_RELAXED,
                                                     __ATOMIC_RELAXED)) {
    }
}

static void uncounted(void *p) {
    if (p) __atomic_sub_fetch(&cur_bytes, (long long)malloc_usable_size(p), __ATOMIC_RELAXED);
}

void *malloc(size_t n) { void *p = __libc_malloc(n); counted(p); return p; }
void *calloc(size_t a, size_t b) { void *p = __libc_calloc(a, b); counted(p); return p; }
void free(void *p) { uncounted(p); __libc_free(p); }
void *memalign(size_t a, size_t n) { void *p = __libc_memalign(a, n); counted(p); return p; }
void *aligned_alloc(size_t a, size_t n) { void *p = __libc_memalign(a, n); counted(p); return p; }
void *valloc(size_t n) { void *p = __libc_valloc(n); counted(p); return p; }
void *pvalloc(size_t n) { void *p = __libc_pvalloc(n); counted(p); return p; }

void *realloc(void *q, size_t n) {
    long long before = q ? (long long)malloc_usable_size(q) : 0;
    void *p = __libc_realloc(q, n);
    if (p || n == 0) {  /* q was taken back (moved, resized or freed); on failure it stays */
        __atomic_sub_fetch(&cur_bytes, before, __ATOMIC_RELAXED);
        counted(p);
    }
    return p;
}

int posix_memalign(void **out, size_t a, size_t n) {
    if (a < sizeof(void *) || (a & (a - 1)) != 0) return EINVAL;
    void *p = __libc_memalign(a, n);
    if (!p) return ENOMEM;
    counted(p);
    *out = p;
    return 0;
}

long long lowbit_heap_bytes(void) { return __atomic_load_n(&cur_bytes, __ATOMIC_RELAXED); }
long long lowbit_heap_peak(void) { return __atomic_load_n(&peak_bytes, __ATOMIC_RELAXED); }
void lowbit_heap_reset_peak(void) {
    __atomic_store_n(&peak_bytes, __atomic_load_n(&cur_bytes, __ATOMIC_RELAXED), __ATOMIC_RELAXED);
}
