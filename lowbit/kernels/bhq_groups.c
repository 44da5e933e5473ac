/* BHQ's groups from its row ranges: lowbit.kernels.bhq_groups (the Python module's docstring
 * says what and why; lowbit.kernels.bhq_groups.reference is the definition, in torch).
 *
 * The bookkeeping (the sort, the prefix sums, the groups and the gathers), whose float64
 * arithmetic (additions, one multiply and divide, round-half-even) is the reference's in
 * the reference's order (ATen's CPU cumsum adds sequentially), and the elementwise math of
 * the scales and Householder vectors (IEEE +, -, *, /, max: correctly rounded, so torch's
 * and C's agree), so the outputs are the reference's bit for bit. ATen's square root is
 * not the C library's (its float64 sqrt is not correctly rounded), so it stays in torch:
 * the square roots depend only on the group size g, and come as tables indexed by g - 1
 * computed by torch with the reference's operations (lowbit_bhq_groups reports the largest
 * g, lowbit_bhq_finish reads the tables). The scales' inverse cube root is
 * lowbit.kernels.bhq_groups.inv_cbrt's: an integer first guess and Newton steps of IEEE
 * operations, the same in torch and here. lowbit_bhq_finish then puts the scales and
 * vectors (and v * s, 2 v) back in row order. Plain C: no intrinsics, no -ffast-math;
 * OpenMP only across attention's entries, which are independent.
 */
#include <float.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#define THREAD_NUM() omp_get_thread_num()
#else  /* built without OpenMP (a compiler without it): one thread */
#define THREAD_NUM() 0
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* idx: 0..n-1 sorted by key descending, ties in ascending index (torch.argsort(key,
 * descending=True, stable=True) for keys without NaN; -0.0 equals +0.0). A stable LSD
 * radix sort on the keys' bits mapped to unsigned integers that order as the doubles do,
 * complemented (ascending complement = descending key), 8 bits a pass; a pass whose digit
 * is the same for every key is skipped (float32 ranges leave the low 29 bits zero). Below
 * SMALL_SORT keys (attention's heads: an entry of 128 rows) a stable merge sort on the same
 * keys instead, the same permutation: the radix sort's fixed 256-bucket work per pass cost
 * 4 us per 128-row entry.
 * ka, kb: n uint64 each; tmp: n int64. */
#define SMALL_SORT 256  /* below this many keys a merge sort: the radix sort's 8 passes of 256 buckets cost more */

/* Stable merge sort of (ka, idx)[lo, hi) by ka ascending (ties keep their order), with kb
 * and tmp as scratch over the same range; runs of up to 16 by insertion. */
static void merge_sort(uint64_t *ka, int64_t *idx, uint64_t *kb, int64_t *tmp, int64_t lo, int64_t hi) {
    if (hi - lo <= 16) {
        for (int64_t i = lo + 1; i < hi; i++) {
            const uint64_t k = ka[i];
            const int64_t x = idx[i];
            int64_t j = i;
            for (; j > lo && ka[j - 1] > k; j--) {
                ka[j] = ka[j - 1];
                idx[j] = idx[j - 1];
            }
            ka[j] = k;
            idx[j] = x;
        }
        return;
    }
    const int64_t mid = lo + (hi - lo) / 2;
    merge_sort(ka, idx, kb, tmp, lo, mid);
    merge_sort(ka, idx, kb, tmp, mid, hi);
    if (ka[mid - 1] <= ka[mid]) return;  /* already in order */
    int64_t a = lo, b = mid, o = lo;
    while (a < mid && b < hi) {
        const int right = ka[b] < ka[a];  /* equal keys: the left (earlier) one first */
        kb[o] = right ? ka[b] : ka[a];
        tmp[o++] = right ? idx[b++] : idx[a++];
    }
    while (a < mid) { kb[o] = ka[a]; tmp[o++] = idx[a++]; }
    while (b < hi) { kb[o] = ka[b]; tmp[o++] = idx[b++]; }
    memcpy(ka + lo, kb + lo, (size_t)(hi - lo) * sizeof(uint64_t));
    memcpy(idx + lo, tmp + lo, (size_t)(hi - lo) * sizeof(int64_t));
}

static void sort_desc(const double *key, int64_t *idx, uint64_t *ka, uint64_t *kb, int64_t *tmp, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint64_t u;
        double k = key[i] == 0.0 ? 0.0 : key[i];  /* -0.0 -> +0.0 */
        memcpy(&u, &k, sizeof u);
        u = (u >> 63) ? ~u : (u | 0x8000000000000000ull);  /* ascending as the doubles */
        ka[i] = ~u;
        idx[i] = i;
    }
    if (n < SMALL_SORT) {  /* the same order: a stable sort by the same keys */
        merge_sort(ka, idx, kb, tmp, 0, n);
        return;
    }
    int64_t *src_i = idx, *dst_i = tmp;
    uint64_t *src_k = ka, *dst_k = kb;
    for (int shift = 0; shift < 64; shift += 8) {
        int64_t count[257] = {0};
        for (int64_t i = 0; i < n; i++) count[((src_k[i] >> shift) & 0xFF) + 1]++;
        int skip = 0;
        for (int b = 1; b <= 256; b++)
            if (count[b] == n) skip = 1;
        if (skip) continue;
        for (int b = 0; b < 256; b++) count[b + 1] += count[b];
        for (int64_t i = 0; i < n; i++) {
            const int64_t o = count[(src_k[i] >> shift) & 0xFF]++;
            dst_k[o] = src_k[i];
            dst_i[o] = src_i[i];
        }
        int64_t *ti = src_i; src_i = dst_i; dst_i = ti;
        uint64_t *tk = src_k; src_k = dst_k; dst_k = tk;
    }
    if (src_i != idx) memcpy(idx, src_i, (size_t)n * sizeof(int64_t));
}

