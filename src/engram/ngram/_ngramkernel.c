/*
 * Optional native CPU kernel for the suffix-array N-gram index (see engram/ngram/suffix_array.py,
 * which holds the pure-Python reference implementation of every function here).
 *
 * A segment is a token stream `tokens` (uint16 or uint32, n items) and its suffix array `sa`
 * (uint32 or int64, n items): sa[i] is the start of the i-th smallest suffix, where a suffix that
 * ends first compares smaller (no sentinel is stored). Every occurrence of a query q is a prefix
 * match of some suffix, and all of them form one contiguous range of sa, found by two binary
 * searches of O(|q| log n) token comparisons. The searches skip the part of q already known to
 * match both ends of the remaining interval (the classic min(lcp_left, lcp_right) trick).
 *
 * "Context" ranges (window_ranges, window_infgram) count only occurrences that are followed by a
 * next token: the one suffix equal to the query itself (the end of the stream) sorts first in the
 * range and is dropped. Contexts obey the document rule of the Python side: a context starts at
 * the last eos at or before the scored position (the eos itself included) or at the row start.
 *
 * Shapes: x [B,T] int64 windows; out of window_ranges [B,T,K+1,2] int64 with (lo,hi) per suffix
 * length k = 0..K, (-1,-1) where the context is shorter than k; out of window_infgram [B,T,3]
 * int64 = (suffix length L, lo, hi) of the longest context suffix that has a continuation.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const void *tok;
    const void *sa;
    int tw; /* bytes per token: 2 or 4 */
    int sw; /* bytes per suffix-array entry: 4 or 8 */
    int64_t n;
} Text;

static inline int64_t tok_at(const Text *T, int64_t i) {
    return T->tw == 2 ? (int64_t)((const uint16_t *)T->tok)[i] : (int64_t)((const uint32_t *)T->tok)[i];
}

static inline int64_t sa_at(const Text *T, int64_t i) {
    return T->sw == 4 ? (int64_t)((const uint32_t *)T->sa)[i] : ((const int64_t *)T->sa)[i];
}

/* Compare the suffix at p with q[0..m), the first j0 tokens being known equal. */
static inline int cmp_suffix(const Text *T, int64_t p, const int64_t *q, int64_t m, int64_t j0,
                             int64_t *lcp) {
    for (int64_t j = j0; j < m; j++) {
        if (p + j >= T->n) { *lcp = j; return -1; } /* the suffix ended: shorter is smaller */
        const int64_t t = tok_at(T, p + j);
        if (t != q[j]) { *lcp = j; return t < q[j] ? -1 : 1; }
    }
    *lcp = m;
    return 0;
}

/* First i in [lo,hi) whose suffix is >= q (strict=0) or > q (strict=1), prefix-wise. */
static int64_t bound(const Text *T, const int64_t *q, int64_t m, int64_t lo, int64_t hi, int strict) {
    int64_t llcp = 0, rlcp = 0;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        int64_t l;
        const int c = cmp_suffix(T, sa_at(T, mid), q, m, llcp < rlcp ? llcp : rlcp, &l);
        if (c < 0 || (strict && c == 0)) { lo = mid + 1; llcp = l; }
        else { hi = mid; rlcp = l; }
    }
    return lo;
}

static inline void find_range(const Text *T, const int64_t *q, int64_t m, int64_t lo, int64_t hi,
                              int64_t *out_lo, int64_t *out_hi) {
    const int64_t a = bound(T, q, m, lo, hi, 0);
    *out_lo = a;
    *out_hi = m == 0 ? hi : bound(T, q, m, a, hi, 1);
}

/* The range of occurrences of q that have a next token. */
static inline void context_range(const Text *T, const int64_t *q, int64_t m, int64_t *lo, int64_t *hi) {
    find_range(T, q, m, 0, T->n, lo, hi);
    if (m > 0 && *lo < *hi && sa_at(T, *lo) + m == T->n) (*lo)++;
    if (*lo >= *hi) { *lo = 0; *hi = 0; }
}

