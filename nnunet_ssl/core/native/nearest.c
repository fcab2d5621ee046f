/* Spade's voxel matching on CPU in compiled C (nnunet_ssl.core.native): the same pairs as the torch matching of
   nnunet_ssl.core.correspondence.match_voxels, in one call instead of ~90 small tensor operations.

   Nearest valid voxel: the valid points of a view are sorted into a grid of cells a little wider than the
   tolerance, so a point within the tolerance of a query lies in one of the 3 x 3 x 3 cells around the query's
   cell; only those are searched. Exact (no fit of the view, any deformation): the nearest point is found whenever
   one lies within the tolerance; among equal squared distances the lowest index wins, as the torch search's first
   minimum does. Squared distances are ((dx^2 + dy^2) + dz^2) in float32, compiled without contraction to fused
   multiply-adds, as torch computes them. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

static int finite3(const float *x) { return isfinite(x[0]) && isfinite(x[1]) && isfinite(x[2]); }

typedef struct {
    const float *p;
    double lo[3], inv_cell;
    int64_t dims[3];
    int64_t *start;  /* (cells + 1): the points of cell c are order[start[c] .. start[c + 1]) */
    int64_t *order;  /* point indices by cell, increasing within a cell */
    int64_t *cell_of;
    size_t cap, npoints;
} grid_t;

static void grid_free(grid_t *g) {
    free(g->start);
    free(g->order);
    free(g->cell_of);
}

/* Sort the ok, finite points of p (n, 3) into cells; returns 0, or -1 without memory. Reuses g's buffers. */
static int grid_build(grid_t *g, const float *p, const uint8_t *ok, int64_t n, double tol) {
    g->p = p;
    if ((size_t)n > g->npoints || !g->order) {
        free(g->order);
        free(g->cell_of);
        g->order = (int64_t *)malloc(sizeof(int64_t) * (size_t)(n > 0 ? n : 1));
        g->cell_of = (int64_t *)malloc(sizeof(int64_t) * (size_t)(n > 0 ? n : 1));
        g->npoints = (size_t)n;
        if (!g->order || !g->cell_of) return -1;
    }
    double lo[3] = {INFINITY, INFINITY, INFINITY}, hi[3] = {-INFINITY, -INFINITY, -INFINITY};
    int64_t count = 0;
    for (int64_t j = 0; j < n; j++) {
        const float *x = p + 3 * j;
        if (!ok[j] || !finite3(x)) continue;
        for (int d = 0; d < 3; d++) {
            if (x[d] < lo[d]) lo[d] = x[d];
            if (x[d] > hi[d]) hi[d] = x[d];
        }
        count++;
    }
    if (count == 0) {
        for (int d = 0; d < 3; d++) { g->lo[d] = 0.0; g->dims[d] = 1; }
        g->inv_cell = 0.0;
    } else {
        /* cells 0.1 % wider than tol (the rounding of a cell index cannot hide a point within tol), widened until
           there are at most ~8 cells per point */
        double cell = tol * 1.001 + 1e-12;
        if (isinf(cell)) cell = DBL_MAX;  /* any width >= tol is exact */
        if (!(cell > 0.0)) cell = 1.0;  /* NaN: nothing is within tol anyway */
        for (;;) {
            double total = 1.0;
            for (int d = 0; d < 3; d++) {
                double span = (hi[d] - lo[d]) / cell;
                g->dims[d] = span < 1e9 ? (int64_t)span + 1 : 0;
                total *= g->dims[d] > 0 ? (double)g->dims[d] : INFINITY;
            }
            if (total <= 8.0 * (double)count + 64.0) break;
            cell *= 2.0;
        }
        for (int d = 0; d < 3; d++) g->lo[d] = lo[d];
        g->inv_cell = 1.0 / cell;
    }
    size_t cells = (size_t)(g->dims[0] * g->dims[1] * g->dims[2]);
    if (cells + 1 > g->cap || !g->start) {
        free(g->start);
        g->cap = cells + 1;
        g->start = (int64_t *)malloc(sizeof(int64_t) * g->cap);
        if (!g->start) return -1;
    }
    int64_t *start = g->start;
    memset(start, 0, sizeof(int64_t) * (cells + 1));
    for (int64_t j = 0; j < n; j++) {
        const float *x = p + 3 * j;
        if (!ok[j] || !finite3(x)) { g->cell_of[j] = -1; continue; }
        int64_t c = 0;
        for (int d = 0; d < 3; d++)  /* x - lo >= 0: truncation is the floor */
            c = c * g->dims[d] + clamp64((int64_t)((x[d] - g->lo[d]) * g->inv_cell), 0, g->dims[d] - 1);
        g->cell_of[j] = c;
        start[c + 1]++;
    }
    for (size_t c = 0; c < cells; c++) start[c + 1] += start[c];
    for (int64_t j = 0; j < n; j++)  /* a stable counting sort: increasing index within a cell */
        if (g->cell_of[j] >= 0) g->order[start[g->cell_of[j]]++] = j;
    for (size_t c = cells; c > 0; c--) start[c] = start[c - 1];
    start[0] = 0;
    return 0;
}

