// Row minima of the pair-map cost for a block of anchors, on the CPU (lightning_swim/_cpu_kernel.py).
//
// For anchors i = row0 .. row0 + nrows - 1, every partner j and every neuron m:
//
//     out[i, m] = min_j  A_ij + R_ij (a_im + b_jm) + K_ij g_m
//
// with the pair factors R = rho, K = kappa t rho, A = K^2 + alpha rho of lightning_swim/_search.py,
// computed here from the Gram block G = Y[rows] Y^T of the centred points y = x - mean(x):
// D_ij = |y_i|^2 + |y_j|^2 - 2 G_ij, recomputed from the coordinates x where that cancels (D_ij <= tol
// (|y_i|^2 + |y_j|^2): near-duplicates), and coincident points (equal group ids) excluded. t_ij uses
// |x|^2. a = 2 v, b = -2 v and g = -2 gamma; the caller adds gamma^2.
//
// The cost per (i, j, m) is one add, two multiply-adds and a min. Four anchors share every load of
// b_j (register blocking); partners come in tiles of 512 whose rows of b stay in L2 while 32 anchors
// use them; super-blocks of 32 anchors are spread over OpenMP threads. Plain C++ with GCC/Clang vector
// extensions: no intrinsics, any target.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <limits>

#if defined(__SSE4_2__)
#include <nmmintrin.h>
#endif

#if defined(__AVX512F__)
#define LS_VBYTES 64
#define LS_MV 2
#elif defined(__AVX__)
#define LS_VBYTES 32
#define LS_MV 1
#else
#define LS_VBYTES 16
#define LS_MV 1
#endif
#define LS_IB 4    // anchors per register block
#define LS_IS 32   // anchors per super-block (sharing a tile of partners in L2), a multiple of LS_IB
#define LS_NJ 512  // partners per tile

template <typename T>
struct Vec {
    typedef T type __attribute__((vector_size(LS_VBYTES)));
};

template <typename T>
static inline typename Vec<T>::type load(const T* p) {
    typename Vec<T>::type v;
    memcpy(&v, p, sizeof(v));
    return v;
}

template <typename T>
static inline void store(T* p, typename Vec<T>::type v) {
    memcpy(p, &v, sizeof(v));
}

// The factors of anchor i against partners j0 .. j0 + nj - 1; returns nothing, fills A, R, K.
template <typename T>
static void pair_factors(int64_t i, int64_t j0, int64_t nj, int64_t d, const T* Gi, const T* x, const T* sq,
                         const T* sqy, const int64_t* groups, T kappa, T alpha, int homogeneous, T tol, T* A, T* R,
                         T* K) {
    const T inf = std::numeric_limits<T>::infinity();
    const T si = sq[i], syi = sqy[i];
    const int64_t gi = groups[i];
    int unsure = 0;
    for (int64_t j = 0; j < nj; j++) {
        const T norms = syi + sqy[j0 + j];
        const T d2 = norms - (T)2 * Gi[j];
        A[j] = d2;
        unsure |= (d2 <= tol * norms) & (groups[j0 + j] != gi);
    }
    if (unsure) {  // cancellation: the distance from the coordinates, as near-duplicates need
        for (int64_t j = 0; j < nj; j++) {
            if (A[j] <= tol * (syi + sqy[j0 + j]) && groups[j0 + j] != gi) {
                const T* xi = x + i * d;
                const T* xj = x + (j0 + j) * d;
                T s = 0;
#pragma omp simd reduction(+ : s)
                for (int64_t k = 0; k < d; k++) s += (xi[k] - xj[k]) * (xi[k] - xj[k]);
                A[j] = s;
            }
        }
    }
    for (int64_t j = 0; j < nj; j++) {
        const int bad = groups[j0 + j] == gi;
        const T d2 = bad ? (T)1 : A[j];
        const T rho = homogeneous ? (T)1 / sqrt(d2) : (T)1 / d2;
        const T ktr = kappa * ((T)0.5 * (si - sq[j0 + j] + d2)) * rho;
        A[j] = bad ? inf : ktr * ktr + alpha * rho;
        R[j] = bad ? (T)0 : rho;
        K[j] = bad ? (T)0 : ktr;
    }
}

