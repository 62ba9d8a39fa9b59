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
 * and the packing and checking of the two records every create, rename and
 * unlink writes, and every directory load and fsck reads by the thousand:
 *
 *   inode_encode(fsseed, ino, ..., root, xxh3)   Inode.encode      (layout.py)
 *   inode_decode(raw, ino, fsseed, verify, xxh3) Inode.decode      (layout.py)
 *   dirent_encode(fsseed, dir_ino, pos, ..., xxh3)
 *                                         encode_dirent            (layout.py)
 *   dirent_block(fsseed, dir_ino, base, raw, xxh3)
 *                                         parse_dirent_block       (layout.py)
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

/* ---- checksummed records: inodes and directory entries (layout.py) ----
 *
 * The checksum is the xxhash module's xxh3_64_intdigest, passed in by the
 * caller (`xxh3`), so that C and Python hash with the same code.  Seeds
 * are layout.seed_for: fsseed ^ tag << 56 ^ location * 0x9E3779B97F4A7C15,
 * modulo 2**64.  The encoders return None when a value does not fit its
 * field: the caller then runs its Python code, which raises struct.error
 * as it always has.  The decoders return None for a record that does not
 * verify: the caller's Python code then says what is wrong with it.
 */
#define TAG_INODE 0x05
#define TAG_DIRENT 0x07
#define GOLDEN 0x9E3779B97F4A7C15ULL
#define INODE_SIZE 256
#define INODE_CSUM_OFF 248
#define INLINE_OFF 120
#define INLINE_MAX 128
#define EXT_ROOT_OFF 128
#define I_INLINE 0x1
#define BLOCK 4096
#define DIRENT_HDR 16
#define DIRENT_CSUM_OFF 12

static uint64_t seed_for(uint64_t fsseed, uint64_t tag, uint64_t location)
{
    return fsseed ^ (tag << 56) ^ (location * GOLDEN);
}

static uint32_t get_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get_le64(const unsigned char *p)
{
    return (uint64_t)get_le32(p) | (uint64_t)get_le32(p + 4) << 32;
}

/* xxh3(p[0:n], seed) through the Python callable; -1 with an exception set.
 * It hashes a bytes copy (n is at most 267 here): the callee may keep what
 * it is given -- a traceback of its exception does -- and must not be left
 * holding a view of memory that is freed or reused. */
static int hash_buf(PyObject *xxh3, const unsigned char *p, Py_ssize_t n, uint64_t seed,
                    uint64_t *out)
{
    PyObject *b = PyBytes_FromStringAndSize((const char *)p, n);
    if (b == NULL)
        return -1;
    PyObject *s = PyLong_FromUnsignedLongLong(seed);
    if (s == NULL) {
        Py_DECREF(b);
        return -1;
    }
    PyObject *argv[2] = {b, s};
    PyObject *h = PyObject_Vectorcall(xxh3, argv, 2, NULL);
    Py_DECREF(s);
    Py_DECREF(b);
    if (h == NULL)
        return -1;
    *out = PyLong_AsUnsignedLongLong(h);
    Py_DECREF(h);
    if (*out == (uint64_t)-1 && PyErr_Occurred())
        return -1;
    return 0;
}

/* An unsigned field of at most `max`; 0 when it does not fit (or is no int). */
static int get_u(PyObject *o, uint64_t max, uint64_t *v)
{
    if (!PyLong_Check(o))
        return 0;
    unsigned long long x = PyLong_AsUnsignedLongLong(o);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (x > max)
        return 0;
    *v = x;
    return 1;
}

