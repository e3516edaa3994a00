/*
 * Optional native CPU kernel for Engram's multi-head N-gram hashing (see engram/hashing.py).
 *
 * One pass over the tokens computes every layer, order and head, so the input is read once
 * and the ids are validated and compressed on the fly. The int64 modulo, which dominates the
 * numpy/torch paths, is replaced by a Barrett reduction: q = mulhi64(x, floor((2^64-1)/p)) is
 * never more than one below floor(x/p) for any x < 2^64, so one conditional subtraction gives
 * the exact remainder. Arithmetic is done in uint64 so wrap-around is defined behaviour. On CPUs
 * with AVX-512 (checked at run time), int32 ids with 8 heads per order take a vector path that
 * reduces one mix modulo all 8 primes at once (run32_avx512_k8); on CPUs with AVX2 only, the same
 * shape takes run32_avx2_k8, which reduces in 32-bit lanes (tables below 2^30 rows per head).
 *
 * Shapes (C-contiguous): ids [B,T]; lookup [V] or None; prefix [B,N-1] or None (compressed
 * history, oldest first); multipliers [L,N]; primes [L,N-1,K]; out [L,B,T,(N-1)*K]. All are
 * int64 except out, which may be int32 when every prime is below 2^31 (each id < its prime):
 * the kernel writes far more bytes than it reads, so int32 ids halve its memory traffic.
 * Returns -1 on success, else the flat index into ids of the first id outside [0, V).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define ENGRAM_MAX_NGRAM 64

#if defined(__GNUC__) || defined(__clang__)
#define ENGRAM_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define ENGRAM_INLINE __forceinline
#else
#define ENGRAM_INLINE inline
#endif

#if defined(__SIZEOF_INT128__)
__extension__ typedef unsigned __int128 engram_u128;
static inline uint64_t mulhi64(uint64_t a, uint64_t b) {
    return (uint64_t)(((engram_u128)a * b) >> 64);
}
#define ENGRAM_HAVE_BARRETT 1
#else
#define ENGRAM_HAVE_BARRETT 0
#endif

static inline uint64_t mod_p(uint64_t x, uint64_t p, uint64_t inv) {
#if ENGRAM_HAVE_BARRETT
    uint64_t r = x - mulhi64(x, inv) * p;
    return r >= p ? r - p : r;
#else
    (void)inv; /* no 128-bit multiply on this compiler: plain division is still exact */
    return x % p;
#endif
}

/* 1 if the buffer's format is a signed integer of `size` bytes. */
static int is_signed_int(const Py_buffer *view, Py_ssize_t size) {
    const char *f = view->format ? view->format : "B";
    char c = f[strlen(f) - 1];
    if (view->itemsize != size) return 0;
    if (size == 8) return c == 'q' || (c == 'l' && sizeof(long) == 8);
    if (size == 4) return c == 'i' || (c == 'l' && sizeof(long) == 4);
    return 0;
}