template <typename T>
static int rowmin(int64_t nrows, int64_t row0, int64_t N, int64_t d, int64_t Mp, const T* G, const T* x, const T* sq,
                  const T* sqy, const int64_t* groups, const T* a, const T* b, const T* g, T kappa, T alpha,
                  int homogeneous, T tol, T* out, int nthreads) {
    typedef typename Vec<T>::type V;
    const int64_t L = LS_VBYTES / sizeof(T);
    const int64_t MC = L * LS_MV;  // neurons per register block
    if (Mp % MC != 0) return 1;
    const int64_t nsuper = (nrows + LS_IS - 1) / LS_IS;
    const T inf = std::numeric_limits<T>::infinity();
    int status = 0;
#pragma omp parallel for schedule(dynamic) num_threads(nthreads)
    for (int64_t sg = 0; sg < nsuper; sg++) {
        // the factors of LS_IS anchors against one tile of partners (L2-resident)
        T* buf = (T*)malloc(sizeof(T) * 3 * LS_IS * LS_NJ);
        if (buf == NULL) {
#pragma omp atomic write
            status = 2;
            continue;
        }
        T *A = buf, *R = buf + LS_IS * LS_NJ, *K = buf + 2 * LS_IS * LS_NJ;
        const int64_t s0 = sg * LS_IS;
        const int64_t ns = nrows - s0 < LS_IS ? nrows - s0 : LS_IS;
        for (int64_t ii = 0; ii < ns; ii++)
            for (int64_t m = 0; m < Mp; m++) out[(s0 + ii) * Mp + m] = inf;
        for (int64_t j0 = 0; j0 < N; j0 += LS_NJ) {
            const int64_t nj = N - j0 < LS_NJ ? N - j0 : LS_NJ;
            for (int64_t ii = 0; ii < LS_IS; ii++) {
                T *Ai = A + ii * LS_NJ, *Ri = R + ii * LS_NJ, *Ki = K + ii * LS_NJ;
                if (ii < ns) {
                    pair_factors<T>(row0 + s0 + ii, j0, nj, d, G + (s0 + ii) * N + j0, x, sq, sqy, groups, kappa,
                                    alpha, homogeneous, tol, Ai, Ri, Ki);
                } else {  // a missing anchor of the last block: never below anything
                    for (int64_t j = 0; j < nj; j++) Ai[j] = inf, Ri[j] = 0, Ki[j] = 0;
                }
            }
            // register blocks of LS_IB anchors x MC neurons; each load of b_j serves LS_IB anchors, and
            // the tile of b stays in L2 for the LS_IS / LS_IB blocks of the super-group
            for (int64_t i0 = 0; i0 < ns; i0 += LS_IB) {
                const int64_t nr = ns - i0 < LS_IB ? ns - i0 : LS_IB;
                const T* Ab = A + i0 * LS_NJ;
                const T* Rb = R + i0 * LS_NJ;
                const T* Kb = K + i0 * LS_NJ;
                for (int64_t m0 = 0; m0 < Mp; m0 += MC) {
                    V acc[LS_IB][LS_MV], av[LS_IB][LS_MV], gv[LS_MV];
                    for (int v = 0; v < LS_MV; v++) {
                        gv[v] = load<T>(g + m0 + v * L);
                        for (int64_t ii = 0; ii < LS_IB; ii++) {
                            const int64_t r = s0 + i0 + (ii < nr ? ii : 0);  // a missing anchor reads a real row
                            acc[ii][v] = load<T>(out + r * Mp + m0 + v * L);
                            av[ii][v] = load<T>(a + (row0 + r) * Mp + m0 + v * L);
                        }
                    }
                    for (int64_t j = 0; j < nj; j++) {
                        V bv[LS_MV];
                        for (int v = 0; v < LS_MV; v++) bv[v] = load<T>(b + (j0 + j) * Mp + m0 + v * L);
                        for (int64_t ii = 0; ii < LS_IB; ii++) {
                            const T ra = Ab[ii * LS_NJ + j], rr = Rb[ii * LS_NJ + j], rk = Kb[ii * LS_NJ + j];
                            for (int v = 0; v < LS_MV; v++) {
                                const V f = ra + rr * (av[ii][v] + bv[v]) + rk * gv[v];
                                acc[ii][v] = f < acc[ii][v] ? f : acc[ii][v];
                            }
                        }
                    }
                    for (int64_t ii = 0; ii < nr; ii++)
                        for (int v = 0; v < LS_MV; v++) store<T>(out + (s0 + i0 + ii) * Mp + m0 + v * L, acc[ii][v]);
                }
            }
        }
        free(buf);
    }
    return status;
}