static int get_s64(PyObject *o, int64_t *v)
{
    if (!PyLong_Check(o))
        return 0;
    long long x = PyLong_AsLongLong(o);
    if (x == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *v = x;
    return 1;
}

#define U32 0xFFFFFFFFULL
#define U16 0xFFFFULL
#define U64 0xFFFFFFFFFFFFFFFFULL

/* inode_encode(fsseed, ino, mode, uid, gid, flags, nlink, generation, size,
 *              blocks, atime, mtime, ctime, btime, rdev, parent, xattr,
 *              orphan_next, orphan_prev, depth, count, root, xxh3)
 * -> the 256-byte slot (Inode.encode), or None when a field does not fit. */
static PyObject *inode_encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 23) {
        PyErr_SetString(PyExc_TypeError, "inode_encode takes 23 arguments");
        return NULL;
    }
    uint64_t fsseed, ino, u[6], q[2], r[5], depth = 0, count = 0;
    int64_t t[4];
    if (!get_u(args[0], U64, &fsseed) || !get_u(args[1], U64, &ino))
        Py_RETURN_NONE;
    for (int i = 0; i < 6; i++) /* mode uid gid flags nlink generation */
        if (!get_u(args[2 + i], U32, &u[i]))
            Py_RETURN_NONE;
    for (int i = 0; i < 2; i++) /* size blocks */
        if (!get_u(args[8 + i], U64, &q[i]))
            Py_RETURN_NONE;
    for (int i = 0; i < 4; i++) /* atime mtime ctime btime */
        if (!get_s64(args[10 + i], &t[i]))
            Py_RETURN_NONE;
    for (int i = 0; i < 5; i++) /* rdev parent xattr orphan_next orphan_prev */
        if (!get_u(args[14 + i], U64, &r[i]))
            Py_RETURN_NONE;
    int inline_ = (u[3] & I_INLINE) != 0;
    if (!inline_ && (!get_u(args[19], U16, &depth) || !get_u(args[20], U16, &count)))
        Py_RETURN_NONE;
    Py_buffer root;
    if (PyObject_GetBuffer(args[21], &root, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, INODE_SIZE);
    if (out == NULL) {
        PyBuffer_Release(&root);
        return NULL;
    }
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    memset(p, 0, INODE_SIZE);
    for (int i = 0; i < 6; i++)
        put_le32(p + 4 * i, (uint32_t)u[i]);
    put_le64(p + 24, q[0]);
    put_le64(p + 32, q[1]);
    for (int i = 0; i < 4; i++)
        put_le64(p + 40 + 8 * i, (uint64_t)t[i]);
    for (int i = 0; i < 5; i++)
        put_le64(p + 72 + 8 * i, r[i]);
    /* 112: reserved, zero */
    Py_ssize_t n = root.len < INLINE_MAX ? root.len : INLINE_MAX;
    if (inline_) {
        memcpy(p + INLINE_OFF, root.buf, n);
    } else {
        put_le16(p + INLINE_OFF, (uint16_t)depth);
        put_le16(p + INLINE_OFF + 2, (uint16_t)count);
        /* 124: pad; the root's first 8 bytes are the header's space */
        if (n > EXT_ROOT_OFF - INLINE_OFF)
            memcpy(p + EXT_ROOT_OFF, (const char *)root.buf + (EXT_ROOT_OFF - INLINE_OFF),
                   n - (EXT_ROOT_OFF - INLINE_OFF));
    }
    PyBuffer_Release(&root);
    uint64_t c;
    if (hash_buf(args[22], p, INODE_CSUM_OFF, seed_for(fsseed, TAG_INODE, ino), &c) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    put_le64(p + INODE_CSUM_OFF, c);
    return out;
}

/* inode_decode(raw, ino, fsseed, verify, xxh3) -> the 17 head fields
 * (mode .. orphan_prev), depth, count and root (bytes 120..247) as one tuple,
 * or None when `verify` and the checksum does not match (an all-zero slot
 * verifies).  `raw` holds at least the 256 bytes of the slot. */
static PyObject *inode_decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "inode_decode(raw, ino, fsseed, verify, xxh3)");
        return NULL;
    }
    uint64_t ino, fsseed;
    if (!get_u(args[1], U64, &ino) || !get_u(args[2], U64, &fsseed)) {
        PyErr_SetString(PyExc_ValueError, "inode_decode: bad inode number or seed");
        return NULL;
    }
    int verify = PyObject_IsTrue(args[3]);
    if (verify < 0)
        return NULL;
    Py_buffer v;
    if (PyObject_GetBuffer(args[0], &v, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *ret = NULL;
    if (v.len < INODE_SIZE) {
        PyErr_SetString(PyExc_ValueError, "inode_decode: short buffer");
        goto out;
    }
    unsigned char p[INODE_SIZE];
    memcpy(p, v.buf, INODE_SIZE);
    if (verify) {
        int zero = 1;
        for (int i = 0; i < INODE_SIZE && zero; i++)
            zero = p[i] == 0;
        if (!zero) {
            uint64_t c;
            if (hash_buf(args[4], p, INODE_CSUM_OFF, seed_for(fsseed, TAG_INODE, ino), &c) < 0)
                goto out;
            if (c != get_le64(p + INODE_CSUM_OFF)) {
                ret = Py_None;
                Py_INCREF(ret);
                goto out;
            }
        }
    }
    ret = PyTuple_New(20);
    if (ret == NULL)
        goto out;
    PyObject *o;
    int k = 0;
#define SET(expr) do { o = (expr); if (o == NULL) goto fail; PyTuple_SET_ITEM(ret, k++, o); } while (0)
    for (int i = 0; i < 6; i++)
        SET(PyLong_FromUnsignedLong(get_le32(p + 4 * i)));
    SET(PyLong_FromUnsignedLongLong(get_le64(p + 24)));
    SET(PyLong_FromUnsignedLongLong(get_le64(p + 32)));
    for (int i = 0; i < 4; i++)
        SET(PyLong_FromLongLong((int64_t)get_le64(p + 40 + 8 * i)));
    for (int i = 0; i < 5; i++)
        SET(PyLong_FromUnsignedLongLong(get_le64(p + 72 + 8 * i)));
    SET(PyLong_FromUnsignedLong(p[INLINE_OFF] | p[INLINE_OFF + 1] << 8));
    SET(PyLong_FromUnsignedLong(p[INLINE_OFF + 2] | p[INLINE_OFF + 3] << 8));
    SET(PyBytes_FromStringAndSize((const char *)p + INLINE_OFF, INLINE_MAX));
#undef SET
    goto out;
fail:
    Py_CLEAR(ret);
out:
    PyBuffer_Release(&v);
    return ret;
}

/* The checksum of a directory record: xxh3 of its first 12 bytes and its
 * name, truncated to 32 bits (layout.dirent_csum). */
static int dirent_csum(PyObject *xxh3, uint64_t fsseed, uint64_t dir_ino, uint64_t pos,
                       const unsigned char *hdr12, const unsigned char *name, Py_ssize_t nl,
                       uint32_t *out)
{
    unsigned char tmp[DIRENT_CSUM_OFF + 255];
    memcpy(tmp, hdr12, DIRENT_CSUM_OFF);
    memcpy(tmp + DIRENT_CSUM_OFF, name, nl);
    uint64_t c;
    if (hash_buf(xxh3, tmp, DIRENT_CSUM_OFF + nl,
                 seed_for(fsseed, TAG_DIRENT, (dir_ino << 32) ^ pos), &c) < 0)
        return -1;
    *out = (uint32_t)c;
    return 0;
}

/* dirent_encode(fsseed, dir_ino, pos, ino, rec_len, ftype, name, xxh3)
 * -> header + name (layout.encode_dirent), or None when a field does not fit. */
static PyObject *dirent_encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "dirent_encode takes 8 arguments");
        return NULL;
    }
    uint64_t fsseed, dir_ino, pos, ino, rec_len, ftype;
    if (!get_u(args[0], U64, &fsseed) || !get_u(args[1], U32, &dir_ino)
        || !get_u(args[2], U32, &pos) || !get_u(args[3], U64, &ino)
        || !get_u(args[4], U16, &rec_len) || !get_u(args[5], 0xFF, &ftype))
        Py_RETURN_NONE;
    Py_buffer name;
    if (PyObject_GetBuffer(args[6], &name, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    if (name.len > 255) {
        PyBuffer_Release(&name);
        Py_RETURN_NONE;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, DIRENT_HDR + name.len);
    if (out == NULL) {
        PyBuffer_Release(&name);
        return NULL;
    }
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    put_le64(p, ino);
    put_le16(p + 8, (uint16_t)rec_len);
    p[10] = (unsigned char)name.len;
    p[11] = (unsigned char)ftype;
    memcpy(p + DIRENT_HDR, name.buf, name.len);
    uint32_t c;
    int rc = dirent_csum(args[7], fsseed, dir_ino, pos, p, p + DIRENT_HDR, name.len, &c);
    PyBuffer_Release(&name);
    if (rc < 0) {
        Py_DECREF(out);
        return NULL;
    }
    put_le32(p + DIRENT_CSUM_OFF, c);
    return out;
}

/* dirent_block(fsseed, dir_ino, base, raw, xxh3) -> [(off, ino, rec_len,
 * ftype, name)] of every record of a 4 KiB directory block at directory
 * offset `base` (layout.parse_dirent_block), or None when any record does not
 * verify or the records do not tile the block. */
static PyObject *dirent_block(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "dirent_block(fsseed, dir_ino, base, raw, xxh3)");
        return NULL;
    }
    uint64_t fsseed, dir_ino, base;
    if (!get_u(args[0], U64, &fsseed) || !get_u(args[1], U32, &dir_ino)
        || !get_u(args[2], U32, &base))
        Py_RETURN_NONE;
    Py_buffer v;
    if (PyObject_GetBuffer(args[3], &v, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *out = NULL;
    if (v.len < BLOCK) {
        PyErr_SetString(PyExc_ValueError, "dirent_block: short buffer");
        goto done;
    }
    const unsigned char *raw = v.buf;
    out = PyList_New(0);
    if (out == NULL)
        goto done;
    Py_ssize_t off = 0;
    while (off < BLOCK) {
        if (off + DIRENT_HDR > BLOCK)
            goto bad;
        const unsigned char *r = raw + off;
        uint64_t ino = get_le64(r);
        unsigned rec_len = r[8] | r[9] << 8, nl = r[10], ftype = r[11];
        if (rec_len < DIRENT_HDR || rec_len % 8 || off + rec_len > BLOCK
            || DIRENT_HDR + nl > rec_len)
            goto bad;
        uint32_t c;
        if (dirent_csum(args[4], fsseed, dir_ino, base + off, r, r + DIRENT_HDR, nl, &c) < 0)
            goto fail;
        if (c != get_le32(r + DIRENT_CSUM_OFF))
            goto bad;
        PyObject *t = Py_BuildValue("(nKIIy#)", off, (unsigned long long)ino, rec_len, ftype,
                                    (const char *)r + DIRENT_HDR, (Py_ssize_t)nl);
        if (t == NULL)
            goto fail;
        int rc = PyList_Append(out, t);
        Py_DECREF(t);
        if (rc < 0)
            goto fail;
        off += rec_len;
    }
    goto done;
bad:
    Py_DECREF(out);
    out = Py_None;
    Py_INCREF(out);
    goto done;
fail:
    Py_CLEAR(out);
done:
    PyBuffer_Release(&v);
    return out;
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
    {"inode_encode", (PyCFunction)(void (*)(void))inode_encode, METH_FASTCALL,
     "inode_encode(fsseed, ino, <19 fields>, root, xxh3) -> bytes | None: Inode.encode"},
    {"inode_decode", (PyCFunction)(void (*)(void))inode_decode, METH_FASTCALL,
     "inode_decode(raw, ino, fsseed, verify, xxh3) -> tuple | None: Inode.decode's fields"},
    {"dirent_encode", (PyCFunction)(void (*)(void))dirent_encode, METH_FASTCALL,
     "dirent_encode(fsseed, dir_ino, pos, ino, rec_len, ftype, name, xxh3) -> bytes | None"},
    {"dirent_block", (PyCFunction)(void (*)(void))dirent_block, METH_FASTCALL,
     "dirent_block(fsseed, dir_ino, base, raw, xxh3) -> [(off, ino, rec_len, ftype, name)] | None"},
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
                      || PyModule_AddIntConstant(m, "WAL_REC_CSUM_OFF", 24) < 0
                      /* and the inode and directory-record layouts (the same check) */
                      || PyModule_AddIntConstant(m, "INODE_SIZE", INODE_SIZE) < 0
                      || PyModule_AddIntConstant(m, "INODE_CSUM_OFF", INODE_CSUM_OFF) < 0
                      || PyModule_AddIntConstant(m, "INLINE_OFF", INLINE_OFF) < 0
                      || PyModule_AddIntConstant(m, "EXT_ROOT_OFF", EXT_ROOT_OFF) < 0
                      || PyModule_AddIntConstant(m, "I_INLINE", I_INLINE) < 0
                      || PyModule_AddIntConstant(m, "DIRENT_SIZE", DIRENT_HDR) < 0
                      || PyModule_AddIntConstant(m, "DIRENT_CSUM_OFF", DIRENT_CSUM_OFF) < 0
                      || PyModule_AddIntConstant(m, "TAG_INODE", TAG_INODE) < 0
                      || PyModule_AddIntConstant(m, "TAG_DIRENT", TAG_DIRENT) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