/* Get an int64 C-contiguous buffer (or int32 too, if allow_i32); ndim must match. */
static int get_int(PyObject *obj, const char *name, int ndim, int writable, int allow_i32,
                   Py_buffer *view) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) != 0) return -1;
    const char *f = view->format ? view->format : "B";
    int ok = is_signed_int(view, 8) || (allow_i32 && is_signed_int(view, 4));
    if (!ok || view->ndim != ndim) {
        PyErr_Format(PyExc_ValueError,
                     "%s: expected a C-contiguous %s array with %d dims, got format '%s', "
                     "itemsize %zd, %d dims; convert with numpy.ascontiguousarray(x, dtype=numpy.int64)",
                     name, allow_i32 ? "int64 or int32" : "int64", ndim, f, view->itemsize, view->ndim);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

struct job {
    const int64_t *x, *lk, *pf;
    const uint64_t *m, *p, *inv;
    void *out; /* int64_t or int32_t, see out32 */
    int out32;
    long long vocab, pad;
    Py_ssize_t B, T, L;
};

/* The token loop every path shares: for every token, layer and order, STORE writes the K ids of
 * `mix` (the mix of order o + 2 of layer l) to row + o * K, row being the token's OUT_T ids of
 * that layer. The enclosing function defines B, T, L, O, H, layer_stride, out, J and N. */
#define ENGRAM_MIX_LOOP(OUT_T, STORE)                                                           \
    uint64_t h[ENGRAM_MAX_NGRAM]; /* h[k] = compressed id k positions back */                   \
    for (Py_ssize_t b = 0; b < B; b++) {                                                        \
        /* Seed the history so that, after the first shift, h[k] holds position -k. */          \
        for (Py_ssize_t k = 0; k < N - 1; k++)                                                  \
            h[k] = J->pf ? (uint64_t)J->pf[b * (N - 1) + (N - 2 - k)] : (uint64_t)J->pad;       \
        for (Py_ssize_t t = 0; t < T; t++) {                                                    \
            const Py_ssize_t i = b * T + t;                                                     \
            const int64_t v = J->x[i];                                                          \
            if (v < 0 || v >= J->vocab) return (long long)i;                                    \
            for (Py_ssize_t k = N - 1; k > 0; k--) h[k] = h[k - 1];                             \
            h[0] = J->lk ? (uint64_t)J->lk[v] : (uint64_t)v;                                    \
            for (Py_ssize_t l = 0; l < L; l++) {                                                \
                const uint64_t *ml = J->m + l * N;                                              \
                OUT_T *row = out + l * layer_stride + i * H;                                    \
                uint64_t mix = h[0] * ml[0];                                                    \
                for (Py_ssize_t o = 0; o < O; o++) {                                            \
                    mix ^= h[o + 1] * ml[o + 1]; /* mix of order n = o + 2 */                   \
                    STORE                                                                       \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    return -1;

/* The whole hash for every layer, ids written as OUT_T; returns -1 or the flat index of the
 * first bad id. Defined once per output type so that the store is a plain typed write. */
#define ENGRAM_DEFINE_RUN(NAME, OUT_T)                                                          \
static ENGRAM_INLINE long long NAME(const struct job *J, const Py_ssize_t N, const Py_ssize_t K) { \
    const Py_ssize_t B = J->B, T = J->T, L = J->L, O = N - 1, H = O * K;                       \
    const Py_ssize_t layer_stride = B * T * H;                                                  \
    OUT_T *const out = (OUT_T *)J->out;                                                         \
    ENGRAM_MIX_LOOP(OUT_T, {                                                                    \
        const uint64_t *pl = J->p + l * H + o * K;                                              \
        const uint64_t *il = J->inv + l * H + o * K;                                            \
        for (Py_ssize_t j = 0; j < K; j++)                                                      \
            row[o * K + j] = (OUT_T)mod_p(mix, pl[j], il[j]);                                   \
    })                                                                                          \
}

ENGRAM_DEFINE_RUN(run64, int64_t)
ENGRAM_DEFINE_RUN(run32, int32_t)

/* AVX-512 path for int32 ids and 8 heads per order (the reference's shape), picked at run time
 * on CPUs that have AVX-512F/DQ. One mix value goes to all 8 heads of its order at once: with
 * q = trunc(double(x) * double(1/p)), the rounding errors total below 3.3 * 2^11 / p, so for
 * p >= 2^16 q is floor(x/p) or one off either way, and r = x - q p (exact in wrapping 64-bit
 * arithmetic) lies in [-p, 2p): one conditional add and one conditional subtract give x mod p
 * exactly, the same ids as the scalar Barrett path (the tests check both). */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define ENGRAM_HAVE_AVX512 1
#define ENGRAM_AVX512_MIN_PRIME 65536

__attribute__((target("avx512f,avx512dq")))
static long long run32_avx512_k8(const struct job *J, const Py_ssize_t N) {
    const Py_ssize_t B = J->B, T = J->T, L = J->L, O = N - 1, H = O * 8;
    const Py_ssize_t layer_stride = B * T * H;
    int32_t *const out = (int32_t *)J->out;
    __m512i pv[ENGRAM_MAX_NGRAM * 4];
    __m512d iv[ENGRAM_MAX_NGRAM * 4];
    if (L * O > ENGRAM_MAX_NGRAM * 4) return -2; /* caller falls back to the scalar path */
    for (Py_ssize_t g = 0; g < L * O; g++) {
        pv[g] = _mm512_loadu_si512((const void *)(J->p + g * 8));
        iv[g] = _mm512_div_pd(_mm512_set1_pd(1.0), _mm512_cvtepu64_pd(pv[g]));
    }
    const __m512i zero = _mm512_setzero_si512();
    ENGRAM_MIX_LOOP(int32_t, {
        const Py_ssize_t g = l * O + o;
        const __m512i x = _mm512_set1_epi64((long long)mix);
        const __m512d q = _mm512_mul_pd(_mm512_set1_pd((double)mix), iv[g]);
        __m512i r = _mm512_sub_epi64(x, _mm512_mullo_epi64(_mm512_cvttpd_epu64(q), pv[g]));
        r = _mm512_mask_add_epi64(r, _mm512_cmplt_epi64_mask(r, zero), r, pv[g]);
        r = _mm512_mask_sub_epi64(r, _mm512_cmpge_epi64_mask(r, pv[g]), r, pv[g]);
        _mm256_storeu_si256((__m256i *)(row + o * 8), _mm512_cvtepi64_epi32(r));
    })
}

static int avx512_usable(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
    }
    return cached;
}

/* AVX2 path, the same shape, for CPUs without AVX-512: all 8 heads of an order in one vector of
 * 32-bit lanes. The quotient comes from doubles, 4 lanes at a time: double(x) * double(1/p) is
 * within 3 * 2^12 / p < 0.19 of x / p under any rounding mode (three roundings of relative error
 * <= 2^-52 each, x < 2^64, p >= 2^16), and adding 2^52 rounds it
 * to an integer q in [floor(x/p) - 1, floor(x/p) + 2] (again under any rounding mode; no separate
 * round instruction, which costs more than the rest of the step) whose low 32 bits are the
 * double's low mantissa bits. Only low 32 bits are needed after that: r = x - q p lies in
 * [-2p, 2p), so s = r + 2p lies in [0, 4p), which fits a uint32 when p < 2^30, and s is then
 * (x + 2p - q p) mod 2^32, from 32-bit products alone. s = min(s, s - 2p), then
 * s = min(s, s - p) (unsigned: the difference wraps above s when it would be negative), leave
 * s mod p. */
#define ENGRAM_AVX2_MAX_PRIME 1073741823 /* 2^30 - 1 */

__attribute__((target("avx2")))
static ENGRAM_INLINE long long run32_avx2_k8_n(const struct job *J, const Py_ssize_t N) {
    const Py_ssize_t B = J->B, T = J->T, L = J->L, O = N - 1, H = O * 8;
    const Py_ssize_t layer_stride = B * T * H;
    int32_t *const out = (int32_t *)J->out;
    /* the doubles' two halves hold heads (0,1,4,5) and (2,3,6,7): one in-lane shuffle of their
     * low words then gives heads 0..7 in order */
    static const int half[2][4] = {{0, 1, 4, 5}, {2, 3, 6, 7}};
    __m256i pv[ENGRAM_MAX_NGRAM * 4], p2v[ENGRAM_MAX_NGRAM * 4];
    __m256d iv[ENGRAM_MAX_NGRAM * 4][2];
    if (L * O > ENGRAM_MAX_NGRAM * 4) return -2; /* caller falls back to the scalar path */
    for (Py_ssize_t g = 0; g < L * O; g++) {
        const uint64_t *pp = J->p + g * 8;
        pv[g] = _mm256_setr_epi32((int)pp[0], (int)pp[1], (int)pp[2], (int)pp[3], (int)pp[4], (int)pp[5],
                                  (int)pp[6], (int)pp[7]);
        p2v[g] = _mm256_add_epi32(pv[g], pv[g]);
        for (int v = 0; v < 2; v++)
            iv[g][v] = _mm256_setr_pd(1.0 / (double)pp[half[v][0]], 1.0 / (double)pp[half[v][1]],
                                      1.0 / (double)pp[half[v][2]], 1.0 / (double)pp[half[v][3]]);
    }
    const __m256d two52 = _mm256_set1_pd(4503599627370496.0);
    ENGRAM_MIX_LOOP(int32_t, {
        const Py_ssize_t g = l * O + o;
        const __m256d xd = _mm256_set1_pd((double)mix);
        const __m256d qa = _mm256_add_pd(_mm256_mul_pd(xd, iv[g][0]), two52);
        const __m256d qb = _mm256_add_pd(_mm256_mul_pd(xd, iv[g][1]), two52);
        const __m256i q = _mm256_castps_si256(_mm256_shuffle_ps(_mm256_castpd_ps(qa), _mm256_castpd_ps(qb),
                                                                _MM_SHUFFLE(2, 0, 2, 0)));
        __m256i s = _mm256_sub_epi32(_mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)mix), p2v[g]),
                                     _mm256_mullo_epi32(q, pv[g]));
        s = _mm256_min_epu32(s, _mm256_sub_epi32(s, p2v[g]));
        s = _mm256_min_epu32(s, _mm256_sub_epi32(s, pv[g]));
        _mm256_storeu_si256((__m256i *)(row + o * 8), s);
    })
}

/* N = 3 (orders 2 and 3, the reference's) as a constant: the compiler unrolls the history and orders */
__attribute__((target("avx2")))
static long long run32_avx2_k8(const struct job *J, const Py_ssize_t N) {
    return N == 3 ? run32_avx2_k8_n(J, 3) : run32_avx2_k8_n(J, N);
}

static int avx2_usable(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") != 0;
    }
    return cached;
}
#else
#define ENGRAM_HAVE_AVX512 0
static int avx512_usable(void) { return 0; }
static int avx2_usable(void) { return 0; }
#endif

