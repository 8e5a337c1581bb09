/* One outer step of the bilevel penalty method (algorithms/bilevel.py), every seed, in one call.

   This is Bilevel.fast_step written as plain C loops over seeds: the same draws from the same
   counter-based uniforms, the same closed-form gradients, the same SGD updates, into new parameter
   tensors. At the theorem's batches (N = M = 2) a step's arithmetic is a few thousand multiply-adds
   per seed, so an eager torch step is ~200 kernel launches of overhead around almost no work; here it
   is one call. Plain C99 with no torch headers: it builds in about 2 s (harness/kernels.py) and reads
   tensors through raw float64 / int64 pointers that bilevel_kernel.py lays out and keeps alive.

   Per seed b (seeds never touch each other's memory: NaN -> `diverged` stays per seed):
     pi_z, pi_y   <- log-softmax(log pi_ref + MLP_theta(features))      policy tables (S, A)
     repeat `inner` times (a z / y stage):
       draw N trajectories from pi_z, M labelled pairs and N trajectories from pi_y
       z <- z + alpha_z g^_theta J(nu, z)                               REINFORCE, leave-one-out baseline
       y <- y - alpha [ g^_theta f(nu, y) / lam - g^_theta J(nu, y) ]   score function + REINFORCE
     draw M pairs from pi_y, N trajectories from pi_z and N from pi_y (the nu stage)
     nu <- nu - xi [ g^_nu f(nu, y) + lam (g^_nu J(nu, z) - g^_nu J(nu, y)) ]
   r_nu(u) is the reward network's output, or R tanh(output) with a bound R (docs/bilevel.md "Bounded rewards").
   Where each uniform goes is the sampler's _DrawPlan (harness/sampling.py), passed in as index tables.
   Two entry points: bilevel_step, one step of every seed per call, runs this per-seed step (seed_step); and
   bilevel_segment, n steps of every seed per call with the seeds split across threads (what a run uses; at the end),
   runs the same step on blocks of VL seeds (8 with AVX-512, else 4), the policy networks' passes with the seeds as the lanes of one vector
   ("a block of seeds as vector lanes"), bit for bit the per-seed code's numbers. Products are fused multiply-adds
   only where the source says fma() (core/kernels.py builds with -ffp-contract=off), so both agree on any compiler. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

typedef struct {          /* an MLP stacked over networks: layer l maps sizes[l] -> sizes[l + 1] */
    int n_layers;         /* 0: a linear reward, nu . phi(u) (W[0] is nu, (nets, sizes[0])) */
    const int64_t *sizes; /* n_layers + 1 (linear: 1) */
    int tanh_act;         /* hidden activation: 0 relu, 1 tanh */
    double **W;           /* per layer: (nets, fan_in, fan_out), row-major: the step's result */
    double **b;           /* per layer: (nets, fan_out) */
    const double **W_in, **b_in;  /* the parameters the step starts from (read until the first update writes W, b) */
} Net;

typedef struct {          /* one stage's _DrawPlan: T trajectories, 2H uniform columns each */
    int64_t T, n_uniforms, n_pairs;
    const int64_t *columns;  /* (2H, T): initial state, then (action, transition) per step */
    const int64_t *row_base; /* (H, T): row of (policy p, step h, state 0) in the stacked (2S, A) tables */
    const int64_t *label_columns, *first, *second; /* (n_pairs) */
} Plan;

typedef struct {
    int64_t B, S, A, H, G, n_units;
    /* environment tables; each *_stride is 0 for a shared table, else the size of an InstanceBatch row */
    const double *policy_x; int64_t policy_x_stride;  /* (S, d): the policy's state features */
    const double *ref_logp; int64_t ref_logp_stride;  /* (S * A) */
    const double *init_cdf; int64_t init_cdf_stride;  /* (G) */
    const double **next_cdf; const int64_t **next_idx; const int64_t *next_k; const int64_t *next_stride; /* h < H - 1: (n_h * A, K) */
    const int64_t *unit_of;                           /* (S * A): reward unit of each flat (h, s, a); n_units pays nothing */
    const double *unit_x; int64_t unit_x_stride;      /* (n_units, d_reward) */
    const double *true_r; int64_t true_r_stride;      /* (n_units + 1): the true reward, padded */
    double beta, label_noise;
    double reward_bound;  /* R > 0: r_nu(u) = R tanh(raw output), in (-R, R); 0: r_nu(u) = raw output (unbounded) */
    double reward_box;    /* R > 0: a linear nu (a table) clipped onto [-R, R] after each update (projected SGD); 0: none */
    Net z, y, nu;
    /* the step */
    int64_t n_traj, n_pairs, inner;
    double lam, alpha, alpha_z, xi;
    const int64_t *keys;  /* (B) CounterRng keys */
    int64_t counter;      /* the RNG counter at the step's first draw */
    Plan stage, nu_stage;
    /* per seed, the policy tables the step ends with (log pi, pi, its cumsum for z and y; the networks' activations):
       policy_table_size(st) doubles each. z and y do not move in the nu stage, so they are the next step's first
       tables: tables_valid says they belong to the parameters W_in (bilevel_kernel.py checks it), and the step
       starts from them instead of a forward pass */
    double *tables; int64_t tables_valid;
} Step;

/* ---- counter-based uniforms: harness/rng.py's CounterRng, draw i of seed b ------------------------ */
static inline uint64_t mix64(uint64_t x) {  /* splitmix64 finaliser */
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}
static void uniforms(uint64_t key, int64_t start, int64_t n, double *restrict u) {  /* draws start .. start + n - 1 */
    for (int64_t i = 0; i < n; i++) {  /* one loop of integer ops: it vectorises */
        uint64_t bits = mix64(key ^ mix64((uint64_t)(start + i) * 0x9E3779B97F4A7C15ULL + 1));
        u[i] = ((double)(int64_t)(bits >> 11) + 0.5) * 0x1p-53;
    }
}
static int64_t search(const double *cdf, int64_t n, int64_t stride, double u) {
    /* torch.searchsorted(cdf, u * cdf[-1]).clamp_max(n - 1), the cdf's entries `stride` apart */
    double v = u * cdf[(n - 1) * stride];
    int64_t i = 0;  /* the first entry >= v of a nondecreasing cdf = how many of its first n - 1 are < v (no branches) */
    for (int64_t j = 0; j < n - 1; j++) i += cdf[j * stride] < v;
    return i;
}
/* exp(x), the kernel's one exponential: within 1 ulp of e^x where that is a normal number, in plain IEEE operations
   (products fused only where written fma()), so that vexp below, the same operations on the 8 lanes of a vector,
   gives every lane the bits this gives its seed. x = k ln2 + r, k an integer (rounded by adding 1.5 2^52) and
   |r| <= ln2 / 2 (two fused multiply-adds against ln2's high and low parts); e^r = 1 + r + r^2 q(r), q the Taylor
   polynomial to r^13 (truncation < 2^-57) by Estrin's scheme (a short dependency chain: one exponential alone, as in
   the BT weights, waits on it); times 2^k as two powers of two 2^k1 2^k2 (both normal numbers, so the first
   product is exact and only the last rounds, into the subnormals below about -708). Below -746 the result is 0 (e^x
   rounds to 0 there), above 710 it is inf, a NaN is returned as it came; never errno or a floating-point trap (a non-finite value is
   found by its bits). libm's exp is a function call per value with a slow path past its range (its overflow handler
   was 4 % of a segment's time, from BT margins); this inlines and vectorises. */
#define EXP_SHIFT 0x1.8p52                  /* 1.5 2^52: adding it rounds |z| < 2^51 to an integer, in the low bits */
#define EXP_INV_LN2 0x1.71547652b82fep0     /* 1 / ln 2 */
#define EXP_LN2_HI 0x1.62e42fefa39efp-1     /* ln 2 rounded to double, */
#define EXP_LN2_LO 0x1.abc9e3b39803fp-56    /* and the rest (|ln 2 - HI - LO| < 6e-34) */
#define EXP_Q(q, r, F, C, T)  /* q(r) = 1/2 + r/6 + ... + r^11/13! by Estrin's scheme (depth 4 instead of Horner's 11), \
    in F (fma), C (a constant) and T (the type) */ \
    T r2 = r * r, r4 = r2 * r2, r8 = r4 * r4; \
    T p0 = F(C(1.0 / 6.0), r, C(0.5)), p1 = F(C(1.0 / 120.0), r, C(1.0 / 24.0)); \
    T p2 = F(C(1.0 / 5040.0), r, C(1.0 / 720.0)), p3 = F(C(1.0 / 362880.0), r, C(1.0 / 40320.0)); \
    T p4 = F(C(1.0 / 39916800.0), r, C(1.0 / 3628800.0)), p5 = F(C(1.0 / 6227020800.0), r, C(1.0 / 479001600.0)); \
    T q01 = F(p1, r2, p0), q23 = F(p3, r2, p2), q45 = F(p5, r2, p4); \
    q = F(q45, r8, F(q23, r4, q01));
#define EXP_SCALAR(c) (c)
static inline double exp_k(double x) {
    if (x < -746.0) return 0.0;
    if (x > 710.0) return INFINITY;
    if (x != x) return x;  /* NaN: itself (which NaN the arithmetic below returns depends on its operands' order) */
    double kd = x * EXP_INV_LN2 + EXP_SHIFT, q;  /* two roundings: to double, then to an integer */
    uint64_t kb, s1, s2;
    memcpy(&kb, &kd, sizeof kb);
    kd = kd - EXP_SHIFT;
    double r = fma(-kd, EXP_LN2_HI, x);
    r = fma(-kd, EXP_LN2_LO, r);
    EXP_Q(q, r, fma, EXP_SCALAR, double)
    double y = 1.0 + fma(r2, q, r);
    uint64_t k = kb - 0x4338000000000000ULL, k1 = (uint64_t)((int64_t)k >> 1), k2 = k - k1;  /* EXP_SHIFT's bits */
    s1 = (k1 + 1023) << 52, s2 = (k2 + 1023) << 52;
    double f1, f2;
    memcpy(&f1, &s1, sizeof f1), memcpy(&f2, &s2, sizeof f2);
    return y * f1 * f2;
}
static double softplus(double x) { return x > 20.0 ? x : log1p(exp_k(x)); }  /* torch's threshold 20 */
static double sigmoid(double x) { return 1.0 / (1.0 + exp_k(-x)); }

/* ---- vectors of VL doubles (GCC's vector extension): the lanes of a segment's block of seeds (below). Lane-major
   arrays: element e of lane v at [e * VL + v]. */
#ifndef VL  /* the lanes (tests build other widths with -DVL=..., which must give the same bits) */
#ifdef __AVX512F__
#define VL 8  /* one AVX-512 vector of doubles */
#else
#define VL 4  /* one AVX2 vector of doubles: on a CPU without AVX-512, GCC moves a wider vector type through memory in
                 pieces (the README job's steps 6x slower, the build 6x longer). A lane is a seed of its own: no bits
                 depend on VL */
#endif
#endif
#if defined(__AVX512F__) && VL == 8  /* the lanes are one AVX-512 vector: its instructions */
#define AVX512_LANES 1
#else
#define AVX512_LANES 0
#endif
#if defined(__FMA__) && VL == 4  /* one AVX2 vector with fused multiply-adds */
#define AVX2_LANES 1
#else
#define AVX2_LANES 0
#endif
typedef double vd __attribute__((vector_size(VL * sizeof(double)), aligned(sizeof(double))));
typedef int64_t vm __attribute__((vector_size(VL * sizeof(int64_t)), aligned(sizeof(int64_t))));
#define LANES(p, e) (*(vd *)((p) + (e) * VL))  /* element e of a lane-major array, every lane */
#define LANE_BITS(p, e) (*(const vm *)((const int64_t *)(p) + (e) * VL))  /* the same, as integers */
static inline vd sel(vm m, vd a, vd b) {  /* per lane: m ? a : b; every mask is all ones or all zeros per lane (a
                                             comparison's), so a blend on the sign bit picks the same: ~7 % of a step */
#if AVX2_LANES
    return (vd)_mm256_blendv_pd((__m256d)b, (__m256d)a, (__m256d)m);
#else
    return (vd)(((vm)a & m) | ((vm)b & ~m));
#endif
}
static inline vd vfma(vd a, vd b, vd c) {  /* fma(a, b, c) per lane: one vector fused multiply-add */
#if AVX512_LANES
    return (vd)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#elif AVX2_LANES
    return (vd)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
    vd r;
    for (int v = 0; v < VL; v++) r[v] = fma(a[v], b[v], c[v]);
    return r;
#endif
}
static inline vd vfma_where(vm m, vd a, vd b, vd c) {  /* per lane: m ? fma(a, b, c) : c */
#if AVX512_LANES
    return (vd)_mm512_mask3_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c, _mm512_test_epi64_mask((__m512i)m, (__m512i)m));
#else
    return sel(m, vfma(a, b, c), c);
#endif
}

static inline vd vexp(vd x) {  /* exp_k on every lane: its operations in its order, so its bits */
    typedef uint64_t vu __attribute__((vector_size(VL * sizeof(uint64_t)), aligned(sizeof(uint64_t))));
    vd kd = x * EXP_INV_LN2 + EXP_SHIFT, q;
    vu kb = (vu)kd;
    kd = kd - EXP_SHIFT;
    vd r = vfma(-kd, (vd){0} + EXP_LN2_HI, x);
    r = vfma(-kd, (vd){0} + EXP_LN2_LO, r);
#define EXP_VECTOR(c) ((vd){0} + (c))
    EXP_Q(q, r, vfma, EXP_VECTOR, vd)
    vd y = 1.0 + vfma(r2, q, r);
    vu k = kb - 0x4338000000000000ULL, k1 = (vu)((vm)k >> 1), k2 = k - k1;
    vd f1 = (vd)((k1 + 1023) << 52), f2 = (vd)((k2 + 1023) << 52);
    y = y * f1 * f2;
#if AVX512_LANES  /* the same selections as below, one blend each (sel's and-or took three instructions, of vexp's ~45) */
    __m512d Y = (__m512d)y, X = (__m512d)x;
    Y = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(X, _mm512_set1_pd(-746.0), _CMP_LT_OQ), Y, _mm512_setzero_pd());
    Y = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(X, _mm512_set1_pd(710.0), _CMP_GT_OQ), Y, _mm512_set1_pd(INFINITY));
    return (vd)_mm512_mask_blend_pd(_mm512_cmp_pd_mask(X, X, _CMP_UNORD_Q), Y, X);
#else
    y = sel(x < -746.0, (vd){0}, y);
    y = sel(x > 710.0, (vd){0} + INFINITY, y);
    return sel(x != x, x, y);
#endif
}

/* exp_k and vexp of x[0 .. n - 1] into scalar and vector (tests/test_kernel_exp.py holds them to each other bit for bit and
   to e^x within 1 ulp) */