/* ------------------------------------------------------------------------- buffer plumbing */
static int get_text(PyObject *o_tok, PyObject *o_sa, Text *T, Py_buffer *tok, Py_buffer *sa) {
    if (PyObject_GetBuffer(o_tok, tok, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) return -1;
    if (PyObject_GetBuffer(o_sa, sa, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) {
        PyBuffer_Release(tok);
        return -1;
    }
    if (tok->ndim != 1 || sa->ndim != 1 || (tok->itemsize != 2 && tok->itemsize != 4) ||
        (sa->itemsize != 4 && sa->itemsize != 8) || tok->shape[0] != sa->shape[0]) {
        PyErr_Format(PyExc_ValueError,
                     "tokens must be 1-D uint16/uint32 and sa 1-D uint32/int64 of the same length; "
                     "got itemsizes %zd/%zd, lengths %zd/%zd",
                     tok->itemsize, sa->itemsize, tok->ndim == 1 ? tok->shape[0] : -1,
                     sa->ndim == 1 ? sa->shape[0] : -1);
        PyBuffer_Release(tok);
        PyBuffer_Release(sa);
        return -1;
    }
    T->tok = tok->buf;
    T->sa = sa->buf;
    T->tw = (int)tok->itemsize;
    T->sw = (int)sa->itemsize;
    T->n = (int64_t)tok->shape[0];
    return 0;
}

static int get_i64(PyObject *obj, const char *name, int ndim, int writable, Py_buffer *view) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) != 0) return -1;
    const char *f = view->format ? view->format : "B";
    char c = f[strlen(f) - 1];
    if (view->itemsize != 8 || !(c == 'q' || (c == 'l' && sizeof(long) == 8)) || view->ndim != ndim) {
        PyErr_Format(PyExc_ValueError,
                     "%s: expected a C-contiguous int64 array with %d dims, got format '%s', "
                     "itemsize %zd, %d dims; convert with numpy.ascontiguousarray(x, dtype=numpy.int64)",
                     name, ndim, f, view->itemsize, view->ndim);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------- find */
static PyObject *py_find(PyObject *self, PyObject *args) {
    PyObject *o_tok, *o_sa, *o_q;
    long long lo, hi;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOLL", &o_tok, &o_sa, &o_q, &lo, &hi)) return NULL;
    Py_buffer tok = {0}, sa = {0}, q = {0};
    Text T;
    if (get_text(o_tok, o_sa, &T, &tok, &sa)) return NULL;
    if (get_i64(o_q, "query", 1, 0, &q)) { PyBuffer_Release(&tok); PyBuffer_Release(&sa); return NULL; }
    if (lo < 0) lo = 0;
    if (hi > T.n) hi = T.n;
    int64_t a = lo, b = lo;
    if (lo < hi) find_range(&T, (const int64_t *)q.buf, (int64_t)q.shape[0], lo, hi, &a, &b);
    PyBuffer_Release(&tok);
    PyBuffer_Release(&sa);
    PyBuffer_Release(&q);
    return Py_BuildValue("LL", (long long)a, (long long)b);
}

/* ------------------------------------------------------------------------- windows */
static PyObject *py_window_ranges(PyObject *self, PyObject *args) {
    PyObject *o_tok, *o_sa, *o_x, *o_out;
    long long eos, kmax;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOLLO", &o_tok, &o_sa, &o_x, &eos, &kmax, &o_out)) return NULL;
    Py_buffer tok = {0}, sa = {0}, x = {0}, out = {0};
    PyObject *result = NULL;
    Text T;
    if (get_text(o_tok, o_sa, &T, &tok, &sa)) return NULL;
    if (get_i64(o_x, "x", 2, 0, &x)) goto done;
    if (get_i64(o_out, "out", 4, 1, &out)) goto done;
    const Py_ssize_t B = x.shape[0], TT = x.shape[1], K = (Py_ssize_t)kmax;
    if (kmax < 0 || out.shape[0] != B || out.shape[1] != TT || out.shape[2] != K + 1 || out.shape[3] != 2) {
        PyErr_SetString(PyExc_ValueError, "window_ranges: out must be [B,T,kmax+1,2] for x [B,T]");
        goto done;
    }
    const int64_t *X = (const int64_t *)x.buf;
    int64_t *O = (int64_t *)out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0; b < B; b++) {
        Py_ssize_t start = 0;
        for (Py_ssize_t t = 0; t < TT; t++) {
            const int64_t *row = X + b * TT;
            if (row[t] == eos) start = t;
            const int64_t avail = (int64_t)(t - start + 1);
            int64_t *o = O + ((b * TT + t) * (K + 1)) * 2;
            o[0] = 0; o[1] = T.n;
            int empty = T.n == 0;
            for (Py_ssize_t k = 1; k <= K; k++) {
                if (k > avail) { o[2 * k] = -1; o[2 * k + 1] = -1; continue; }
                if (empty) { o[2 * k] = 0; o[2 * k + 1] = 0; continue; }
                int64_t lo, hi;
                context_range(&T, row + t - k + 1, k, &lo, &hi);
                o[2 * k] = lo; o[2 * k + 1] = hi;
                empty = lo >= hi;
            }
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&tok);
    PyBuffer_Release(&sa);
    if (x.obj) PyBuffer_Release(&x);
    if (out.obj) PyBuffer_Release(&out);
    return result;
}

static PyObject *py_window_infgram(PyObject *self, PyObject *args) {
    PyObject *o_tok, *o_sa, *o_x, *o_out;
    long long eos;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOLO", &o_tok, &o_sa, &o_x, &eos, &o_out)) return NULL;
    Py_buffer tok = {0}, sa = {0}, x = {0}, out = {0};
    PyObject *result = NULL;
    Text T;
    if (get_text(o_tok, o_sa, &T, &tok, &sa)) return NULL;
    if (get_i64(o_x, "x", 2, 0, &x)) goto done;
    if (get_i64(o_out, "out", 3, 1, &out)) goto done;
    const Py_ssize_t B = x.shape[0], TT = x.shape[1];
    if (out.shape[0] != B || out.shape[1] != TT || out.shape[2] != 3) {
        PyErr_SetString(PyExc_ValueError, "window_infgram: out must be [B,T,3] for x [B,T]");
        goto done;
    }
    const int64_t *X = (const int64_t *)x.buf;
    int64_t *O = (int64_t *)out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0; b < B; b++) {
        const int64_t *row = X + b * TT;
        Py_ssize_t start = 0;
        int64_t prev = 0;
        for (Py_ssize_t t = 0; t < TT; t++) {
            if (row[t] == eos) start = t;
            const int64_t avail = (int64_t)(t - start + 1);
            /* Matching statistics: the longest match grows by at most one token per position. */
            int64_t k = prev + 1 < avail ? prev + 1 : avail, lo = 0, hi = T.n;
            for (; k > 0; k--) {
                context_range(&T, row + t - k + 1, k, &lo, &hi);
                if (lo < hi) break;
            }
            if (k == 0) { lo = 0; hi = T.n; }
            int64_t *o = O + (b * TT + t) * 3;
            o[0] = k; o[1] = lo; o[2] = hi;
            prev = k;
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&tok);
    PyBuffer_Release(&sa);
    if (x.obj) PyBuffer_Release(&x);
    if (out.obj) PyBuffer_Release(&out);
    return result;
}

/* ------------------------------------------------------------------------- capped LCP */
static PyObject *py_lcp_capped(PyObject *self, PyObject *args) {
    PyObject *o_tok, *o_sa, *o_out;
    long long cap;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOLO", &o_tok, &o_sa, &cap, &o_out)) return NULL;
    Py_buffer tok = {0}, sa = {0}, out = {0};
    PyObject *result = NULL;
    Text T;
    if (get_text(o_tok, o_sa, &T, &tok, &sa)) return NULL;
    if (PyObject_GetBuffer(o_out, &out, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) != 0) goto done;
    if (out.ndim != 1 || out.itemsize != 1 || out.shape[0] != (T.n > 0 ? T.n - 1 : 0) || cap < 0 || cap > 255) {
        PyErr_SetString(PyExc_ValueError, "lcp_capped: out must be uint8 [n-1] and 0 <= cap <= 255");
        goto done;
    }
    uint8_t *O = (uint8_t *)out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t i = 1; i < T.n; i++) {
        const int64_t a = sa_at(&T, i - 1), b = sa_at(&T, i);
        int64_t l = 0;
        while (l < cap && a + l < T.n && b + l < T.n && tok_at(&T, a + l) == tok_at(&T, b + l)) l++;
        O[i - 1] = (uint8_t)l;
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&tok);
    PyBuffer_Release(&sa);
    if (out.obj) PyBuffer_Release(&out);
    return result;
}