static long long run(const struct job *J, const Py_ssize_t N, const Py_ssize_t K, int simd) {
#if ENGRAM_HAVE_AVX512
    /* simd: 0 the scalar path; 1 (the default) the widest vector path the CPU has, AVX-512 or
     * else AVX2; 2 the AVX2 one even where AVX-512 is there (tests and `engram bench hash`) */
    const int wide = simd == 1 && avx512_usable();
    const int avx2 = !wide && simd != 0 && avx2_usable();
    if (J->out32 && K == 8 && (wide || avx2)) {
        /* the vector reductions are exact only for primes >= 2^16, the AVX2 one only below 2^30
         * (see above); other tables take the scalar path */
        const uint64_t top = wide ? (uint64_t)INT32_MAX : (uint64_t)ENGRAM_AVX2_MAX_PRIME;
        int fits = 1;
        for (Py_ssize_t g = 0; g < J->L * (N - 1) * 8; g++)
            fits &= J->p[g] >= ENGRAM_AVX512_MIN_PRIME && J->p[g] <= top;
        if (fits) {
            const long long r = wide ? run32_avx512_k8(J, N) : run32_avx2_k8(J, N);
            if (r != -2) return r;
        }
    }
#else
    (void)simd;
#endif
    /* Constant N and K for the common shapes let the compiler unroll the inner loops. */
#define ENGRAM_DISPATCH(R)                                 \
    if (N == 3 && K == 8) return R(J, 3, 8);               \
    if (N == 3 && K == 4) return R(J, 3, 4);               \
    if (N == 3 && K == 2) return R(J, 3, 2);               \
    return R(J, N, K);
    if (J->out32) { ENGRAM_DISPATCH(run32) }
    ENGRAM_DISPATCH(run64)
#undef ENGRAM_DISPATCH
}