/* lam: (n,) float64 row ranges, n >= 2, all finite, at least one > 0 (the caller checks).
 * Outputs, all (n,) unless said; "sorted" ones are in the order of the rows sorted by range:
 *   order      the rows sorted by range, descending (stable)
 *   grp_sorted (sorted) group ids in [0, k): the k large rows are groups 0..k-1
 *   g          (sorted) float64 size of the row's group
 *   lam_large  (sorted) the range of the group's large row
 *   lam_small  (sorted) the range of the group's first (largest) small row, 0 if none
 *   group      group ids in row order
 *   crow       (n + 1,) of which k + 1 are used: group j's members are
 *              members[crow[j] : crow[j + 1]]
 *   members    row ids grouped by group, ascending within each group
 *   k_out      (2,): the number of groups k, and the largest group's size
 * work: 3 n int64 of scratch. */
void lowbit_bhq_groups(const double *lam, int64_t n, int64_t *order, int64_t *grp_sorted, double *g,
                       double *lam_large, double *lam_small, int64_t *group, int64_t *crow, int64_t *members,
                       int64_t *k_out, int64_t *work) {
    int64_t *cum = work, *tmp = work + n;
    double *prefix = (double *)(work + 2 * n), *ls = lam_large; /* ls: overwritten last */
    sort_desc(lam, order, (uint64_t *)work, (uint64_t *)(work + n), (int64_t *)(work + 2 * n), n);
    double acc = 0.0;
    for (int64_t i = 0; i < n; i++) {
        ls[i] = lam[order[i]];
        acc += ls[i];
        prefix[i] = acc;
    }
    /* z: the first z >= 1 with z * ls[n-z-1] > prefix[n-z-1], else n - 1 */
    int64_t z = n - 1;
    for (int64_t zc = 1; zc < n; zc++) {
        if ((double)zc * ls[n - zc - 1] > prefix[n - zc - 1]) {
            z = zc;
            break;
        }
    }
    int64_t k = n - z;
    double total = prefix[k - 1];
    /* each large row's share of small rows: round(cumsum(z * ls / total)) (half to even),
     * the last set to z, clamped to [0, z], then a running maximum */
    acc = 0.0;
    for (int64_t i = 0; i < k; i++) {
        acc += (double)z * ls[i] / total;
        cum[i] = (int64_t)nearbyint(acc);
    }
    cum[k - 1] = z;
    int64_t run = 0;
    for (int64_t i = 0; i < k; i++) {
        int64_t c = cum[i] < 0 ? 0 : (cum[i] > z ? z : cum[i]);
        run = i == 0 || c > run ? c : run;
        cum[i] = run;
    }
    /* large row i is group i; small row t is in the group j with cum[j-1] <= t < cum[j]
     * (searchsorted(cum, t, right=True)) */
    for (int64_t i = 0; i < k; i++) grp_sorted[i] = i;
    int64_t j = 0;
    for (int64_t t = 0; t < z; t++) {
        while (cum[j] <= t) j++;
        grp_sorted[k + t] = j;
    }
    /* per group (prefix[] is free now): its large row's range and first small row's */
    double *gl = prefix, *gs = (double *)tmp;
    for (int64_t q = 0; q < k; q++) {
        int64_t start = q == 0 ? 0 : cum[q - 1];
        gl[q] = ls[q];
        gs[q] = cum[q] > start ? ls[k + start] : 0.0;
    }
    for (int64_t i = 0; i < n; i++) {
        int64_t q = grp_sorted[i];
        int64_t start = q == 0 ? 0 : cum[q - 1];
        g[i] = (double)(cum[q] - start + 1);
        lam_large[i] = gl[q];
        lam_small[i] = gs[q];
        group[order[i]] = q;
    }
    /* members grouped by group, ascending row ids within a group: a counting sort */
    for (int64_t q = 0; q <= k; q++) crow[q] = 0;
    for (int64_t r = 0; r < n; r++) crow[group[r] + 1]++;
    for (int64_t q = 0; q < k; q++) crow[q + 1] += crow[q];
    int64_t *fill = work; /* cum is no longer needed */
    for (int64_t q = 0; q < k; q++) fill[q] = crow[q];
    for (int64_t r = 0; r < n; r++) members[fill[group[r]]++] = r;
    k_out[0] = k;
    int64_t gmax = 1;
    for (int64_t q = 0; q < k; q++)
        if (crow[q + 1] - crow[q] > gmax) gmax = crow[q + 1] - crow[q];
    k_out[1] = gmax;
}