// The SWIM neurons of the pairs (rows[b], j) of the exact function-space search (lightning_swim/_fsearch.py)
// as unit vectors, for piecewise-linear activations: for every b < B and j < N,
//
//     z_n = (G_jn - G_{rows[b] n}) r_bj + c_bj,   h_n = max(z_n, 0) + slope min(z_n, 0),
//
// out[b, j, :] = h / |h| (T) and out_bf16[b, j, :] = the same rounded to bfloat16 (to nearest, ties to
// even), inv[b, j] = 1 / |h|. One pass computes |h|^2, a second writes them; the rows of G stay in cache.
// With out (or inv) NULL that output is not written (the screen's PwlRows build the rows they need again).
// Plain loops the compiler vectorises.
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

template <typename T>
static inline T pwl_unit(const T* gi, const T* gj, T rr, T cc, T slope, T inv, int64_t n) {
    const T z = (gj[n] - gi[n]) * rr + cc;
    return ((z > 0 ? z : 0) + slope * (z < 0 ? z : 0)) * inv;
}

template <typename T>
static void unit_neurons(int64_t B, int64_t N, const int64_t* rows, const T* G, const T* r, const T* c, T slope,
                         T* out, uint16_t* out_bf16, T* inv_out, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bj = 0; bj < B * N; bj++) {
        const T* gi = G + rows[bj / N] * N;
        const T* gj = G + (bj % N) * N;
        const T rr = r[bj], cc = c[bj];
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t n = 0; n < N; n++) {
            const T h = pwl_unit(gi, gj, rr, cc, slope, (T)1, n);
            s += h * h;
        }
        const T inv = 1 / sqrt(s);
        if (inv_out != NULL) inv_out[bj] = inv;
        uint16_t* ob = out_bf16 + bj * N;
        if (out != NULL) {
            T* o = out + bj * N;
#pragma omp simd
            for (int64_t n = 0; n < N; n++) {
                const T h = pwl_unit(gi, gj, rr, cc, slope, inv, n);
                o[n] = h;
                ob[n] = to_bf16((float)h);
            }
        } else {
#pragma omp simd
            for (int64_t n = 0; n < N; n++) ob[n] = to_bf16((float)pwl_unit(gi, gj, rr, cc, slope, inv, n));
        }
    }
}