void exp_values(int64_t n, const double *x, double *scalar, double *vector) {
    for (int64_t i = 0; i < n; i++) scalar[i] = exp_k(x[i]);
    for (int64_t i = 0; i < n; i += VL) {
        vd v = {0};
        for (int64_t j = 0; j < VL && i + j < n; j++) v[j] = x[i + j];
        v = vexp(v);
        for (int64_t j = 0; j < VL && i + j < n; j++) vector[i + j] = v[j];
    }
}

/* ---- the networks ---------------------------------------------------------------------------------- */
static int64_t widest(const Net *net) {
    int64_t w = 1;
    for (int l = 0; l <= net->n_layers; l++) if (net->sizes[l] > w) w = net->sizes[l];
    return w;
}
/* out[j] = init[j] (0 without) + sum_k coef[k * cstride] * mat[k * stride + j], j < m: the one product of the
   networks' passes. m is a constant in each inlined copy (tiles' switch), so the accumulators stay in registers
   instead of being stored and reloaded at every k, which made the plain loop 3x slower at these sizes. */
#define TILE 16
static inline __attribute__((always_inline)) void tile(const int m, const int sparse, double *out, const double *init,
        const double *restrict coef, int64_t cstride, int64_t n, const double *restrict mat, int64_t stride) {
    double acc[TILE];
    for (int j = 0; j < m; j++) acc[j] = init ? init[j] : 0.0;
    for (int64_t k = 0; k < n; k++) {
        const double c = coef[k * cstride], *restrict row = mat + k * stride;
        if (sparse && c == 0.0) continue;  /* a feature that is 0 (the policy's inputs are mostly one-hot) adds 0 */
        for (int j = 0; j < m; j++) acc[j] = fma(c, row[j], acc[j]);
    }
    for (int j = 0; j < m; j++) out[j] = acc[j];
}
#define TILE_CASE(m) case m: tile(m, SPARSE, out + j0, init ? init + j0 : NULL, coef, cstride, n, mat + j0, stride); break;
#define TILE_SWITCH \
        switch (width - j0 < TILE ? width - j0 : TILE) { \
            TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) TILE_CASE(6) TILE_CASE(7) TILE_CASE(8) \
            TILE_CASE(9) TILE_CASE(10) TILE_CASE(11) TILE_CASE(12) TILE_CASE(13) TILE_CASE(14) TILE_CASE(15) TILE_CASE(16) \
        }
/* sparse: skip the coefficients that are 0 (a network's inputs, when the features are mostly one-hot) */
static void tiles(int64_t width, double *out, const double *init, const double *coef, int64_t cstride, int64_t n,
                  const double *mat, int64_t stride, int sparse) {
    if (width == 1) {  /* a dot product (the reward's one output): four partial sums, not one chain of n adds */
        double acc[4] = {init ? init[0] : 0.0, 0.0, 0.0, 0.0};
        int64_t k = 0;
        for (; k + 4 <= n; k += 4)
            for (int j = 0; j < 4; j++) acc[j] = fma(coef[(k + j) * cstride], mat[(k + j) * stride], acc[j]);
        for (; k < n; k++) acc[0] = fma(coef[k * cstride], mat[k * stride], acc[0]);
        out[0] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        return;
    }
    for (int64_t j0 = 0; j0 < width; j0 += TILE) {
        if (sparse) {
#define SPARSE 1
            TILE_SWITCH
#undef SPARSE
        } else {
#define SPARSE 0
            TILE_SWITCH
#undef SPARSE
        }
    }
}

/* tile for four rows at once: out[r][j] = init[j] + sum_k coef[r][k] mat[k][j], each (r, j) summed in tile's order.
   Four independent chains of multiply-adds instead of one: a row's m accumulators alone wait on the multiply-add's
   latency at every k (the policy's output layer, 6 wide, was most of the policy tables' time). */
static inline __attribute__((always_inline)) void tile4(const int m, double *out, int64_t ostride, const double *init,
        const double *restrict coef, int64_t cstride, int64_t n, const double *restrict mat, int64_t stride) {
    double a0[TILE], a1[TILE], a2[TILE], a3[TILE];
    for (int j = 0; j < m; j++) a0[j] = a1[j] = a2[j] = a3[j] = init[j];
    for (int64_t k = 0; k < n; k++) {
        const double c0 = coef[k], c1 = coef[cstride + k], c2 = coef[2 * cstride + k], c3 = coef[3 * cstride + k];
        const double *restrict row = mat + k * stride;
        for (int j = 0; j < m; j++) {
            a0[j] = fma(c0, row[j], a0[j]), a1[j] = fma(c1, row[j], a1[j]);
            a2[j] = fma(c2, row[j], a2[j]), a3[j] = fma(c3, row[j], a3[j]);
        }
    }
    for (int j = 0; j < m; j++) {
        out[j] = a0[j], out[ostride + j] = a1[j], out[2 * ostride + j] = a2[j], out[3 * ostride + j] = a3[j];
    }
}
#define TILE4_CASE(m) case m: tile4(m, out + r * fo, fo, bias, in + r * fi, fi, fi, W, fo); break;

/* forward of network k on n rows x (n, sizes[0]); acts[l] (n, sizes[l]) for l >= 1, hidden ones after the activation */
static void mlp_forward(const Net *net, int64_t k, const double *x, int64_t n, double **acts) {
    const double *in = x;
    for (int l = 0; l < net->n_layers; l++) {
        int64_t fi = net->sizes[l], fo = net->sizes[l + 1];
        const double *W = net->W[l] + k * fi * fo, *bias = net->b[l] + k * fo;
        double *out = acts[l + 1];
        /* a dense layer no wider than a tile takes its rows four at a time (not the sparse input layer; not a
           one-output layer, whose dot product tiles sums in its own order) */
        int64_t four = l > 0 && fo > 1 && fo <= TILE ? n - n % 4 : 0;
        for (int64_t r = 0; r < four; r += 4)
            switch (fo) {  /* h_{l+1} = b + h_l W, rows r .. r + 3 */
                TILE4_CASE(2) TILE4_CASE(3) TILE4_CASE(4) TILE4_CASE(5) TILE4_CASE(6) TILE4_CASE(7) TILE4_CASE(8)
                TILE4_CASE(9) TILE4_CASE(10) TILE4_CASE(11) TILE4_CASE(12) TILE4_CASE(13) TILE4_CASE(14)
                TILE4_CASE(15) TILE4_CASE(16)
            }
        for (int64_t r = 0; r < n; r++) {
            double *o = out + r * fo;
            if (r >= four) tiles(fo, o, bias, in + r * fi, 1, fi, W, fo, l == 0);  /* h_{l+1} = b + h_l W */
            if (l + 1 < net->n_layers) {  /* hidden layer: relu or tanh */
                if (net->tanh_act) for (int64_t j = 0; j < fo; j++) o[j] = tanh(o[j]);
                else for (int64_t j = 0; j < fo; j++) o[j] = o[j] > 0 ? o[j] : 0.0;
            }
        }
        in = out;
    }
}
static int64_t n_params(const Net *net) {
    int64_t n = net->n_layers ? 0 : net->sizes[0];
    for (int l = 0; l < net->n_layers; l++) n += net->sizes[l] * net->sizes[l + 1] + net->sizes[l + 1];
    return n;
}
/* grad += the gradient w.r.t. network k's parameters of sum(g_out * output), g_out (n, sizes[L]), laid out
   layer by layer as (dW_l, db_l): the closed-form backward of StackedMLP.backward. g and g_prev are
   (n, widest) scratch, Wt (widest, widest); g_out is read only. */
static void mlp_backward(const Net *net, int64_t k, const double *x, int64_t n, double *const *acts,
                         const double *g_out, double *g, double *g_prev, double *Wt, double *grad) {
    int L = net->n_layers;
    for (int64_t e = 0; e < n * net->sizes[L]; e++) g[e] = g_out[e];
    double *dW = grad;
    for (int l = 0; l < L - 1; l++) dW += net->sizes[l] * net->sizes[l + 1] + net->sizes[l + 1];
    for (int l = L - 1; l >= 0; l--) {
        int64_t fi = net->sizes[l], fo = net->sizes[l + 1];
        const double *in = l == 0 ? x : acts[l];
        double *db = dW + fi * fo;
        if (l < L - 1) {  /* through the activation: relu' = [h > 0], tanh' = 1 - h^2 */
            const double *h = acts[l + 1];
            if (net->tanh_act) for (int64_t e = 0; e < n * fo; e++) g[e] = g[e] * (1 - h[e] * h[e]);
            else for (int64_t e = 0; e < n * fo; e++) g[e] = h[e] > 0 ? g[e] : 0.0;
        }
        if (fo >= fi || fo > TILE)  /* dW = h_l^T g: row i of dW sums h_l[r, i] g[r] over the rows */
            for (int64_t i = 0; i < fi; i++) tiles(fo, dW + i * fo, dW + i * fo, in + i, fi, n, g, fo, l == 0);
        else  /* a narrow layer (the policy's actions, the reward's one output): column j of dW, fi wide */
            for (int64_t j = 0; j < fo; j++) {
                tiles(fi, Wt, NULL, g + j, fo, n, in, fi, 0);
                for (int64_t i = 0; i < fi; i++) dW[i * fo + j] += Wt[i];
            }
        for (int64_t r = 0; r < n; r++)  /* db = sum over rows of g */
            for (int64_t j = 0; j < fo; j++) db[j] += g[r * fo + j];
        if (l > 0) {  /* dh_l = g W^T, through W^T laid out (fo, fi) */
            const double *W = net->W[l] + k * fi * fo;
            for (int64_t i = 0; i < fi; i++)
                for (int64_t j = 0; j < fo; j++) Wt[j * fi + i] = W[i * fo + j];
            for (int64_t r = 0; r < n; r++) tiles(fi, g_prev + r * fi, NULL, g + r * fo, 1, fo, Wt, fi, 0);
            double *t = g; g = g_prev; g_prev = t;
            dW -= net->sizes[l - 1] * fi + fi;
        }
    }
}
/* p <- p - lr * grad (sgd_update) for network k: `to`'s parameters from `from`'s (the step's start, or `to` itself
   after a first update), grad as mlp_backward lays it out */
static void sgd_update(const Net *from, const Net *to, int64_t k, const double *grad, double lr) {
    for (int l = 0; l < to->n_layers; l++) {
        int64_t fi = to->sizes[l], fo = to->sizes[l + 1];
        const double *W0 = from->W[l] + k * fi * fo, *b0 = from->b[l] + k * fo;
        double *W = to->W[l] + k * fi * fo, *bias = to->b[l] + k * fo;
        for (int64_t e = 0; e < fi * fo; e++) W[e] = W0[e] - lr * grad[e];
        grad += fi * fo;
        for (int64_t j = 0; j < fo; j++) bias[j] = b0[j] - lr * grad[j];
        grad += fo;
    }
}

/* ---- one seed's step ------------------------------------------------------------------------------- */
typedef struct {  /* per-seed scratch, allocated once per call (the policy tables: this seed's slice of Step.tables) */
    Net z, y, nu;                     /* the parameters this seed's passes read: W_in until a net's first update, then W */
    double *logp, *prob, *cdf;        /* (2S, A): pi_z's log-prob table, then pi_y's; their exp and cumsum */
    int64_t ts;                       /* the stride of logp and cdf's entries: 1, or VL where they are a block's lanes */
    double **pacts[2];                /* policy activations per network and layer (S, width) */
    double *r, **racts;               /* reward per unit (n_units + 1) and its activations (n_units, width) */
    double *rtanh;                    /* with a bound: tanh of the network's raw output per unit (n_units + 1) */
    double *rx, **rrows;              /* the nu stage's visited units' inputs and activations, gathered as rows */
    char *r_done;                     /* which units' rewards are computed (only visited units: after each draw) */
    char *r_seen;                     /* units the nu stage visits */
    int64_t *todo;                    /* a stage's visited units whose rewards are not computed yet (T * H) */
    int64_t *index, *local, *unit;    /* (T, H) flat (p, h, s, a) index, (h, s, a) index and reward unit per step */
    double *ret, *weight;             /* (T) */
    double *label;                    /* (pairs) */
    double *u;                        /* a stage's uniforms */
    double *grad;                     /* (2S, A), later (n_units) */
    double *g, *g_prev, *Wt, *dW, *gout; /* backward scratch */
    double *px, **prows;              /* a z / y stage's visited states' policy inputs and activations, gathered as rows */
} Work;

static void policy_tables(const Step *st, Work *w, int64_t b) {
    /* pi_p = log-softmax(log pi_ref + MLP_p(x)) per state row, p = z, y */
    const double *x = st->policy_x + b * st->policy_x_stride, *ref = st->ref_logp + b * st->ref_logp_stride;
    int64_t S = st->S, A = st->A;
    for (int p = 0; p < 2; p++) {
        const Net *net = p ? &w->y : &w->z;
        mlp_forward(net, b, x, S, w->pacts[p]);
        const double *out = w->pacts[p][net->n_layers];
        double *lp = w->logp + p * S * A, *pi = w->prob + p * S * A, *cdf = w->cdf + p * S * A;
        for (int64_t s = 0; s < S; s++) {
            double m = -INFINITY, sum = 0, c = 0;
            for (int64_t a = 0; a < A; a++) { lp[s * A + a] = ref[s * A + a] + out[s * A + a]; if (lp[s * A + a] > m) m = lp[s * A + a]; }
            for (int64_t a = 0; a < A; a++) {
                double d = lp[s * A + a] - m;
                pi[s * A + a] = exp_k(d);
                sum += pi[s * A + a];
            }
            double lse = log(sum);
            for (int64_t a = 0; a < A; a++) {
                lp[s * A + a] = lp[s * A + a] - m - lse;
                pi[s * A + a] /= sum;              /* pi = exp(log pi), from the exponentials just taken */
                cdf[s * A + a] = c += pi[s * A + a];  /* what actions are drawn from (policy_cdf) */
            }
        }
    }
}

/* four rows' one-output layer (the reward's): out[q] = bias + in[q] . W, each row summed exactly as tiles' width-1
   case sums one (its own four partial sums, the same final adds), the four rows' chains interleaved so that they wait
   on the multiply-add's latency together instead of in turn */
static void dot4(double *const out[4], const double *bias, const double *const in[4], int64_t n, const double *W) {
    double acc[4][4];
    for (int q = 0; q < 4; q++) acc[q][0] = bias[0], acc[q][1] = acc[q][2] = acc[q][3] = 0.0;
    int64_t k = 0;
    for (; k + 4 <= n; k += 4)
        for (int q = 0; q < 4; q++)
            for (int j = 0; j < 4; j++) acc[q][j] = fma(in[q][k + j], W[k + j], acc[q][j]);
    for (; k < n; k++)
        for (int q = 0; q < 4; q++) acc[q][0] = fma(in[q][k], W[k], acc[q][0]);
    for (int q = 0; q < 4; q++) out[q][0] = (acc[q][0] + acc[q][1]) + (acc[q][2] + acc[q][3]);
}

