"""The compiled bilevel segment written with numba (`@njit(parallel=True)`, prange over seeds), for one measurement
only: numba against bilevel_step.c on the same segment (docs/fast.md "Segments"). Not part of the package (numba is
not a dependency): bench/test_bench_segments.py's `test_numba_vs_c_segment` runs it when numba is installed.

Scope: what the C file's segment computes for the default networks (one hidden ReLU layer for the policy and an MLP
reward with one hidden ReLU layer), the single loop's schedules, one instance (no InstanceBatch), no divergence check.
It reads the same tables and draw plans as bilevel_kernel.CompiledStep and the same counter RNG.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

M1, M2, GOLDEN, ONE = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15), np.uint64(1)


@njit(inline="always")
def mix64(x):
    x = (x ^ (x >> np.uint64(30))) * M1
    x = (x ^ (x >> np.uint64(27))) * M2
    return x ^ (x >> np.uint64(31))


@njit(inline="always")
def uniforms(key, start, n, u):
    for i in range(n):
        bits = mix64(key ^ mix64(np.uint64(start + i) * GOLDEN + ONE))
        u[i] = (np.float64(np.int64(bits >> np.uint64(11))) + 0.5) * 1.1102230246251565e-16


@njit(inline="always")
def search(cdf, off, n, u):
    v = u * cdf[off + n - 1]
    i = 0
    for j in range(n - 1):
        i += cdf[off + j] < v
    return i


@njit(inline="always")
def softplus(x):
    return x if x > 20.0 else np.log1p(np.exp(x))


@njit(inline="always")
def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@njit
def forward(W1, b1, W2, b2, x, h, out):
    """h = relu(b1 + x W1), out = b2 + h W2, for the rows of x."""
    n, d = x.shape
    w, m = W2.shape
    for r in range(n):
        for j in range(w):
            h[r, j] = b1[j]
        for k in range(d):
            c = x[r, k]
            if c != 0.0:
                for j in range(w):
                    h[r, j] += c * W1[k, j]
        for j in range(w):
            h[r, j] = max(h[r, j], 0.0)
        for j in range(m):
            out[r, j] = b2[j]
        for k in range(w):
            c = h[r, k]
            for j in range(m):
                out[r, j] += c * W2[k, j]


@njit
def backward_update(W1, b1, W2, b2, x, h, gout, n, lr, gh):
    """p <- p - lr * d/dp sum(gout * out) over the first n rows (x, h, gout gathered)."""
    w, m = W2.shape
    d = x.shape[1]
    for r in range(n):  # through the hidden layer first, with the weights of the step's start
        for i in range(w):
            s = 0.0
            for j in range(m):
                s += gout[r, j] * W2[i, j]
            gh[r, i] = s if h[r, i] > 0 else 0.0
    for i in range(w):
        for j in range(m):
            s = 0.0
            for r in range(n):
                s += h[r, i] * gout[r, j]
            W2[i, j] -= lr * s
    for j in range(m):
        s = 0.0
        for r in range(n):
            s += gout[r, j]
        b2[j] -= lr * s
    for k in range(d):
        for i in range(w):
            s = 0.0
            for r in range(n):
                s += x[r, k] * gh[r, i]
            W1[k, i] -= lr * s
    for i in range(w):
        s = 0.0
        for r in range(n):
            s += gh[r, i]
        b1[i] -= lr * s


@njit
def tables(W1, b1, W2, b2, x, ref, h, out, logp, prob, cdf):
    forward(W1, b1, W2, b2, x, h, out)
    S, A = out.shape
    for s in range(S):
        m = -np.inf
        for a in range(A):
            logp[s, a] = ref[s * A + a] + out[s, a]
            m = max(m, logp[s, a])
        tot = 0.0
        for a in range(A):
            prob[s, a] = np.exp(logp[s, a] - m)
            tot += prob[s, a]
        lse = np.log(tot)
        c = 0.0
        for a in range(A):
            logp[s, a] = logp[s, a] - m - lse
            prob[s, a] /= tot
            c += prob[s, a]
            cdf[s, a] = c


@njit
def reward_of(unit_id, U, r, r_done, racts, rW1, rb1, rW2, rb2, unit_x):
    if unit_id >= U:
        return 0.0
    if not r_done[unit_id]:
        wr = rW1.shape[1]
        dr = unit_x.shape[1]
        for j in range(wr):
            s = rb1[j]
            for k in range(dr):
                c = unit_x[unit_id, k]
                if c != 0.0:
                    s += c * rW1[k, j]
            racts[unit_id, j] = max(s, 0.0)
        s = rb2[0]
        for k in range(wr):
            s += racts[unit_id, k] * rW2[k, 0]
        r[unit_id] = s
        r_done[unit_id] = True
    return r[unit_id]


@njit
def draw(key, counter, cols, base, lab, first, second, n_u, u, init_cdf, cdf, next_cdf, next_idx, next_k,
         unit_of, true_r, label_noise, index, local, unit, label, S, A, H):
    uniforms(key, counter, n_u, u)
    T = cols.shape[1]
    G = init_cdf.shape[0]
    SA = S * A
    for t in range(T):
        s = search(init_cdf, 0, G, u[cols[0, t]])
        for hh in range(H):
            row = s + base[hh, t]
            a = search(cdf[row], 0, A, u[cols[1 + 2 * hh, t]])
            idx = row * A + a
            index[t, hh] = idx
            local[t, hh] = idx if idx < SA else idx - SA
            unit[t, hh] = unit_of[local[t, hh]]
            if hh < H - 1:
                K = next_k[hh]
                loc = s * A + a
                if K == 1:
                    s = next_idx[hh, loc, 0]
                else:
                    s = next_idx[hh, loc, search(next_cdf[hh, loc], 0, K, u[cols[2 + 2 * hh, t]])]
    for i in range(lab.shape[0]):
        r1 = 0.0
        r2 = 0.0
        for hh in range(H):
            r1 += true_r[unit[first[i], hh]]
            r2 += true_r[unit[second[i], hh]]
        p = label_noise + (1 - 2 * label_noise) * sigmoid(r1 - r2)
        label[i] = 1.0 if u[lab[i]] < p else 0.0


@njit
def loo(v, off, n):
    s = 0.0
    for i in range(n):
        s += v[off + i]
    for i in range(n):
        v[off + i] = (v[off + i] - (s - v[off + i]) / (n - 1)) / n


@njit(parallel=True)
def segment(n_steps, k0, sch_tab, counter0, step_uniforms, keys,
            zW1, zb1, zW2, zb2, yW1, yb1, yW2, yb2, rW1, rb1, rW2, rb2,
            x, ref, init_cdf, next_cdf, next_idx, next_k, unit_of, unit_x, true_r, beta, label_noise,
            N, M, inner, st_cols, st_base, st_lab, st_first, st_second, st_nu,
            nu_cols, nu_base, nu_lab, nu_first, nu_second, nu_nu):
    """n_steps steps of every seed (prange over seeds); sch_tab (n_steps, 4): lam, alpha, alpha_z, xi per step."""
    for b in prange(keys.shape[0]):
        one_seed(b, n_steps, k0, sch_tab, counter0, step_uniforms, keys,
                 zW1, zb1, zW2, zb2, yW1, yb1, yW2, yb2, rW1, rb1, rW2, rb2,
                 x, ref, init_cdf, next_cdf, next_idx, next_k, unit_of, unit_x, true_r, beta, label_noise,
                 N, M, inner, st_cols, st_base, st_lab, st_first, st_second, st_nu,
                 nu_cols, nu_base, nu_lab, nu_first, nu_second, nu_nu)


@njit
def one_seed(b, n_steps, k0, sch_tab, counter0, step_uniforms, keys,
             zW1, zb1, zW2, zb2, yW1, yb1, yW2, yb2, rW1, rb1, rW2, rb2,
             x, ref, init_cdf, next_cdf, next_idx, next_k, unit_of, unit_x, true_r, beta, label_noise,
             N, M, inner, st_cols, st_base, st_lab, st_first, st_second, st_nu,
             nu_cols, nu_base, nu_lab, nu_first, nu_second, nu_nu):
    S, d = x.shape
    A = zW2.shape[2]
    w = zW1.shape[2]
    H = st_base.shape[0]
    U = unit_x.shape[0]
    wr = rW1.shape[2]
    Tm = max(st_cols.shape[1], nu_cols.shape[1])
    if True:
        key = np.uint64(keys[b])
        hz = np.empty((S, w))
        hy = np.empty((S, w))
        out = np.empty((S, A))
        logp = np.empty((2 * S, A))
        prob = np.empty((2 * S, A))
        cdf = np.empty((2 * S, A))
        u = np.empty(max(st_nu, nu_nu))
        index = np.empty((Tm, H), np.int64)
        local = np.empty((Tm, H), np.int64)
        unit = np.empty((Tm, H), np.int64)
        ret = np.empty(Tm)
        weight = np.empty(Tm)
        label = np.empty(max(M, 1))
        r = np.zeros(U + 1)
        r_done = np.zeros(U + 1, np.bool_)
        racts = np.empty((U, wr))
        grad = np.empty(2 * S * A)
        gout = np.empty((S, A))
        px = np.empty((S, d))
        ph = np.empty((S, w))
        gh = np.empty((max(S, U), max(w, wr)))
        rx = np.empty((U, unit_x.shape[1]))
        rh = np.empty((U, wr))
        rg = np.empty((U, 1))
        gu = np.empty(U)
        seen = np.zeros(U, np.bool_)
        tables(zW1[b], zb1[b], zW2[b], zb2[b], x, ref, hz, out, logp[:S], prob[:S], cdf[:S])
        tables(yW1[b], yb1[b], yW2[b], yb2[b], x, ref, hy, out, logp[S:], prob[S:], cdf[S:])
        for i in range(n_steps):
            lam, alpha, alpha_z, xi = sch_tab[i, 0], sch_tab[i, 1], sch_tab[i, 2], sch_tab[i, 3]
            counter = counter0 + i * step_uniforms
            r_done[:] = False
            for _ in range(inner):
                T = st_cols.shape[1]
                draw(key, counter, st_cols, st_base, st_lab, st_first, st_second, st_nu, u, init_cdf, cdf, next_cdf,
                     next_idx, next_k, unit_of, true_r, label_noise, index, local, unit, label, S, A, H)
                counter += st_nu
                for t in range(T):
                    lp = 0.0
                    lr = 0.0
                    rr = 0.0
                    for hh in range(H):
                        lp += logp[index[t, hh] // A, index[t, hh] % A]
                        lr += ref[local[t, hh]]
                        rr += reward_of(unit[t, hh], U, r, r_done, racts, rW1[b], rb1[b], rW2[b], rb2[b], unit_x)
                    ret[t] = rr - beta * (lp - lr)
                for j in range(N):
                    weight[j] = ret[j]
                    weight[N + 2 * M + j] = ret[N + 2 * M + j]
                loo(weight, 0, N)
                loo(weight, N + 2 * M, N)
                for j in range(N):
                    weight[N + 2 * M + j] = -weight[N + 2 * M + j]
                for j in range(M):
                    m1 = 0.0
                    m2 = 0.0
                    for hh in range(H):
                        m1 += reward_of(unit[N + j, hh], U, r, r_done, racts, rW1[b], rb1[b], rW2[b], rb2[b], unit_x)
                        m2 += reward_of(unit[N + M + j, hh], U, r, r_done, racts, rW1[b], rb1[b], rW2[b], rb2[b], unit_x)
                    mm = m1 - m2
                    weight[N + j] = softplus(mm) - label[j] * mm
                loo(weight, N, M)
                for j in range(M):
                    weight[N + j] /= lam
                    weight[N + M + j] = weight[N + j]
                grad[:] = 0.0
                for t in range(T):
                    for hh in range(H):
                        grad[index[t, hh]] += weight[t]
                for p in range(2):
                    scale = -alpha_z if p == 0 else alpha
                    n = 0
                    for s in range(S):
                        tot = 0.0
                        visited = False
                        for a in range(A):
                            g = grad[p * S * A + s * A + a] * scale
                            tot += g
                            visited |= g != 0.0
                        if not visited:
                            continue
                        for a in range(A):
                            gout[n, a] = grad[p * S * A + s * A + a] * scale - prob[p * S + s, a] * tot
                        for k in range(d):
                            px[n, k] = x[s, k]
                        hsrc = hz if p == 0 else hy
                        for k in range(w):
                            ph[n, k] = hsrc[s, k]
                        n += 1
                    if p == 0:
                        backward_update(zW1[b], zb1[b], zW2[b], zb2[b], px, ph, gout, n, 1.0, gh)
                    else:
                        backward_update(yW1[b], yb1[b], yW2[b], yb2[b], px, ph, gout, n, 1.0, gh)
                tables(zW1[b], zb1[b], zW2[b], zb2[b], x, ref, hz, out, logp[:S], prob[:S], cdf[:S])
                tables(yW1[b], yb1[b], yW2[b], yb2[b], x, ref, hy, out, logp[S:], prob[S:], cdf[S:])
            # the nu stage
            T = nu_cols.shape[1]
            draw(key, counter, nu_cols, nu_base, nu_lab, nu_first, nu_second, nu_nu, u, init_cdf, cdf, next_cdf,
                 next_idx, next_k, unit_of, true_r, label_noise, index, local, unit, label, S, A, H)
            for j in range(M):
                m1 = 0.0
                m2 = 0.0
                for hh in range(H):
                    m1 += reward_of(unit[j, hh], U, r, r_done, racts, rW1[b], rb1[b], rW2[b], rb2[b], unit_x)
                    m2 += reward_of(unit[M + j, hh], U, r, r_done, racts, rW1[b], rb1[b], rW2[b], rb2[b], unit_x)
                weight[j] = (sigmoid(m1 - m2) - label[j]) / M
                weight[M + j] = -weight[j]
            for j in range(N):
                weight[2 * M + j] = lam / N
                weight[2 * M + N + j] = -(lam / N)
            gu[:] = 0.0
            seen[:] = False
            for t in range(T):
                for hh in range(H):
                    uu = unit[t, hh]
                    if uu < U:
                        gu[uu] += weight[t]
                        seen[uu] = True
            n = 0
            for uu in range(U):
                if not seen[uu]:
                    continue
                reward_of(uu, U, r, r_done, racts, rW1[b], rb1[b], rW2[b], rb2[b], unit_x)
                for k in range(unit_x.shape[1]):
                    rx[n, k] = unit_x[uu, k]
                for k in range(wr):
                    rh[n, k] = racts[uu, k]
                rg[n, 0] = gu[uu]
                n += 1
            backward_update(rW1[b], rb1[b], rW2[b], rb2[b], rx, rh, rg, n, xi, gh)