/* The nearest point of the 27 cells around x: its index (-1: none) and squared distance (+inf: none). */
static int64_t grid_nearest(const grid_t *g, const float *x, float *out_d2) {
    int64_t best = -1;
    float best_d2 = INFINITY;
    int64_t c0[3], c1[3];
    if (!finite3(x) || g->inv_cell == 0.0) { *out_d2 = INFINITY; return -1; }
    for (int d = 0; d < 3; d++) {
        double f = floor((x[d] - g->lo[d]) * g->inv_cell);
        if (f < -1.0 || f > (double)g->dims[d]) { *out_d2 = INFINITY; return -1; }  /* > a cell from every point */
        c0[d] = clamp64((int64_t)f - 1, 0, g->dims[d] - 1);
        c1[d] = clamp64((int64_t)f + 1, 0, g->dims[d] - 1);
    }
    for (int64_t a = c0[0]; a <= c1[0]; a++)
        for (int64_t b = c0[1]; b <= c1[1]; b++) {
            /* the cells c0[2] .. c1[2] of a row are consecutive: one run of points */
            int64_t row = (a * g->dims[1] + b) * g->dims[2];
            for (int64_t s = g->start[row + c0[2]]; s < g->start[row + c1[2] + 1]; s++) {
                int64_t j = g->order[s];
                const float *y = g->p + 3 * j;
                float d0 = y[0] - x[0], d1 = y[1] - x[1], d2 = y[2] - x[2];
                float e = d0 * d0 + d1 * d1;
                e = e + d2 * d2;
                if (e < best_d2 || (e == best_d2 && j < best)) { best_d2 = e; best = j; }
            }
        }
    *out_d2 = best_d2;
    return best;
}

/* For every query point q (bsz, m, 3) of batch item b, the nearest point of p (bsz, n, 3) whose flag ok (bsz, n)
   is set: out_idx (bsz, m) and out_d2 (bsz, m) exact whenever that point lies within tol; index 0 and +inf where
   no flagged point lies within about tol. Returns 0, or -1 without memory (outputs then undefined). */
int nearest_within(const float *q, int64_t bsz, int64_t m, const float *p, const uint8_t *ok, int64_t n,
                   double tol, int64_t *out_idx, float *out_d2) {
    grid_t g;
    memset(&g, 0, sizeof g);
    for (int64_t b = 0; b < bsz; b++) {
        if (grid_build(&g, p + b * n * 3, ok + b * n, n, tol) != 0) { grid_free(&g); return -1; }
        for (int64_t i = 0; i < m; i++) {
            int64_t j = grid_nearest(&g, q + (b * m + i) * 3, out_d2 + b * m + i);
            out_idx[b * m + i] = j < 0 ? 0 : j;
        }
    }
    grid_free(&g);
    return 0;
}

/* ------------------------------------------------------------------ the whole matching */

typedef struct { float score; int64_t idx; } scored_t;

/* descending score, ascending index among equal scores */
static int before(const scored_t *a, const scored_t *b) {
    return a->score > b->score || (a->score == b->score && a->idx < b->idx);
}

/* Sort v (len) into the `before` order by buckets of score (NB of them between the extreme scores, highest first;
   a monotone map, so buckets hold consecutive ranks) and only as far as needed: the caller sorts one bucket at a
   time (insertion sort: a bucket holds ~len / NB entries of uniform scores) as it reaches it. out (len): v by
   bucket, stable; first (NB + 1): bucket b is out[first[b] .. first[b + 1]). */
