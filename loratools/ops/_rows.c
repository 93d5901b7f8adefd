/* The merge's inner loop in one pass over each element: rows of a stored weight plus the product of two low-rank
 * factors, cast back to the stored dtype, with the report's numbers taken on the way.
 *
 *   out[i, j] = cast(W[i, j] + sum_k A[i, k] * B[k, j])      (W: bf16, f16 or f32; A, B: float32; out: bf16/f16/f32)
 *
 * and over all elements: max |delta|, sum W^2, sum lost^2 and the count of elements whose lost part is not finite
 * (stored overflowed), where delta = A @ B (float32) and lost = float(out) - (W + delta). The sums are float64.
 *
 * The same arithmetic as loratools.ops.merge_engine._chunk in torch: the product in float32, added to the base in
 * float32, cast with round-to-nearest-even (NaN as 0x7FC0 for bf16; as 0x7E00 with its sign for f16); only the order
 * in which the product's rank terms meet differs from a BLAS (here k = 0, 1, ..., with fused multiply-adds where the
 * CPU has them). torch is not needed: buffers come through the buffer protocol and the loop runs without the GIL.
 * src and out must not overlap (a block whose float32 sums are not finite is read again, in float64).
 *
 * Four rows by sixteen columns at a time, in registers (GCC/Clang vector types: AVX on x86-64 where the CPU has it
 * plus FMA, SSE2 otherwise, NEON on ARM); the rows and columns left over go element by element, in the same order.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef uint32_t v4u __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

#define INLINE static inline __attribute__((always_inline))

typedef struct {
    double max_abs, base_sq, lost_sq;
    long long overflow;
} Stats;

/* ---- one element -------------------------------------------------------------------------------------------- */

INLINE float f_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
INLINE uint32_t u_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

INLINE float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return f_of(sign | 0x7f800000u | (man << 13));  /* inf, NaN */
    if (exp == 0) {                                                    /* zero, subnormal: man * 2^-24, exact */
        float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    return f_of(sign | ((exp + 112u) << 23) | (man << 13));
}

/* float -> half, round to nearest even: the float unit does the rounding. |x| is scaled so that values too large
 * for half become inf and then brought to an exponent where adding a power of two (2^(e+13) or, for half's
 * subnormals, 2^-1 ... the smallest) leaves exactly half's mantissa bits, rounded. */
INLINE uint16_t f32_to_f16(float f) {
    uint32_t w = u_of(f), two_w = w + w, sign = w & 0x80000000u;
    float mag = f_of(w & 0x7fffffffu);
    float base = (mag * 0x1p+112f) * 0x1p-110f;
    uint32_t bias = two_w & 0xff000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = f_of((bias >> 1) + 0x07800000u) + base;
    uint32_t bits = u_of(base);
    uint32_t nonsign = ((bits >> 13) & 0x7c00u) + (bits & 0x0fffu);
    return (uint16_t)((sign >> 16) | (two_w > 0xff000000u ? 0x7e00u : nonsign));
}

