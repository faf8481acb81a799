/* A host stand-in for cuBLAS (libcublas.so) over mock_cuda.c's memory: the
 * calls hydra-edge makes — the products sgemm and GemmEx (bf16 or f32
 * inputs, f32 output, f32 compute), in column-major BLAS semantics, and the
 * element-wise dgmm and axpy (dropout masks). It refuses what
 * cuBLAS refuses (leading dimensions, a handle used without its context
 * current, unsupported type combinations) and checks that every element a
 * product reads or writes lies inside one allocation. Sums in double: the
 * tests compare with the CPU at f32 tolerances. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int mock_check_range(uintptr_t p, size_t bytes);
void *mock_current_context(void);
int mock_injected_fault(void);

typedef int cublasStatus_t;
enum { SUCCESS = 0, NOT_INITIALIZED = 1, INVALID_VALUE = 7, EXECUTION_FAILED = 13, NOT_SUPPORTED = 15 };
enum { R_32F = 0, R_16BF = 14, COMPUTE_32F = 68 };

struct handle {
    void *ctx;
    void *stream;
};

static cublasStatus_t fail(cublasStatus_t r, const char *what) {
    if (getenv("MOCK_CUDA_VERBOSE")) fprintf(stderr, "mock cublas: %s -> %d\n", what, r);
    return r;
}

cublasStatus_t cublasCreate_v2(struct handle **h) {
    if (!mock_current_context()) return fail(NOT_INITIALIZED, "cublasCreate_v2 without a context");
    *h = calloc(1, sizeof **h);
    if (!*h) return fail(3, "cublasCreate_v2: out of memory");
    (*h)->ctx = mock_current_context();
    return SUCCESS;
}

cublasStatus_t cublasDestroy_v2(struct handle *h) {
    if (!h) return fail(NOT_INITIALIZED, "cublasDestroy_v2");
    free(h);
    return SUCCESS;
}

cublasStatus_t cublasSetStream_v2(struct handle *h, void *stream) {
    if (!h) return fail(NOT_INITIALIZED, "cublasSetStream_v2");
    h->stream = stream;
    return SUCCESS;
}

static float load(const void *base, int type, size_t i) {
    if (type == R_32F) return ((const float *)base)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)base)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Bytes a stored operand spans: `cols` columns of `rows` with leading
 * dimension `ld`. */
static size_t span(int rows, int cols, int ld, size_t elem) {
    if (rows == 0 || cols == 0) return 0;
    return ((size_t)(cols - 1) * (size_t)ld + (size_t)rows) * elem;
}

static cublasStatus_t gemm_body(struct handle *h, int ta, int tb, int m, int n, int k, float alpha,
                                const void *a, int at, int lda, const void *b, int bt, int ldb,
                                float beta, float *c, int ldc);

static cublasStatus_t gemm(struct handle *h, int ta, int tb, int m, int n, int k, float alpha,
                           const void *a, int at, int lda, const void *b, int bt, int ldb,
                           float beta, float *c, int ldc) {
    if (!h) return fail(NOT_INITIALIZED, "gemm: no handle");
    if (mock_injected_fault()) return fail(EXECUTION_FAILED, "gemm: injected fault");
    return gemm_body(h, ta, tb, m, n, k, alpha, a, at, lda, b, bt, ldb, beta, c, ldc);
}

static cublasStatus_t gemm_body(struct handle *h, int ta, int tb, int m, int n, int k, float alpha,
                                const void *a, int at, int lda, const void *b, int bt, int ldb,
                                float beta, float *c, int ldc) {
    if (mock_current_context() != h->ctx) return fail(EXECUTION_FAILED, "gemm: the handle's context is not current");
    if (ta < 0 || ta > 1 || tb < 0 || tb > 1) return fail(INVALID_VALUE, "gemm: op");
    if (m < 0 || n < 0 || k < 0) return fail(INVALID_VALUE, "gemm: negative size");
    int ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
    if (lda < (ar > 1 ? ar : 1) || ldb < (br > 1 ? br : 1) || ldc < (m > 1 ? m : 1))
        return fail(INVALID_VALUE, "gemm: leading dimension");
    if (m == 0 || n == 0) return SUCCESS;
    size_t ea = at == R_32F ? 4 : 2, eb = bt == R_32F ? 4 : 2;
    if (k > 0 && (!mock_check_range((uintptr_t)a, span(ar, ac, lda, ea)) ||
                  !mock_check_range((uintptr_t)b, span(br, bc, ldb, eb))))
        return fail(EXECUTION_FAILED, "gemm: A or B reaches outside its allocation");
    if (!mock_check_range((uintptr_t)c, span(m, n, ldc, 4)))
        return fail(EXECUTION_FAILED, "gemm: C reaches outside its allocation");
    for (int j = 0; j < n; j++) {
        for (int i = 0; i < m; i++) {
            double s = 0.0;
            for (int p = 0; p < k; p++) {
                float av = load(a, at, ta ? (size_t)p + (size_t)i * lda : (size_t)i + (size_t)p * lda);
                float bv = load(b, bt, tb ? (size_t)j + (size_t)p * ldb : (size_t)p + (size_t)j * ldb);
                s += (double)av * (double)bv;
            }
            float *cv = &c[(size_t)i + (size_t)j * ldc];
            /* beta == 0: C is not read (it may hold anything). */
            *cv = (float)(alpha * s) + (beta == 0.0f ? 0.0f : beta * *cv);
        }
    }
    return SUCCESS;
}

