/* uint8 HWC image -> normalised float image, in one pass: the last step of the CPU train/val
 * pipelines (pipelines/torch_resize.py). torch does it in three passes whose first, the
 * HWC -> CHW transpose of a 224x224 image, cannot be vectorised (stride-3 reads): 0.11-0.15 ms;
 * this loop, vectorised by the compiler: 0.05-0.06 ms. The arithmetic is torch's (a float
 * multiply, then a float add: no FMA contraction, see setup.py), so the values are bit-identical.
 *
 * Built at install time (setup.py, optional): without it torch_resize uses torch's ops. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef MULTIVERSION
#define MULTIVERSION
#endif

/* the helpers must be compiled inside each clone, i.e. inlined: an out-of-line copy would be
 * built for the default target only */
#define ALWAYS_INLINE inline __attribute__((always_inline))

/* Rows are processed CHUNK pixels at a time: with a bounded count the compiler can prove that
 * 3 * x does not overflow under Python's -fwrapv and vectorises (unbounded: a scalar loop, 2x
 * slower), and a mirrored chunk fits a scratch row. */
#define CHUNK 256

/* n pixels of interleaved RGB -> three float planes */
static ALWAYS_INLINE void to_planes(const uint8_t *restrict src, int n, float *restrict r,
                                    float *restrict g, float *restrict b, const float *scale,
                                    const float *shift)
{
    const float s0 = scale[0], s1 = scale[1], s2 = scale[2];
    const float b0 = shift[0], b1 = shift[1], b2 = shift[2];
    for (int x = 0; x < n; x++) {
        r[x] = src[3 * x] * s0 + b0;
        g[x] = src[3 * x + 1] * s1 + b1;
        b[x] = src[3 * x + 2] * s2 + b2;
    }
}

/* 3n interleaved values -> floats, with constants repeated per value (scale3[i] = scale[i % 3]) */
static ALWAYS_INLINE void to_interleaved(const uint8_t *restrict src, int n3,
                                         float *restrict dst, const float *restrict scale3,
                                         const float *restrict shift3)
{
    for (int i = 0; i < n3; i++)
        dst[i] = src[i] * scale3[i] + shift3[i];
}

static ALWAYS_INLINE void reverse_floats(float *restrict dst, const float *restrict src, int n)
{
    for (int x = 0; x < n; x++)
        dst[x] = src[n - 1 - x];
}

static ALWAYS_INLINE void reverse_pixels(float *dst, const float *src, int n)
{
    for (int x = 0; x < n; x++)
        memcpy(dst + 3 * x, src + 3 * (n - 1 - x), 3 * sizeof(float));
}

/* dst: contiguous (3, h, w) */
MULTIVERSION
static void planar(const uint8_t *src, Py_ssize_t row_stride, int h, int w, float *dst,
                   const float *scale, const float *shift)
{
    const Py_ssize_t plane = (Py_ssize_t)h * w;
    for (int y = 0; y < h; y++) {
        const uint8_t *row = src + y * row_stride;
        float *r = dst + (Py_ssize_t)y * w, *g = r + plane, *b = g + plane;
        for (int x0 = 0; x0 < w; x0 += CHUNK) {
            int n = w - x0 < CHUNK ? w - x0 : CHUNK;
            to_planes(row + 3 * x0, n, r + x0, g + x0, b + x0, scale, shift);
        }
    }
}

MULTIVERSION
static void planar_mirrored(const uint8_t *src, Py_ssize_t row_stride, int h, int w, float *dst,
                            const float *scale, const float *shift)
{
    const Py_ssize_t plane = (Py_ssize_t)h * w;
    float scratch[3][CHUNK] __attribute__((aligned(64)));
    for (int y = 0; y < h; y++) {
        const uint8_t *row = src + y * row_stride;
        float *r = dst + (Py_ssize_t)y * w, *g = r + plane, *b = g + plane;
        for (int x0 = 0; x0 < w; x0 += CHUNK) { /* source [x0, x0 + n) -> [w - x0 - n, w - x0) */
            int n = w - x0 < CHUNK ? w - x0 : CHUNK;
            to_planes(row + 3 * x0, n, scratch[0], scratch[1], scratch[2], scale, shift);
            reverse_floats(r + w - x0 - n, scratch[0], n);
            reverse_floats(g + w - x0 - n, scratch[1], n);
            reverse_floats(b + w - x0 - n, scratch[2], n);
        }
    }
}

/* dst: contiguous (h, w, 3), i.e. one image of a channels_last batch */
MULTIVERSION
static void interleaved(const uint8_t *src, Py_ssize_t row_stride, int h, int w, float *dst,
                        const float *scale, const float *shift, int flip)
{
    float scale3[3 * CHUNK], shift3[3 * CHUNK], scratch[3 * CHUNK];
    for (int i = 0; i < 3 * CHUNK; i++) {
        scale3[i] = scale[i % 3];
        shift3[i] = shift[i % 3];
    }
    for (int y = 0; y < h; y++) {
        const uint8_t *row = src + y * row_stride;
        float *out = dst + (Py_ssize_t)y * w * 3;
        for (int x0 = 0; x0 < w; x0 += CHUNK) {
            int n = w - x0 < CHUNK ? w - x0 : CHUNK;
            if (!flip) {
                to_interleaved(row + 3 * x0, 3 * n, out + 3 * x0, scale3, shift3);
            } else {
                to_interleaved(row + 3 * x0, 3 * n, scratch, scale3, shift3);
                reverse_pixels(out + 3 * (w - x0 - n), scratch, n);
            }
        }
    }
}

PyDoc_STRVAR(normalize_doc,
"normalize(src, row_stride, height, width, dst, planar, scale, shift, flip)\n\n"
"src: address of a uint8 RGB image, pixels 3 bytes apart, rows row_stride bytes apart;\n"
"dst: address of a contiguous float32 (3, height, width) image if planar, else (height, width, 3);\n"
"scale, shift: addresses of 3 float32 each: dst = src * scale[c] + shift[c], mirrored if flip.\n"
"The caller (pipelines/torch_resize.py) checks the tensors behind the addresses.");

static PyObject *normalize(PyObject *self, PyObject *args)
{
    Py_ssize_t src, row_stride, dst, scale, shift;
    int h, w, is_planar, flip;
    if (!PyArg_ParseTuple(args, "nniinpnnp", &src, &row_stride, &h, &w, &dst, &is_planar, &scale,
                          &shift, &flip))
        return NULL;
    if (h < 0 || w < 0 || row_stride < 3 * (Py_ssize_t)w) {
        PyErr_Format(PyExc_ValueError, "normalize: bad geometry (%d x %d, row stride %zd)", h, w,
                     row_stride);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (is_planar && !flip)
        planar((const uint8_t *)src, row_stride, h, w, (float *)dst, (const float *)scale,
               (const float *)shift);
    else if (is_planar)
        planar_mirrored((const uint8_t *)src, row_stride, h, w, (float *)dst,
                        (const float *)scale, (const float *)shift);
    else
        interleaved((const uint8_t *)src, row_stride, h, w, (float *)dst, (const float *)scale,
                    (const float *)shift, flip);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"normalize", normalize, METH_VARARGS, normalize_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_normalize",
    "One-pass uint8 HWC -> normalised float conversion (see pipelines/torch_resize.py).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__normalize(void)
{
    return PyModule_Create(&module);
}