/* r_nu(u) for the n listed units (distinct, not computed yet): each unit's operations are mlp_forward's on its one
   row, so its bits; the units go layer by layer together, so that their independent chains overlap (the one-output
   layer four units at a time: dot4). Activations into racts at the unit's row. */
static void reward_units(const Step *st, Work *w, int64_t b, const int64_t *units, int64_t n) {
    const Net *net = &w->nu;
    int64_t d = net->sizes[0], L = net->n_layers;
    const double *x = st->unit_x + b * st->unit_x_stride;
    if (L == 0)  /* linear: nu . phi(u) */
        for (int64_t q = 0; q < n; q++) {
            const double *nu = net->W[0] + b * d, *phi = x + units[q] * d;
            double s = 0;
            for (int64_t i = 0; i < d; i++) s += nu[i] * phi[i];
            w->r[units[q]] = s;
        }
    for (int l = 0; l < L; l++) {
        int64_t fi = net->sizes[l], fo = net->sizes[l + 1], q = 0;
        const double *W = net->W[l] + b * fi * fo, *bias = net->b[l] + b * fo;
        const double *in = l ? w->racts[l] : x;  /* unit u's row at u * fi */
        double *out = w->racts[l + 1];
        if (fo == 1)
            for (; q + 4 <= n; q += 4) {
                const double *rows[4];
                double *outs[4];
                for (int i = 0; i < 4; i++) rows[i] = in + units[q + i] * fi, outs[i] = out + units[q + i];
                dot4(outs, bias, rows, fi, W);
            }
        for (; q < n; q++) tiles(fo, out + units[q] * fo, bias, in + units[q] * fi, 1, fi, W, fo, l == 0);
        if (l + 1 < L)  /* hidden layer: relu or tanh */
            for (q = 0; q < n; q++) {
                double *o = out + units[q] * fo;
                if (net->tanh_act) for (int64_t j = 0; j < fo; j++) o[j] = tanh(o[j]);
                else for (int64_t j = 0; j < fo; j++) o[j] = o[j] > 0 ? o[j] : 0.0;
            }
        if (l + 1 == L) for (q = 0; q < n; q++) w->r[units[q]] = out[units[q]];
    }
    if (st->reward_bound > 0)  /* r_nu(u) = R tanh(raw) */
        for (int64_t q = 0; q < n; q++) {
            int64_t u = units[q];
            w->rtanh[u] = tanh(w->r[u]);  /* kept for the nu stage's backward */
            w->r[u] = st->reward_bound * w->rtanh[u];
        }
}

/* the rewards of every unit a stage's trajectories visit that is not computed yet, in one reward_units call (the
   stage reads them all: its returns, or the nu stage's backward); nu is fixed until the nu update, so every stage of
   a step reads the same values */
static void stage_rewards(const Step *st, Work *w, int64_t b, int64_t T) {
    int64_t n = 0;
    for (int64_t e = 0; e < T * st->H; e++) {
        int64_t u = w->unit[e];
        if (u < st->n_units && !w->r_done[u]) w->r_done[u] = 1, w->todo[n++] = u;
    }
    reward_units(st, w, b, w->todo, n);
}

static void draw(const Step *st, Work *w, int64_t b, const Plan *plan, int64_t counter) {
    /* every trajectory of the stage (CountingSampler.flat_draws): index, unit; labels of its pairs */
    int64_t S = st->S, A = st->A, H = st->H, T = plan->T, SA = S * A;
    const double *u = w->u;
    uniforms((uint64_t)st->keys[b], counter, plan->n_uniforms, w->u);  /* the stage's uniforms, in the stream's order */
    const double *init = st->init_cdf + b * st->init_cdf_stride;
    for (int64_t t = 0; t < T; t++) {
        int64_t s = search(init, st->G, 1, u[plan->columns[t]]);
        for (int64_t h = 0; h < H; h++) {
            int64_t row = s + plan->row_base[h * T + t];
            /* a ~ pi(. | s): inverse CDF */
            int64_t a = search(w->cdf + row * A * w->ts, A, w->ts, u[plan->columns[(1 + 2 * h) * T + t]]);
            int64_t idx = row * A + a;
            w->index[t * H + h] = idx;
            w->local[t * H + h] = idx < SA ? idx : idx - SA;  /* the flat (h, s, a) of either policy's table */
            w->unit[t * H + h] = st->unit_of[w->local[t * H + h]];
            if (h < H - 1) {  /* s' ~ P(. | s, a) */
                int64_t K = st->next_k[h], local = s * A + a;
                const int64_t *nxt = st->next_idx[h] + b * st->next_stride[h] + local * K;
                if (K == 1) s = nxt[0];  /* deterministic successor: the draw is made, not needed */
                else {
                    const double *cdf = st->next_cdf[h] + b * st->next_stride[h] + local * K;
                    s = nxt[search(cdf, K, 1, u[plan->columns[(2 + 2 * h) * T + t]])];
                }
            }
        }
    }
    const double *true_r = st->true_r + b * st->true_r_stride;
    for (int64_t i = 0; i < plan->n_pairs; i++) {  /* Bradley-Terry oracle on the true reward, label noise eta */
        double r1 = 0, r2 = 0;
        for (int64_t h = 0; h < H; h++) { r1 += true_r[w->unit[plan->first[i] * H + h]]; r2 += true_r[w->unit[plan->second[i] * H + h]]; }
        double p = st->label_noise + (1 - 2 * st->label_noise) * sigmoid(r1 - r2);
        w->label[i] = u[plan->label_columns[i]] < p ? 1.0 : 0.0;
    }
}

static double model_return(const Step *st, const Work *w, int64_t t) {  /* R_nu(tau) = sum_t r_nu(u_t), after
    stage_rewards; the padded slot (u = n_units) is a step that pays nothing */
    double s = 0;
    for (int64_t h = 0; h < st->H; h++) { int64_t u = w->unit[t * st->H + h]; s += u < st->n_units ? w->r[u] : 0.0; }
    return s;
}

static void leave_one_out_weights(double *v, int64_t n) {
    /* (v_i - b_i) / n, b_i = mean_{j != i} v_j: policy_gradient_weights, preference_score_weights */
    double sum = 0;
    for (int64_t i = 0; i < n; i++) sum += v[i];
    for (int64_t i = 0; i < n; i++) v[i] = (v[i] - (sum - v[i]) / (n - 1)) / n;
}

/* a z / y stage's gradient on the log-pi tables from its draws and their rewards: w->grad (2S, A), z's then y's */
static void z_y_grad(const Step *st, Work *w, int64_t b) {
    int64_t N = st->n_traj, M = st->n_pairs, H = st->H, S = st->S, A = st->A, T = st->stage.T;
    const double *ref = st->ref_logp + b * st->ref_logp_stride;
    for (int64_t t = 0; t < T; t++) {  /* G(tau) = R_nu(tau) - beta sum_t log pi/pi_ref (a_t | s_t) */
        double lp = 0, lr = 0;
        for (int64_t h = 0; h < H; h++) { int64_t i = w->index[t * H + h]; lp += w->logp[i * w->ts]; lr += ref[w->local[t * H + h]]; }
        w->ret[t] = model_return(st, w, t) - st->beta * (lp - lr);
    }
    double *wz = w->weight, *score = w->weight + N, *wy = w->weight + N + 2 * M;
    for (int64_t i = 0; i < N; i++) { wz[i] = w->ret[i]; wy[i] = w->ret[N + 2 * M + i]; }
    leave_one_out_weights(wz, N);  /* z: grad of g^_theta J(nu, z) = (G - b) / N on log pi(tau) */
    leave_one_out_weights(wy, N);
    for (int64_t i = 0; i < N; i++) wy[i] = -wy[i];  /* y: minus g^_theta J(nu, y) */
    for (int64_t i = 0; i < M; i++) {    /* BT loss l = softplus(m) - label m, m = R_nu(tau) - R_nu(tau') */
        double m = model_return(st, w, N + i) - model_return(st, w, N + M + i);
        score[i] = softplus(m) - w->label[i] * m;
    }
    leave_one_out_weights(score, M);  /* y: g^_theta f(nu, y) / lam, (l - b) / M / lam on both members */
    for (int64_t i = 0; i < M; i++) { score[i] /= st->lam; score[M + i] = score[i]; }
    double *grad = w->grad;  /* d/d(log pi tables) of sum_i weight_i log pi(tau_i), times -alpha_z (z) / alpha (y) */
    memset(grad, 0, sizeof(double) * 2 * S * A);
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++) grad[w->index[t * H + h]] += w->weight[t];
    for (int64_t e = 0; e < S * A; e++) { grad[e] *= -st->alpha_z; grad[S * A + e] *= st->alpha; }
}
/* a z / y stage up to its gradient on the log-pi tables */
static void z_y_weights(const Step *st, Work *w, int64_t b, int64_t counter) {
    draw(st, w, b, &st->stage, counter);  /* trajectories: z's N, y's M pairs (first, second members), y's N */
    stage_rewards(st, w, b, st->stage.T);
    z_y_grad(st, w, b);
}

static void z_y_stage(const Step *st, Work *w, int64_t b, int64_t counter) {
    int64_t S = st->S, A = st->A;
    z_y_weights(st, w, b, counter);
    const double *grad = w->grad;
    const double *x = st->policy_x + b * st->policy_x_stride;
    for (int p = 0; p < 2; p++) {  /* through log-softmax: d logits = g - pi sum_a g; then the network */
        const double *pi = w->prob + p * S * A, *g = grad + p * S * A;
        Net *net = p ? &w->y : &w->z;
        const Net *to = p ? &st->y : &st->z;
        int64_t n = 0, d = net->sizes[0];
        for (int64_t s = 0; s < S; s++) {  /* only the states the stage visited have a gradient: their rows, gathered */
            double sum = 0;
            int visited = 0;
            for (int64_t a = 0; a < A; a++) { sum += g[s * A + a]; visited |= g[s * A + a] != 0.0; }
            if (!visited) continue;
            for (int64_t a = 0; a < A; a++) w->gout[n * A + a] = g[s * A + a] - pi[s * A + a] * sum;
            for (int64_t i = 0; i < d; i++) w->px[n * d + i] = x[s * d + i];
            for (int l = 1; l < net->n_layers; l++) {
                int64_t wl = net->sizes[l];
                for (int64_t i = 0; i < wl; i++) w->prows[l][n * wl + i] = w->pacts[p][l][s * wl + i];
            }
            n++;
        }
        memset(w->dW, 0, sizeof(double) * n_params(net));
        mlp_backward(net, b, w->px, n, w->prows, w->gout, w->g, w->g_prev, w->Wt, w->dW);
        sgd_update(net, to, b, w->dW, 1.0);  /* the step size is in the gradient already */
        net->W = to->W, net->b = to->b;  /* from here on the passes read the updated parameters */
    }
    policy_tables(st, w, b);
}

/* the nu stage's d/d r_nu(u) of the hypergradient surrogate per unit (w->grad, before the bound), from its draws and
   the rewards of its first 2M trajectories (the pairs); w->r_seen: the units it visits */
static void nu_unit_grad(const Step *st, Work *w) {
    int64_t N = st->n_traj, M = st->n_pairs, H = st->H, T = st->nu_stage.T, U = st->n_units;
    double *weight = w->weight;
    for (int64_t i = 0; i < M; i++) {  /* g^_nu f(nu, y): d/d margin of the mean BT loss = (sigmoid(m) - label) / M */
        double m = model_return(st, w, i) - model_return(st, w, M + i);
        weight[i] = (sigmoid(m) - w->label[i]) / M;
        weight[M + i] = -weight[i];
    }
    for (int64_t i = 0; i < N; i++) {  /* lam (g^_nu J(nu, z) - g^_nu J(nu, y)): lam / N per trajectory's R_nu */
        weight[2 * M + i] = st->lam / N;
        weight[2 * M + N + i] = -(st->lam / N);
    }
    double *gu = w->grad;  /* d/d r_nu(u) of the hypergradient surrogate, per unit */
    memset(gu, 0, sizeof(double) * U);
    memset(w->r_seen, 0, U);
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++) {
            int64_t u = w->unit[t * H + h];
            if (u < U) { gu[u] += weight[t]; w->r_seen[u] = 1; }
        }
}

static void nu_stage(const Step *st, Work *w, int64_t b, int64_t counter) {
    int64_t U = st->n_units;
    draw(st, w, b, &st->nu_stage, counter);  /* trajectories: y's M pairs (first, second members), z's N, y's N */
    stage_rewards(st, w, b, st->nu_stage.T);
    nu_unit_grad(st, w);
    double *gu = w->grad;
    /* stage_rewards computed every visited unit's reward, its tanh with a bound, its activations */
    if (st->reward_bound > 0)  /* through the bound: d r_nu(u) / d raw = R (1 - tanh^2 raw), at the visited units */
        for (int64_t u = 0; u < U; u++) {
            if (!w->r_seen[u]) continue;
            double t = w->rtanh[u];
            gu[u] *= st->reward_bound * (1 - t * t);
        }
    const Net *net = &w->nu;
    int64_t d = net->sizes[0];
    const double *phi = st->unit_x + b * st->unit_x_stride;
    if (net->n_layers == 0) {  /* linear: grad nu = sum_u g_u phi(u) */
        const double *nu0 = net->W[0] + b * d;
        double *nu = st->nu.W[0] + b * d;
        for (int64_t i = 0; i < d; i++) {
            double s = 0;
            for (int64_t u = 0; u < U; u++) s += gu[u] * phi[u * d + i];
            w->dW[i] = s;
        }
        for (int64_t i = 0; i < d; i++) nu[i] = nu0[i] - st->xi * w->dW[i];
        if (st->reward_box > 0)  /* then onto the box: nu <- clip(nu, -R, R) (a NaN stays NaN, as in torch.clamp) */
            for (int64_t i = 0; i < d; i++) {
                if (nu[i] > st->reward_box) nu[i] = st->reward_box;
                else if (nu[i] < -st->reward_box) nu[i] = -st->reward_box;
            }
        return;
    }
    /* the MLP: one backward over the units the stage visits (the others' gradient is 0), their inputs and
       activations gathered into rows, then one update */
    int64_t n = 0, L = net->n_layers;
    for (int64_t u = 0; u < U; u++) {
        if (!w->r_seen[u]) continue;
        for (int64_t i = 0; i < d; i++) w->rx[n * d + i] = phi[u * d + i];  /* a few doubles: no memcpy call */
        for (int l = 1; l <= L; l++) {
            int64_t wl = net->sizes[l];
            for (int64_t i = 0; i < wl; i++) w->rrows[l][n * wl + i] = w->racts[l][u * wl + i];
        }
        w->gout[n++] = gu[u];
    }
    memset(w->dW, 0, sizeof(double) * n_params(net));
    if (n) mlp_backward(net, b, w->rx, n, w->rrows, w->gout, w->g, w->g_prev, w->Wt, w->dW);
    sgd_update(net, &st->nu, b, w->dW, st->xi);  /* nu <- nu - xi grad */
}