INLINE uint16_t f32_to_bf16(float f) {
    uint32_t u = u_of(f);
    if (f != f) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

INLINE float load1(const char *p, int dt) {
    uint16_t h;
    float f;
    switch (dt) {
    case DT_BF16: memcpy(&h, p, 2); return f_of((uint32_t)h << 16);
    case DT_F16: memcpy(&h, p, 2); return f16_to_f32(h);
    default: memcpy(&f, p, 4); return f;
    }
}

/* stores m in dtype dt at p; returns the stored value, read back as float */
INLINE float store1(char *p, int dt, float m) {
    uint16_t h;
    switch (dt) {
    case DT_BF16: h = f32_to_bf16(m); memcpy(p, &h, 2); return f_of((uint32_t)h << 16);
    case DT_F16: h = f32_to_f16(m); memcpy(p, &h, 2); return f16_to_f32(h);
    default: memcpy(p, &m, 4); return m;
    }
}

INLINE void epilogue1(float d, const char *src, int sdt, char *out, int odt, Stats *st) {
    float ad = d < 0 ? -d : d;
    if (ad > st->max_abs) st->max_abs = ad;
    float w = load1(src, sdt);
    st->base_sq += (double)w * (double)w;
    float m = d + w;
    float lost = store1(out, odt, m) - m;
    if (lost - lost == 0) st->lost_sq += (double)lost * (double)lost;
    else st->overflow++;
}

/* ---- eight elements ---------------------------------------------------------------------------------------------- */

/* bfloat16 <-> float32 in 128-bit halves (SSE2 and AVX-without-AVX2 CPUs have 128-bit integer operations only).
 * __builtin_shufflevector: Clang, GCC 12 and later; older GCC: __builtin_shuffle and copies of halves. */
#if defined(__has_builtin) && !defined(ROWS_NO_SHUFFLEVECTOR)
#if __has_builtin(__builtin_shufflevector)
#define HAVE_SHUFFLEVECTOR 1
#endif
#endif
#ifdef HAVE_SHUFFLEVECTOR
INLINE v8f join(v4f lo, v4f hi) { return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7); }
INLINE v4f lo_half(v8f v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3); }
INLINE v4f hi_half(v8f v) { return __builtin_shufflevector(v, v, 4, 5, 6, 7); }
/* z, h -> (z0 h0 z1 h1 z2 h2 z3 h3) or (... h4 ... h7): each 16-bit value the high half of a 32-bit word */
INLINE v8h interleave_lo(v8h z, v8h h) { return __builtin_shufflevector(z, h, 0, 8, 1, 9, 2, 10, 3, 11); }
INLINE v8h interleave_hi(v8h z, v8h h) { return __builtin_shufflevector(z, h, 4, 12, 5, 13, 6, 14, 7, 15); }
/* the high 16 bits of each 32-bit word of lo, then of hi */
INLINE v8h high_halves(v8h lo, v8h hi) { return __builtin_shufflevector(lo, hi, 1, 3, 5, 7, 9, 11, 13, 15); }
#else
typedef union {
    v8f v;
    v4f h[2];
} Halves;
INLINE v8f join(v4f lo, v4f hi) { Halves u = {.h = {lo, hi}}; return u.v; }
INLINE v4f lo_half(v8f v) { Halves u = {.v = v}; return u.h[0]; }
INLINE v4f hi_half(v8f v) { Halves u = {.v = v}; return u.h[1]; }
INLINE v8h interleave_lo(v8h z, v8h h) { return __builtin_shuffle(z, h, (v8h){0, 8, 1, 9, 2, 10, 3, 11}); }
INLINE v8h interleave_hi(v8h z, v8h h) { return __builtin_shuffle(z, h, (v8h){4, 12, 5, 13, 6, 14, 7, 15}); }
INLINE v8h high_halves(v8h lo, v8h hi) { return __builtin_shuffle(lo, hi, (v8h){1, 3, 5, 7, 9, 11, 13, 15}); }
#endif

INLINE v8f load8(const char *p, int dt) {
    if (dt == DT_BF16) {  /* each 16-bit value becomes the high half of a 32-bit word */
        v8h h, z = {0};
        memcpy(&h, p, 16);
        return join((v4f)interleave_lo(z, h), (v4f)interleave_hi(z, h));
    }
    v8f f;
    if (dt == DT_F32) {
        memcpy(&f, p, 32);
        return f;
    }
    for (int l = 0; l < 8; l++) f[l] = load1(p + 2 * l, dt);
    return f;
}

INLINE v4u round_bf16(v4f m) {  /* the rounded value in the high 16 bits, the low 16 bits zero */
    v4u u = (v4u)m;
    v4u r = u + 0x7fffu + ((u >> 16) & 1u);
    v4u nan = (v4u)(m != m);
    r = (r & ~nan) | (0x7fc00000u & nan);
    return r & 0xffff0000u;
}

