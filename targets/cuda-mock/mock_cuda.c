/* A host-memory stand-in for the CUDA driver API (libcuda.so), for CI on
 * machines without a GPU: "device memory" is host memory, copies are
 * memcpy, there is one in-order stream. It implements exactly the calls
 * hydra-edge's `cuda` feature makes through cudarc, and checks what a real
 * driver would refuse: a call without a current context, a free of an
 * unknown pointer, a copy or memset that leaves its allocation, a zero-size
 * allocation. Its companion mock_cublas.c checks cuBLAS's arguments and
 * every element a product reads or writes against these allocations
 * (mock_check_range, exported here).
 *
 * It proves the Rust side's plumbing (what goes up, which call, which
 * transposes and leading dimensions, what comes back, when memory is freed)
 * — not a GPU's arithmetic: targets/gpu-check.sh on a real GPU does that. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void *CUcontext;
typedef void *CUstream;
typedef void *CUevent;
typedef struct module *CUmodule;
typedef struct function *CUfunction;

enum {
    OK = 0,
    INVALID_VALUE = 1,
    NOT_INITIALIZED = 3,
    INVALID_DEVICE = 101,
    INVALID_IMAGE = 200,
    INVALID_CONTEXT = 201,
    NOT_FOUND = 500,
    LAUNCH_FAILED = 719,
    ILLEGAL_ADDRESS = 700,
};

int mock_injected_fault(void);

static int initialized; /* read and written with __atomic builtins */
static int contexts[8]; /* the primary contexts' identities */
static __thread CUcontext current;

static int device_count(void) {
    const char *n = getenv("MOCK_CUDA_DEVICES");
    int c = n ? atoi(n) : 1;
    return c < 0 ? 0 : c > 8 ? 8 : c;
}

/* ---- allocations ---------------------------------------------------- */

struct block {
    uintptr_t base;
    size_t size;
};
static struct block *blocks;
static size_t nblocks, cap;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* Whether [p, p + bytes) lies inside one live allocation. */
int mock_check_range(uintptr_t p, size_t bytes) {
    int ok = 0;
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < nblocks; i++) {
        if (p >= blocks[i].base && p - blocks[i].base <= blocks[i].size &&
            bytes <= blocks[i].size - (p - blocks[i].base)) {
            ok = 1;
            break;
        }
    }
    pthread_mutex_unlock(&lock);
    return ok;
}

/* Allocations still live (for a leak check from a test, if wanted). */
size_t mock_live_allocations(void) {
    pthread_mutex_lock(&lock);
    size_t n = nblocks;
    pthread_mutex_unlock(&lock);
    return n;
}

/* MOCK_CUDA_REPORT: how many allocations the process left live (a free
 * the driver refused, say without its context, leaves one). */
__attribute__((destructor)) static void report_live(void) {
    if (getenv("MOCK_CUDA_REPORT"))
        fprintf(stderr, "mock cuda: %zu allocation(s) live at exit\n", mock_live_allocations());
}

/* The context current on this thread (cuBLAS checks its handle's). */
void *mock_current_context(void) { return current; }

static CUresult fail(CUresult r, const char *what) {
    if (getenv("MOCK_CUDA_VERBOSE")) fprintf(stderr, "mock cuda: %s -> %d\n", what, r);
    return r;
}

CUresult cuInit(unsigned flags) {
    (void)flags;
    __atomic_store_n(&initialized, 1, __ATOMIC_SEQ_CST);
    return OK;
}

CUresult cuDeviceGetCount(int *count) {
    if (!__atomic_load_n(&initialized, __ATOMIC_SEQ_CST)) return fail(NOT_INITIALIZED, "cuDeviceGetCount");
    *count = device_count();
    return OK;
}

CUresult cuDeviceGet(CUdevice *dev, int ordinal) {
    if (!__atomic_load_n(&initialized, __ATOMIC_SEQ_CST)) return fail(NOT_INITIALIZED, "cuDeviceGet");
    if (ordinal < 0 || ordinal >= device_count()) return fail(INVALID_DEVICE, "cuDeviceGet");
    *dev = ordinal;
    return OK;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice dev) {
    if (dev < 0 || dev >= device_count() || len <= 0) return fail(INVALID_VALUE, "cuDeviceGetName");
    snprintf(name, (size_t)len, "mock GPU %d (host memory, tests only)", dev);
    return OK;
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev) {
    if (dev < 0 || dev >= device_count()) return fail(INVALID_DEVICE, "cuDeviceTotalMem_v2");
    *bytes = (size_t)16 << 30;
    return OK;
}