#define NB 256
static int64_t bucket_of(float score, float hi, float scale) {
    float t = (hi - score) * scale;
    return t >= 0.0f && t < (float)NB ? (int64_t)t : (t >= (float)NB ? NB - 1 : 0);  /* NaN: bucket 0 */
}

static void bucket_by_score(const scored_t *v, int64_t len, scored_t *out, int64_t *first) {
    float lo = INFINITY, hi = -INFINITY;
    for (int64_t i = 0; i < len; i++) {
        if (v[i].score < lo) lo = v[i].score;
        if (v[i].score > hi) hi = v[i].score;
    }
    float scale = hi > lo ? (float)NB / (hi - lo) : 0.0f;
    if (!isfinite(scale)) scale = 0.0f;  /* infinite or NaN scores, or a gap too small to divide by: one bucket */
    memset(first, 0, sizeof(int64_t) * (NB + 1));
    for (int64_t i = 0; i < len; i++) first[bucket_of(v[i].score, hi, scale) + 1]++;
    for (int b = 0; b < NB; b++) first[b + 1] += first[b];
    int64_t fill[NB];
    memcpy(fill, first, sizeof fill);
    for (int64_t i = 0; i < len; i++) out[fill[bucket_of(v[i].score, hi, scale)]++] = v[i];
}

static void insertion_sort(scored_t *v, int64_t len) {
    for (int64_t i = 1; i < len; i++) {
        scored_t t = v[i];
        int64_t j = i - 1;
        while (j >= 0 && before(&t, &v[j])) { v[j + 1] = v[j]; j--; }
        v[j + 1] = t;
    }
}

typedef struct {
    scored_t *cand, *order;
    grid_t grid;
} match_buffers_t;

static int buffers_init(match_buffers_t *w, int64_t n) {
    memset(w, 0, sizeof *w);
    w->cand = (scored_t *)malloc(sizeof(scored_t) * (size_t)(n > 0 ? n : 1));
    w->order = (scored_t *)malloc(sizeof(scored_t) * (size_t)(n > 0 ? n : 1));
    return w->cand && w->order ? 0 : -1;
}

static void buffers_free(match_buffers_t *w) {
    free(w->cand);
    free(w->order);
    grid_free(&w->grid);
}

/* One item of match_voxels (below): views of n voxels, k slots ia, ib, mk, dist. Returns 0, or -1 without memory. */
static int match_one(const float *pab, const uint8_t *vab, const float *pbb, const uint8_t *vbb, const float *sb,
                     int64_t n, int64_t m, int64_t k, double tol, match_buffers_t *w, int64_t *ia, int64_t *ib,
                     uint8_t *mk, float *dist) {
    const float tol_f = (float)tol;
    memset(ia, 0, sizeof(int64_t) * (size_t)k);
    memset(ib, 0, sizeof(int64_t) * (size_t)k);
    memset(mk, 0, (size_t)k);
    if (dist) memset(dist, 0, sizeof(float) * (size_t)k);
    if (!(tol >= 0.0)) return 0;  /* no distance is within a negative or NaN tolerance (the callers pass finite ones) */
    /* view b's valid bounding box grown by tol, in float32 as torch computes it */
    float lo[3] = {INFINITY, INFINITY, INFINITY}, hi[3] = {-INFINITY, -INFINITY, -INFINITY};
    for (int64_t j = 0; j < n; j++) {
        if (!vbb[j]) continue;
        for (int d = 0; d < 3; d++) {
            float x = pbb[3 * j + d];
            if (x < lo[d]) lo[d] = x;
            if (x > hi[d]) hi[d] = x;
        }
    }
    for (int d = 0; d < 3; d++) { lo[d] = lo[d] - tol_f; hi[d] = hi[d] + tol_f; }
    int64_t len = 0;
    for (int64_t j = 0; j < n; j++) {
        const float *x = pab + 3 * j;
        if (vab[j] && x[0] >= lo[0] && x[0] <= hi[0] && x[1] >= lo[1] && x[1] <= hi[1] && x[2] >= lo[2] &&
            x[2] <= hi[2]) {
            w->cand[len].score = sb[j];
            w->cand[len].idx = j;
            len++;
        }
    }
    if (len == 0 || k == 0) return 0;
    if (grid_build(&w->grid, pbb, vbb, n, tol) != 0) return -1;
    int64_t first[NB + 1];
    bucket_by_score(w->cand, len, w->order, first);
    scored_t *order = w->order;
    int64_t filled = 0, taken = 0;
    for (int bucket = 0; bucket < NB && taken < m && filled < k; bucket++) {
        int64_t from = first[bucket], to = first[bucket + 1];
        insertion_sort(order + from, to - from);
        for (int64_t s = from; s < to && taken < m && filled < k; s++, taken++) {
            float d2;
            int64_t j = grid_nearest(&w->grid, pab + 3 * order[s].idx, &d2);
            float r = sqrtf(d2);
            if (j < 0 || !(r <= tol_f)) continue;
            ia[filled] = order[s].idx;
            ib[filled] = j;
            mk[filled] = 1;
            if (dist) dist[filled] = r;
            filled++;
        }
    }
    return 0;
}

