/* psi_gap's inner Newton solve on split rows (envs/penalty.py split_newton_rows), every row of a chunk in one call.

   This is newton_rows (envs/penalty.py) for one row of _Inner(split=True) at a time, as plain C loops: a row is one
   (seed, group) problem of k logits on the one-group design (E (k, m) visits of (s, a), S (m, k) visits of the
   state of logit j, same (k, k) the same-state mask, A actions per state), with its own Lsym, Lrho (m, m) and lin,
   rho, log_trans (m). On the bandit k = m = 6: torch pays ~1 us per operation on such rows, C a few ns per flop.
   Per row, as _Inner._parts / value_grad_hessian / _newton_direction / newton_rows (the Hessian where an iteration
   goes on from the point, not where it stops: the same bits):
     lp = log-softmax per state of x;  lpE = lp E;  P = exp(lpE + log_trans);  LP = Lsym P;
     u = LP + lin + lam_beta lpE;  value = sum((u - LP / 2) P rho)
     grad = E (rho P u) - (S^T (rho P u)) pi,  D = E^T - S pi,  hess = D^T (P (Lrho (P D)) + rho P (u + 2 lam_beta) D)
            - diag(w) + w pi^T same,  w = (S^T (rho P u + lam_beta rho P)) pi
     direction -(H + same)^-1 g by Cholesky; where H + same is not positive definite (a pivot <= 0 or not finite),
     the modified-eigenvalue direction -V diag(1 / max(|ev|, 1e-8 max(max |ev|, 1))) V^T g of its eigenvalues ev and
     eigenvectors V (cyclic Jacobi here, LAPACK's eigh in torch: the same direction up to rounding); capped at
     max_move in sup-norm; the full step if it passes Armijo with slack rounding (1 + |f|), else halving on the value
     alone up to 60 times; stop at |g|_inf <= tol (converged), at no decrease (converged iff |g|_inf <= metric_tol),
     after max_iter iterations, from a non-finite start or a non-finite H + same (unconverged).
   Rows never touch each other's memory, so a row's bits do not depend on the other rows of the call, nor on which
   thread solves it: split_newton's threads, and a thread that joins them with help_split_newton, take the rows in
   small blocks from one shared counter until none is left, each with its own scratch. Built with
   core/kernels.py's flags (-ffp-contract=off, no -ffast-math): NaN survives, sums keep the order written. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

/* Every function below takes the sizes k, m as arguments and is inlined into the driver, which calls it with the
   constants 4, 6 or 8 where k = m is one of them (Solve.unrolled) (the bandit: one trajectory per action): the compiler unrolls those
   loops. The operations and their order are the same in every copy, so the bits are (no -ffast-math, no contraction). */
/* A row's status: CONVERGED or not, with the INDEFINITE bit set where some iteration took the eigenvalue direction. */
enum { UNCONVERGED = 0, CONVERGED = 1, INDEFINITE = 2 };

typedef struct {
    int64_t A;
    const double *E, *S, *same;                         /* the one-group design, row-major */
    const double *Lsym, *Lrho, *lin, *rho, *log_trans;  /* this row's */
    double lam_beta;
    double *lp, *lpE, *P, *LP, *u, *pi, *rPu, *D, *PD, *LPD, *c, *w, *v;  /* scratch */
} Row;

INLINE double sup_norm(const double *g, int64_t k) {  /* NaN if any entry is NaN, as torch's amax */
    double best = 0.0;
    for (int64_t j = 0; j < k; j++) {
        double a = fabs(g[j]);
        if (isnan(a)) return a;
        if (a > best) best = a;
    }
    return best;
}

INLINE double row_value(Row *r, const double *x, int64_t k, int64_t m) {  /* _Inner._parts: lp, lpE, P, LP, u, value */
    int64_t A = r->A;
    for (int64_t s = 0; s < k; s += A) {  /* torch's log_softmax: x - max - log(sum exp(x - max)) */
        double mx = x[s];
        for (int64_t a = 1; a < A; a++) mx = x[s + a] > mx || isnan(x[s + a]) ? x[s + a] : mx;
        double sum = 0.0;
        for (int64_t a = 0; a < A; a++) sum += exp(x[s + a] - mx);
        double lse = log(sum);
        for (int64_t a = 0; a < A; a++) r->lp[s + a] = x[s + a] - mx - lse;
    }
    for (int64_t t = 0; t < m; t++) {
        double acc = 0.0;
        for (int64_t j = 0; j < k; j++) acc += r->lp[j] * r->E[j * m + t];
        r->lpE[t] = acc;
        r->P[t] = exp(acc + r->log_trans[t]);
    }
    double value = 0.0;
    for (int64_t t = 0; t < m; t++) {
        double acc = 0.0;
        for (int64_t q = 0; q < m; q++) acc += r->Lsym[t * m + q] * r->P[q];
        r->LP[t] = acc;
        r->u[t] = acc + r->lin[t] + r->lam_beta * r->lpE[t];
    }
    for (int64_t t = 0; t < m; t++) value += (r->u[t] - 0.5 * r->LP[t]) * r->P[t] * r->rho[t];
    return value;
}