/* Free memory: the 16 GiB less what is allocated (live blocks). */
CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
    if (!current) return fail(INVALID_CONTEXT, "cuMemGetInfo_v2");
    size_t used = 0;
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < nblocks; i++) used += blocks[i].size;
    pthread_mutex_unlock(&lock);
    *total = (size_t)16 << 30;
    *free_bytes = used < *total ? *total - used : 0;
    return OK;
}

CUresult cuDeviceGetAttribute(int *v, int attrib, CUdevice dev) {
    if (dev < 0 || dev >= device_count()) return fail(INVALID_DEVICE, "cuDeviceGetAttribute");
    const char *cc = getenv("MOCK_CUDA_CC_MAJOR");
    switch (attrib) {
    case 75: *v = cc ? atoi(cc) : 9; break; /* compute capability major */
    case 76: *v = 0; break;                 /* minor */
    case 18: /* integrated (shares the host's memory, as a Jetson's): MOCK_CUDA_INTEGRATED */
        *v = getenv("MOCK_CUDA_INTEGRATED") ? atoi(getenv("MOCK_CUDA_INTEGRATED")) : 0;
        break;
    case 115: /* memory pools, as on current GPUs: cudarc then allocates and frees
                 with cuMemAllocAsync / cuMemFreeAsync (MOCK_CUDA_POOLS=0: the
                 synchronous cuMemAlloc_v2 / cuMemFree_v2) */
        *v = getenv("MOCK_CUDA_POOLS") ? atoi(getenv("MOCK_CUDA_POOLS")) : 1;
        break;
    default: *v = 0;
    }
    return OK;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice dev) {
    if (dev < 0 || dev >= device_count()) return fail(INVALID_DEVICE, "cuDevicePrimaryCtxRetain");
    *ctx = &contexts[dev];
    return OK;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
    return dev < 0 || dev >= device_count() ? fail(INVALID_DEVICE, "release") : OK;
}

CUresult cuCtxGetCurrent(CUcontext *ctx) {
    *ctx = current;
    return OK;
}

CUresult cuCtxSetCurrent(CUcontext ctx) {
    current = ctx;
    return OK;
}

CUresult cuCtxSynchronize(void) { return current ? OK : fail(INVALID_CONTEXT, "cuCtxSynchronize"); }

CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t bytes) {
    if (!current) return fail(INVALID_CONTEXT, "cuMemAlloc_v2");
    if (bytes == 0) return fail(INVALID_VALUE, "cuMemAlloc_v2 of 0 bytes");
    if (mock_injected_fault()) return fail(2, "cuMemAlloc_v2: injected fault");
    /* Poisoned: a product that reads memory nobody wrote gets NaN. */
    void *m = malloc(bytes);
    if (!m) return fail(2, "cuMemAlloc_v2: out of memory");
    memset(m, 0xff, bytes);
    pthread_mutex_lock(&lock);
    if (nblocks == cap) {
        size_t grown = cap ? cap * 2 : 64;
        struct block *b = realloc(blocks, grown * sizeof *blocks);
        if (!b) {
            pthread_mutex_unlock(&lock);
            free(m);
            return fail(2, "cuMemAlloc_v2: out of memory (table)");
        }
        blocks = b;
        cap = grown;
    }
    blocks[nblocks++] = (struct block){(uintptr_t)m, bytes};
    pthread_mutex_unlock(&lock);
    *p = (CUdeviceptr)(uintptr_t)m;
    return OK;
}

CUresult cuMemFree_v2(CUdeviceptr p) {
    if (!current) return fail(INVALID_CONTEXT, "cuMemFree_v2 without a current context");
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < nblocks; i++) {
        if (blocks[i].base == (uintptr_t)p) {
            free((void *)blocks[i].base);
            blocks[i] = blocks[--nblocks];
            pthread_mutex_unlock(&lock);
            return OK;
        }
    }
    pthread_mutex_unlock(&lock);
    return fail(INVALID_VALUE, "cuMemFree_v2 of an unknown pointer");
}