/* correspondence.match_voxels for positions pa, pb (bsz, n, 3) float32, flags va, vb (bsz, n) bytes and one
   random score per voxel of view a (bsz, n) float32: the eligible a voxels (valid, inside view b's valid bounding
   box grown by tol) with the m highest scores are the candidates; each is paired with its nearest valid b voxel;
   those within tol are matches, and the k with the highest scores fill the slots in descending score order (the
   candidates are taken in that order, sorted a bucket at a time, so the search stops at the k-th match). Empty
   slots: index 0, mask 0, distance 0. Float32 comparisons, as in torch. Returns 0, or -1 without memory. */
int match_voxels(const float *pa, const uint8_t *va, const float *pb, const uint8_t *vb, const float *scores,
                 int64_t bsz, int64_t n, int64_t m, int64_t k, double tol, int64_t *index_a, int64_t *index_b,
                 uint8_t *mask, float *distance) {
    match_buffers_t w;
    int rc = buffers_init(&w, n);
    for (int64_t b = 0; b < bsz && rc == 0; b++)
        rc = match_one(pa + b * n * 3, va + b * n, pb + b * n * 3, vb + b * n, scores + b * n, n, m, k, tol, &w,
                       index_a + b * k, index_b + b * k, mask + b * k, distance + b * k);
    buffers_free(&w);
    return rc;
}

/* ------------------------------------------------------------------ the dense loss's negatives */

/* keep (n, n) float32 for x (n, 3) float32 and ok (n) bytes: 1 where rows i and j are both ok and their squared
   distance (float32 differences, ((dx^2 + dy^2) + dz^2)) exceeds r2, else 0; then, where partner >= 0, entry
   (i, (i + partner) mod n) of every row is set to 1 (the positive, kept in the denominator). Returns the number of
   far pairs off those entries (the negatives), or -1 without memory. The differences are exact for nearby points
   (Sterbenz), so coincident points are never far; at most pairs within ~1e-7 of r2 (relative) may go either way. */
int64_t far_pairs(const float *x, const uint8_t *ok, int64_t n, int64_t partner, double r2, float *keep) {
    float *soa = (float *)malloc(sizeof(float) * 3 * (size_t)(n > 0 ? n : 1));
    int32_t *oki = (int32_t *)malloc(sizeof(int32_t) * (size_t)(n > 0 ? n : 1));
    if (!soa || !oki) { free(soa); free(oki); return -1; }
    float *x0 = soa, *x1 = soa + n, *x2 = soa + 2 * n;
    for (int64_t j = 0; j < n; j++) {
        x0[j] = x[3 * j];
        x1[j] = x[3 * j + 1];
        x2[j] = x[3 * j + 2];
        oki[j] = ok[j] ? 1 : 0;
    }
    const float r2f = (float)r2;
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++) {
        float *row = keep + i * n;
        if (!oki[i]) {
            memset(row, 0, sizeof(float) * (size_t)n);
        } else {
            const float a0 = x0[i], a1 = x1[i], a2 = x2[i];
            int32_t c = 0;
            for (int64_t j = 0; j < n; j++) {
                float d0 = x0[j] - a0, d1 = x1[j] - a1, d2 = x2[j] - a2;
                float e = d0 * d0 + d1 * d1;
                e = e + d2 * d2;
                int32_t far = (e > r2f) & oki[j];
                row[j] = (float)far;
                c += far;
            }
            count += c;
        }
        if (partner >= 0 && n > 0) {
            int64_t j = (i + partner) % n;
            count -= row[j] != 0.0f;
            row[j] = 1.0f;
        }
    }
    free(soa);
    free(oki);
    return count;
}

