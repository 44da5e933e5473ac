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
static double inv_cbrt(double b) {
    const int small = b < DBL_MIN;  /* subnormal: b 2^54 (exact), the result times 2^18 (exact) */
    if (small) b = b * 18014398509481984.0;  /* 2^54 */
    int64_t bits, yb;
    memcpy(&bits, &b, sizeof bits);
    int64_t q = bits / 3;
    if (bits % 3 != 0 && bits < 0) q -= 1;
    yb = INV_CBRT_MAGIC - q;
    double y;
    memcpy(&y, &yb, sizeof y);
    for (int i = 0; i < INV_CBRT_STEPS; i++) y = y + y * ((1.0 - (b * y) * (y * y)) * INV_CBRT_THIRD);
    return small ? y * 262144.0 : y;  /* 2^18 */
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
    for (int64_t i = 0; i < n; i++) {
        const double gi = g[i];
        const int64_t t = (int64_t)gi - 1;
        const double v = i < k ? tab_vl[t] : tab_vs[t];
        const double gm1 = gi - 1.0 > 1.0 ? gi - 1.0 : 1.0;
        const double floor_ = ratio * lam_large[i] > DBL_MIN ? ratio * lam_large[i] : DBL_MIN;
        const double w2a = lam_small[i] * tab_hm[t];
        const double base = i < k ? lam_large[i] / tab_r[t] : (w2a > floor_ ? w2a : floor_) / gm1;
        const double si = gi > 1.0 ? inv_cbrt(base) : 1.0;
        const int64_t o = order[i];
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
