/* BHQ's groups from its row ranges: lowbit.kernels.bhq_groups (the Python module's docstring
 * says what and why; lowbit.kernels.bhq_groups.reference is the definition, in torch).
 *
 * The bookkeeping only: the sort, the prefix sums, the groups and the gathers, whose
 * float64 arithmetic (additions, one multiply and divide, round-half-even) is the
 * reference's in the reference's order (ATen's CPU cumsum adds sequentially), so the
 * outputs are the reference's bit for bit. The scales' and vectors' elementwise math
 * (square roots, powers) stays in torch for both (ATen's sqrt and pow are not always
 * the C library's). Plain C: no intrinsics, no -ffast-math.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* idx: 0..n-1 sorted by key descending, ties in ascending index (torch.argsort(key,
 * descending=True, stable=True) for keys without NaN). Bottom-up merge sort. */
static void sort_desc(const double *key, int64_t *idx, int64_t *tmp, int64_t n) {
    for (int64_t i = 0; i < n; i++) idx[i] = i;
    int64_t *src = idx, *dst = tmp;
    for (int64_t width = 1; width < n; width *= 2) {
        for (int64_t lo = 0; lo < n; lo += 2 * width) {
            int64_t mid = lo + width < n ? lo + width : n;
            int64_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            int64_t a = lo, b = mid, o = lo;
            while (a < mid && b < hi) dst[o++] = key[src[b]] > key[src[a]] ? src[b++] : src[a++];
            while (a < mid) dst[o++] = src[a++];
            while (b < hi) dst[o++] = src[b++];
        }
        int64_t *t = src; src = dst; dst = t;
    }
    if (src != idx) memcpy(idx, src, (size_t)n * sizeof(int64_t));
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
 *   k_out      (1,): the number of groups k
 * work: 3 n int64 of scratch. */
void lowbit_bhq_groups(const double *lam, int64_t n, int64_t *order, int64_t *grp_sorted, double *g,
                       double *lam_large, double *lam_small, int64_t *group, int64_t *crow, int64_t *members,
                       int64_t *k_out, int64_t *work) {
    int64_t *cum = work, *tmp = work + n;
    double *prefix = (double *)(work + 2 * n), *ls = lam_large; /* ls: overwritten last */
    sort_desc(lam, order, tmp, n);
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
    *k_out = k;
}