/* stores m in dtype dt at p; returns the stored values, read back as float */
INLINE v8f store8(char *p, int dt, v8f m) {
    if (dt == DT_BF16) {
        v4u lo = round_bf16(lo_half(m)), hi = round_bf16(hi_half(m));
        v8h h = high_halves((v8h)lo, (v8h)hi);
        memcpy(p, &h, 16);
        return join((v4f)lo, (v4f)hi);
    }
    if (dt == DT_F32) {
        memcpy(p, &m, 32);
        return m;
    }
    v8f back;
    for (int l = 0; l < 8; l++) back[l] = store1(p + 2 * l, dt, m[l]);
    return back;
}

/* float32 sums of a few hundred squares per lane: flushed into float64 after every four rows (and done again in
 * float64 where a float32 sum is not finite, so that a huge but finite value is not reported as inf) */
typedef struct {
    v8f max_abs, base_sq, lost_sq;
    v8f bad;  /* counts, as floats: exact far beyond a block's elements; float operations are 256 bits wide */
} Lanes;

INLINE void epilogue8(v8f d, const char *src, int sdt, char *out, int odt, Lanes *ln) {
    v8f ad = (v8f)((v8u)d & 0x7fffffffu);
    v8i more = ad > ln->max_abs;
    ln->max_abs = (v8f)(((v8i)ad & more) | ((v8i)ln->max_abs & ~more));
    v8f w = load8(src, sdt);
    ln->base_sq += w * w;
    v8f m = d + w;
    v8f lost = store8(out, odt, m) - m;
    v8i fin = (lost - lost) == 0;
    ln->bad += (v8f)(~fin & (v8i)((v8f){0} + 1.0f));  /* 1 per lane that is not finite */
    lost = (v8f)((v8i)lost & fin);
    ln->lost_sq += lost * lost;
}

/* ---- the loop ------------------------------------------------------------------------------------------------------ */

typedef struct {
    const char *src;
    const float *a, *b;
    char *out;
    Py_ssize_t rows, cols, rank;
    int sdt, odt;
    Stats st;
} Job;

/* rows [i0, i1), every column, one element at a time, float64 sums */
INLINE void rows1(const Job *jb, Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t j0, int sdt, int odt, Stats *st) {
    const Py_ssize_t cols = jb->cols, R = jb->rank;
    const size_t ss = sdt == DT_F32 ? 4 : 2, os_ = odt == DT_F32 ? 4 : 2;
    for (Py_ssize_t i = i0; i < i1; i++) {
        const float *ar = jb->a + i * R;
        for (Py_ssize_t j = j0; j < cols; j++) {
            float d = 0;
            for (Py_ssize_t k = 0; k < R; k++) d += ar[k] * jb->b[k * cols + j];
            size_t e = (size_t)i * cols + j;
            epilogue1(d, jb->src + e * ss, sdt, jb->out + e * os_, odt, st);
        }
    }
}