/* b^(-1/3) as lowbit.kernels.bhq_groups.inv_cbrt computes it (its docstring: a subnormal b
 * scaled by 2^54 first and its result by 2^18, the first guess from the bits, INV_CBRT_STEPS Newton steps y + y ((1 - (b y)(y y)) THIRD), each
 * operation rounded as IEEE float64 arithmetic rounds it). The floor division of the bits
 * is Python's (toward -inf). */
#define INV_CBRT_MAGIC 0x553EF0FF289DD796LL
#define INV_CBRT_STEPS 4
#define INV_CBRT_THIRD (1.0 / 3.0)
/* inv_cbrt's first guess (its small-operand scaling applied by the caller). */
static inline double inv_cbrt_guess(double b) {
    int64_t bits, yb;
    memcpy(&bits, &b, sizeof bits);
    int64_t q = bits / 3;
    if (bits % 3 != 0 && bits < 0) q -= 1;
    yb = INV_CBRT_MAGIC - q;
    double y;
    memcpy(&y, &yb, sizeof y);
    return y;
}

#define INV_CBRT_STEP(y, b) ((y) + (y) * ((1.0 - ((b) * (y)) * ((y) * (y))) * INV_CBRT_THIRD))

static double inv_cbrt(double b) {
    const int small = b < DBL_MIN;  /* subnormal: b 2^54 (exact), the result times 2^18 (exact) */
    if (small) b = b * 18014398509481984.0;  /* 2^54 */
    double y = inv_cbrt_guess(b);
    for (int i = 0; i < INV_CBRT_STEPS; i++) y = INV_CBRT_STEP(y, b);
    return small ? y * 262144.0 : y;  /* 2^18 */
}