static PyObject *hash_ids(PyObject *self, PyObject *args) {
    PyObject *o_ids, *o_lookup, *o_prefix, *o_mult, *o_primes, *o_out;
    long long vocab, pad;
    int simd = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOLLOOOO|i", &o_ids, &o_lookup, &vocab, &pad, &o_prefix, &o_mult,
                          &o_primes, &o_out, &simd))
        return NULL;
    if (simd < 0 || simd > 2) {
        PyErr_Format(PyExc_ValueError, "hash_ids: simd=%d; use 0 (scalar), 1 (the default: the widest vector path the CPU has) or 2 (AVX2)", simd);
        return NULL;
    }

    Py_buffer ids = {0}, lookup = {0}, prefix = {0}, mult = {0}, primes = {0}, out = {0};
    int have_lookup = o_lookup != Py_None, have_prefix = o_prefix != Py_None;
    PyObject *result = NULL;
    uint64_t *inv = NULL;

    if (get_int(o_ids, "ids", 2, 0, 0, &ids)) goto done;
    if (have_lookup && get_int(o_lookup, "lookup", 1, 0, 0, &lookup)) goto done;
    if (have_prefix && get_int(o_prefix, "prefix", 2, 0, 0, &prefix)) goto done;
    if (get_int(o_mult, "multipliers", 2, 0, 0, &mult)) goto done;
    if (get_int(o_primes, "primes", 3, 0, 0, &primes)) goto done;
    if (get_int(o_out, "out", 4, 1, 1, &out)) goto done;

    const Py_ssize_t B = ids.shape[0], T = ids.shape[1];
    const Py_ssize_t L = mult.shape[0], N = mult.shape[1];
    const Py_ssize_t O = primes.shape[1], K = primes.shape[2], H = O * K;
    if (N < 2 || N > ENGRAM_MAX_NGRAM || primes.shape[0] != L || O != N - 1 ||
        out.shape[0] != L || out.shape[1] != B || out.shape[2] != T || out.shape[3] != H ||
        (have_lookup && lookup.shape[0] != vocab) ||
        (have_prefix && (prefix.shape[0] != B || prefix.shape[1] != N - 1))) {
        PyErr_SetString(PyExc_ValueError,
                        "hash_ids: inconsistent shapes; expected ids [B,T], lookup [V], prefix "
                        "[B,N-1], multipliers [L,N] with 2 <= N <= 64, primes [L,N-1,K], "
                        "out [L,B,T,(N-1)*K]");
        goto done;
    }

    const int out32 = out.itemsize == 4;
    const int64_t *pr = (const int64_t *)primes.buf;
    for (Py_ssize_t i = 0; i < L * H; i++) {
        if (pr[i] < 1 || (out32 && pr[i] > INT32_MAX)) {
            PyErr_Format(PyExc_ValueError, "hash_ids: table size %lld must be in [1, %s]; "
                         "use an int64 out array for tables of 2^31 rows or more",
                         (long long)pr[i], out32 ? "2^31 - 1" : "2^63 - 1");
            goto done;
        }
    }
    inv = (uint64_t *)PyMem_Malloc((size_t)(L * H + 1) * sizeof(uint64_t));
    if (!inv) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < L * H; i++) inv[i] = UINT64_MAX / (uint64_t)pr[i];

    struct job J = {
        .x = (const int64_t *)ids.buf,
        .lk = have_lookup ? (const int64_t *)lookup.buf : NULL,
        .pf = have_prefix ? (const int64_t *)prefix.buf : NULL,
        .m = (const uint64_t *)mult.buf,
        .p = (const uint64_t *)primes.buf,
        .inv = inv,
        .out = out.buf,
        .out32 = out32,
        .vocab = vocab, .pad = pad, .B = B, .T = T, .L = L,
    };
    long long bad;
    Py_BEGIN_ALLOW_THREADS
    bad = run(&J, N, K, simd);
    Py_END_ALLOW_THREADS

    result = PyLong_FromLongLong(bad);