/* The value and gradient at x, keeping in r's scratch what hessian() reads (pi, P, c, w): a point's Hessian is computed
   only where an iteration goes on from it (not at the point that converges, nor at a rejected trial). */
INLINE double value_grad(Row *r, const double *x, double *g, int64_t k, int64_t m) {
    double value = row_value(r, x, k, m);
    for (int64_t j = 0; j < k; j++) r->pi[j] = exp(r->lp[j]);
    for (int64_t t = 0; t < m; t++) {
        r->rPu[t] = r->rho[t] * r->P[t] * r->u[t];
        r->c[t] = r->rho[t] * r->P[t] * (r->u[t] + 2.0 * r->lam_beta);
    }
    for (int64_t j = 0; j < k; j++) {
        double e = 0.0, s = 0.0, sw = 0.0;
        for (int64_t t = 0; t < m; t++) {
            e += r->rPu[t] * r->E[j * m + t];
            s += r->rPu[t] * r->S[t * k + j];
            sw += (r->rPu[t] + r->lam_beta * r->rho[t] * r->P[t]) * r->S[t * k + j];
        }
        g[j] = e - s * r->pi[j];
        r->w[j] = sw * r->pi[j];
    }
    return value;
}

/* The Hessian at the point value_grad() was last called at (its scratch). */
INLINE void hessian(Row *r, double *H, int64_t k, int64_t m) {
    for (int64_t t = 0; t < m; t++)
        for (int64_t j = 0; j < k; j++) {
            r->D[t * k + j] = r->E[j * m + t] - r->S[t * k + j] * r->pi[j];
            r->PD[t * k + j] = r->P[t] * r->D[t * k + j];
        }
    for (int64_t t = 0; t < m; t++)
        for (int64_t j = 0; j < k; j++) {
            double acc = 0.0;
            for (int64_t q = 0; q < m; q++) acc += r->Lrho[t * m + q] * r->PD[q * k + j];
            r->LPD[t * k + j] = acc;
        }
    for (int64_t t = 0; t < m; t++)  /* v = P LPD + c D: the right factor of D^T (...) */
        for (int64_t j = 0; j < k; j++) r->v[t * k + j] = r->P[t] * r->LPD[t * k + j] + r->c[t] * r->D[t * k + j];
    for (int64_t i = 0; i < k; i++)
        for (int64_t j = 0; j < k; j++) {
            double acc = 0.0;
            for (int64_t t = 0; t < m; t++) acc += r->D[t * k + i] * r->v[t * k + j];
            H[i * k + j] = acc - (i == j ? r->w[i] : 0.0) + r->w[i] * r->pi[j] * r->same[i * k + j];
        }
}

/* Eigenvalues ev (k) and eigenvectors V (k, k), row-major, column i for ev[i], of the symmetric a (k, k), by the
   cyclic Jacobi method (Golub and Van Loan, Matrix Computations, section 8.5: the symmetric Schur decomposition):
   sweep over the pairs p < q in row order, each time rotating rows and columns p, q by the angle that zeroes a[p][q]
   (and accumulating the rotations in V), until the off-diagonal part's Frobenius norm is at most DBL_EPSILON times
   the matrix's (which rotations leave unchanged) or 50 sweeps. Convergence is quadratic: on 6 x 6 matrices 5-7
   sweeps. a is overwritten (its diagonal ends as ev). Eigenvalues are not sorted (the direction does not need it). */