CUresult cuMemAllocAsync(CUdeviceptr *p, size_t bytes, CUstream s) {
    (void)s;
    return cuMemAlloc_v2(p, bytes);
}

CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    (void)s;
    return cuMemFree_v2(p);
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t bytes, CUstream s) {
    (void)s;
    if (!current) return fail(INVALID_CONTEXT, "cuMemcpyHtoDAsync_v2");
    if (!mock_check_range((uintptr_t)dst, bytes)) return fail(ILLEGAL_ADDRESS, "HtoD out of range");
    if (mock_injected_fault()) return fail(LAUNCH_FAILED, "HtoD: injected fault");
    memcpy((void *)(uintptr_t)dst, src, bytes);
    return OK;
}

CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t bytes, CUstream s) {
    (void)s;
    if (!current) return fail(INVALID_CONTEXT, "cuMemcpyDtoHAsync_v2");
    if (!mock_check_range((uintptr_t)src, bytes)) return fail(ILLEGAL_ADDRESS, "DtoH out of range");
    if (mock_injected_fault()) return fail(LAUNCH_FAILED, "DtoH: injected fault");
    memcpy(dst, (void *)(uintptr_t)src, bytes);
    return OK;
}

CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream s) {
    (void)s;
    if (!current) return fail(INVALID_CONTEXT, "cuMemcpyDtoDAsync_v2");
    if (!mock_check_range((uintptr_t)src, bytes)) return fail(ILLEGAL_ADDRESS, "DtoD source out of range");
    if (!mock_check_range((uintptr_t)dst, bytes)) return fail(ILLEGAL_ADDRESS, "DtoD destination out of range");
    if (mock_injected_fault()) return fail(LAUNCH_FAILED, "DtoD: injected fault");
    memmove((void *)(uintptr_t)dst, (void *)(uintptr_t)src, bytes);
    return OK;
}

CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) {
    (void)s;
    if (!current) return fail(INVALID_CONTEXT, "cuMemsetD8Async");
    if (!mock_check_range((uintptr_t)dst, n)) return fail(ILLEGAL_ADDRESS, "memset out of range");
    if (mock_injected_fault()) return fail(LAUNCH_FAILED, "memset: injected fault");
    memset((void *)(uintptr_t)dst, v, n);
    return OK;
}

CUresult cuStreamSynchronize(CUstream s) {
    (void)s;
    return current ? OK : fail(INVALID_CONTEXT, "cuStreamSynchronize");
}

static int event_token;
CUresult cuEventCreate(CUevent *e, unsigned flags) {
    (void)flags;
    if (!current) return fail(INVALID_CONTEXT, "cuEventCreate");
    *e = &event_token;
    return OK;
}
CUresult cuEventDestroy_v2(CUevent e) { return e ? OK : INVALID_VALUE; }
CUresult cuEventRecord(CUevent e, CUstream s) { (void)s; return e ? OK : INVALID_VALUE; }
CUresult cuEventSynchronize(CUevent e) { return e ? OK : INVALID_VALUE; }
CUresult cuEventQuery(CUevent e) { return e ? OK : INVALID_VALUE; }
CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned f) { (void)s; (void)f; return e ? OK : INVALID_VALUE; }

/* Fault injection: while the file named by MOCK_CUDA_FAULTS exists and holds
 * "G N", the N-th allocation, copy, memset, product or kernel launch since
 * it appeared with tag G fails (as on a lost GPU or a full one), once; a
 * new tag starts a new count. The tests write and remove the file while
 * they hold the GPU. */
static long armed_calls, armed_tag = -1;

int mock_injected_fault(void) {
    const char *path = getenv("MOCK_CUDA_FAULTS");
    FILE *f = path ? fopen(path, "r") : NULL;
    if (!f) {
        armed_tag = -1;
        return 0;
    }
    long tag = -1, nth = 0;
    if (fscanf(f, "%ld %ld", &tag, &nth) != 2) nth = 0;
    fclose(f);
    if (tag != armed_tag) {
        armed_tag = tag;
        armed_calls = 0;
    }
    return ++armed_calls == nth;
}