int64_t step_struct_size(void) { return (int64_t)sizeof(Step); }  /* bilevel_kernel.py checks its _Step against it */

int64_t policy_table_size(const Step *st) {  /* doubles per seed in Step.tables */
    int64_t n = 3 * 2 * st->S * st->A;
    for (int l = 1; l <= st->z.n_layers; l++) n += 2 * st->S * st->z.sizes[l];
    return n;
}

/* ---- a seed's scratch, one per thread ---------------------------------------------------------------- */
static int work_alloc(const Step *st, Work *w) {  /* 0, or 1 when out of memory */
    int64_t S = st->S, A = st->A, U = st->n_units, H = st->H;
    int64_t T = st->stage.T > st->nu_stage.T ? st->stage.T : st->nu_stage.T;
    int64_t P = st->n_pairs > 0 ? st->n_pairs : 1;
    int64_t wp = widest(&st->z), wr = widest(&st->nu);
    int64_t rows = S > U ? S : U, wide = wp > wr ? wp : wr;
    int64_t np = n_params(&st->z) > n_params(&st->nu) ? n_params(&st->z) : n_params(&st->nu);
    int64_t nu_max = st->stage.n_uniforms > st->nu_stage.n_uniforms ? st->stage.n_uniforms : st->nu_stage.n_uniforms;
    memset(w, 0, sizeof(*w));
    w->pacts[0] = calloc(st->z.n_layers + 1, sizeof(double *));
    w->pacts[1] = calloc(st->z.n_layers + 1, sizeof(double *));
    w->racts = calloc(st->nu.n_layers + 1, sizeof(double *));
    w->rrows = calloc(st->nu.n_layers + 1, sizeof(double *));
    w->prows = calloc(st->z.n_layers + 1, sizeof(double *));
    if (!w->pacts[0] || !w->pacts[1] || !w->racts || !w->rrows || !w->prows) return 1;
    int bad = 0;
    for (int l = 1; l < st->z.n_layers; l++) bad |= !(w->prows[l] = malloc(sizeof(double) * S * st->z.sizes[l]));
    bad |= !(w->px = malloc(sizeof(double) * S * st->z.sizes[0]));
    for (int l = 1; l <= st->nu.n_layers; l++) {
        bad |= !(w->racts[l] = malloc(sizeof(double) * U * st->nu.sizes[l]));
        bad |= !(w->rrows[l] = malloc(sizeof(double) * U * st->nu.sizes[l]));
    }
    bad |= !(w->r = malloc(sizeof(double) * (U + 1)));
    bad |= !(w->rtanh = malloc(sizeof(double) * (U + 1)));
    bad |= !(w->rx = malloc(sizeof(double) * (U * st->nu.sizes[0] + 1)));
    bad |= !(w->r_done = malloc(U + 1));
    bad |= !(w->r_seen = malloc(U + 1));
    bad |= !(w->index = malloc(sizeof(int64_t) * T * H));
    bad |= !(w->todo = malloc(sizeof(int64_t) * T * H));
    bad |= !(w->unit = malloc(sizeof(int64_t) * T * H));
    bad |= !(w->local = malloc(sizeof(int64_t) * T * H));
    bad |= !(w->ret = malloc(sizeof(double) * T));
    bad |= !(w->weight = malloc(sizeof(double) * T));
    bad |= !(w->label = malloc(sizeof(double) * P));
    bad |= !(w->u = malloc(sizeof(double) * (nu_max + 1)));
    bad |= !(w->grad = malloc(sizeof(double) * (2 * S * A > U ? 2 * S * A : U)));
    bad |= !(w->g = malloc(sizeof(double) * rows * wide));
    bad |= !(w->g_prev = malloc(sizeof(double) * rows * wide));
    bad |= !(w->Wt = malloc(sizeof(double) * wide * wide));
    bad |= !(w->gout = malloc(sizeof(double) * rows * (A > 1 ? A : 1)));
    bad |= !(w->dW = malloc(sizeof(double) * np));
    return bad;
}
static void work_free(const Step *st, Work *w) {
    free(w->pacts[0]); free(w->pacts[1]); free(w->r); free(w->rtanh);
    if (w->racts && w->rrows)
        for (int l = 1; l <= st->nu.n_layers; l++) { free(w->racts[l]); free(w->rrows[l]); }
    if (w->prows) for (int l = 1; l < st->z.n_layers; l++) free(w->prows[l]);
    free(w->prows); free(w->px);
    free(w->racts); free(w->rrows); free(w->rx); free(w->r_done); free(w->r_seen); free(w->todo); free(w->index); free(w->unit);
    free(w->local); free(w->ret); free(w->weight); free(w->label); free(w->u); free(w->grad); free(w->g);
    free(w->g_prev); free(w->Wt); free(w->gout); free(w->dW);
}

/* seed b's scratch at a step's start: the parameters its passes read, its reward cache, its slice of Step.tables */
static void seed_begin(const Step *st, Work *w, int64_t b) {
    int64_t S = st->S, A = st->A;
    w->z = st->z, w->y = st->y, w->nu = st->nu;  /* every pass reads the step's start until its net's first update */
    w->z.W = (double **)st->z.W_in, w->z.b = (double **)st->z.b_in;
    w->y.W = (double **)st->y.W_in, w->y.b = (double **)st->y.b_in;
    w->nu.W = (double **)st->nu.W_in, w->nu.b = (double **)st->nu.b_in;
    memset(w->r_done, 0, st->n_units + 1);
    double *t = st->tables + b * policy_table_size(st);  /* this seed's tables live in Step.tables */
    w->logp = t, w->prob = t + 2 * S * A, w->cdf = t + 4 * S * A, w->ts = 1, t += 6 * S * A;
    for (int p = 0; p < 2; p++)
        for (int l = 1; l <= st->z.n_layers; l++) { w->pacts[p][l] = t; t += S * st->z.sizes[l]; }
}

/* one step of seed b from the RNG counter `counter`: its tables first (a forward) unless tables_valid */
static void seed_step(const Step *st, Work *w, int64_t b, int tables_valid, int64_t counter) {
    seed_begin(st, w, b);
    if (!tables_valid) policy_tables(st, w, b);
    for (int64_t k = 0; k < st->inner; k++) { z_y_stage(st, w, b, counter); counter += st->stage.n_uniforms; }
    nu_stage(st, w, b, counter);
}

/* The step for every seed; returns 0, 1 when a network has more than 15 layers, 2 when out of memory. */
int bilevel_step(const Step *st) {
    if (st->z.n_layers > 15 || st->nu.n_layers > 15) return 1;
    Work w;
    int bad = work_alloc(st, &w);
    if (!bad)
        for (int64_t b = 0; b < st->B; b++) seed_step(st, &w, b, (int)st->tables_valid, st->counter);
    work_free(st, &w);
    return bad ? 2 : 0;
}

/* ---- a segment: n steps of every seed in one call, seeds split across threads ----------------------------
   The harness owns the schedule of evaluations: it asks for n steps (to the next evaluation point, the budget,
   or a time cap). Each seed runs its n steps from its own RNG stream and memory, so the result is the per-step
   call's, bit for bit, whatever the number of threads. The parameters are updated in place (W_in == W). After each
   step a seed alive at its start whose parameters hold a non-finite value is marked (died = the step, 1..n, at
   whose end it happened) and zeroed, as the harness's _mark_diverged does after a step; it keeps stepping, as
   there. */
typedef struct {
    int64_t n_steps;           /* steps to run */
    int64_t k;                 /* the outer iteration of the first one (state.k) */
    int64_t step_uniforms;     /* RNG draws per step: inner stages and the nu stage */
    int64_t single_loop;       /* 1: the schedules below are functions of k; 0: constants lam, alpha, alpha_z, xi */
    double lam0, lam_exponent, c_alpha, alpha_exponent, c_alpha_z, alpha_z_exponent, c_xi, xi_exponent, k0;
    double lam, alpha, alpha_z, xi;
    const int64_t *alive;      /* (B) 1: the seed is alive at the segment's start */
    int64_t *died;             /* (B) out: 0, or the step at whose end the seed went non-finite */
    int64_t n_threads;
    double *schedule;          /* (n_steps, 4) scratch: lam, alpha, alpha_z, xi per step */
} Segment;

int64_t segment_struct_size(void) { return (int64_t)sizeof(Segment); }

static void set_schedule(const Segment *seg, int64_t i, double *out) {
    /* Bilevel.set_schedule: lam_k = lam0 (1 + k / k0)^c_lam, alpha_k = c_alpha / (k + k0)^a, xi_k = c_xi / (k + k0)^b */
    if (!seg->single_loop) { out[0] = seg->lam, out[1] = seg->alpha, out[2] = seg->alpha_z, out[3] = seg->xi; return; }
    double k = (double)(seg->k + i);
    out[0] = seg->lam0 * pow(1.0 + k / seg->k0, seg->lam_exponent);
    out[1] = seg->c_alpha / pow(k + seg->k0, seg->alpha_exponent);
    out[2] = seg->c_alpha_z / pow(k + seg->k0, seg->alpha_z_exponent);
    out[3] = seg->c_xi / pow(k + seg->k0, seg->xi_exponent);
}

static uint64_t non_finite(const double *x, int64_t n) {  /* nonzero iff some x[e] is inf or NaN: its exponent bits
    all ones. Integer ops with an OR reduction, so the loop vectorises (isfinite per element did not: 14 % of a step) */
    const uint64_t exponent = 0x7FF0000000000000ULL;
    uint64_t bad = 0;
    for (int64_t e = 0; e < n; e++) {
        uint64_t bits;
        memcpy(&bits, x + e, sizeof bits);
        bad |= (bits & exponent) == exponent;
    }
    return bad;
}
/* a network's weight matrices W[l], (sizes[l], fan_out(l)), l < n_weights: an MLP's layers (each with a bias b[l]), or
   the linear reward's one, nu = W[0], (d, 1), without a bias */
static int n_weights(const Net *net) { return net->n_layers ? net->n_layers : 1; }
static int64_t fan_out(const Net *net, int l) { return net->n_layers ? net->sizes[l + 1] : 1; }

static int finite(const Net *net, int64_t b) {  /* every parameter of network b finite */
    uint64_t bad = 0;
    for (int l = 0; l < n_weights(net); l++) {
        int64_t fi = net->sizes[l], fo = fan_out(net, l);
        bad |= non_finite(net->W[l] + b * fi * fo, fi * fo);
        if (net->n_layers) bad |= non_finite(net->b[l] + b * fo, fo);
    }
    return !bad;
}
static void zero(const Net *net, int64_t b) {
    for (int l = 0; l < n_weights(net); l++) {
        int64_t fi = net->sizes[l], fo = fan_out(net, l);
        memset(net->W[l] + b * fi * fo, 0, sizeof(double) * fi * fo);
        if (net->n_layers) memset(net->b[l] + b * fo, 0, sizeof(double) * fo);
    }
}


/* ---- a block of seeds as vector lanes: a segment's policy passes --------------------------------------------------
   At the theorem's sizes a policy pass is 8 states through 8 -> 32 -> 6: per seed, too narrow for the vector units
   (about 0.6 multiply-adds per cycle). A segment steps VL seeds together and runs the two policy networks' forward (the
   tables), backward and update with the seeds as the lanes of one vector: each product below is one fused multiply-add
   on VL seeds, and each lane sums the per-seed code's terms in its order (mlp_forward's tile / tile4, mlp_backward,
   sgd_update), so every seed's numbers are the per-seed code's bit for bit (tests/test_segments.py holds a segment to
   the per-step call, which runs the per-seed code). The backward runs over every state, a lane adding only the rows of
   the states its stage visited (`visited`): the per-seed code's gathered rows, in the same order. Where the reward
   passes allow it (reward_lanes_apply: a linear or tabular reward, or hidden layers at least 2 wide) the stages' draws,
   returns and weights and the reward's forward, backward and update run on the lanes too (block_draw, block_rewards,
   block_z_y_grad, block_nu_stage): each lane's draw indexes rows of its own, so those are gathered and scattered lane
   by lane, and the arithmetic is vector. Otherwise they stay per seed and read each lane's log pi and cdf tables where
   block_tables writes them, on the lanes (Work.ts = VL apart). The exponential is vexp, exp_k's operations on the
   lanes; log and tanh stay libm's, one lane at a time. z and y (and nu, where it is on the lanes) live on the lanes
   for the whole call: block_begin reads the seeds' parameters (and tables), block_end writes them back; in between
   the finiteness check reads the lanes. */
typedef struct {
    int64_t n, seed[VL];          /* lanes in use and their seeds (unused lanes repeat seed[0]; nothing of theirs is written) */
    Work w[VL];                   /* each lane's per-seed scratch, where the stages stay per seed (rl == 0) */
    double *W[2][16], *b[2][16];  /* z and y, lane-major: W (fan_in, fan_out), b (fan_out) */
    double *h[2][17];             /* activations (S, width) per layer; h[p][0] the inputs x (S, d), z's and y's */
    double *ref;                  /* (S, A) log pi_ref */
    double *pi, *gt;              /* (2S, A) pi_z then pi_y; the stage's d/d log pi tables (z_y_weights' grad) */
    double *lp, *cdf;             /* (2S, A) log pi and its cumsum: each lane's Work reads them in place (ts = VL) */
    double *g, *g_prev;           /* backward scratch: (S, widest) twice */
    double *tmp;                  /* (2A): a state's log pi before normalising and its exponentials */
    vm *visited;                  /* (S) per lane: the stage visited the state */
    char *any;                    /* (S) some lane visited the state */
    int64_t *xk, *xr;             /* the inputs some lane has not 0, as lists (a count, then the indices ascending): per
                                     state its features (S, d + 1), per feature its states (d, S + 1) */
    int rl;                       /* the stages and the reward are on the lanes too (reward_lanes_apply) */
    double *RW[16], *Rb[16];      /* nu, lane-major */
    double *dRW[16], *dRb[16];    /* the nu stage's gradient of nu */
    double *ra[17];               /* rows' reward activations per layer (rows, sizes[l]), lane-major; ra[0] the inputs */
    double *rg, *rg_prev;         /* backward scratch: (rows, widest) each */
    int64_t *rrow;                /* (rows, VL): lane v's unit at row r at [r * VL + v] */
    vm *rkeep;                    /* (rows) per lane: the row is one of its units */
    double *u, *lab, *rs, *ret, *wt;  /* a stage's uniforms, pair labels, rewards per (t, h), returns, weights per
                                         trajectory */
    int64_t *idx, *loc, *unit;    /* per (t, h): index in the stacked (2S, A) tables, in one table, reward unit */
    int64_t *slot_row;            /* per (t, h) of the nu stage: its unit's row (-1: a padded step) */
    uint64_t *seen;               /* a bit per unit: the units a lane's nu stage visits (cleared after use) */
    int64_t *before;              /* per 64-unit word of `seen`: the rows of the units below it */
    double *rr, *rt;              /* per row of the nu stage: r_nu(u); with a bound, tanh of the raw output */
    double *rraw;                 /* (rows) the reward's raw output per row: ra[L], or ra[1] for the linear reward */
    double *phi, *gu;             /* the linear reward: every unit's features (U, d) per lane; d/d r_nu(u) per unit (U) */
} Block;