INLINE void jacobi_eigen(int64_t k, double *a, double *V, double *ev) {
    double frob = 0.0;
    for (int64_t i = 0; i < k * k; i++) frob += a[i] * a[i];
    for (int64_t i = 0; i < k * k; i++) V[i] = 0.0;
    for (int64_t i = 0; i < k; i++) V[i * k + i] = 1.0;
    for (int sweep = 0; sweep < 50; sweep++) {
        double off = 0.0;
        for (int64_t p = 0; p < k; p++)
            for (int64_t q = p + 1; q < k; q++) off += 2.0 * a[p * k + q] * a[p * k + q];
        if (!(off > 2.2204460492503131e-16 * 2.2204460492503131e-16 * frob)) break;  /* NaN too: nothing to gain */
        for (int64_t p = 0; p < k; p++)
            for (int64_t q = p + 1; q < k; q++) {
                double apq = a[p * k + q];
                if (apq == 0.0) continue;
                /* t = tan(angle), the smaller root of t^2 + 2 tau t - 1 = 0, tau = (a_qq - a_pp) / (2 a_pq) */
                double tau = (a[q * k + q] - a[p * k + p]) / (2.0 * apq);
                double t = (tau >= 0.0 ? 1.0 : -1.0) / (fabs(tau) + hypot(1.0, tau));
                double c = 1.0 / sqrt(1.0 + t * t), s = t * c;
                for (int64_t r = 0; r < k; r++) {  /* a <- a J: columns p, q */
                    double arp = a[r * k + p], arq = a[r * k + q];
                    a[r * k + p] = c * arp - s * arq;
                    a[r * k + q] = s * arp + c * arq;
                }
                for (int64_t r = 0; r < k; r++) {  /* a <- J^T a: rows p, q */
                    double apr = a[p * k + r], aqr = a[q * k + r];
                    a[p * k + r] = c * apr - s * aqr;
                    a[q * k + r] = s * apr + c * aqr;
                }
                a[p * k + q] = 0.0, a[q * k + p] = 0.0;  /* zero by the choice of t, up to rounding */
                for (int64_t r = 0; r < k; r++) {  /* V <- V J */
                    double vrp = V[r * k + p], vrq = V[r * k + q];
                    V[r * k + p] = c * vrp - s * vrq;
                    V[r * k + q] = s * vrp + c * vrq;
                }
            }
    }
    for (int64_t i = 0; i < k; i++) ev[i] = a[i * k + i];
}

/* Exported for the test of the eigen-solver alone (tests/test_penalty_newton_c.py): n matrices a (n, k, k), each
   overwritten, into ev (n, k) and V (n, k, k). */
void eigen_symmetric(int64_t n, int64_t k, double *a, double *V, double *ev) {
    for (int64_t i = 0; i < n; i++) jacobi_eigen(k, a + i * k * k, V + i * k * k, ev + i * k);
}

/* d = -(H + same)^-1 g by Cholesky (L in work, 1 / L_jj on its diagonal), or where a pivot is <= 0 or not finite
   (H + same not positive definite) the modified-eigenvalue direction -V diag(1 / max(|ev|, 1e-8 max(max |ev|, 1)))
   V^T g; capped at max_move in sup-norm. work: 2 k^2 + 2 k doubles. Returns 1 (Cholesky), INDEFINITE (the eigenvalue
   direction), or 0 where H + same is not finite (no direction). */
INLINE int newton_direction(int64_t k, const double *H, const double *same, const double *g, double max_move,
                            double *work, double *d) {
    double *chol = work;
    int positive = 1;
    for (int64_t i = 0; i < k * k; i++) chol[i] = H[i] + same[i];
    for (int64_t j = 0; j < k; j++) {
        double s = chol[j * k + j];
        for (int64_t p = 0; p < j; p++) s -= chol[j * k + p] * chol[j * k + p];
        if (!(s > 0.0) || !isfinite(s)) { positive = 0; break; }
        double inv = 1.0 / sqrt(s);  /* kept on the diagonal: L's off-diagonal and both solves multiply by it */
        chol[j * k + j] = inv;
        for (int64_t i = j + 1; i < k; i++) {
            double acc = chol[i * k + j];
            for (int64_t p = 0; p < j; p++) acc -= chol[i * k + p] * chol[j * k + p];
            chol[i * k + j] = acc * inv;
        }
    }
    if (positive) {
        for (int64_t i = 0; i < k; i++) {  /* L y = g */
            double acc = g[i];
            for (int64_t p = 0; p < i; p++) acc -= chol[i * k + p] * d[p];
            d[i] = acc * chol[i * k + i];
        }
        for (int64_t i = k - 1; i >= 0; i--) {  /* L^T z = y */
            double acc = d[i];
            for (int64_t p = i + 1; p < k; p++) acc -= chol[p * k + i] * d[p];
            d[i] = acc * chol[i * k + i];
        }
    } else {
        double *M = work, *V = M + k * k, *ev = V + k * k, *y = ev + k;
        for (int64_t i = 0; i < k * k; i++) {
            M[i] = H[i] + same[i];
            if (!isfinite(M[i])) return 0;
        }
        jacobi_eigen(k, M, V, ev);
        double top = 0.0;
        for (int64_t i = 0; i < k; i++) top = fabs(ev[i]) > top ? fabs(ev[i]) : top;
        double floor = 1e-8 * (top > 1.0 ? top : 1.0);
        for (int64_t i = 0; i < k; i++) {  /* y = diag(1 / max(|ev|, floor)) V^T g */
            double acc = 0.0;
            for (int64_t r = 0; r < k; r++) acc += V[r * k + i] * g[r];
            y[i] = acc / (fabs(ev[i]) > floor ? fabs(ev[i]) : floor);
        }
        for (int64_t r = 0; r < k; r++) {  /* d = V y, negated with the cap below */
            double acc = 0.0;
            for (int64_t i = 0; i < k; i++) acc += V[r * k + i] * y[i];
            d[r] = acc;
        }
    }
    double big = sup_norm(d, k), scale = max_move / (big > max_move || isnan(big) ? big : max_move);
    for (int64_t i = 0; i < k; i++) d[i] = -d[i] * scale;
    return positive ? 1 : INDEFINITE;
}