/* Row i's (sorted order) base and vector entry, as lowbit_bhq_finish computes them. */
static inline double finish_base(int64_t i, int64_t k, const double *g, const double *lam_large,
                                 const double *lam_small, const double *tab_r, const double *tab_vl,
                                 const double *tab_vs, const double *tab_hm, double ratio, double *v) {
    const double gi = g[i];
    const int64_t t = (int64_t)gi - 1;
    *v = i < k ? tab_vl[t] : tab_vs[t];
    const double gm1 = gi - 1.0 > 1.0 ? gi - 1.0 : 1.0;
    const double floor_ = ratio * lam_large[i] > DBL_MIN ? ratio * lam_large[i] : DBL_MIN;
    const double w2a = lam_small[i] * tab_hm[t];
    return i < k ? lam_large[i] / tab_r[t] : (w2a > floor_ ? w2a : floor_) / gm1;
}

/* Row i's outputs at row order[i] (lowbit_bhq_finish's). */
static inline void finish_store(int64_t o, double si, double v, int f64, void *scale, void *v_out, void *w_out,
                                void *v2_out) {
    if (f64) {
        ((double *)scale)[o] = si;
        ((double *)v_out)[o] = v;
        ((double *)w_out)[o] = v * si;
        ((double *)v2_out)[o] = 2.0 * v;
    } else {
        const float sf = (float)si, vf = (float)v;
        ((float *)scale)[o] = sf;
        ((float *)v_out)[o] = vf;
        ((float *)w_out)[o] = vf * sf;
        ((float *)v2_out)[o] = 2.0f * vf;
    }
}

/* The vectors and scales (lowbit.kernels.bhq_groups._scales_of), rows in sorted order (the
 * first k large) from lowbit_bhq_groups's g, lam_large, lam_small, written in row order
 * (row order[i]) in float32 (f64 == 0, round to nearest even) or float64:
 *   v      the Householder vector entry
 *   scale  g > 1: inv_cbrt(base) with base = λ_large/√g for a large row, else
 *          max(λ_small·max|H_g|, max(ratio·λ_large, DBL_MIN)) / max(g - 1, 1)
 *          (ratio: bhq_groups.MIN_SMALL_RATIO); 1 where g == 1
 *   w      v * scale, and v2 = 2 v (both in the output dtype: what BHQ's kernels read)
 * Tables (index g - 1, at least the largest group's size; bhq_groups._tables): r = sqrt(g),
 * vl and vs the vector entries of a group's large and small rows, hm = max|H_max(g, 2)|. */