cublasStatus_t cublasSgemm_v2(struct handle *h, int ta, int tb, int m, int n, int k,
                              const float *alpha, const float *a, int lda, const float *b, int ldb,
                              const float *beta, float *c, int ldc) {
    return gemm(h, ta, tb, m, n, k, *alpha, a, R_32F, lda, b, R_32F, ldb, *beta, c, ldc);
}

/* `batch` products, the i-th on A + i·sa, B + i·sb, C + i·sc (elements):
 * one call (one fault opportunity), each product checked as cublasSgemm's. */
cublasStatus_t cublasSgemmStridedBatched(struct handle *h, int ta, int tb, int m, int n, int k,
                                         const float *alpha, const float *a, int lda, long long sa,
                                         const float *b, int ldb, long long sb, const float *beta,
                                         float *c, int ldc, long long sc, int batch) {
    if (!h) return fail(NOT_INITIALIZED, "gemm batched: no handle");
    if (batch < 0 || sa < 0 || sb < 0 || sc < 0) return fail(INVALID_VALUE, "gemm batched: negative batch or stride");
    if (mock_injected_fault()) return fail(EXECUTION_FAILED, "gemm batched: injected fault");
    /* The whole stack lies in each operand's allocation (not only each item). */
    if (batch > 0 && m > 0 && n > 0 && k > 0) {
        int ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
        size_t last = (size_t)(batch - 1);
        if (!mock_check_range((uintptr_t)a, last * (size_t)sa * 4 + span(ar, ac, lda, 4)) ||
            !mock_check_range((uintptr_t)b, last * (size_t)sb * 4 + span(br, bc, ldb, 4)) ||
            !mock_check_range((uintptr_t)c, last * (size_t)sc * 4 + span(m, n, ldc, 4)))
            return fail(EXECUTION_FAILED, "gemm batched: the stack reaches outside its allocation");
    }
    for (int i = 0; i < batch; i++) {
        cublasStatus_t r = gemm_body(h, ta, tb, m, n, k, *alpha, a + (size_t)i * (size_t)sa, R_32F, lda,
                                     b + (size_t)i * (size_t)sb, R_32F, ldb, *beta,
                                     c + (size_t)i * (size_t)sc, ldc);
        if (r != SUCCESS) return r;
    }
    return SUCCESS;
}

cublasStatus_t cublasGemmEx(struct handle *h, int ta, int tb, int m, int n, int k,
                            const void *alpha, const void *a, int at, int lda, const void *b,
                            int bt, int ldb, const void *beta, void *c, int ct, int ldc,
                            int compute, int algo) {
    (void)algo;
    /* The combinations hydra-edge uses (and cuBLAS supports with 32F compute). */
    if (compute != COMPUTE_32F || ct != R_32F || at != bt || (at != R_32F && at != R_16BF))
        return fail(NOT_SUPPORTED, "cublasGemmEx: type combination");
    return gemm(h, ta, tb, m, n, k, *(const float *)alpha, a, at, lda, b, bt, ldb,
                *(const float *)beta, c, ldc);
}

/* C = diag(x)·A (left) or A·diag(x) (right), column-major, f32. */
cublasStatus_t cublasSdgmm(struct handle *h, int mode, int m, int n, const float *a, int lda,
                           const float *x, int incx, float *c, int ldc) {
    if (!h) return fail(NOT_INITIALIZED, "dgmm: no handle");
    if (mock_current_context() != h->ctx) return fail(EXECUTION_FAILED, "dgmm: the handle's context is not current");
    if ((mode != 0 && mode != 1) || m < 0 || n < 0 || incx == 0) return fail(INVALID_VALUE, "dgmm: arguments");
    if (lda < (m > 1 ? m : 1) || ldc < (m > 1 ? m : 1)) return fail(INVALID_VALUE, "dgmm: leading dimension");
    if (m == 0 || n == 0) return SUCCESS;
    if (mock_injected_fault()) return fail(EXECUTION_FAILED, "dgmm: injected fault");
    int xn = mode == 0 ? m : n;
    size_t ax = (size_t)(incx > 0 ? incx : -incx);
    if (!mock_check_range((uintptr_t)a, span(m, n, lda, 4)) ||
        !mock_check_range((uintptr_t)x, ((size_t)(xn - 1) * ax + 1) * 4) ||
        !mock_check_range((uintptr_t)c, span(m, n, ldc, 4)))
        return fail(EXECUTION_FAILED, "dgmm: an operand reaches outside its allocation");
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            int xi = mode == 0 ? i : j;
            float xv = x[incx > 0 ? (size_t)xi * ax : (size_t)(xn - 1 - xi) * ax];
            c[(size_t)i + (size_t)j * ldc] = xv * a[(size_t)i + (size_t)j * lda];
        }
    return SUCCESS;
}

/* y += alpha·x, f32. */
cublasStatus_t cublasSaxpy_v2(struct handle *h, int n, const float *alpha, const float *x, int incx,
                              float *y, int incy) {
    if (!h) return fail(NOT_INITIALIZED, "axpy: no handle");
    if (mock_current_context() != h->ctx) return fail(EXECUTION_FAILED, "axpy: the handle's context is not current");
    if (n <= 0) return SUCCESS;
    if (incx != 1 || incy != 1) return fail(NOT_SUPPORTED, "axpy: the mock takes unit strides");
    if (mock_injected_fault()) return fail(EXECUTION_FAILED, "axpy: injected fault");
    if (!mock_check_range((uintptr_t)x, (size_t)n * 4) || !mock_check_range((uintptr_t)y, (size_t)n * 4))
        return fail(EXECUTION_FAILED, "axpy: an operand reaches outside its allocation");
    for (int i = 0; i < n; i++) y[i] += *alpha * x[i];
    return SUCCESS;
}