typedef struct {
    int64_t R, k, m, A, max_iter, backtracks;
    int64_t unrolled;  /* 1: the copies for k = m in {4, 6, 8} where they apply; 0: the generic loops (the same bits) */
    int64_t n_threads; /* threads the rows are split across (the same bits whatever their number) */
    const double *E, *S, *same;
    const double *Lsym, *Lrho, *lin, *rho, *log_trans;  /* (R, m, m), (R, m, m), (R, m) x 3 */
    double lam_beta, tol, max_move, armijo, rounding, metric_tol;
    const double *x0;  /* (R, k) */
    double *x;         /* (R, k): the solution (x0 where the start is not finite) */
    int64_t *status;   /* (R): CONVERGED or UNCONVERGED, | INDEFINITE where an eigenvalue direction was taken */
    int64_t *next_row; /* the first row no thread has taken yet: 0 before the call, R (or more) after it */
} Solve;

int64_t solve_struct_size(void) { return (int64_t)sizeof(Solve); }

INLINE void solve_row(const Solve *q, Row *r, int64_t b, double *buf, int64_t k, int64_t m) {
    r->Lsym = q->Lsym + b * m * m; r->Lrho = q->Lrho + b * m * m;
    r->lin = q->lin + b * m; r->rho = q->rho + b * m; r->log_trans = q->log_trans + b * m;
    double *x = q->x + b * k, *g = buf, *H = g + k, *d = H + k * k, *work = d + k, *trial = work + 2 * k * k + 2 * k;
    double *g1 = trial + k;
    memcpy(x, q->x0 + b * k, (size_t)k * sizeof(double));
    q->status[b] = UNCONVERGED;
    double f = value_grad(r, x, g, k, m);
    if (!isfinite(f)) return;  /* a non-finite row is left to the caller, unconverged */
    for (int64_t j = 0; j < k; j++) if (!isfinite(g[j])) return;
    for (int64_t it = 0; it < q->max_iter; it++) {
        double gmax = sup_norm(g, k);
        if (gmax <= q->tol) { q->status[b] |= CONVERGED; return; }
        hessian(r, H, k, m);  /* at x: value_grad's last call was at x */
        int direction = newton_direction(k, H, q->same, g, q->max_move, work, d);
        if (direction == 0) return;  /* H + same not finite: left to the caller, unconverged */
        if (direction == INDEFINITE) q->status[b] |= INDEFINITE;
        double slope = 0.0;
        for (int64_t j = 0; j < k; j++) slope += g[j] * d[j];
        double slack = q->rounding * (1.0 + fabs(f));
        for (int64_t j = 0; j < k; j++) trial[j] = x[j] + d[j];
        double f1 = value_grad(r, trial, g1, k, m);  /* the full step, which Newton takes almost always */
        if (f1 <= f + q->armijo * slope + slack && isfinite(f1)) {
            memcpy(x, trial, (size_t)k * sizeof(double));
            memcpy(g, g1, (size_t)k * sizeof(double));
            f = f1;
            continue;
        }
        double step = 0.5;  /* backtrack on the value alone, then one gradient and Hessian */
        int found = 0;
        for (int64_t s = 0; s < q->backtracks; s++) {
            for (int64_t j = 0; j < k; j++) trial[j] = x[j] + step * d[j];
            double ft = row_value(r, trial, k, m);
            if (ft <= f + q->armijo * step * slope + slack && isfinite(ft)) { found = 1; break; }
            step = 0.5 * step;
        }
        if (!found) {  /* no step decreases f: converged iff the gradient is at the precision floor of f */
            if (gmax <= q->metric_tol) q->status[b] |= CONVERGED;
            return;
        }
        memcpy(x, trial, (size_t)k * sizeof(double));
        f = value_grad(r, x, g, k, m);
    }
}