static int reward_lanes_apply(const Step *st) {
    /* the reward network's passes on the lanes mirror reward_units and mlp_backward where every hidden layer is at
       least 2 wide (width 1: tiles' dot-product order) and the output is one number; a linear reward (a table, too)
       where its per-unit features fit a block's copy of them (n_units x d <= 2^16) */
    const Net *net = &st->nu;
    if (net->n_layers == 0) return st->n_units * net->sizes[0] <= 65536;
    if (net->n_layers < 2 || net->sizes[net->n_layers] != 1) return 0;
    for (int l = 1; l < net->n_layers; l++) if (net->sizes[l] < 2) return 0;
    return 1;
}

static int lanes_apply(const Step *st) {  /* the lane passes mirror the per-seed code's products of width >= 2 */
    if (st->z.n_layers < 1) return 0;
    for (int l = 0; l <= st->z.n_layers; l++) if (st->z.sizes[l] < 2) return 0;  /* width 1: tiles' dot product order */
    return 1;
}

/* n zeroed doubles at a multiple of 64 bytes (lane_free frees them), so that each lane vector of a lane-major array is
   one cache line: a vector store across two lines costs about twice one (calloc aligns to 16: measured, the lane passes
   took 1.2-1.6x as long at an offset of 16 bytes) */
static double *lane_calloc(int64_t n) {
    char *p = calloc(1, sizeof(double) * n + 64 + sizeof(void *));
    if (!p) return NULL;
    char *a = (char *)(((uintptr_t)p + sizeof(void *) + 63) & ~(uintptr_t)63);
    memcpy(a - sizeof(void *), &p, sizeof(void *));  /* the block calloc returned, just below */
    return (double *)a;
}
static void lane_free(void *a) {
    if (!a) return;
    void *p;
    memcpy(&p, (char *)a - sizeof(void *), sizeof(void *));
    free(p);
}

static int block_alloc(const Step *st, Block *k) {  /* 0, or 1 when out of memory */
    const Net *net = &st->z;
    int64_t S = st->S, A = st->A, L = net->n_layers, wide = widest(net);
    memset(k, 0, sizeof(*k));
    int bad = 0;
    k->rl = reward_lanes_apply(st);
    for (int v = 0; v < VL && !k->rl; v++) bad |= work_alloc(st, &k->w[v]);  /* the per-seed stages' scratch */
    for (int p = 0; p < 2; p++)
        for (int l = 0; l < L; l++) {
            bad |= !(k->W[p][l] = lane_calloc(net->sizes[l] * net->sizes[l + 1] * VL));
            bad |= !(k->b[p][l] = lane_calloc(net->sizes[l + 1] * VL));
            bad |= !(k->h[p][l + 1] = lane_calloc(S * net->sizes[l + 1] * VL));
        }
    bad |= !(k->h[0][0] = k->h[1][0] = lane_calloc(S * net->sizes[0] * VL));
    bad |= !(k->ref = lane_calloc(S * A * VL));
    bad |= !(k->pi = lane_calloc(2 * S * A * VL));
    bad |= !(k->lp = lane_calloc(2 * S * A * VL));
    bad |= !(k->cdf = lane_calloc(2 * S * A * VL));
    bad |= !(k->gt = lane_calloc(2 * S * A * VL));
    bad |= !(k->g = lane_calloc(S * wide * VL));
    bad |= !(k->g_prev = lane_calloc(S * wide * VL));
    bad |= !(k->visited = (vm *)lane_calloc(S * VL));
    bad |= !(k->any = calloc(S, 1));
    bad |= !(k->xk = calloc(S * (net->sizes[0] + 1), sizeof(int64_t)));
    bad |= !(k->xr = calloc(net->sizes[0] * (S + 1), sizeof(int64_t)));
    bad |= !(k->tmp = lane_calloc(2 * A * VL));
    if (k->rl) {
        const Net *nu = &st->nu;
        for (int l = 0; l < n_weights(nu); l++) {
            bad |= !(k->RW[l] = lane_calloc(nu->sizes[l] * fan_out(nu, l) * VL));
            if (!nu->n_layers) continue;  /* the linear reward: no bias, and its update needs no gradient buffer */
            bad |= !(k->Rb[l] = lane_calloc(nu->sizes[l + 1] * VL));
            bad |= !(k->dRW[l] = lane_calloc(nu->sizes[l] * nu->sizes[l + 1] * VL));
            bad |= !(k->dRb[l] = lane_calloc(nu->sizes[l + 1] * VL));
        }
        /* rows: a stage's (trajectory, step) pairs, or the nu stage's distinct units (at most as many) */
        int64_t rows = (st->stage.T > st->nu_stage.T ? st->stage.T : st->nu_stage.T) * st->H;
        for (int l = 0; l <= nu->n_layers; l++) bad |= !(k->ra[l] = lane_calloc(rows * nu->sizes[l] * VL));
        if (nu->n_layers == 0) {  /* linear: its raw output per row, the features and the per-unit gradient */
            bad |= !(k->ra[1] = lane_calloc(rows * VL));
            bad |= !(k->phi = lane_calloc(st->n_units * nu->sizes[0] * VL));
            bad |= !(k->gu = lane_calloc((st->n_units + 1) * VL));
        }
        k->rraw = k->ra[nu->n_layers ? nu->n_layers : 1];
        bad |= !(k->rg = lane_calloc(rows * widest(nu) * VL));
        bad |= !(k->rg_prev = lane_calloc(rows * widest(nu) * VL));
        bad |= !(k->rrow = (int64_t *)lane_calloc(rows * VL));
        bad |= !(k->rkeep = (vm *)lane_calloc(rows * VL));
        int64_t T = st->stage.T > st->nu_stage.T ? st->stage.T : st->nu_stage.T;
        int64_t nu_max = st->stage.n_uniforms > st->nu_stage.n_uniforms ? st->stage.n_uniforms : st->nu_stage.n_uniforms;
        bad |= !(k->u = lane_calloc((nu_max + 1) * VL));
        bad |= !(k->lab = lane_calloc((st->n_pairs + 1) * VL));
        bad |= !(k->rs = lane_calloc(rows * VL));
        bad |= !(k->ret = lane_calloc(T * VL));
        bad |= !(k->wt = lane_calloc(T * VL));
        bad |= !(k->rr = lane_calloc(rows * VL));
        bad |= !(k->rt = lane_calloc(rows * VL));
        bad |= !(k->slot_row = (int64_t *)lane_calloc(rows * VL));
        bad |= !(k->seen = calloc(st->n_units / 64 + 1, sizeof(uint64_t)));
        bad |= !(k->before = calloc(st->n_units / 64 + 1, sizeof(int64_t)));
        bad |= !(k->idx = (int64_t *)lane_calloc(rows * VL));
        bad |= !(k->loc = (int64_t *)lane_calloc(rows * VL));
        bad |= !(k->unit = (int64_t *)lane_calloc(rows * VL));
    }
    return bad;
}
static void block_free(const Step *st, Block *k) {
    for (int v = 0; v < VL; v++) work_free(st, &k->w[v]);  /* zeroed where never allocated: frees nothing */
    for (int p = 0; p < 2; p++)
        for (int l = 0; l < st->z.n_layers; l++) { lane_free(k->W[p][l]); lane_free(k->b[p][l]); lane_free(k->h[p][l + 1]); }
    lane_free(k->h[0][0]); lane_free(k->ref); lane_free(k->pi); lane_free(k->lp); lane_free(k->cdf); lane_free(k->gt);
    lane_free(k->g); lane_free(k->g_prev); lane_free(k->visited); lane_free(k->tmp); free(k->any); free(k->xk); free(k->xr);
    for (int l = 0; l < 16; l++) { lane_free(k->RW[l]); lane_free(k->Rb[l]); lane_free(k->dRW[l]); lane_free(k->dRb[l]); }
    for (int l = 0; l < 17; l++) lane_free(k->ra[l]);
    lane_free(k->rg); lane_free(k->rg_prev); lane_free(k->rrow); lane_free(k->rkeep); lane_free(k->u); lane_free(k->lab);
    lane_free(k->rs); lane_free(k->ret); lane_free(k->wt); lane_free(k->rr); lane_free(k->rt); lane_free(k->slot_row);
    lane_free(k->idx); lane_free(k->loc); lane_free(k->unit); free(k->seen); free(k->before); lane_free(k->phi);
    lane_free(k->gu);
}

/* lanes v0 .. v1 - 1 of network p (z, y) from their seeds' parameters */
static void block_load(const Step *st, Block *k, int p, int64_t v0, int64_t v1) {
    const Net *net = p ? &st->y : &st->z;
    for (int l = 0; l < net->n_layers; l++) {
        int64_t fi = net->sizes[l], fo = net->sizes[l + 1];
        for (int64_t v = v0; v < v1; v++) {
            const double *W = net->W[l] + k->seed[v] * fi * fo, *b = net->b[l] + k->seed[v] * fo;
            for (int64_t e = 0; e < fi * fo; e++) k->W[p][l][e * VL + v] = W[e];
            for (int64_t j = 0; j < fo; j++) k->b[p][l][j * VL + v] = b[j];
        }
    }
}

/* out[r][j] = init[j] (0 without) + sum_k coef[r][k] mat[k * ks + j * js], rows r < R, j < m, every lane: tile's and
   tile4's order (k ascending, one fused multiply-add each). nz (one row): the input layer, whose coefficients are mostly
   0 (one-hot features): the list of the k where some lane's coef[k] is not 0 (a count, then the k ascending); the other
   k are skipped, and a lane whose coef[k] is 0 skips it, as tile does. Rows at coef + r * cs and out + r * os; arrays
   lane-major. act: what is stored, as the separate passes over out computed it: 0 the sums, 1 relu of them (a hidden
   layer's forward), 2 / 3 them times relu' / tanh' at the activations h (laid out as out: the backward's dh) */
static inline __attribute__((always_inline)) void lane_tile(const int m, const int R, double *out, int64_t os,
        const double *init, const double *coef, int64_t cs, const int64_t *nz, int64_t n, const double *mat, int64_t ks,
        int64_t js, int act, const double *h) {
    vd acc[4][8];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < m; j++) acc[r][j] = init ? LANES(init, j) : (vd){0};
    if (nz)
        for (int64_t q = 1; q <= nz[0]; q++) {
            const int64_t k = nz[q];
            const double *row = mat + k * ks * VL;
            const vd c = LANES(coef, k);
            const vm use = c != 0.0;
            for (int j = 0; j < m; j++) acc[0][j] = vfma_where(use, c, LANES(row, j * js), acc[0][j]);
        }
    else
        for (int64_t k = 0; k < n; k++) {
            const double *row = mat + k * ks * VL;
            for (int r = 0; r < R; r++) {
                const vd c = LANES(coef, r * cs + k);
                for (int j = 0; j < m; j++) acc[r][j] = vfma(c, LANES(row, j * js), acc[r][j]);
            }
        }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < m; j++) {
            vd o = acc[r][j];
            if (act == 1) o = sel(o > 0.0, o, (vd){0});
            else if (act == 2) o = sel(LANES(h, r * os + j) > 0.0, o, (vd){0});
            else if (act == 3) { vd he = LANES(h, r * os + j); o = o * (1 - he * he); }
            LANES(out, r * os + j) = o;
        }
}
#define LANE_CASE(m) case m: lane_tile(m, ROWS, out + (r * os + j0) * VL, os, init ? init + j0 * VL : NULL, \
                                       coef + r * cs * VL, cs, nz ? nz + r * (n + 1) : NULL, n, mat + j0 * js * VL, ks, js, \
                                       act, h ? h + (r * os + j0) * VL : NULL); break;
#define LANE_SWITCH switch (width - j0 < 8 ? width - j0 : 8) { LANE_CASE(1) LANE_CASE(2) LANE_CASE(3) LANE_CASE(4) \
                                                               LANE_CASE(5) LANE_CASE(6) LANE_CASE(7) LANE_CASE(8) }
/* lane_tile over `rows` rows, width outputs eight at a time: four rows at a time where a tile is at most 6 wide (24
   accumulators: the policy's output layer), else two (independent chains), one at a time with nz; inlined, so that act
   is a constant in each copy (a runtime act kept the accumulators in memory) */
static inline __attribute__((always_inline)) void lane_tiles(int64_t rows, int64_t width, double *out, int64_t os,
        const double *init, const double *coef, int64_t cs, const int64_t *nz, int64_t n, const double *mat, int64_t ks,
        int64_t js, const int act, const double *h) {
    int64_t r = 0;
    if (!nz && width <= 6)
        for (; r + 4 <= rows; r += 4) {
            int64_t j0 = 0;
#define ROWS 4
            switch (width) { LANE_CASE(1) LANE_CASE(2) LANE_CASE(3) LANE_CASE(4) LANE_CASE(5) LANE_CASE(6) }
#undef ROWS
        }
    if (!nz)
        for (; r + 2 <= rows; r += 2)
            for (int64_t j0 = 0; j0 < width; j0 += 8) {
#define ROWS 2
                LANE_SWITCH
#undef ROWS
            }
    for (; r < rows; r++)
        for (int64_t j0 = 0; j0 < width; j0 += 8) {
#define ROWS 1
            LANE_SWITCH
#undef ROWS
        }
}

/* out[q][j] -= sum over the rows r < n that a lane keeps (keep[r]; with nz, also coef[r][q] != 0) of coef[r][q] mat[r][j],
   q < R consecutive columns of coef, j < m, r ascending from 0 (coef NULL: 1): mlp_backward's sums over its gathered
   rows (tiles), in their order. A row no lane keeps (any[r] == 0, or not in the list nz: with nz, R = 1 and the rows
   where some lane's coef[r][0] is not 0, a count then the r ascending) is skipped. R columns at once are R m
   independent chains of multiply-adds (one column's m alone wait on the multiply-add's latency at every row); each
   (q, j) still sums its rows in order. out[q] at out + q * os; arrays lane-major. */
