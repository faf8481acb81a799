/* A host stand-in for NVRTC (libnvrtc.so): it compiles a program's CUDA C++
 * source on the host with the system's C++ compiler, so the very kernels
 * hydra-edge sends to a GPU run (one thread after another) in CI. A prelude
 * defines what the kernels use of CUDA (__global__, blockIdx, threadIdx,
 * blockDim, gridDim, math.h); for each `extern "C" __global__ void
 * name(params)` a launcher `name__mock_launch(grid, block, args)` is
 * generated that runs every thread of the grid with the arguments unpacked
 * from cuLaunchKernel's array. The "PTX" returned is "MOCKPTX <path of the
 * shared object>", which mock_cuda.c's cuModuleLoadData opens.
 *
 * Floating-point contraction follows the program's options: `--fmad=false`
 * compiles with -ffp-contract=off, anything else with FMA contraction (as a
 * GPU contracts by default), so a kernel that must match the CPU bit for
 * bit fails here too when it forgets to ask. Kernels that need shared
 * memory, barriers or atomics are beyond it (none of hydra-edge's do). */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int nvrtcResult;
enum { SUCCESS = 0, OUT_OF_MEMORY = 1, INVALID_INPUT = 3, INVALID_PROGRAM = 4, COMPILATION = 6 };

struct prog {
    char *src;
    char *ptx;
    char *log;
};

const char *nvrtcGetErrorString(nvrtcResult r) {
    switch (r) {
    case SUCCESS: return "NVRTC_SUCCESS";
    case COMPILATION: return "NVRTC_ERROR_COMPILATION (mock)";
    case INVALID_INPUT: return "NVRTC_ERROR_INVALID_INPUT (mock)";
    case INVALID_PROGRAM: return "NVRTC_ERROR_INVALID_PROGRAM (mock)";
    default: return "NVRTC_ERROR (mock)";
    }
}

nvrtcResult nvrtcVersion(int *major, int *minor) {
    *major = 12;
    *minor = 2;
    return SUCCESS;
}

nvrtcResult nvrtcCreateProgram(struct prog **p, const char *src, const char *name, int nh,
                               const char *const *headers, const char *const *names) {
    (void)name; (void)headers; (void)names;
    if (!p || !src || nh != 0) return INVALID_INPUT;
    *p = calloc(1, sizeof **p);
    if (!*p) return OUT_OF_MEMORY;
    (*p)->src = strdup(src);
    return (*p)->src ? SUCCESS : OUT_OF_MEMORY;
}

nvrtcResult nvrtcDestroyProgram(struct prog **p) {
    if (!p || !*p) return INVALID_PROGRAM;
    free((*p)->src);
    free((*p)->ptx);
    free((*p)->log);
    free(*p);
    *p = NULL;
    return SUCCESS;
}

/* Appends to a growing string. */
struct buf {
    char *s;
    size_t len, cap;
};