// The screen of the exact function-space search (lightning_swim/_fsearch.py). chat [P, M] holds bfloat16
// cosines (their bits), thr [M] float32 thresholds; an entry (p, m) passes where chat[p, m] >= thr[m], compared
// in float32 (as torch compares a bfloat16 tensor with a float32 one).
//
// screen_counts: row_counts[p] and neuron_counts[m], the passing entries of each row and each neuron.
// screen_exact: for every passing entry, row by row from offsets[p] (the exclusive prefix sum of row_counts),
// p_out = p, m_out = m and cos_out = <h[p], aT[m]> in T, from the unit rows h [P, N] and the unit neurons
// aT [M, N]: the cosines the screen bounded, computed again exactly, as one sampled product would.
static inline float from_bf16(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

static int screen_counts(int64_t P, int64_t M, const uint16_t* chat, const float* thr, int64_t* row_counts,
                         int64_t* neuron_counts, int nthreads) {
    int status = 0;
    for (int64_t m = 0; m < M; m++) neuron_counts[m] = 0;
#pragma omp parallel num_threads(nthreads)
    {
        int64_t* local = (int64_t*)calloc(M > 0 ? M : 1, sizeof(int64_t));
        if (local == NULL) {
#pragma omp atomic write
            status = 1;
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < P; p++) {
            if (local == NULL) continue;
            const uint16_t* row = chat + p * M;
            int64_t k = 0;
            for (int64_t m = 0; m < M; m++) {
                const int64_t pass = from_bf16(row[m]) >= thr[m];
                k += pass;
                local[m] += pass;
            }
            row_counts[p] = k;
        }
        if (local != NULL) {
#pragma omp critical
            for (int64_t m = 0; m < M; m++) neuron_counts[m] += local[m];
            free(local);
        }
    }
    return status;
}

// The rows screen_exact reads: stored (h [P, N]), or built again by get() into a buffer of N.
template <typename T>
struct StoredRows {
    const T* h;
    int64_t N;
    const T* get(int64_t p, T*) const { return h + p * N; }
};

// The unit rows of unit_neurons, built again instead of read: row p = b N + j is h_n = pwl(z_n) inv[p],
// z_n = (G_jn - G_{rows[b] n}) r[p] + c[p], as unit_neurons writes it. The rows of G stay in cache where a
// block of stored rows does not.
template <typename T>
struct PwlRows {
    const int64_t* rows;
    const T *G, *r, *c, *inv;
    T slope;
    int64_t N;
    const T* get(int64_t p, T* h) const {
        const T *gi = G + rows[p / N] * N, *gj = G + (p % N) * N;
        const T rr = r[p], cc = c[p], iv = inv[p];
#pragma omp simd
        for (int64_t n = 0; n < N; n++) h[n] = pwl_unit(gi, gj, rr, cc, slope, iv, n);
        return h;
    }
};

// Every passing entry of chat, row by row from offsets[p]: p, m and <row p, aT[m]>. A row is fetched once, at
// its first passing entry. Returns 1 where a row buffer could not be allocated.
template <typename T, typename Rows>
static int screen_exact(int64_t P, int64_t M, int64_t N, const uint16_t* chat, const float* thr,
                        const int64_t* offsets, const Rows& source, const T* aT, int64_t* p_out, int64_t* m_out,
                        T* cos_out, int nthreads) {
    int status = 0;
#pragma omp parallel num_threads(nthreads)
    {
        T* buffer = (T*)malloc((N > 0 ? N : 1) * sizeof(T));
        if (buffer == NULL) {
#pragma omp atomic write
            status = 1;
        }
#pragma omp for schedule(dynamic, 64)
        for (int64_t p = 0; p < P; p++) {
            if (buffer == NULL) continue;
            const uint16_t* row = chat + p * M;
            const T* h = NULL;
            int64_t k = offsets[p];
            for (int64_t m = 0; m < M; m++) {
                if (!(from_bf16(row[m]) >= thr[m])) continue;
                if (h == NULL) h = source.get(p, buffer);
                const T* am = aT + m * N;
                T s = 0;
#pragma omp simd reduction(+ : s)
                for (int64_t n = 0; n < N; n++) s += h[n] * am[n];
                p_out[k] = p;
                m_out[k] = m;
                cos_out[k] = s;
                k++;
            }
        }
        free(buffer);
    }
    return status;
}

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of n bytes, as TensorBoard's event records use it
// (lightning_swim/_tensorboard.py): the SSE4.2 instruction where the build has it, else a table.
struct Crc32cTable {
    uint32_t t[256];
    Crc32cTable() {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
            t[i] = c;
        }
    }
};

static uint32_t crc32c(const uint8_t* p, int64_t n) {
    uint32_t crc = 0xFFFFFFFFu;
#if defined(__SSE4_2__)
    uint64_t c = crc;
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t v;
        memcpy(&v, p, sizeof(v));
        c = _mm_crc32_u64(c, v);
    }
    crc = (uint32_t)c;
    for (; n > 0; n--, p++) crc = _mm_crc32_u8(crc, *p);
#else
    static const Crc32cTable table;  // built once (thread-safe in C++11)
    for (; n > 0; n--, p++) crc = table.t[(crc ^ *p) & 0xFFu] ^ (crc >> 8);
#endif
    return crc ^ 0xFFFFFFFFu;
}