void lowbit_bhq_finish(int64_t n, int64_t k, const int64_t *order, const double *g, const double *lam_large,
                       const double *lam_small, const double *tab_r, const double *tab_vl, const double *tab_vs,
                       const double *tab_hm, double ratio, int f64, void *scale, void *v_out, void *w_out,
                       void *v2_out) {
    int64_t i = 0;
    /* four rows at a time: inv_cbrt's operations for each (the same bits), its four chains of
     * dependent Newton steps interleaved, which one row at a time left the core waiting on */
    for (; i + 4 <= n; i += 4) {
        double v0, v1, v2, v3;
        double b0 = finish_base(i, k, g, lam_large, lam_small, tab_r, tab_vl, tab_vs, tab_hm, ratio, &v0);
        double b1 = finish_base(i + 1, k, g, lam_large, lam_small, tab_r, tab_vl, tab_vs, tab_hm, ratio, &v1);
        double b2 = finish_base(i + 2, k, g, lam_large, lam_small, tab_r, tab_vl, tab_vs, tab_hm, ratio, &v2);
        double b3 = finish_base(i + 3, k, g, lam_large, lam_small, tab_r, tab_vl, tab_vs, tab_hm, ratio, &v3);
        const int s0 = b0 < DBL_MIN, s1 = b1 < DBL_MIN, s2 = b2 < DBL_MIN, s3 = b3 < DBL_MIN;
        if (s0) b0 *= 18014398509481984.0;  /* 2^54: inv_cbrt's subnormal scaling */
        if (s1) b1 *= 18014398509481984.0;
        if (s2) b2 *= 18014398509481984.0;
        if (s3) b3 *= 18014398509481984.0;
        double y0 = inv_cbrt_guess(b0), y1 = inv_cbrt_guess(b1), y2 = inv_cbrt_guess(b2), y3 = inv_cbrt_guess(b3);
        for (int st = 0; st < INV_CBRT_STEPS; st++) {
            y0 = INV_CBRT_STEP(y0, b0);
            y1 = INV_CBRT_STEP(y1, b1);
            y2 = INV_CBRT_STEP(y2, b2);
            y3 = INV_CBRT_STEP(y3, b3);
        }
        if (s0) y0 *= 262144.0;  /* 2^18 */
        if (s1) y1 *= 262144.0;
        if (s2) y2 *= 262144.0;
        if (s3) y3 *= 262144.0;
        finish_store(order[i], g[i] > 1.0 ? y0 : 1.0, v0, f64, scale, v_out, w_out, v2_out);
        finish_store(order[i + 1], g[i + 1] > 1.0 ? y1 : 1.0, v1, f64, scale, v_out, w_out, v2_out);
        finish_store(order[i + 2], g[i + 2] > 1.0 ? y2 : 1.0, v2, f64, scale, v_out, w_out, v2_out);
        finish_store(order[i + 3], g[i + 3] > 1.0 ? y3 : 1.0, v3, f64, scale, v_out, w_out, v2_out);
    }
    for (; i < n; i++) {
        double v;
        const double base = finish_base(i, k, g, lam_large, lam_small, tab_r, tab_vl, tab_vs, tab_hm, ratio, &v);
        finish_store(order[i], g[i] > 1.0 ? inv_cbrt(base) : 1.0, v, f64, scale, v_out, w_out, v2_out);
    }
}

/* Groups within entries (lowbit.kernels.bhq_groups.run_entries): lam holds n_entries
 * consecutive entries of r rows each; every entry's groups are built from its own rows
 * alone, as lowbit_bhq_groups builds them for the entry's r ranges, except that an
 * entry of one row, or whose ranges include a NaN or an infinity, or are all zero, gets
 * groups of one (bhq_transform's rule for a whole operand). Outputs as lowbit_bhq_groups's,
 * each entry's in its own slice (r of each, r + 1 of crow) and in its own row and group
 * numbering (0..r-1, 0..k_e-1): k_out is (n_entries, 2), each entry's number of groups
 * and largest group. lowbit_bhq_entries_join then numbers them for the whole operand.
 * The entries are independent: they go to `threads` threads, each with its own 3 r int64
 * of scratch in work (3 r threads); the results do not depend on the threads. */
void lowbit_bhq_groups_entries(const double *lam, int64_t n_entries, int64_t r, int64_t *order, int64_t *grp_sorted,
                               double *g, double *lam_large, double *lam_small, int64_t *group, int64_t *crow,
                               int64_t *members, int64_t *k_out, int64_t *work, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t e = 0; e < n_entries; e++) {
        const double *le = lam + e * r;
        const int64_t o = e * r;
        int ok = r >= 2;
        double top = 0.0;
        for (int64_t i = 0; ok && i < r; i++) {
            if (!isfinite(le[i])) ok = 0;
            else if (le[i] > top) top = le[i];
        }
        if (ok && top > 0.0) {
            lowbit_bhq_groups(le, r, order + o, grp_sorted + o, g + o, lam_large + o, lam_small + o, group + o,
                              crow + e * (r + 1), members + o, k_out + 2 * e, work + 3 * r * THREAD_NUM());
            continue;
        }
        for (int64_t i = 0; i < r; i++) {  /* groups of one: g = 1 gives s = 1, v = 0 */
            order[o + i] = i;
            grp_sorted[o + i] = i;
            g[o + i] = 1.0;
            lam_large[o + i] = 0.0;
            lam_small[o + i] = 0.0;
            group[o + i] = i;
            crow[e * (r + 1) + i] = i;
            members[o + i] = i;
        }
        crow[e * (r + 1) + r] = r;
        k_out[2 * e] = r;
        k_out[2 * e + 1] = 1;
    }
}