static inline __attribute__((always_inline)) void lane_row_tile(const int m, const int R, double *out, int64_t os,
        const double *coef, int64_t cs, const int64_t *nz, const vm *keep, const char *any, int64_t n, const double *mat,
        int64_t ms) {
    vd acc[4][8];
    for (int q = 0; q < R; q++)
        for (int j = 0; j < m; j++) acc[q][j] = (vd){0};
    if (nz)
        for (int64_t i = 1; i <= nz[0]; i++) {
            const int64_t r = nz[i];
            if (!any[r]) continue;  /* a state no lane's stage visited */
            const vd c = LANES(coef, r * cs);
            const vm u = keep[r] & (c != 0.0);
            for (int j = 0; j < m; j++) acc[0][j] = vfma_where(u, c, LANES(mat, r * ms + j), acc[0][j]);
        }
    else
        for (int64_t r = 0; r < n; r++) {
            if (!any[r]) continue;  /* a state no lane's stage visited */
            const vm use = keep[r];
            for (int q = 0; q < R; q++) {
                const vd c = coef ? LANES(coef, r * cs + q) : (vd){0} + 1.0;
                for (int j = 0; j < m; j++) acc[q][j] = vfma_where(use, c, LANES(mat, r * ms + j), acc[q][j]);
            }
        }
    for (int q = 0; q < R; q++)
        for (int j = 0; j < m; j++) LANES(out, q * os + j) = LANES(out, q * os + j) - acc[q][j];
}
#define ROW_CASE(m) case m: lane_row_tile(m, ROWS, out + (c * os + j0) * VL, os, coef ? coef + c * VL : NULL, cs, \
                                          nz ? nz + c * (n + 1) : NULL, keep, any, n, mat + j0 * VL, ms); break;
#define ROW_SWITCH switch (width - j0 < 8 ? width - j0 : 8) { ROW_CASE(1) ROW_CASE(2) ROW_CASE(3) ROW_CASE(4) \
                                                             ROW_CASE(5) ROW_CASE(6) ROW_CASE(7) ROW_CASE(8) }
/* lane_row_tile over `cols` columns of coef (their outputs os apart), width outputs eight at a time: four columns at a
   time where a tile is at most 6 wide, else two; one at a time with nz (the sparse input layer) or without coef */
static void lane_rows(int64_t cols, int64_t width, double *out, int64_t os, const double *coef, int64_t cs,
                      const int64_t *nz, const vm *keep, const char *any, int64_t n, const double *mat, int64_t ms) {
    int64_t c = 0;
    if (!nz && coef) {
        if (width <= 6)
            for (; c + 4 <= cols; c += 4)
                for (int64_t j0 = 0; j0 < width; j0 += 8) {
#define ROWS 4
                    ROW_SWITCH
#undef ROWS
                }
        for (; c + 2 <= cols; c += 2)
            for (int64_t j0 = 0; j0 < width; j0 += 8) {
#define ROWS 2
                ROW_SWITCH
#undef ROWS
            }
    }
    for (; c < cols; c++)
        for (int64_t j0 = 0; j0 < width; j0 += 8) {
#define ROWS 1
            ROW_SWITCH
#undef ROWS
        }
}

/* pi_p = log-softmax(log pi_ref + MLP_p(x)) per state row, p = z, y, every lane (policy_tables), into the block's lanes
   (the lanes' draws and returns read log pi and its cdf there, 8 apart; block_end writes them to Step.tables) */
static void block_tables(const Step *st, Block *k) {
    const Net *net = &st->z;
    int64_t S = st->S, A = st->A, L = net->n_layers;
    for (int p = 0; p < 2; p++) {
        for (int l = 0; l < L; l++) {  /* h_{l+1} = act(b + h_l W) on every state; the input layer skips 0 features */
            int64_t fi = net->sizes[l], fo = net->sizes[l + 1];
            const double *in = k->h[p][l];
            double *out = k->h[p][l + 1];
            const int64_t *nz = l == 0 ? k->xk : NULL;
            if (l + 1 < L && !net->tanh_act)  /* a hidden layer: relu, as lane_tile stores it (act a constant in each copy) */
                lane_tiles(S, fo, out, fo, k->b[p][l], in, fi, nz, fi, k->W[p][l], fo, 1, 1, NULL);
            else
                lane_tiles(S, fo, out, fo, k->b[p][l], in, fi, nz, fi, k->W[p][l], fo, 1, 0, NULL);
            if (l + 1 < L && net->tanh_act)  /* or tanh */
                for (int64_t e = 0; e < S * fo * VL; e++) out[e] = tanh(out[e]);
        }
        const double *out = k->h[p][L];
        double *pi = k->pi + p * S * A * VL;
        for (int64_t s = 0; s < S; s++) {
            vd m = (vd){0} - INFINITY, sum = {0}, c = {0}, lse;
            double *lp = k->tmp, *ex = k->tmp + A * VL;
            for (int64_t a = 0; a < A; a++) {
                vd x = LANES(k->ref, s * A + a) + LANES(out, s * A + a);
                LANES(lp, a) = x;
                m = sel(x > m, x, m);
            }
            for (int64_t a = 0; a < A; a++) {
                vd e = vexp(LANES(lp, a) - m);
                LANES(ex, a) = e;
                sum += e;
            }
            for (int v = 0; v < VL; v++) lse[v] = log(sum[v]);
            for (int64_t a = 0; a < A; a++) {
                vd lpa = LANES(lp, a) - m - lse, pa = LANES(ex, a) / sum;  /* pi = exp(log pi), from the exponentials */
                c += pa;  /* what actions are drawn from (policy_cdf) */
                LANES(pi, s * A + a) = pa;
                LANES(k->lp, p * S * A + s * A + a) = lpa;
                LANES(k->cdf, p * S * A + s * A + a) = c;
            }
        }
    }
}

/* the z / y stage's update of network p, every lane: mlp_backward of the visited states' rows, then sgd_update with
   step 1 (the step sizes are in k->gt already); the seeds' parameters and the lanes' copies both updated */
static void block_update(const Step *st, Block *k, int p) {
    const Net *net = p ? &st->y : &st->z;
    int64_t S = st->S, A = st->A, L = net->n_layers;
    const double *gt = k->gt + p * S * A * VL, *pi = k->pi + p * S * A * VL;
    double *g = k->g, *g_prev = k->g_prev;
    for (int64_t s = 0; s < S; s++) {  /* through log-softmax: d logits = g - pi sum_a g, at the visited states */
        vd sum = {0};
        vm seen = {0};
        for (int64_t a = 0; a < A; a++) { vd ga = LANES(gt, s * A + a); sum += ga; seen |= ga != 0.0; }
        k->visited[s] = seen;
        k->any[s] = 0;
        for (int v = 0; v < VL; v++) k->any[s] |= seen[v] != 0;
        for (int64_t a = 0; a < A; a++)
            LANES(g, s * A + a) = sel(seen, LANES(gt, s * A + a) - LANES(pi, s * A + a) * sum, (vd){0});
    }
    for (int l = L - 1; l >= 0; l--) {
        int64_t fi = net->sizes[l], fo = net->sizes[l + 1];
        const double *in = k->h[p][l];
        /* dh_l = g W^T with the layer's W before its update: row r's fi outputs sum g[r][j] W[i][j] over j; then through
           the activation h_l, as lane_tile stores it: relu' = [h > 0], tanh' = 1 - h^2 */
        if (l > 0 && net->tanh_act) lane_tiles(S, fi, g_prev, fi, NULL, g, fo, NULL, fo, k->W[p][l], 1, fo, 3, in);
        else if (l > 0) lane_tiles(S, fi, g_prev, fi, NULL, g, fo, NULL, fo, k->W[p][l], 1, fo, 2, in);
        /* W <- W - dW, dW = h_l^T g over the visited rows, r ascending (the input layer skips its 0 features, as tiles
           does there); b <- b - db, db = sum over the visited rows of g: sgd_update with step 1 (the step sizes are in
           k->gt already), each sum subtracted as it is finished rather than kept in a gradient buffer (1.0 grad is grad) */
        int skip = l == 0 && (fo >= fi || fo > TILE);
        lane_rows(fi, fo, k->W[p][l], fo, in, fi, skip ? k->xr : NULL, k->visited, k->any, S, g, fo);
        lane_rows(1, fo, k->b[p][l], fo, NULL, 0, NULL, k->visited, k->any, S, g, fo);
        if (l > 0) { double *t = g; g = g_prev; g_prev = t; }
    }
}

/* ---- the reward network on the lanes (reward_lanes_apply): rows of units, lane v's row r at a unit of its own -------
   Each product below sums its terms as the per-seed code does (reward_units' forward: tiles' order in a hidden layer,
   the input layer skipping a lane's 0 features, dot4's four partial sums in the one-output layer; mlp_backward's sums
   over the rows, r ascending), so each lane's bits. */

/* out[q * os] = init[q] (0 without) + sum over the rows r < n a lane keeps of coef[r * cs] mat[r * ms + q * mq], q < m,
   r ascending, one fused multiply-add each (coef NULL: plus mat); keep NULL: every lane; sparse: a lane also skips a
   row whose coef is 0; plus_zero: 0 + the sum (a sum added to a zeroed gradient). Arrays lane-major. */
static inline __attribute__((always_inline)) void sum_tile(const int m, double *out, int64_t os, const double *init,
        const double *coef, int64_t cs, const double *mat, int64_t ms, int64_t mq, const vm *keep, int sparse, int64_t n,
        int plus_zero) {
    vd acc[8];
    for (int q = 0; q < m; q++) acc[q] = init ? LANES(init, q) : (vd){0};
    for (int64_t r = 0; r < n; r++) {
        const double *row = mat + r * ms * VL;
        if (!coef) {
            for (int q = 0; q < m; q++) acc[q] = sel(keep[r], acc[q] + LANES(row, q * mq), acc[q]);
            continue;
        }
        const vd c = LANES(coef, r * cs);
        if (!keep && !sparse) {
            for (int q = 0; q < m; q++) acc[q] = vfma(c, LANES(row, q * mq), acc[q]);
            continue;
        }
        vm use = keep ? keep[r] : (vm){0} - 1;
        if (sparse) use &= c != 0.0;
        for (int q = 0; q < m; q++) acc[q] = vfma_where(use, c, LANES(row, q * mq), acc[q]);
    }
    for (int q = 0; q < m; q++) LANES(out, q * os) = plus_zero ? 0.0 + acc[q] : acc[q];
}
#define SUM_CASE(m) case m: sum_tile(m, out + q0 * os * VL, os, init ? init + q0 * VL : NULL, coef, cs, \
                                     mat + q0 * mq * VL, ms, mq, keep, sparse, n, plus_zero); break;
/* sum_tile over width outputs, eight at a time (their accumulators stay in registers) */
static void sums(int64_t width, double *out, int64_t os, const double *init, const double *coef, int64_t cs,
                 const double *mat, int64_t ms, int64_t mq, const vm *keep, int sparse, int64_t n, int plus_zero) {
    for (int64_t q0 = 0; q0 < width; q0 += 8)
        switch (width - q0 < 8 ? width - q0 : 8) {
            SUM_CASE(1) SUM_CASE(2) SUM_CASE(3) SUM_CASE(4) SUM_CASE(5) SUM_CASE(6) SUM_CASE(7) SUM_CASE(8)
        }
}

/* each lane's inputs phi(u) into row r of k->ra[0], u = units[r * VL + v] (a padded unit, u = n_units, reads unit 0:
   nothing reads its reward or gradient) */
static void block_reward_inputs(const Step *st, Block *k, const int64_t *units, int64_t rows) {
    int64_t d = st->nu.sizes[0];
    for (int64_t r = 0; r < rows; r++)
        for (int64_t v = 0; v < VL; v++) {
            int64_t u = units[r * VL + v];
            const double *phi = st->unit_x + k->seed[v] * st->unit_x_stride + (u < st->n_units ? u : 0) * d;
            for (int64_t i = 0; i < d; i++) k->ra[0][(r * d + i) * VL + v] = phi[i];
        }
}

/* the forward of rows 0 .. rows - 1 (inputs in k->ra[0]): activations into k->ra[l], the raw output (before the bound)
   into k->ra[L] */
static void block_reward_rows(const Step *st, Block *k, int64_t rows) {
    const Net *net = &st->nu;
    int L = net->n_layers;
    if (L == 0)  /* linear: nu . phi(u), i ascending from 0 (reward_units' sum: products, then adds) */
        for (int64_t r = 0; r < rows; r++) {
            vd s = {0};
            for (int64_t i = 0; i < net->sizes[0]; i++) s = s + LANES(k->RW[0], i) * LANES(k->ra[0], r * net->sizes[0] + i);
            LANES(k->rraw, r) = s;
        }
    for (int l = 0; l < L; l++) {
        int64_t fi = net->sizes[l], fo = net->sizes[l + 1];
        const double *W = k->RW[l];
        for (int64_t r = 0; r < rows; r++) {
            const double *in = k->ra[l] + r * fi * VL;
            double *out = k->ra[l + 1] + r * fo * VL;
            if (fo == 1) {  /* the output: bias + in . W in four partial sums, (a0 + a1) + (a2 + a3) */
                vd acc[4] = {LANES(k->Rb[l], 0), {0}, {0}, {0}};
                int64_t i = 0;
                for (; i + 4 <= fi; i += 4)
                    for (int j = 0; j < 4; j++) acc[j] = vfma(LANES(in, i + j), LANES(W, i + j), acc[j]);
                for (; i < fi; i++) acc[0] = vfma(LANES(in, i), LANES(W, i), acc[0]);
                LANES(out, 0) = (acc[0] + acc[1]) + (acc[2] + acc[3]);
                continue;
            }
            sums(fo, out, 1, k->Rb[l], in, 1, W, fo, 1, NULL, l == 0, fi, 0);  /* h = b + in W, k ascending */
            if (l + 1 < L) {  /* hidden layer: relu or tanh (libm's, a lane at a time) */
                if (net->tanh_act) for (int64_t e = 0; e < fo * VL; e++) out[e] = tanh(out[e]);
                else for (int64_t j = 0; j < fo; j++) { vd o = LANES(out, j); LANES(out, j) = sel(o > 0.0, o, (vd){0}); }
            }
        }
    }
}

/* the rewards of the first T trajectories of every lane's draw (k->unit), a row per (trajectory, step), into k->rs:
   r_nu(u), R tanh(raw) with a bound, and 0 at a padded step (u = n_units), which model_return adds as 0 */