/* Rows a thread takes at a time from the shared counter: ~30 us of work on the bandit, so that the counter is rarely
   touched and a thread that joins late still finds rows to take. */
#define CLAIM 8

/* One thread's share of a call: blocks of CLAIM rows taken from q->next_row until none is left, with this thread's
   own scratch. */
typedef struct {
    const Solve *q;
    int64_t bad;  /* its scratch could not be allocated */
} Block;

/* The next block of rows for this thread: [*first, *last), or 0 when every row is taken. */
static int take_rows(const Solve *q, int64_t *first, int64_t *last) {
    int64_t b = __atomic_fetch_add(q->next_row, CLAIM, __ATOMIC_RELAXED);
    if (b >= q->R) return 0;
    *first = b, *last = b + CLAIM < q->R ? b + CLAIM : q->R;
    return 1;
}

static void *solve_block(void *arg) {
    Block *job = arg;
    const Solve *q = job->q;
    int64_t k = q->k, m = q->m, first, last;
    size_t row_doubles = (size_t)(4 * k + 4 * m * k + 9 * m + 2 * k), solve_doubles = (size_t)(6 * k + 3 * k * k);
    double *scratch = malloc((row_doubles + solve_doubles) * sizeof(double));
    if (scratch == NULL) { job->bad = 1; return NULL; }
    Row r = {q->A, q->E, q->S, q->same, NULL, NULL, NULL, NULL, NULL, q->lam_beta, NULL};
    double *p = scratch;
    r.lp = p; p += k; r.pi = p; p += k; r.w = p; p += k;
    r.lpE = p; p += m; r.P = p; p += m; r.LP = p; p += m; r.u = p; p += m; r.rPu = p; p += m; r.c = p; p += m;
    r.D = p; p += m * k; r.PD = p; p += m * k; r.LPD = p; p += m * k; r.v = p; p += m * k;
    while (take_rows(q, &first, &last)) {
        if (!q->unrolled) for (int64_t b = first; b < last; b++) solve_row(q, &r, b, p, k, m);
        else if (k == 6 && m == 6) for (int64_t b = first; b < last; b++) solve_row(q, &r, b, p, 6, 6);  /* the default bandit */
        else if (k == 4 && m == 4) for (int64_t b = first; b < last; b++) solve_row(q, &r, b, p, 4, 4);
        else if (k == 8 && m == 8) for (int64_t b = first; b < last; b++) solve_row(q, &r, b, p, 8, 8);
        else for (int64_t b = first; b < last; b++) solve_row(q, &r, b, p, k, m);
    }
    free(scratch);
    return NULL;
}

static int bad_sizes(const Solve *q) { return q->k <= 0 || q->m <= 0 || q->A <= 0 || q->k % q->A != 0; }

/* Every row of the call, over n_threads threads (at most one per row, at most 256; the calling thread is one of
   them) taking blocks of rows from q->next_row; returns 0, 1 when the sizes are not whole states or scratch cannot be
   allocated, 3 when a thread could not start. */
int64_t split_newton(const Solve *q) {
    if (bad_sizes(q)) return 1;
    int64_t n = q->n_threads < 1 ? 1 : q->n_threads;
    if (n > q->R) n = q->R > 0 ? q->R : 1;
    if (n > 256) n = 256;
    Block jobs[256];
    pthread_t threads[256];
    for (int64_t t = 0; t < n; t++) jobs[t] = (Block){q, 0};
    int64_t started = 0, failed = 0;
    for (int64_t t = 1; t < n; t++) {
        if (pthread_create(&threads[t], NULL, solve_block, &jobs[t]) != 0) { failed = 1; break; }
        started = t;
    }
    if (!failed) solve_block(&jobs[0]);
    for (int64_t t = 1; t <= started; t++) pthread_join(threads[t], NULL);
    if (failed) return 3;
    for (int64_t t = 0; t < n; t++) if (jobs[t].bad) return 1;
    return 0;
}

/* The calling thread joins a split_newton call running on another thread (or not started yet): it takes rows from
   the same counter until none is left, then returns (the rows other threads took may still be being solved: the
   caller waits for split_newton to return). Returns 0, or 1 like split_newton. */
int64_t help_split_newton(const Solve *q) {
    if (bad_sizes(q)) return 1;
    Block job = {q, 0};
    solve_block(&job);
    return job.bad;
}