void lowbit_bhq_entries_join(int64_t n_entries, int64_t r, const int64_t *k_out, int64_t *group,
                             const int64_t *crow, int64_t *members, int64_t *crow_out);

/* lowbit_bhq_finish for each entry of lowbit_bhq_groups_entries's outputs (its k_out; the
 * entry's order is its own rows), on `threads` threads, then lowbit_bhq_entries_join. */
void lowbit_bhq_finish_entries(int64_t n_entries, int64_t r, const int64_t *k_out, const int64_t *order,
                               const double *g, const double *lam_large, const double *lam_small,
                               const double *tab_r, const double *tab_vl, const double *tab_vs, const double *tab_hm,
                               double ratio, int f64, void *scale, void *v_out, void *w_out, void *v2_out,
                               int64_t *group, const int64_t *crow, int64_t *members, int64_t *crow_out,
                               int threads) {
    const size_t size = f64 ? sizeof(double) : sizeof(float);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t e = 0; e < n_entries; e++) {
        const int64_t o = e * r;
        const size_t b = (size_t)o * size;
        lowbit_bhq_finish(r, k_out[2 * e], order + o, g + o, lam_large + o, lam_small + o, tab_r, tab_vl, tab_vs,
                          tab_hm, ratio, f64, (char *)scale + b, (char *)v_out + b, (char *)w_out + b,
                          (char *)v2_out + b);
    }
    lowbit_bhq_entries_join(n_entries, r, k_out, group, crow, members, crow_out);
}

/* The entries' groups numbered for the whole operand, in place: entry e's group ids and
 * member rows offset by the groups and rows of the entries before it, and crow_out
 * (K + 1,) the whole operand's CSR row pointer (K = the entries' groups together) from
 * the entries' own (r + 1 each). */
void lowbit_bhq_entries_join(int64_t n_entries, int64_t r, const int64_t *k_out, int64_t *group,
                             const int64_t *crow, int64_t *members, int64_t *crow_out) {
    int64_t groups = 0;
    for (int64_t e = 0; e < n_entries; e++) {
        const int64_t o = e * r, k = k_out[2 * e];
        for (int64_t i = 0; i < r; i++) {
            group[o + i] += groups;
            members[o + i] += o;
        }
        for (int64_t q = 0; q < k; q++) crow_out[groups + q] = crow[e * (r + 1) + q] + o;
        groups += k;
    }
    crow_out[groups] = n_entries * r;
}

/* The ranges checked and made float64 (lowbit_bhq_build's and lowbit_bhq_build_entries'
 * first step): lam (n,) float64 (lam_f64) or float32, copied into l64 (exact). Returns 0
 * where a range is negative (-Inf included) or, with finite, where one is NaN or +Inf or
 * none is positive; else 1. */
static int ranges64(const void *lam, int lam_f64, int64_t n, int finite, double *l64) {
    double top = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const double x = lam_f64 ? ((const double *)lam)[i] : (double)((const float *)lam)[i];
        if (x < 0.0 || (finite && !(x <= DBL_MAX))) return 0;  /* !(x <= DBL_MAX): NaN or +Inf */
        if (x > top) top = x;
        l64[i] = x;
    }
    return !finite || top > 0.0;
}

/* The op bhq_groups in one call (lowbit.kernels.bhq_groups._groups): lam (n,) float64
 * (lam_f64) or float32 ranges, n >= 2; then lowbit_bhq_groups and, where the tables
 * (tab_size entries each) cover the largest group, lowbit_bhq_finish. out: scale, v, w,
 * v2, n each, in the output dtype (f64: float64, else float32), one after the other; idx:
 * group (n), members (n), crow (n + 1, of which k + 1 used); work: 9 n + 2 int64 of
 * scratch (lam as float64, order, grp_sorted, g, lam_large, lam_small, 3 n for
 * lowbit_bhq_groups, and its k_out last). Returns the number of groups k >= 1; -1 where
 * the tables are too small (lowbit_bhq_finish then runs with grown ones on work's arrays:
 * k_out holds k and the largest group); 0 where the ranges are outside the op's
 * conditions (a NaN, an infinity, a negative range or none positive: ranges64), nothing
 * written but work. */