extern "C" {

// Neurons per register block for an element of `itemsize` bytes: the neuron axis must be padded to a multiple.
int64_t ls_neuron_block(int64_t itemsize) { return (LS_VBYTES / itemsize) * LS_MV; }

int ls_rowmin_f32(int64_t nrows, int64_t row0, int64_t N, int64_t d, int64_t Mp, const float* G, const float* x,
                  const float* sq, const float* sqy, const int64_t* groups, const float* a, const float* b,
                  const float* g, double kappa, double alpha, int homogeneous, double tol, float* out, int nthreads) {
    return rowmin<float>(nrows, row0, N, d, Mp, G, x, sq, sqy, groups, a, b, g, (float)kappa, (float)alpha,
                         homogeneous, (float)tol, out, nthreads);
}

int ls_rowmin_f64(int64_t nrows, int64_t row0, int64_t N, int64_t d, int64_t Mp, const double* G, const double* x,
                  const double* sq, const double* sqy, const int64_t* groups, const double* a, const double* b,
                  const double* g, double kappa, double alpha, int homogeneous, double tol, double* out,
                  int nthreads) {
    return rowmin<double>(nrows, row0, N, d, Mp, G, x, sq, sqy, groups, a, b, g, kappa, alpha, homogeneous, tol, out,
                          nthreads);
}

void ls_unit_neurons_f32(int64_t B, int64_t N, const int64_t* rows, const float* G, const float* r, const float* c,
                         double slope, float* out, uint16_t* out_bf16, float* inv, int nthreads) {
    unit_neurons<float>(B, N, rows, G, r, c, (float)slope, out, out_bf16, inv, nthreads);
}

void ls_unit_neurons_f64(int64_t B, int64_t N, const int64_t* rows, const double* G, const double* r,
                         const double* c, double slope, double* out, uint16_t* out_bf16, double* inv, int nthreads) {
    unit_neurons<double>(B, N, rows, G, r, c, slope, out, out_bf16, inv, nthreads);
}

int ls_screen_counts(int64_t P, int64_t M, const uint16_t* chat, const float* thr, int64_t* row_counts,
                     int64_t* neuron_counts, int nthreads) {
    return screen_counts(P, M, chat, thr, row_counts, neuron_counts, nthreads);
}

int ls_screen_exact_f32(int64_t P, int64_t M, int64_t N, const uint16_t* chat, const float* thr,
                        const int64_t* offsets, const float* h, const float* aT, int64_t* p_out, int64_t* m_out,
                        float* cos_out, int nthreads) {
    const StoredRows<float> rows = {h, N};
    return screen_exact<float>(P, M, N, chat, thr, offsets, rows, aT, p_out, m_out, cos_out, nthreads);
}

int ls_screen_exact_f64(int64_t P, int64_t M, int64_t N, const uint16_t* chat, const float* thr,
                        const int64_t* offsets, const double* h, const double* aT, int64_t* p_out, int64_t* m_out,
                        double* cos_out, int nthreads) {
    const StoredRows<double> rows = {h, N};
    return screen_exact<double>(P, M, N, chat, thr, offsets, rows, aT, p_out, m_out, cos_out, nthreads);
}

int ls_screen_exact_pwl_f32(int64_t P, int64_t M, int64_t N, const uint16_t* chat, const float* thr,
                            const int64_t* offsets, const int64_t* rows, const float* G, const float* r,
                            const float* c, double slope, const float* inv, const float* aT, int64_t* p_out,
                            int64_t* m_out, float* cos_out, int nthreads) {
    const PwlRows<float> source = {rows, G, r, c, inv, (float)slope, N};
    return screen_exact<float>(P, M, N, chat, thr, offsets, source, aT, p_out, m_out, cos_out, nthreads);
}

int ls_screen_exact_pwl_f64(int64_t P, int64_t M, int64_t N, const uint16_t* chat, const float* thr,
                            const int64_t* offsets, const int64_t* rows, const double* G, const double* r,
                            const double* c, double slope, const double* inv, const double* aT, int64_t* p_out,
                            int64_t* m_out, double* cos_out, int nthreads) {
    const PwlRows<double> source = {rows, G, r, c, inv, slope, N};
    return screen_exact<double>(P, M, N, chat, thr, offsets, source, aT, p_out, m_out, cos_out, nthreads);
}

uint32_t ls_crc32c(const uint8_t* data, int64_t n) { return crc32c(data, n); }
}