/* ------------------------------------------------------------------ the crop-level selection */

/* selection.contrastive_masks for positions c (n, dims) float32 and group ids (n) int64: pos_ij = i != j and
   (same group or distance < r_pos), neg_ij = i != j, not pos_ij and distance > r_neg; distances
   sqrt((dx0^2 + dx1^2) + ...) in float32 and the radii rounded to float32, as torch's direct cdist and comparisons
   compute them. pos, neg (n, n) bytes. */
void contrastive_masks(const float *c, const int64_t *group, int64_t n, int64_t dims, double r_pos, double r_neg,
                       uint8_t *pos, uint8_t *neg) {
    const float rp = (float)r_pos, rn = (float)r_neg;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t j = 0; j < n; j++) {
            float e = 0.0f;
            for (int64_t d = 0; d < dims; d++) {
                float t = c[i * dims + d] - c[j * dims + d];
                e = e + t * t;
            }
            float dist = sqrtf(e);
            uint8_t p = i != j && (group[i] == group[j] || dist < rp);
            pos[i * n + j] = p;
            neg[i * n + j] = i != j && !p && dist > rn;
        }
    }
}

/* ------------------------------------------------------------------ the dense loss's selection in one call */

/* Everything dense_correspondence_loss selects, for N views of n voxels each, positions pos (N, n, 3) float32 and
   flags ok (N, n) bytes, the B view pairs (va[i], vb[i]), their random scores (B, n), each view's canonical scale
   and offset (N, 3) float32: the matching of every pair (match_voxels; k slots per pair), then the rows' flat
   voxel indices flat (2, B, k) int64 (view * n + voxel: the a slots, then the b slots), their flags slot_ok
   (2, B, k) bytes, their canonical positions (position * scale + offset in float32) and from those the mask of
   negatives and positives keep (2Bk, 2Bk) (far_pairs with partner Bk). Returns the number of negatives, or -1
   without memory. */
int64_t dense_selection(const float *pos, const uint8_t *ok, int64_t n, const int64_t *va,
                        const int64_t *vb, int64_t bsz, const float *scores, const float *scale, const float *offset,
                        int64_t m, int64_t k, double tol, double r2, int64_t *flat, uint8_t *slot_ok, float *keep) {
    const int64_t p = bsz * k;
    match_buffers_t w;
    int64_t *ia = (int64_t *)malloc(sizeof(int64_t) * (size_t)(k > 0 ? k : 1));
    int64_t *ib = (int64_t *)malloc(sizeof(int64_t) * (size_t)(k > 0 ? k : 1));
    float *x = (float *)malloc(sizeof(float) * 3 * (size_t)(p > 0 ? 2 * p : 1));
    int rc = buffers_init(&w, n);
    if (!ia || !ib || !x) rc = -1;
    for (int64_t i = 0; i < bsz && rc == 0; i++) {
        const int64_t a = va[i], b = vb[i];
        rc = match_one(pos + a * n * 3, ok + a * n, pos + b * n * 3, ok + b * n, scores + i * n, n, m, k, tol, &w,
                       ia, ib, slot_ok + i * k, NULL);
        if (rc != 0) break;
        for (int64_t s = 0; s < k; s++) {
            slot_ok[p + i * k + s] = slot_ok[i * k + s];
            int64_t rows[2] = {i * k + s, p + i * k + s}, views[2] = {a, b}, vox[2] = {ia[s], ib[s]};
            for (int h = 0; h < 2; h++) {
                flat[rows[h]] = views[h] * n + vox[h];
                for (int d = 0; d < 3; d++) {  /* views without voxels: empty slots, any position */
                    float t = n > 0 ? pos[(views[h] * n + vox[h]) * 3 + d] * scale[views[h] * 3 + d] : 0.0f;
                    x[rows[h] * 3 + d] = t + offset[views[h] * 3 + d];
                }
            }
        }
    }
    int64_t count = -1;
    if (rc == 0) count = far_pairs(x, slot_ok, 2 * p, p, r2, keep);
    buffers_free(&w);
    free(ia);
    free(ib);
    free(x);
    return count;
}