int64_t lowbit_bhq_build(const void *lam, int lam_f64, int64_t n, double ratio, int f64, const double *tab_r,
                         const double *tab_vl, const double *tab_vs, const double *tab_hm, int64_t tab_size,
                         void *out, int64_t *idx, int64_t *work) {
    double *l64 = (double *)work;
    if (!ranges64(lam, lam_f64, n, 1, l64)) return 0;
    int64_t *order = work + n, *grp_sorted = work + 2 * n, *k_out = work + 9 * n;
    double *g = (double *)(work + 3 * n), *lam_large = (double *)(work + 4 * n), *lam_small = (double *)(work + 5 * n);
    lowbit_bhq_groups(l64, n, order, grp_sorted, g, lam_large, lam_small, idx, idx + 2 * n, idx + n, k_out,
                      work + 6 * n);
    if (k_out[1] > tab_size) return -1;
    const size_t b = (size_t)n * (f64 ? sizeof(double) : sizeof(float));
    lowbit_bhq_finish(n, k_out[0], order, g, lam_large, lam_small, tab_r, tab_vl, tab_vs, tab_hm, ratio, f64, out,
                      (char *)out + b, (char *)out + 2 * b, (char *)out + 3 * b);
    return k_out[0];
}

/* The op bhq_entry_groups in one call (lowbit.kernels.bhq_groups._entry_groups): lam
 * (n_entries r,) float64 (lam_f64) or float32, then lowbit_bhq_groups_entries and
 * lowbit_bhq_finish_entries on `threads` threads. The tables must cover r (tab_size >=
 * r). out as lowbit_bhq_build's; idx: group (n), members (n), crow_out (n + 1, of which
 * K + 1 used); k_out (n_entries, 2); work: 6 n + n_entries (r + 1) + 3 r threads int64
 * (lam as float64, order, grp_sorted, g, lam_large, lam_small, the entries' own crow,
 * each thread's scratch). Returns the groups K of
 * all entries; 0 where a range is negative (-Inf included: outside the op's conditions,
 * nothing written but work) or r > tab_size. */
int64_t lowbit_bhq_build_entries(const void *lam, int lam_f64, int64_t n_entries, int64_t r, double ratio, int f64,
                                 const double *tab_r, const double *tab_vl, const double *tab_vs,
                                 const double *tab_hm, int64_t tab_size, void *out, int64_t *idx, int64_t *k_out,
                                 int64_t *work, int threads) {
    const int64_t n = n_entries * r;
    double *l64 = (double *)work;
    if (r > tab_size || !ranges64(lam, lam_f64, n, 0, l64)) return 0;
    int64_t *order = work + n, *grp_sorted = work + 2 * n, *crow = work + 6 * n;
    double *g = (double *)(work + 3 * n), *lam_large = (double *)(work + 4 * n), *lam_small = (double *)(work + 5 * n);
    lowbit_bhq_groups_entries(l64, n_entries, r, order, grp_sorted, g, lam_large, lam_small, idx, crow, idx + n,
                              k_out, crow + n_entries * (r + 1), threads);
    const size_t b = (size_t)n * (f64 ? sizeof(double) : sizeof(float));
    lowbit_bhq_finish_entries(n_entries, r, k_out, order, g, lam_large, lam_small, tab_r, tab_vl, tab_vs, tab_hm,
                              ratio, f64, out, (char *)out + b, (char *)out + 2 * b, (char *)out + 3 * b, idx, crow,
                              idx + n, idx + 2 * n, threads);
    int64_t groups = 0;
    for (int64_t e = 0; e < n_entries; e++) groups += k_out[2 * e];
    return groups;
}