static void put(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#include <stdarg.h>
static void put(struct buf *b, const char *fmt, ...) {
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int n = vsnprintf(b->s ? b->s + b->len : NULL, b->s ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) abort();
        if (b->s && b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        b->cap = (b->cap + (size_t)n + 1) * 2;
        b->s = realloc(b->s, b->cap);
        if (!b->s) abort();
    }
}

/* The launchers of every `__global__ void name(params)` in `src`; returns the
 * number of kernels, -1 on a signature it cannot read. */
static int launchers(const char *src, struct buf *out) {
    int kernels = 0;
    for (const char *at = strstr(src, "__global__"); at; at = strstr(at, "__global__")) {
        at += strlen("__global__");
        while (isspace((unsigned char)*at)) at++;
        if (strncmp(at, "void", 4) != 0) return -1;
        at += 4;
        while (isspace((unsigned char)*at)) at++;
        const char *name = at;
        while (isalnum((unsigned char)*at) || *at == '_') at++;
        int name_len = (int)(at - name);
        while (isspace((unsigned char)*at)) at++;
        if (*at != '(' || name_len == 0) return -1;
        const char *params = ++at;
        const char *close = strchr(params, ')');
        if (!close) return -1;
        put(out,
            "extern \"C\" void %.*s__mock_launch(const unsigned *g, const unsigned *b, void **a) {\n"
            "  gridDim = {g[0], g[1], g[2]}; blockDim = {b[0], b[1], b[2]};\n"
            "  for (unsigned bz = 0; bz < g[2]; bz++) for (unsigned by = 0; by < g[1]; by++)\n"
            "  for (unsigned bx = 0; bx < g[0]; bx++) for (unsigned tz = 0; tz < b[2]; tz++)\n"
            "  for (unsigned ty = 0; ty < b[1]; ty++) for (unsigned tx = 0; tx < b[0]; tx++) {\n"
            "    blockIdx = {bx, by, bz}; threadIdx = {tx, ty, tz};\n"
            "    %.*s(",
            name_len, name, name_len, name);
        /* Each parameter: its type is what precedes its name. */
        int i = 0;
        for (const char *p = params; p < close; i++) {
            const char *comma = memchr(p, ',', (size_t)(close - p));
            const char *end = comma ? comma : close;
            const char *last = end;
            while (last > p && isspace((unsigned char)last[-1])) last--;
            const char *id = last;
            while (id > p && (isalnum((unsigned char)id[-1]) || id[-1] == '_')) id--;
            if (id == last || id == p) return -1;
            put(out, "%s*(%.*s *)a[%d]", i ? ", " : "", (int)(id - p), p, i);
            p = comma ? comma + 1 : close;
        }
        put(out, ");\n  }\n}\n");
        kernels++;
        at = close;
    }
    return kernels;
}

static const char PRELUDE[] =
    "#include <math.h>\n"
    "struct mock_dim3 { unsigned x, y, z; };\n"
    "static thread_local mock_dim3 blockIdx, threadIdx, blockDim, gridDim;\n"
    "#define __global__\n"
    "#define __device__ static inline\n"
    "#define __forceinline__\n"
    "#line 1 \"kernel.cu\"\n";

nvrtcResult nvrtcCompileProgram(struct prog *p, int nopt, const char *const *opts) {
    if (!p) return INVALID_PROGRAM;
    int fmad = 1;
    for (int i = 0; i < nopt; i++)
        if (opts[i] && strcmp(opts[i], "--fmad=false") == 0) fmad = 0;
    struct buf code = {0}, launch = {0};
    if (launchers(p->src, &launch) <= 0) {
        free(launch.s);
        free(p->log);
        p->log = strdup("mock nvrtc: no `__global__ void name(params)` it can read");
        return COMPILATION;
    }
    put(&code, "%s%s\n%s", PRELUDE, p->src, launch.s);
    free(launch.s);
    /* MOCK_NVRTC_DIR (run.sh: its build folder), else /tmp. */
    const char *base = getenv("MOCK_NVRTC_DIR");
    char dir[512];
    snprintf(dir, sizeof dir, "%s/mock-nvrtc-XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(dir)) return OUT_OF_MEMORY;
    char src[600], so[600], log[600], cmd[2048];
    snprintf(src, sizeof src, "%s/k.cpp", dir);
    snprintf(so, sizeof so, "%s/k.so", dir);
    snprintf(log, sizeof log, "%s/log", dir);
    FILE *f = fopen(src, "w");
    if (!f) return OUT_OF_MEMORY;
    fputs(code.s, f);
    fclose(f);
    free(code.s);
    int fma = 0;
#if defined(__x86_64__)
    __builtin_cpu_init();
    fma = __builtin_cpu_supports("fma");
#endif
    snprintf(cmd, sizeof cmd, "c++ -x c++ -std=c++17 -O2 -fPIC -shared -Wall -Werror %s -o %s %s 2> %s",
             fmad ? (fma ? "-mfma -ffp-contract=fast" : "-ffp-contract=fast") : "-ffp-contract=off",
             so, src, log);
    int rc = system(cmd);
    /* The log, for nvrtcGetProgramLog. */
    free(p->log);
    p->log = NULL;
    f = fopen(log, "r");
    if (f) {
        struct buf l = {0};
        put(&l, "%s", "");
        char line[512];
        while (fgets(line, sizeof line, f)) put(&l, "%s", line);
        fclose(f);
        p->log = l.s;
    }
    unlink(src);
    unlink(log);
    if (rc != 0) {
        unlink(so);
        rmdir(dir);
        return COMPILATION;
    }
    /* The shared object stays until the module opens it (mock_cuda.c's
     * cuModuleLoadData removes it and its folder once it is loaded). */
    free(p->ptx);
    size_t n = strlen(so) + 16;
    p->ptx = malloc(n);
    if (!p->ptx) return OUT_OF_MEMORY;
    snprintf(p->ptx, n, "MOCKPTX %s", so);
    return SUCCESS;
}

nvrtcResult nvrtcGetPTXSize(struct prog *p, size_t *n) {
    if (!p || !p->ptx) return INVALID_PROGRAM;
    *n = strlen(p->ptx) + 1;
    return SUCCESS;
}

nvrtcResult nvrtcGetPTX(struct prog *p, char *out) {
    if (!p || !p->ptx) return INVALID_PROGRAM;
    memcpy(out, p->ptx, strlen(p->ptx) + 1);
    return SUCCESS;
}

nvrtcResult nvrtcGetProgramLogSize(struct prog *p, size_t *n) {
    if (!p) return INVALID_PROGRAM;
    *n = (p->log ? strlen(p->log) : 0) + 1;
    return SUCCESS;
}

nvrtcResult nvrtcGetProgramLog(struct prog *p, char *out) {
    if (!p) return INVALID_PROGRAM;
    const char *l = p->log ? p->log : "";
    memcpy(out, l, strlen(l) + 1);
    return SUCCESS;
}