INLINE void run_job(Job *jb, const int sdt, const int odt) {
    const Py_ssize_t rows = jb->rows, cols = jb->cols, R = jb->rank;
    const size_t ss = sdt == DT_F32 ? 4 : 2, os_ = odt == DT_F32 ? 4 : 2;
    const float *A = jb->a, *B = jb->b;
    Stats st = {0, 0, 0, 0};
    Py_ssize_t i0 = 0;
    const Py_ssize_t cols16 = cols - cols % 16;
    for (; i0 + 4 <= rows; i0 += 4) {
        const float *a0 = A + i0 * R, *a1 = a0 + R, *a2 = a1 + R, *a3 = a2 + R;
        Lanes ln;
        memset(&ln, 0, sizeof ln);
        for (Py_ssize_t j0 = 0; j0 < cols16; j0 += 16) {
            v8f c00 = {0}, c01 = {0}, c10 = {0}, c11 = {0}, c20 = {0}, c21 = {0}, c30 = {0}, c31 = {0};
            for (Py_ssize_t k = 0; k < R; k++) {
                v8f b0, b1;
                memcpy(&b0, B + k * cols + j0, 32);
                memcpy(&b1, B + k * cols + j0 + 8, 32);
                c00 += a0[k] * b0; c01 += a0[k] * b1;
                c10 += a1[k] * b0; c11 += a1[k] * b1;
                c20 += a2[k] * b0; c21 += a2[k] * b1;
                c30 += a3[k] * b0; c31 += a3[k] * b1;
            }
            size_t e = (size_t)i0 * cols + j0;
#define EPI(c, r, h) epilogue8(c, jb->src + (e + (size_t)(r) * cols + (h)) * ss, sdt, \
                               jb->out + (e + (size_t)(r) * cols + (h)) * os_, odt, &ln)
            EPI(c00, 0, 0); EPI(c01, 0, 8); EPI(c10, 1, 0); EPI(c11, 1, 8);
            EPI(c20, 2, 0); EPI(c21, 2, 8); EPI(c30, 3, 0); EPI(c31, 3, 8);
#undef EPI
        }
        Stats blk = {0, 0, 0, 0};
        for (int l = 0; l < 8; l++) {
            if (ln.max_abs[l] > blk.max_abs) blk.max_abs = ln.max_abs[l];
            blk.base_sq += ln.base_sq[l];
            blk.lost_sq += ln.lost_sq[l];
            blk.overflow += (long long)ln.bad[l];
        }
        if (blk.base_sq - blk.base_sq != 0 || blk.lost_sq - blk.lost_sq != 0) {  /* again, in float64 */
            blk = (Stats){0, 0, 0, 0};
            rows1(jb, i0, i0 + 4, 0, sdt, odt, &blk);
        } else {
            for (int r = 0; r < 4; r++) rows1(jb, i0 + r, i0 + r + 1, cols16, sdt, odt, &blk);  /* columns left */
        }
        if (blk.max_abs > st.max_abs) st.max_abs = blk.max_abs;
        st.base_sq += blk.base_sq;
        st.lost_sq += blk.lost_sq;
        st.overflow += blk.overflow;
    }
    rows1(jb, i0, rows, 0, sdt, odt, &st);  /* rows left over */
    jb->st = st;
}

/* each pair of dtypes compiled on its own (the conversions inlined, no test per element) */
INLINE void run_any(Job *jb) {
#define CASE(s, o) if (jb->sdt == s && jb->odt == o) { run_job(jb, s, o); return; }
    CASE(DT_BF16, DT_BF16) CASE(DT_F16, DT_F16) CASE(DT_F32, DT_F32)
    CASE(DT_BF16, DT_F32) CASE(DT_BF16, DT_F16) CASE(DT_F16, DT_F32) CASE(DT_F16, DT_BF16)
    CASE(DT_F32, DT_BF16) CASE(DT_F32, DT_F16)
#undef CASE
}

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx,fma"))) static void run_fma(Job *jb) { run_any(jb); }
#define HAVE_FMA_PATH 1
#endif
static void run_plain(Job *jb) { run_any(jb); }

static void (*run)(Job *) = run_plain;
static const char *simd = "default";

/* ---- Python --------------------------------------------------------------------------------------------------- */

static int get(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t offset, Py_ssize_t need, const char *what) {
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) return -1;
    if (offset < 0 || need < 0 || offset > view->len || view->len - offset < need) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes from %zd are needed, the buffer has %zd", what, need, offset,
                     view->len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int size_of(int dt) { return dt == DT_F32 ? 4 : dt == DT_BF16 || dt == DT_F16 ? 2 : 0; }

PyDoc_STRVAR(merge_rows_doc,
"merge_rows(src, src_offset, src_dtype, a, a_offset, b, rows, cols, rank, out, out_offset, out_dtype)\n"
"--\n\n"
"out[i, j] = cast(src[i, j] + sum_k a[i, k] * b[k, j]) for rows x cols elements (row-major, no padding); a is\n"
"rows x rank float32 from a_offset, b rank x cols float32; dtypes 0 float32, 1 bfloat16, 2 float16. Returns\n"
"(max |delta|, sum src^2, sum lost^2, count of non-finite lost), lost = stored - (src + delta). The GIL is\n"
"released while it runs.");

