/*
 * pmfs._accel: the hot loops of a metadata commit, in C.
 *
 * Every metadata operation ends in a WAL commit (pmfs/wal.py), and the
 * byte shuffling of a commit -- collecting the changed bytes of each cache
 * line, diffing the lines against the image, packing the log record, and
 * storing + flushing the entries in place -- is a per-byte, per-line loop
 * that costs CPython tens of microseconds per operation.  These functions
 * do exactly what the pure-Python code next to each caller does (that code
 * stays, is used when this module is not built, and tests/test_accel.py
 * checks that both give the same bytes):
 *
 *   tx_write(lines, image, off, data)     Transaction.write        (wal.py)
 *   diff_lines(lines, image)              Transaction.entries      (wal.py)
 *   wal_record(magic, txid, entries)      encode_wal_record        (layout.py)
 *   store_flush(image, addr, flush, entries, gap)
 *                                         LibpmemImage.store_all   (pmem.py)
 *   copy_nodrain(image, addr, memcpy, off, data, start, n)
 *                                         LibpmemImage.copy        (pmem.py)
 *
 * `lines` maps a cache-line number to a 64-byte bytearray (the line as the
 * transaction will leave it), `image` is the writable buffer of the mapped
 * image.  Only store_flush and copy_nodrain write to the image: they are
 * the libpmem backend's store primitives, called from pmfs/pmem.py only,
 * and call libpmem's pmem_flush / pmem_memcpy_nodrain through the function
 * pointer they are given.  Nothing here
 * fences: ordering stays in wal.py, where the crash explorer sees it.
 *
 * Integers in the record are little-endian, as struct's "<" formats.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define LINE 64
#define LINE_SHIFT 6
#define REC_HDR 32
#define ENT_HDR 16

static void put_le16(unsigned char *p, uint16_t v) { p[0] = v; p[1] = v >> 8; }
static void put_le32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void put_le64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* The 64-byte bytearray of `lines` for line number `ln`, created from the
 * image if absent (a borrowed reference), or NULL with an exception set. */
static PyObject *line_buf(PyObject *lines, long long ln, const char *img, int fill)
{
    PyObject *key = PyLong_FromLongLong(ln);
    if (key == NULL)
        return NULL;
    PyObject *buf = PyDict_GetItemWithError(lines, key);
    if (buf == NULL) {
        if (PyErr_Occurred()) {
            Py_DECREF(key);
            return NULL;
        }
        buf = PyByteArray_FromStringAndSize(fill ? img + (ln << LINE_SHIFT) : NULL, LINE);
        if (buf == NULL || PyDict_SetItem(lines, key, buf) < 0) {
            Py_XDECREF(buf);
            Py_DECREF(key);
            return NULL;
        }
        Py_DECREF(buf); /* the dict holds it */
    } else if (!PyByteArray_CheckExact(buf) || PyByteArray_GET_SIZE(buf) != LINE) {
        Py_DECREF(key);
        PyErr_SetString(PyExc_TypeError, "a transaction line is not a 64-byte bytearray");
        return NULL;
    }
    Py_DECREF(key);
    return buf;
}

static PyObject *tx_write(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "tx_write(lines, image, off, data)");
        return NULL;
    }
    PyObject *lines = args[0];
    if (!PyDict_CheckExact(lines)) {
        PyErr_SetString(PyExc_TypeError, "lines must be a dict");
        return NULL;
    }
    long long off = PyLong_AsLongLong(args[2]);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer img, data;
    if (PyObject_GetBuffer(args[1], &img, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[3], &data, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&img);
        return NULL;
    }
    PyObject *ret = NULL;
    long long n = data.len, end = off + n;
    if (n == 0) {
        ret = Py_None;
        goto out;
    }
    /* (whole lines: a partly written line is read from the image) */
    if (off < 0 || (((end - 1) >> LINE_SHIFT) + 1) << LINE_SHIFT > img.len) {
        PyErr_Format(PyExc_ValueError, "tx write [%lld, %lld) outside the image", off, end);
        goto out;
    }
    const unsigned char *src = data.buf;
    for (long long ln = off >> LINE_SHIFT; ln <= (end - 1) >> LINE_SHIFT; ln++) {
        long long base = ln << LINE_SHIFT;
        long long a = off > base ? off - base : 0;
        long long b = end < base + LINE ? end - base : LINE;
        PyObject *buf = line_buf(lines, ln, img.buf, !(a == 0 && b == LINE));
        if (buf == NULL)
            goto out;
        memmove(PyByteArray_AS_STRING(buf) + a, src, b - a);
        src += b - a;
    }
    ret = Py_None;