/* Modules are mock_nvrtc.c's shared objects ("MOCKPTX <path>"); a function
 * is the launcher generated for its kernel. */
struct module {
    void *lib;
};
struct function {
    void (*launch)(const unsigned *grid, const unsigned *block, void **args);
};

CUresult cuModuleLoadData(CUmodule *m, const void *image) {
    if (!current) return fail(INVALID_CONTEXT, "cuModuleLoadData");
    const char *s = image;
    if (!s || strncmp(s, "MOCKPTX ", 8) != 0) return fail(INVALID_IMAGE, "cuModuleLoadData: not a mock image");
    void *lib = dlopen(s + 8, RTLD_NOW | RTLD_LOCAL);
    if (!lib) return fail(INVALID_IMAGE, "cuModuleLoadData: dlopen");
    /* Loaded: the file and its folder (mock_nvrtc.c's) can go. */
    char dir[600];
    snprintf(dir, sizeof dir, "%s", s + 8);
    char *slash = strrchr(dir, '/');
    unlink(s + 8);
    if (slash) {
        *slash = 0;
        rmdir(dir);
    }
    *m = calloc(1, sizeof **m);
    if (!*m) return fail(2, "cuModuleLoadData: out of memory");
    (*m)->lib = lib;
    return OK;
}

CUresult cuModuleUnload(CUmodule m) {
    if (!m) return fail(INVALID_VALUE, "cuModuleUnload");
    dlclose(m->lib);
    free(m);
    return OK;
}

CUresult cuModuleGetFunction(CUfunction *f, CUmodule m, const char *name) {
    if (!current) return fail(INVALID_CONTEXT, "cuModuleGetFunction");
    if (!m || !name) return fail(INVALID_VALUE, "cuModuleGetFunction");
    char sym[256];
    snprintf(sym, sizeof sym, "%s__mock_launch", name);
    void *launch = dlsym(m->lib, sym);
    if (!launch) return fail(NOT_FOUND, "cuModuleGetFunction: no such kernel");
    *f = calloc(1, sizeof **f);
    if (!*f) return fail(2, "cuModuleGetFunction: out of memory");
    memcpy(&(*f)->launch, &launch, sizeof launch);
    return OK;
}

/* Runs every thread of the grid in turn, on this thread. */
CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned shmem, CUstream s, void **params,
                        void **extra) {
    (void)s;
    if (!current) return fail(INVALID_CONTEXT, "cuLaunchKernel");
    if (!f || !params || extra) return fail(INVALID_VALUE, "cuLaunchKernel: arguments");
    if (!gx || !gy || !gz || !bx || !by || !bz || (unsigned long long)bx * by * bz > 1024 || gy > 65535 || gz > 65535)
        return fail(INVALID_VALUE, "cuLaunchKernel: grid or block out of range");
    if (shmem) return fail(INVALID_VALUE, "cuLaunchKernel: the mock has no shared memory");
    if (mock_injected_fault()) return fail(LAUNCH_FAILED, "cuLaunchKernel: injected fault");
    const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
    f->launch(grid, block, params);
    return OK;
}

/* One string per code, kept for the process (cudarc keeps the pointer). */
CUresult cuGetErrorName(CUresult r, const char **s) {
    switch (r) {
    case OK: *s = "CUDA_SUCCESS"; break;
    case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE (mock)"; break;
    case 2: *s = "CUDA_ERROR_OUT_OF_MEMORY (mock)"; break;
    case NOT_INITIALIZED: *s = "CUDA_ERROR_NOT_INITIALIZED (mock)"; break;
    case INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE (mock)"; break;
    case INVALID_CONTEXT: *s = "CUDA_ERROR_INVALID_CONTEXT (mock)"; break;
    case ILLEGAL_ADDRESS: *s = "CUDA_ERROR_ILLEGAL_ADDRESS (mock)"; break;
    case INVALID_IMAGE: *s = "CUDA_ERROR_INVALID_IMAGE (mock)"; break;
    case NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND (mock)"; break;
    case LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED (mock)"; break;
    default: *s = "CUDA_ERROR_UNKNOWN (mock)";
    }
    return OK;
}
CUresult cuGetErrorString(CUresult r, const char **s) { return cuGetErrorName(r, s); }