done:
    PyMem_Free(inv);
    if (ids.obj) PyBuffer_Release(&ids);
    if (lookup.obj) PyBuffer_Release(&lookup);
    if (prefix.obj) PyBuffer_Release(&prefix);
    if (mult.obj) PyBuffer_Release(&mult);
    if (primes.obj) PyBuffer_Release(&primes);
    if (out.obj) PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"hash_ids", hash_ids, METH_VARARGS,
     "hash_ids(ids, lookup, vocab_size, pad_id, prefix, multipliers, primes, out, simd=1) -> int\n\n"
     "Fill out[L,B,T,H] (int64, or int32 for tables below 2^31 rows) with the hash ids of every "
     "layer; return -1, or the flat index of the "
     "first id outside [0, vocab_size). simd=0 keeps to the scalar path; 1, the default, takes the widest "
     "vector path the CPU has (AVX-512, else AVX2); 2 takes the AVX2 one even where AVX-512 is there."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_hashkernel",
    "Native CPU kernel for Engram N-gram hashing (optional; engram.hashing falls back to torch).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__hashkernel(void) {
    PyObject *mod = PyModule_Create(&module);
    if (!mod) return NULL;
    /* VECTOR: the vector path simd=1 takes for 8 heads of int32 ids, as run() picks it ("" for none) */
    const char *vector = avx512_usable() ? "AVX-512" : avx2_usable() ? "AVX2" : "";
    if (PyModule_AddIntConstant(mod, "MAX_NGRAM", ENGRAM_MAX_NGRAM) ||
        PyModule_AddIntConstant(mod, "BARRETT", ENGRAM_HAVE_BARRETT) ||
        PyModule_AddIntConstant(mod, "AVX512", avx512_usable()) ||
        PyModule_AddIntConstant(mod, "AVX2", avx2_usable()) ||
        PyModule_AddStringConstant(mod, "VECTOR", vector)) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