out:
    PyBuffer_Release(&data);
    PyBuffer_Release(&img);
    Py_XINCREF(ret);
    return ret;
}

/* Append (offset, bytes of run) to out. */
static int emit(PyObject *out, long long start, const char *run, Py_ssize_t n)
{
    PyObject *t = Py_BuildValue("(Ly#)", start, run, n);
    if (t == NULL)
        return -1;
    int r = PyList_Append(out, t);
    Py_DECREF(t);
    return r;
}

static PyObject *diff_lines(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyDict_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "diff_lines(lines: dict, image)");
        return NULL;
    }
    PyObject *lines = args[0];
    Py_buffer img;
    if (PyObject_GetBuffer(args[1], &img, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *out = NULL, *keys = PyDict_Keys(lines);
    char *run = NULL;
    if (keys == NULL || PyList_Sort(keys) < 0)
        goto fail;
    Py_ssize_t nk = PyList_GET_SIZE(keys);
    out = PyList_New(0);
    run = PyMem_Malloc(nk * LINE + 1);
    if (out == NULL || run == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    long long run_start = -1, prev = -2;
    Py_ssize_t run_len = 0;
    for (Py_ssize_t i = 0; i < nk; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        long long ln = PyLong_AsLongLong(key);
        if (ln == -1 && PyErr_Occurred())
            goto fail;
        PyObject *buf = PyDict_GetItemWithError(lines, key);
        if (buf == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_KeyError, "line vanished");
            goto fail;
        }
        if (!PyByteArray_CheckExact(buf) || PyByteArray_GET_SIZE(buf) != LINE) {
            PyErr_SetString(PyExc_TypeError, "a transaction line is not a 64-byte bytearray");
            goto fail;
        }
        long long base = ln << LINE_SHIFT;
        if (ln < 0 || base + LINE > img.len) {
            PyErr_Format(PyExc_ValueError, "line %lld outside the image", ln);
            goto fail;
        }
        const char *line = PyByteArray_AS_STRING(buf);
        if (memcmp(line, (const char *)img.buf + base, LINE) == 0)
            continue;
        if (ln != prev + 1) {
            if (run_len && emit(out, run_start, run, run_len) < 0)
                goto fail;
            run_start = base;
            run_len = 0;
        }
        memcpy(run + run_len, line, LINE);
        run_len += LINE;
        prev = ln;
    }
    if (run_len && emit(out, run_start, run, run_len) < 0)
        goto fail;
    PyMem_Free(run);
    Py_DECREF(keys);
    PyBuffer_Release(&img);
    return out;
fail:
    PyMem_Free(run);
    Py_XDECREF(keys);
    Py_XDECREF(out);
    PyBuffer_Release(&img);
    return NULL;
}

/* The data buffer of entries[i] = (offset, data); views released by caller. */
static int entry_at(PyObject *entries, Py_ssize_t i, long long *off, Py_buffer *view)
{
    PyObject *e = PySequence_Fast_GET_ITEM(entries, i);
    if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 2) {
        PyErr_SetString(PyExc_TypeError, "an entry is not an (offset, data) tuple");
        return -1;
    }
    *off = PyLong_AsLongLong(PyTuple_GET_ITEM(e, 0));
    if (*off == -1 && PyErr_Occurred())
        return -1;
    return PyObject_GetBuffer(PyTuple_GET_ITEM(e, 1), view, PyBUF_C_CONTIGUOUS);
}