/* ------------------------------------------------------------------------- count of counts */
static inline void tally(int64_t *n1234, int64_t c) {
    if (c >= 1 && c <= 4) n1234[c - 1]++;
}

/* The reference is count_of_counts_py in engram/ngram/segment.py. At depth d the groups of equal
 * d-grams are the runs of sa joined by lcp >= d. A run's size is the raw count of its d-gram (all
 * members share the d-gram, so the document rule holds for all or none of them), and the number
 * of distinct tokens just before its members is the continuation count of that d-gram. Distinct
 * left neighbours are counted with a stamp per token id, so no sorting is needed.
 *
 * One pass with random reads lays out, in sa order, what the depth loops need: the token before
 * each suffix (the BWT), how far the suffix runs before its first eos (from its first token, and
 * from its second), its length, all capped at 255 (K <= 254), and its common prefix with the
 * suffix before it, capped at K. The depth loops then read memory in order. */
static PyObject *py_count_of_counts(PyObject *self, PyObject *args) {
    PyObject *o_tok, *o_sa, *o_out;
    long long eos, K;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOLLO", &o_tok, &o_sa, &eos, &K, &o_out)) return NULL;
    Py_buffer tok = {0}, sa = {0}, out = {0};
    PyObject *result = NULL;
    int64_t *stamp = NULL;
    uint32_t *bwt = NULL;
    uint8_t *dist = NULL, *f0 = NULL, *f1 = NULL, *rem = NULL, *L = NULL;
    Text T;
    if (get_text(o_tok, o_sa, &T, &tok, &sa)) return NULL;
    if (get_i64(o_out, "out", 3, 1, &out)) goto done;
    if (K < 1 || K > 254 || out.shape[0] != 2 || out.shape[1] != K || out.shape[2] != 4) {
        PyErr_SetString(PyExc_ValueError, "count_of_counts: out must be int64 [2, K, 4] with 1 <= K <= 254");
        goto done;
    }
    const int64_t n = T.n;
    int64_t vmax = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t t = tok_at(&T, i);
        if (t > vmax) vmax = t;
    }
    stamp = (int64_t *)calloc((size_t)vmax + 1, sizeof(int64_t));
    bwt = (uint32_t *)malloc((size_t)(n > 0 ? n : 1) * sizeof(uint32_t));
    dist = (uint8_t *)malloc((size_t)n + 1);
    f0 = (uint8_t *)malloc((size_t)(n > 0 ? n : 1));
    f1 = (uint8_t *)malloc((size_t)(n > 0 ? n : 1));
    rem = (uint8_t *)malloc((size_t)(n > 0 ? n : 1));
    L = (uint8_t *)malloc((size_t)(n > 0 ? n : 1));
    if (!stamp || !bwt || !dist || !f0 || !f1 || !rem || !L) { PyErr_NoMemory(); goto done; }
    int64_t *raw = (int64_t *)out.buf, *cont = raw + 4 * K;
    memset(raw, 0, (size_t)(8 * K * sizeof(int64_t)));
    Py_BEGIN_ALLOW_THREADS
    dist[n] = 255; /* dist[p]: tokens from p to the first eos at or after p (255: none that close) */
    for (int64_t p = n - 1; p >= 0; p--)
        dist[p] = tok_at(&T, p) == eos ? 0 : (dist[p + 1] == 255 ? 255 : (uint8_t)(dist[p + 1] + 1));
    for (int64_t i = 0; i < n; i++) {
        const int64_t p = sa_at(&T, i);
        bwt[i] = p > 0 ? (uint32_t)tok_at(&T, p - 1) : UINT32_MAX; /* none before the first token */
        f0[i] = dist[p];
        f1[i] = dist[p + 1] >= 254 ? 255 : (uint8_t)(dist[p + 1] + 1);
        rem[i] = n - p >= 255 ? 255 : (uint8_t)(n - p);
        if (i > 0) { /* L[i-1]: common prefix of suffixes sa[i-1] and sa[i], capped at K */
            const int64_t a = sa_at(&T, i - 1);
            int64_t l = 0;
            while (l < K && a + l < n && p + l < n && tok_at(&T, a + l) == tok_at(&T, p + l)) l++;
            L[i - 1] = (uint8_t)l;
        }
    }
    int64_t group = 0; /* stamps of all depths share one counter, so they never need clearing */
    for (int64_t d = 1; d <= K; d++) {
        int64_t *rawd = raw + 4 * (d - 1), *contd = cont + 4 * (d - 1);
        int64_t i0 = 0;
        while (i0 < n) {
            int64_t i1 = i0 + 1;
            while (i1 < n && L[i1 - 1] >= d) i1++;
            /* sa[i0..i1): one d-gram shared by all members, or a single suffix shorter than d */
            if (rem[i0] >= d) {
                if (d <= 2 || f1[i0] >= d - 1) tally(rawd, i1 - i0); /* no eos strictly inside */
                if (f0[i0] >= d - 1) {                                /* no eos in g[:-1] */
                    int64_t distinct = 0;
                    group++;
                    for (int64_t i = i0; i < i1; i++) {
                        const uint32_t u = bwt[i];
                        if (u != UINT32_MAX && stamp[u] != group) { stamp[u] = group; distinct++; }
                    }
                    tally(contd, distinct);
                }
            }
            i0 = i1;
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(stamp);
    free(bwt);
    free(dist);
    free(f0);
    free(f1);
    free(rem);
    free(L);
    PyBuffer_Release(&tok);
    PyBuffer_Release(&sa);
    if (out.obj) PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"lcp_capped", py_lcp_capped, METH_VARARGS,
     "lcp_capped(tokens, sa, cap, out): out[i-1] = min(cap, LCP of the suffixes sa[i-1], sa[i]) "
     "into out uint8 [n-1]."},
    {"count_of_counts", py_count_of_counts, METH_VARARGS,
     "count_of_counts(tokens, sa, eos, K, out): n1..n4 of raw (out[0]) and continuation "
     "(out[1]) counts of orders 1..K into out int64 [2, K, 4]."},
    {"find", py_find, METH_VARARGS,
     "find(tokens, sa, query, lo, hi) -> (lo, hi): the sa range, within [lo,hi), of suffixes "
     "that start with query (int64 1-D)."},
    {"window_ranges", py_window_ranges, METH_VARARGS,
     "window_ranges(tokens, sa, x, eos, kmax, out): context ranges of every suffix length "
     "0..kmax of every position of x [B,T] into out [B,T,kmax+1,2]."},
    {"window_infgram", py_window_infgram, METH_VARARGS,
     "window_infgram(tokens, sa, x, eos, out): (L, lo, hi) of the longest context suffix with a "
     "continuation, for every position of x [B,T], into out [B,T,3]."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ngramkernel",
    "Native CPU kernel for suffix-array N-gram queries (optional; engram.ngram falls back to Python).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ngramkernel(void) { return PyModule_Create(&module); }