static PyObject *merge_rows(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *src_o, *a_o, *b_o, *out_o;
    Py_ssize_t src_off, a_off, rows, cols, rank, out_off;
    int sdt, odt;
    if (!PyArg_ParseTuple(args, "OniOnOnnnOni", &src_o, &src_off, &sdt, &a_o, &a_off, &b_o, &rows, &cols, &rank,
                          &out_o, &out_off, &odt))
        return NULL;
    if (!size_of(sdt) || !size_of(odt)) return PyErr_Format(PyExc_ValueError, "unknown dtype code");
    if (rows < 0 || cols < 0 || rank < 0 || (cols && rows > PY_SSIZE_T_MAX / 4 / cols) ||
        (rank && (rows > PY_SSIZE_T_MAX / 4 / rank || cols > PY_SSIZE_T_MAX / 4 / rank)))
        return PyErr_Format(PyExc_ValueError, "bad shape");
    Py_buffer src, a, b, out;
    if (get(src_o, &src, 0, src_off, rows * cols * size_of(sdt), "src") < 0) return NULL;
    if (get(a_o, &a, 0, a_off, rows * rank * 4, "a") < 0) goto fail_src;
    if (get(b_o, &b, 0, 0, rank * cols * 4, "b") < 0) goto fail_a;
    if (get(out_o, &out, 1, out_off, rows * cols * size_of(odt), "out") < 0) goto fail_b;
    if (rows == 0 || cols == 0) {  /* nothing to do (and with rank 0 the checks above would not bound rows) */
        PyBuffer_Release(&out);
        PyBuffer_Release(&b);
        PyBuffer_Release(&a);
        PyBuffer_Release(&src);
        return Py_BuildValue("dddL", 0.0, 0.0, 0.0, 0LL);
    }
    Job jb = {(const char *)src.buf + src_off, (const float *)((const char *)a.buf + a_off), (const float *)b.buf,
              (char *)out.buf + out_off, rows, cols, rank, sdt, odt, {0, 0, 0, 0}};
    if ((uintptr_t)jb.a % 4 || (uintptr_t)jb.b % 4) {
        PyErr_SetString(PyExc_ValueError, "a and b must be aligned to 4 bytes");
    } else {
        Py_BEGIN_ALLOW_THREADS
        run(&jb);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&out);
    PyBuffer_Release(&b);
    PyBuffer_Release(&a);
    PyBuffer_Release(&src);
    if (PyErr_Occurred()) return NULL;
    return Py_BuildValue("dddL", jb.st.max_abs, jb.st.base_sq, jb.st.lost_sq, jb.st.overflow);
fail_b:
    PyBuffer_Release(&b);
fail_a:
    PyBuffer_Release(&a);
fail_src:
    PyBuffer_Release(&src);
    return NULL;
}

static PyObject *set_simd(PyObject *self, PyObject *arg) {
    (void)self;
    const char *name = PyUnicode_AsUTF8(arg);
    if (name == NULL) return NULL;
    PyObject *old = PyUnicode_FromString(simd);
    if (old == NULL) return NULL;
    if (strcmp(name, "default") == 0) {
        run = run_plain;
        simd = "default";
    }
#ifdef HAVE_FMA_PATH
    else if (strcmp(name, "avx+fma") == 0 && __builtin_cpu_supports("avx") && __builtin_cpu_supports("fma")) {
        run = run_fma;
        simd = "avx+fma";
    }
#endif
    else {
        Py_DECREF(old);
        return PyErr_Format(PyExc_ValueError, "no such path on this CPU: %s", name);
    }
    return old;
}

static PyMethodDef methods[] = {
    {"merge_rows", merge_rows, METH_VARARGS, merge_rows_doc},
    {"set_simd", set_simd, METH_O, "set_simd(name) -> the previous one: 'default' or 'avx+fma' (for tests)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rows", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__rows(void) {
#ifdef HAVE_FMA_PATH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx") && __builtin_cpu_supports("fma")) {
        run = run_fma;
        simd = "avx+fma";
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    return m;
}