static PyObject *wal_record(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "wal_record(magic, txid, entries)");
        return NULL;
    }
    unsigned long magic = PyLong_AsUnsignedLong(args[0]);
    if (magic == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long long txid = PyLong_AsUnsignedLongLong(args[1]);
    if (txid == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    PyObject *entries = PySequence_Fast(args[2], "entries must be a sequence");
    if (entries == NULL)
        return NULL;
    Py_ssize_t ne = PySequence_Fast_GET_SIZE(entries);
    PyObject *rec = NULL;
    long long size = REC_HDR;
    for (Py_ssize_t i = 0; i < ne; i++) {
        PyObject *e = PySequence_Fast_GET_ITEM(entries, i);
        if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 2) {
            PyErr_SetString(PyExc_TypeError, "an entry is not an (offset, data) tuple");
            goto out;
        }
        Py_ssize_t n = PyObject_Length(PyTuple_GET_ITEM(e, 1));
        if (n < 0)
            goto out;
        size += ENT_HDR + ((n + 7) & ~7LL);
    }
    long long total = (size + LINE - 1) & ~(long long)(LINE - 1);
    if (total > 0xFFFFFFFFLL || ne > 0xFFFFFFFFLL) {
        PyErr_SetString(PyExc_OverflowError, "WAL record too large");
        goto out;
    }
    rec = PyByteArray_FromStringAndSize(NULL, total);
    if (rec == NULL)
        goto out;
    unsigned char *p = (unsigned char *)PyByteArray_AS_STRING(rec);
    memset(p, 0, total);
    put_le32(p, (uint32_t)magic);
    put_le16(p + 4, 0); /* kind: transaction */
    put_le64(p + 8, txid);
    put_le32(p + 16, (uint32_t)total);
    put_le32(p + 20, (uint32_t)ne);
    /* p + 24: checksum, filled in by the caller over these bytes */
    long long pos = REC_HDR;
    for (Py_ssize_t i = 0; i < ne; i++) {
        long long off;
        Py_buffer v;
        if (entry_at(entries, i, &off, &v) < 0)
            goto fail;
        if (pos + ENT_HDR + v.len > total) { /* changed size since it was measured */
            PyBuffer_Release(&v);
            PyErr_SetString(PyExc_RuntimeError, "WAL entry changed size while encoding");
            goto fail;
        }
        put_le64(p + pos, (uint64_t)off);
        put_le32(p + pos + 8, (uint32_t)v.len);
        pos += ENT_HDR;
        memcpy(p + pos, v.buf, v.len);
        pos += (v.len + 7) & ~7LL;
        PyBuffer_Release(&v);
    }
    goto out;
fail:
    Py_CLEAR(rec);
out:
    Py_DECREF(entries);
    return rec;
}

typedef void *(*memcpy_fn)(void *dst, const void *src, size_t len);

/* The writable image buffer, checked against the address libpmem was given. */
static int image_at(PyObject *obj, PyObject *addr_obj, Py_buffer *img)
{
    unsigned long long addr = PyLong_AsUnsignedLongLong(addr_obj);
    if (addr == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (PyObject_GetBuffer(obj, img, PyBUF_WRITABLE) < 0)
        return -1;
    if ((uintptr_t)img->buf != (uintptr_t)addr) {
        PyBuffer_Release(img);
        PyErr_SetString(PyExc_ValueError, "addr is not the image buffer's address");
        return -1;
    }
    return 0;
}

typedef void (*flush_fn)(const void *addr, size_t len);

static PyObject *store_flush(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "store_flush(image, addr, flush, entries, gap)");
        return NULL;
    }
    unsigned long long fp = PyLong_AsUnsignedLongLong(args[2]);
    if (fp == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    long long gap = PyLong_AsLongLong(args[4]);
    if (gap == -1 && PyErr_Occurred())
        return NULL;
    if (fp == 0) {
        PyErr_SetString(PyExc_ValueError, "no flush function");
        return NULL;
    }
    flush_fn flush = (flush_fn)(uintptr_t)fp;
    Py_buffer img;
    if (image_at(args[0], args[1], &img) < 0)
        return NULL;
    PyObject *entries = PySequence_Fast(args[3], "entries must be a sequence");
    if (entries == NULL) {
        PyBuffer_Release(&img);
        return NULL;
    }
    Py_ssize_t ne = PySequence_Fast_GET_SIZE(entries);
    long long start = -1, end = -1;
    PyObject *ret = NULL;
    for (Py_ssize_t i = 0; i < ne; i++) {
        long long off;
        Py_buffer v;
        if (entry_at(entries, i, &off, &v) < 0)
            goto out;
        if (off < 0 || off + v.len > img.len) {
            PyErr_Format(PyExc_ValueError, "write [%lld, %lld) outside the image (%zd)",
                         off, off + (long long)v.len, img.len);
            PyBuffer_Release(&v);
            goto out;
        }
        memcpy((char *)img.buf + off, v.buf, v.len);
        if (end < 0 || off < end || off - end > gap) { /* not just after: flush apart */
            if (end >= 0)
                flush((char *)img.buf + start, end - start);
            start = off;
        }
        end = off + v.len;
        PyBuffer_Release(&v);
    }
    if (end >= 0)
        flush((char *)img.buf + start, end - start);
    ret = Py_None;
    Py_INCREF(ret);
out:
    Py_DECREF(entries);
    PyBuffer_Release(&img);
    return ret;
}