static void block_rewards(const Step *st, Block *k, int64_t T) {
    int64_t rows = T * st->H;
    block_reward_inputs(st, k, k->unit, rows);
    block_reward_rows(st, k, rows);
    for (int64_t e = 0; e < rows; e++)
        for (int v = 0; v < VL; v++) {
            double raw = k->rraw[e * VL + v];
            k->rs[e * VL + v] = k->unit[e * VL + v] >= st->n_units ? 0.0 : st->reward_bound > 0 ? st->reward_bound * tanh(raw) : raw;
        }
}

/* ---- a stage's draws, returns and weights on the lanes (Block.rl) ------------------------------------------------
   draw, z_y_grad and nu_stage with lane v's numbers at [e * VL + v]: the same operations per lane in the same order,
   so each lane's bits. Lanes past the block's seeds (v >= n) copy lane 0's stream and are never written back. */

/* the stage's uniforms of every lane, then its trajectories (index, local, unit per (t, h)) and its pairs' labels */
static void block_draw(const Step *st, Block *k, const Plan *plan, int64_t counter) {
    int64_t S = st->S, A = st->A, H = st->H, T = plan->T, SA = S * A, G = st->G;
    double *u = k->u;
    for (int64_t i = 0; i < plan->n_uniforms; i++) {  /* uniforms(): draw counter + i of each lane's stream */
        uint64_t c = mix64((uint64_t)(counter + i) * 0x9E3779B97F4A7C15ULL + 1);
        for (int v = 0; v < VL; v++) {
            uint64_t bits = mix64((uint64_t)st->keys[k->seed[v]] ^ c);
            u[i * VL + v] = ((double)(int64_t)(bits >> 11) + 0.5) * 0x1p-53;
        }
    }
    for (int64_t t = 0; t < T; t++) {
        int64_t s[VL];
        const double *ui = u + plan->columns[t] * VL;
        for (int v = 0; v < VL; v++)
            s[v] = search(st->init_cdf + k->seed[v] * st->init_cdf_stride, G, 1, ui[v]);
        for (int64_t h = 0; h < H; h++) {
            int64_t e = t * H + h, base = plan->row_base[h * T + t];
            const double *ua = u + plan->columns[(1 + 2 * h) * T + t] * VL;
            for (int v = 0; v < VL; v++) {
                int64_t row = s[v] + base;
                /* a ~ pi(. | s): inverse CDF, on this lane's cdf */
                int64_t a = search(k->cdf + row * A * VL + v, A, VL, ua[v]), idx = row * A + a;
                int64_t local = idx < SA ? idx : idx - SA;
                k->idx[e * VL + v] = idx, k->loc[e * VL + v] = local, k->unit[e * VL + v] = st->unit_of[local];
                if (h < H - 1) {  /* s' ~ P(. | s, a) */
                    int64_t K = st->next_k[h], at = s[v] * A + a, b = k->seed[v];
                    const int64_t *nxt = st->next_idx[h] + b * st->next_stride[h] + at * K;
                    if (K == 1) s[v] = nxt[0];
                    else {
                        const double *cdf = st->next_cdf[h] + b * st->next_stride[h] + at * K;
                        s[v] = nxt[search(cdf, K, 1, u[plan->columns[(2 + 2 * h) * T + t] * VL + v])];
                    }
                }
            }
        }
    }
    for (int64_t i = 0; i < plan->n_pairs; i++) {  /* Bradley-Terry oracle on the true reward, label noise eta */
        vd r1 = {0}, r2 = {0};
        for (int64_t h = 0; h < H; h++)
            for (int v = 0; v < VL; v++) {
                const double *true_r = st->true_r + k->seed[v] * st->true_r_stride;
                r1[v] += true_r[k->unit[(plan->first[i] * H + h) * VL + v]];
                r2[v] += true_r[k->unit[(plan->second[i] * H + h) * VL + v]];
            }
        vd p = st->label_noise + (1 - 2 * st->label_noise) * (1.0 / (1.0 + vexp(-(r1 - r2))));  /* sigmoid */
        vd ul = LANES(u, plan->label_columns[i]);
        LANES(k->lab, i) = sel(ul < p, (vd){0} + 1.0, (vd){0});
    }
}

/* R_nu(tau_t) of every lane (model_return): the rewards of its steps, from block_rewards, a padded step paying 0 */
static vd block_return(const Step *st, const Block *k, int64_t t) {
    vd s = {0};
    for (int64_t h = 0; h < st->H; h++) s += LANES(k->rs, t * st->H + h);
    return s;
}

static void block_leave_one_out(double *v, int64_t n) {  /* leave_one_out_weights, every lane */
    vd sum = {0};
    for (int64_t i = 0; i < n; i++) sum += LANES(v, i);
    for (int64_t i = 0; i < n; i++) LANES(v, i) = (LANES(v, i) - (sum - LANES(v, i)) / (double)(n - 1)) / (double)n;
}

/* z_y_grad, every lane: the gradient on the log-pi tables straight into k->gt */
static void block_z_y_grad(const Step *st, Block *k) {
    int64_t N = st->n_traj, M = st->n_pairs, H = st->H, S = st->S, A = st->A, T = st->stage.T;
    double *wt = k->wt;
    for (int64_t t = 0; t < T; t++) {  /* G(tau) = R_nu(tau) - beta sum_t log pi/pi_ref (a_t | s_t) */
        vd lp = {0}, lr = {0};
        for (int64_t h = 0; h < H; h++)
            for (int v = 0; v < VL; v++) {
                lp[v] += k->lp[k->idx[(t * H + h) * VL + v] * VL + v];
                lr[v] += k->ref[k->loc[(t * H + h) * VL + v] * VL + v];
            }
        LANES(k->ret, t) = block_return(st, k, t) - st->beta * (lp - lr);
    }
    double *wz = wt, *score = wt + N * VL, *wy = wt + (N + 2 * M) * VL;
    for (int64_t i = 0; i < N; i++) { LANES(wz, i) = LANES(k->ret, i); LANES(wy, i) = LANES(k->ret, N + 2 * M + i); }
    block_leave_one_out(wz, N);  /* z: grad of g^_theta J(nu, z) = (G - b) / N on log pi(tau) */
    block_leave_one_out(wy, N);
    for (int64_t i = 0; i < N; i++) LANES(wy, i) = -LANES(wy, i);  /* y: minus g^_theta J(nu, y) */
    for (int64_t i = 0; i < M; i++) {  /* BT loss l = softplus(m) - label m, m = R_nu(tau) - R_nu(tau') */
        vd m = block_return(st, k, N + i) - block_return(st, k, N + M + i), ex = vexp(m), sp;
        for (int v = 0; v < VL; v++) sp[v] = m[v] > 20.0 ? m[v] : log1p(ex[v]);  /* softplus */
        LANES(score, i) = sp - LANES(k->lab, i) * m;
    }
    block_leave_one_out(score, M);  /* y: g^_theta f(nu, y) / lam, (l - b) / M / lam on both members */
    for (int64_t i = 0; i < M; i++) { LANES(score, i) = LANES(score, i) / st->lam; LANES(score, M + i) = LANES(score, i); }
    double *gt = k->gt;  /* d/d(log pi tables) of sum_i weight_i log pi(tau_i), times -alpha_z (z) / alpha (y) */
    memset(gt, 0, sizeof(double) * 2 * S * A * VL);
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++)
            for (int v = 0; v < VL; v++) gt[k->idx[(t * H + h) * VL + v] * VL + v] += wt[t * VL + v];
    for (int64_t e = 0; e < S * A; e++) {
        LANES(gt, e) = LANES(gt, e) * -st->alpha_z;
        LANES(gt, S * A + e) = LANES(gt, S * A + e) * st->alpha;
    }
}

/* the nu stage after its draws (block_draw), every lane: nu_stage's rows are the distinct units the draws visit, in
   ascending order (the per-seed code's gathered rows; a lane with fewer keeps none of the rest); their forward gives
   both the pairs' rewards (the margins) and the backward's activations; then nu_unit_grad's weights and per-unit
   gradient (summed per row, (t, h) ascending), mlp_backward over the rows and sgd_update with step xi */
static void block_nu_stage(const Step *st, Block *k) {
    const Net *net = &st->nu;
    int L = net->n_layers;
    int64_t N = st->n_traj, M = st->n_pairs, H = st->H, T = st->nu_stage.T, U = st->n_units, rows = 0, nrow[VL];
    int64_t words = (U + 63) / 64;
    uint64_t *seen = k->seen;  /* a bit per unit, all 0 between calls */
    for (int v = 0; v < VL; v++) {  /* the lane's units, ascending: the set bits of `seen`, word by word */
        int64_t n = 0;
        for (int64_t e = 0; e < T * H; e++) {
            int64_t u = k->unit[e * VL + v];
            if (u < U) seen[u >> 6] |= 1ULL << (u & 63);
        }
        for (int64_t q = 0; q < words; q++) {
            k->before[q] = n;  /* rows of the units below word q */
            for (uint64_t bits = seen[q]; bits; bits &= bits - 1) k->rrow[n++ * VL + v] = q * 64 + __builtin_ctzll(bits);
        }
        for (int64_t e = 0; e < T * H; e++) {  /* each step's row (how many of the lane's units are below its unit), -1
                                                  at a padded step */
            int64_t u = k->unit[e * VL + v];
            k->slot_row[e * VL + v] = u < U ? k->before[u >> 6] + __builtin_popcountll(seen[u >> 6] & ((1ULL << (u & 63)) - 1)) : -1;
        }
        for (int64_t e = 0; e < T * H; e++) {
            int64_t u = k->unit[e * VL + v];
            if (u < U) seen[u >> 6] = 0;
        }
        nrow[v] = n;
        if (n > rows) rows = n;
    }
    for (int64_t r = 0; r < rows; r++)
        for (int v = 0; v < VL; v++) {
            k->rkeep[r][v] = -(int64_t)(r < nrow[v]);
            if (r >= nrow[v]) k->rrow[r * VL + v] = U;  /* a padded row: unit 0's inputs, no gradient */
        }
    block_reward_inputs(st, k, k->rrow, rows);
    block_reward_rows(st, k, rows);
    double *raw = k->rraw, *rr = k->rr;
    for (int64_t r = 0; r < rows; r++)  /* r_nu(u) = R tanh(raw) with a bound (tanh kept for the backward) */
        for (int v = 0; v < VL; v++) {
            if (st->reward_bound > 0) k->rt[r * VL + v] = tanh(raw[r * VL + v]), rr[r * VL + v] = st->reward_bound * k->rt[r * VL + v];
            else rr[r * VL + v] = raw[r * VL + v];
        }
    for (int64_t e = 0; e < 2 * M * H; e++)  /* the pairs' steps' rewards, 0 at a padded step (model_return) */
        for (int v = 0; v < VL; v++) {
            int64_t r = k->slot_row[e * VL + v];
            k->rs[e * VL + v] = r < 0 ? 0.0 : rr[r * VL + v];
        }
    double *wt = k->wt;
    for (int64_t i = 0; i < M; i++) {  /* g^_nu f(nu, y): d/d margin of the mean BT loss = (sigmoid(m) - label) / M */
        vd m = block_return(st, k, i) - block_return(st, k, M + i);
        LANES(wt, i) = (1.0 / (1.0 + vexp(-m)) - LANES(k->lab, i)) / (double)M;
        LANES(wt, M + i) = -LANES(wt, i);
    }
    for (int64_t i = 0; i < N; i++) {  /* lam (g^_nu J(nu, z) - g^_nu J(nu, y)): lam / N per trajectory's R_nu */
        LANES(wt, 2 * M + i) = (vd){0} + st->lam / N;
        LANES(wt, 2 * M + N + i) = -((vd){0} + st->lam / N);
    }
    double *g = k->rg, *g_prev = k->rg_prev;  /* d/d r_nu(u) of the hypergradient surrogate, per row */
    memset(g, 0, sizeof(double) * rows * VL);
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++)
            for (int v = 0; v < VL; v++) {
                int64_t r = k->slot_row[(t * H + h) * VL + v];
                if (r >= 0) g[r * VL + v] += wt[t * VL + v];
            }
    if (st->reward_bound > 0)  /* through the bound: d r_nu(u) / d raw = R (1 - tanh^2 raw) */
        for (int64_t r = 0; r < rows; r++) {
            vd t = LANES(k->rt, r);
            LANES(g, r) = LANES(g, r) * (st->reward_bound * (1 - t * t));
        }
    if (L == 0) {  /* linear: grad nu = sum over every unit of g_u phi(u) (0 at the units not visited), u ascending */
        int64_t d = net->sizes[0];
        for (int64_t r = 0; r < rows; r++)
            for (int v = 0; v < VL; v++)
                if (r < nrow[v]) k->gu[k->rrow[r * VL + v] * VL + v] = g[r * VL + v];
        const vd xi = (vd){0} + st->xi, box = (vd){0} + st->reward_box;
        for (int64_t i = 0; i < d; i++) {
            vd s = {0};
            for (int64_t u = 0; u < U; u++) s = s + LANES(k->gu, u) * LANES(k->phi, u * d + i);
            vd nu = LANES(k->RW[0], i) - xi * s;
            if (st->reward_box > 0)  /* then onto the box [-R, R] (a NaN stays NaN) */
                nu = sel(nu > box, box, sel(nu < -box, -box, nu));
            LANES(k->RW[0], i) = nu;
        }
        for (int64_t r = 0; r < rows; r++)  /* gu back to 0 */
            for (int v = 0; v < VL; v++)
                if (r < nrow[v]) k->gu[k->rrow[r * VL + v] * VL + v] = 0.0;
        return;
    }
    for (int l = L - 1; l >= 0; l--) {
        int64_t fi = net->sizes[l], fo = net->sizes[l + 1];
        const double *in = k->ra[l];
        if (l < L - 1)  /* through the activation: relu' = [h > 0], tanh' = 1 - h^2 */
            for (int64_t e = 0; e < rows * fo; e++) {
                vd h = LANES(k->ra[l + 1], e), ge = LANES(g, e);
                LANES(g, e) = net->tanh_act ? ge * (1 - h * h) : sel(h > 0.0, ge, (vd){0});
            }
        if (fo >= fi || fo > TILE)  /* dW = h_l^T g: row i of dW sums h_l[r, i] g[r] over the kept rows */
            for (int64_t i = 0; i < fi; i++)
                sums(fo, k->dRW[l] + i * fo * VL, 1, NULL, in + i * VL, fi, g, fo, 1, k->rkeep, l == 0, rows, 0);
        else  /* a narrow layer (the one output): column j of dW, then 0 + it (mlp_backward adds it to a zeroed dW) */
            for (int64_t j = 0; j < fo; j++)
                sums(fi, k->dRW[l] + j * VL, fo, NULL, g + j * VL, fo, in, fi, 1, k->rkeep, 0, rows, 1);
        sums(fo, k->dRb[l], 1, NULL, NULL, 0, g, fo, 1, k->rkeep, 0, rows, 0);  /* db = sum over the kept rows of g */
        if (l > 0) {  /* dh_l = g W^T (W before its update): row r's fi outputs sum g[r][j] W[i][j] over j */
            for (int64_t r = 0; r < rows; r++)
                sums(fi, g_prev + r * fi * VL, 1, NULL, g + r * fo * VL, 1, k->RW[l], 1, fo, NULL, 0, fo, 0);
            double *t = g; g = g_prev; g_prev = t;
        }
    }
    const vd xi = (vd){0} + st->xi;
    for (int l = 0; l < L; l++) {  /* nu <- nu - xi grad (sgd_update) */
        int64_t fi = net->sizes[l], fo = net->sizes[l + 1];
        for (int64_t e = 0; e < fi * fo; e++) LANES(k->RW[l], e) = LANES(k->RW[l], e) - xi * LANES(k->dRW[l], e);
        for (int64_t j = 0; j < fo; j++) LANES(k->Rb[l], j) = LANES(k->Rb[l], j) - xi * LANES(k->dRb[l], j);
    }
}