static PyObject *copy_nodrain(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "copy_nodrain(image, addr, memcpy, off, data, start, n)");
        return NULL;
    }
    unsigned long long fp = PyLong_AsUnsignedLongLong(args[2]);
    if (fp == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (fp == 0) {
        PyErr_SetString(PyExc_ValueError, "no memcpy function");
        return NULL;
    }
    long long off = PyLong_AsLongLong(args[3]);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    long long start = PyLong_AsLongLong(args[5]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    long long n = PyLong_AsLongLong(args[6]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer img, data;
    if (image_at(args[0], args[1], &img) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[4], &data, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&img);
        return NULL;
    }
    PyObject *ret = NULL;
    if (start < 0 || n < 0 || start + n > data.len) {
        PyErr_Format(PyExc_ValueError, "copy of [%lld, %lld) from %zd bytes",
                     start, start + n, data.len);
    } else if (off < 0 || off + n > img.len) {
        PyErr_Format(PyExc_ValueError, "copy [%lld, %lld) outside the image", off, off + n);
    } else {
        if (n)
            ((memcpy_fn)(uintptr_t)fp)((char *)img.buf + off, (const char *)data.buf + start,
                                       (size_t)n);
        ret = Py_None;
        Py_INCREF(ret);
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&img);
    return ret;
}

static PyMethodDef methods[] = {
    {"tx_write", (PyCFunction)(void (*)(void))tx_write, METH_FASTCALL,
     "tx_write(lines, image, off, data): set bytes [off, off+len) in the line map"},
    {"diff_lines", (PyCFunction)(void (*)(void))diff_lines, METH_FASTCALL,
     "diff_lines(lines, image) -> [(offset, bytes)]: changed lines, coalesced"},
    {"wal_record", (PyCFunction)(void (*)(void))wal_record, METH_FASTCALL,
     "wal_record(magic, txid, entries) -> bytearray: a record, checksum field zero"},
    {"store_flush", (PyCFunction)(void (*)(void))store_flush, METH_FASTCALL,
     "store_flush(image, addr, flush, entries, gap): store entries, flush near ranges once"},
    {"copy_nodrain", (PyCFunction)(void (*)(void))copy_nodrain, METH_FASTCALL,
     "copy_nodrain(image, addr, memcpy, off, data, start, n): libpmem's memcpy of any buffer"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pmfs._accel",
    "The hot loops of a pmfs metadata commit in C (see the source's header).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__accel(void)
{
    PyObject *m = PyModule_Create(&module);
    /* the record layout this file packs: layout.py uses wal_record only
     * when these agree with its WAL_REC, WAL_ENT and WAL_REC_CSUM_OFF */
    if (m != NULL && (PyModule_AddIntConstant(m, "WAL_REC_SIZE", REC_HDR) < 0
                      || PyModule_AddIntConstant(m, "WAL_ENT_SIZE", ENT_HDR) < 0
                      || PyModule_AddIntConstant(m, "WAL_REC_CSUM_OFF", 24) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