/* nu's lanes from (load) or into (store) the block's seeds' parameters; on load, a linear reward's lanes also take
   their features of every unit (what its update sums over) */
static void block_nu_copy(const Step *st, Block *k, int store) {
    const Net *net = &st->nu;
    for (int l = 0; l < n_weights(net); l++) {
        int64_t fi = net->sizes[l], fo = fan_out(net, l);
        for (int64_t v = 0; v < (store ? k->n : VL); v++) {
            double *W = net->W[l] + k->seed[v] * fi * fo;
            for (int64_t e = 0; e < fi * fo; e++) {
                if (store) W[e] = k->RW[l][e * VL + v]; else k->RW[l][e * VL + v] = W[e];
            }
            if (!net->n_layers) continue;
            double *b = net->b[l] + k->seed[v] * fo;
            for (int64_t j = 0; j < fo; j++) {
                if (store) b[j] = k->Rb[l][j * VL + v]; else k->Rb[l][j * VL + v] = b[j];
            }
        }
    }
    if (!store && !net->n_layers)
        for (int64_t v = 0; v < VL; v++)
            for (int64_t e = 0; e < st->n_units * net->sizes[0]; e++)
                k->phi[e * VL + v] = st->unit_x[k->seed[v] * st->unit_x_stride + e];
}

/* per lane: some parameter of z or y (and nu on the lanes) is inf or NaN (finite's exponent-bits test); zero_lane: lane v's
   z and y (and nu on the lanes) := 0 */
static vm lanes_non_finite(const double *x, int64_t n) {  /* per lane: some x[e] is inf or NaN, e < n. Four OR
    chains, not one: a single chain waits on the compare's latency at every element (it was 4 % of the kernel) */
    const vm exponent = (vm){0} + 0x7FF0000000000000LL;
    vm bad[4] = {{0}, {0}, {0}, {0}};
    int64_t e = 0;
    for (; e + 4 <= n; e += 4)
        for (int q = 0; q < 4; q++) bad[q] |= (LANE_BITS(x, e + q) & exponent) == exponent;
    for (; e < n; e++) bad[0] |= (LANE_BITS(x, e) & exponent) == exponent;
    return (bad[0] | bad[1]) | (bad[2] | bad[3]);
}
static vm block_non_finite(const Step *st, const Block *k) {
    vm bad = {0};
    for (int p = 0; p < 2; p++)
        for (int l = 0; l < st->z.n_layers; l++) {
            int64_t fi = st->z.sizes[l], fo = st->z.sizes[l + 1];
            bad |= lanes_non_finite(k->W[p][l], fi * fo) | lanes_non_finite(k->b[p][l], fo);
        }
    if (k->rl)  /* and nu, when it is on the lanes */
        for (int l = 0; l < n_weights(&st->nu); l++) {
            int64_t fi = st->nu.sizes[l], fo = fan_out(&st->nu, l);
            bad |= lanes_non_finite(k->RW[l], fi * fo);
            if (st->nu.n_layers) bad |= lanes_non_finite(k->Rb[l], fo);
        }
    return bad;
}
static void zero_lane(const Step *st, Block *k, int64_t v) {
    for (int p = 0; p < 2; p++)
        for (int l = 0; l < st->z.n_layers; l++) {
            int64_t fi = st->z.sizes[l], fo = st->z.sizes[l + 1];
            for (int64_t e = 0; e < fi * fo; e++) k->W[p][l][e * VL + v] = 0.0;
            for (int64_t j = 0; j < fo; j++) k->b[p][l][j * VL + v] = 0.0;
        }
    if (k->rl)
        for (int l = 0; l < n_weights(&st->nu); l++) {
            int64_t fi = st->nu.sizes[l], fo = fan_out(&st->nu, l);
            for (int64_t e = 0; e < fi * fo; e++) k->RW[l][e * VL + v] = 0.0;
            for (int64_t j = 0; j < fo && st->nu.n_layers; j++) k->Rb[l][j * VL + v] = 0.0;
        }
}

/* seeds first .. first + n - 1 (n <= VL) into the block's lanes: their inputs and log pi_ref, their parameters, and their
   tables when `valid` (the last call's, as the per-seed code starts from them) */
static void block_begin(const Step *st, Block *k, int64_t first, int64_t n, int valid) {
    const Net *net = &st->z;
    int64_t S = st->S, A = st->A, d = net->sizes[0], L = net->n_layers;
    k->n = n;
    for (int64_t v = 0; v < VL; v++) k->seed[v] = first + (v < n ? v : 0);
    for (int64_t v = 0; v < VL; v++) {
        const double *x = st->policy_x + k->seed[v] * st->policy_x_stride, *ref = st->ref_logp + k->seed[v] * st->ref_logp_stride;
        for (int64_t e = 0; e < S * d; e++) k->h[0][0][e * VL + v] = x[e];
        for (int64_t e = 0; e < S * A; e++) k->ref[e * VL + v] = ref[e];
    }
    for (int64_t i = 0; i < d; i++) k->xr[i * (S + 1)] = 0;
    for (int64_t s = 0; s < S; s++) {
        int64_t *row = k->xk + s * (d + 1);
        row[0] = 0;
        for (int64_t i = 0; i < d; i++) {
            int nz = 0;
            for (int64_t v = 0; v < VL; v++) nz |= k->h[0][0][(s * d + i) * VL + v] != 0.0;
            if (!nz) continue;
            int64_t *col = k->xr + i * (S + 1);
            row[++row[0]] = i, col[++col[0]] = s;
        }
    }
    block_load(st, k, 0, 0, VL), block_load(st, k, 1, 0, VL);
    if (!valid) return;
    for (int64_t v = 0; v < VL; v++) {
        const double *t = st->tables + k->seed[v] * policy_table_size(st);
        for (int64_t e = 0; e < 2 * S * A; e++)
            k->lp[e * VL + v] = t[e], k->pi[e * VL + v] = t[2 * S * A + e], k->cdf[e * VL + v] = t[4 * S * A + e];
        t += 6 * S * A;
        for (int p = 0; p < 2; p++)
            for (int l = 1; l <= L; l++) {
                for (int64_t e = 0; e < S * net->sizes[l]; e++) k->h[p][l][e * VL + v] = t[e];
                t += S * net->sizes[l];
            }
    }
}
/* the lanes' z and y into their seeds' parameters, their tables (log pi, pi, cdf) and activations into their Step.tables */
static void block_end(const Step *st, Block *k) {
    const Net *net = &st->z;
    int64_t S = st->S, A = st->A, L = net->n_layers;
    for (int p = 0; p < 2; p++) {
        const Net *to = p ? &st->y : &st->z;
        for (int l = 0; l < L; l++) {
            int64_t fi = net->sizes[l], fo = net->sizes[l + 1];
            for (int64_t v = 0; v < k->n; v++) {
                double *W = to->W[l] + k->seed[v] * fi * fo, *b = to->b[l] + k->seed[v] * fo;
                for (int64_t e = 0; e < fi * fo; e++) W[e] = k->W[p][l][e * VL + v];
                for (int64_t j = 0; j < fo; j++) b[j] = k->b[p][l][j * VL + v];
            }
        }
    }
    for (int64_t v = 0; v < k->n; v++) {
        double *t = st->tables + k->seed[v] * policy_table_size(st);
        for (int64_t e = 0; e < 2 * S * A; e++)
            t[e] = k->lp[e * VL + v], t[2 * S * A + e] = k->pi[e * VL + v], t[4 * S * A + e] = k->cdf[e * VL + v];
        t += 6 * S * A;
        for (int p = 0; p < 2; p++)
            for (int l = 1; l <= L; l++) {
                for (int64_t e = 0; e < S * net->sizes[l]; e++) t[e] = k->h[p][l][e * VL + v];
                t += S * net->sizes[l];
            }
    }
}

typedef struct { const Step *st; const Segment *seg; int64_t first, last; int bad; } Job;

/* the thread's seeds VL at a time (Block): the same steps as below, the policy networks' passes on the lanes */
static void run_blocks(Job *job, Step *st) {
    const Segment *seg = job->seg;
    Block *k = malloc(sizeof(Block));
    job->bad = !k || block_alloc(st, k);
    for (int64_t first = job->first; first < job->last && !job->bad; first += VL) {
        int64_t n = job->last - first < VL ? job->last - first : VL, counter = st->counter;
        int valid = (int)st->tables_valid, alive[VL];
        block_begin(st, k, first, n, valid);
        if (k->rl) block_nu_copy(st, k, 0);
        for (int64_t v = 0; v < n; v++) alive[v] = seg->alive[first + v] != 0;
        for (int64_t i = 0; i < seg->n_steps; i++, counter += seg->step_uniforms) {
            const double *s = seg->schedule + 4 * i;
            st->lam = s[0], st->alpha = s[1], st->alpha_z = s[2], st->xi = s[3];
            for (int64_t v = 0; v < n && !k->rl; v++) {  /* each lane's draws and returns read its log pi and cdf on the lanes */
                seed_begin(st, &k->w[v], k->seed[v]);
                k->w[v].logp = k->lp + v, k->w[v].cdf = k->cdf + v, k->w[v].ts = VL;
            }
            if (!valid) block_tables(st, k);
            int64_t c = counter;
            for (int64_t stage = 0; stage < st->inner; stage++, c += st->stage.n_uniforms) {  /* z_y_stage, every lane */
                if (k->rl) {  /* every lane: the draws, the rewards, the returns and weights into gt */
                    block_draw(st, k, &st->stage, c);
                    block_rewards(st, k, st->stage.T);
                    block_z_y_grad(st, k);
                } else
                    for (int64_t v = 0; v < n; v++) {
                        z_y_weights(st, &k->w[v], k->seed[v], c);
                        for (int64_t e = 0; e < 2 * st->S * st->A; e++) k->gt[e * VL + v] = k->w[v].grad[e];
                    }
                block_update(st, k, 0), block_update(st, k, 1);
                block_tables(st, k);
            }
            if (k->rl) {  /* every lane: the draws, the rewards, the unit gradient, nu's update */
                block_draw(st, k, &st->nu_stage, c);
                block_nu_stage(st, k);
            } else
                for (int64_t v = 0; v < n; v++) nu_stage(st, &k->w[v], k->seed[v], c);
            valid = 1;  /* z and y do not move in the nu stage: the step's last tables are the next step's first */
            vm bad = block_non_finite(st, k);
            for (int64_t v = 0; v < n; v++) {
                int64_t b = k->seed[v];
                if (alive[v] && (bad[v] || (!k->rl && !finite(&st->nu, b)))) {  /* diverged at this step */
                    zero_lane(st, k, v);
                    if (!k->rl) zero(&st->nu, b);  /* a per-seed nu (on the lanes, zero_lane zeroed it) */
                    seg->died[b] = i + 1, alive[v] = 0, valid = 0;  /* the zeroed parameters' tables: a forward */
                }
            }
        }
        if (k->rl) block_nu_copy(st, k, 1);
        block_end(st, k);
    }
    if (k) block_free(st, k);
    free(k);
}

static void *run_seeds(void *arg) {
    Job *job = arg;
    const Segment *seg = job->seg;
    Step st = *job->st;  /* this thread's copy: the schedule changes per step */
    if (lanes_apply(&st)) { run_blocks(job, &st); return NULL; }
    Work w;
    job->bad = work_alloc(&st, &w);
    for (int64_t b = job->first; b < job->last && !job->bad; b++) {
        int valid = (int)st.tables_valid, alive = seg->alive[b] != 0;
        int64_t counter = st.counter;
        for (int64_t i = 0; i < seg->n_steps; i++, counter += seg->step_uniforms) {
            const double *s = seg->schedule + 4 * i;
            st.lam = s[0], st.alpha = s[1], st.alpha_z = s[2], st.xi = s[3];
            seed_step(&st, &w, b, valid, counter);
            valid = 1;  /* z and y do not move in the nu stage: the step's last tables are the next step's first */
            if (alive) {
                if (!(finite(&st.z, b) && finite(&st.y, b) && finite(&st.nu, b))) {  /* diverged at this step */
                    zero(&st.z, b), zero(&st.y, b), zero(&st.nu, b);
                    seg->died[b] = i + 1, alive = 0, valid = 0;  /* the zeroed parameters' tables: a forward */
                }
            }
        }
    }
    work_free(&st, &w);
    return NULL;
}

/* n_steps steps of every seed; returns 0, 1 when a network has more than 15 layers, 2 when out of memory,
   3 when a thread could not start. Step.counter is the RNG counter at the first step's first draw; st->z/y/nu's
   W_in must equal W (updated in place). */
int bilevel_segment(const Step *st, Segment *seg) {
    if (st->z.n_layers > 15 || st->nu.n_layers > 15) return 1;
    for (int64_t i = 0; i < seg->n_steps; i++) set_schedule(seg, i, seg->schedule + 4 * i);
    int64_t n = seg->n_threads < 1 ? 1 : seg->n_threads;
    if (n > st->B) n = st->B > 0 ? st->B : 1;
    Job jobs[256];
    pthread_t threads[256];
    if (n > 256) n = 256;
    for (int64_t t = 0; t < n; t++)  /* contiguous blocks of seeds: each thread's seeds are its memory */
        jobs[t] = (Job){st, seg, st->B * t / n, st->B * (t + 1) / n, 0};
    int64_t started = 0, failed = 0;
    for (int64_t t = 1; t < n; t++) {
        if (pthread_create(&threads[t], NULL, run_seeds, &jobs[t]) != 0) { failed = 1; break; }
        started = t;
    }
    if (!failed) run_seeds(&jobs[0]);
    for (int64_t t = 1; t <= started; t++) pthread_join(threads[t], NULL);
    if (failed) return 3;
    for (int64_t t = 0; t < n; t++) if (jobs[t].bad) return 2;
    return 0;
}
