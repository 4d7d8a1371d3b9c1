/*
 * hybridft_common._speedups: compiled inner loops of the data plane (issue 14).
 *
 * Why this exists: the comparator, the net-filter framing and the NBD codec spend most of their
 * time in per-frame / per-request Python (header unpacking, slicing, small tuples).  These
 * functions do exactly what the pure-Python loops they replace do -- same results, same error
 * texts, same state changes -- only without the interpreter in the loop.  The Python code stays
 * the reference: tests run both on the same inputs, and HYBRIDFT_PURE_PYTHON=1 selects it at run
 * time (see hybridft_common/fastpath.py, the only importer of this module).
 *
 * Every function is stateless: the callers keep their state in Python objects and pass it in and
 * out explicitly, so the Python and the C versions share one class and one set of attributes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static inline uint32_t be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static inline uint32_t be16(const unsigned char *p) { return ((uint32_t)p[0] << 8) | (uint32_t)p[1]; }

static inline void put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* The bytes buf[start:end] of a buffer argument: 0 with *view held (release it), or -1 with an
 * exception set.  Every decoder below reads its caller's receive buffer through this. */
static int get_span(PyObject *obj, Py_ssize_t start, Py_ssize_t end, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0)
        return -1;
    if (start < 0 || end < start || end > view->len) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "start/end outside the buffer");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------- */
/* QEMU net-filter framing (colo_compare.transport)                                            */
/* ------------------------------------------------------------------------------------------- */

#define MAX_VNET_HDR 64

/* decode_records(buf, start, end, vnet_hdr, max_record)
 *   -> (frames, headers, pos, nbytes, error)
 * The body of FrameDecoder._parse: every complete record in buf[start:end]; headers is [] without
 * vnet_hdr; pos is the first unconsumed byte; error is None or the FrameTooLarge message. */
static PyObject *decode_records(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "decode_records takes 5 arguments");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    Py_ssize_t end = PyLong_AsSsize_t(args[2]);
    int vnet = PyObject_IsTrue(args[3]);
    long long limit = PyLong_AsLongLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (get_span(args[0], start, end, &view) < 0)
        return NULL;
    const unsigned char *buf = (const unsigned char *)view.buf;
    PyObject *frames = PyList_New(0), *headers = PyList_New(0), *error = NULL;
    if (frames == NULL || headers == NULL)
        goto fail;
    Py_ssize_t pos = start;
    long long nbytes = 0;
    if (!vnet) {
        while (end - pos >= 4) {
            uint32_t length = be32(buf + pos);
            if ((long long)length > limit) {
                error = PyUnicode_FromFormat("record length %u exceeds QEMU's maximum %lld", length, limit);
                if (error == NULL)
                    goto fail;
                break;
            }
            Py_ssize_t stop = pos + 4 + (Py_ssize_t)length;
            if (stop > end)
                break;
            PyObject *f = PyBytes_FromStringAndSize((const char *)buf + pos + 4, length);
            if (f == NULL || PyList_Append(frames, f) < 0) {
                Py_XDECREF(f);
                goto fail;
            }
            Py_DECREF(f);
            nbytes += length;
            pos = stop;
        }
    } else {
        while (end - pos >= 8) {
            uint32_t length = be32(buf + pos), hdr_len = be32(buf + pos + 4);
            if ((long long)length > limit) {
                error = PyUnicode_FromFormat("record length %u exceeds QEMU's maximum %lld", length, limit);
                if (error == NULL)
                    goto fail;
                break;
            }
            if (hdr_len > length || hdr_len > MAX_VNET_HDR) {
                error = PyUnicode_FromFormat(
                    "vnet_hdr_len %u is impossible for a record of %u bytes "
                    "(is vnet_hdr_support set on one side only?)",
                    hdr_len, length);
                if (error == NULL)
                    goto fail;
                break;
            }
            Py_ssize_t stop = pos + 8 + (Py_ssize_t)length;
            if (stop > end)
                break;
            PyObject *h = PyBytes_FromStringAndSize((const char *)buf + pos + 8, hdr_len);
            if (h == NULL || PyList_Append(headers, h) < 0) {
                Py_XDECREF(h);
                goto fail;
            }
            Py_DECREF(h);
            PyObject *f = PyBytes_FromStringAndSize((const char *)buf + pos + 8 + hdr_len, length - hdr_len);
            if (f == NULL || PyList_Append(frames, f) < 0) {
                Py_XDECREF(f);
                goto fail;
            }
            Py_DECREF(f);
            nbytes += length;
            pos = stop;
        }
    }
    PyBuffer_Release(&view);
    if (error == NULL)
        error = Py_NewRef(Py_None);
    return Py_BuildValue("(NNnLN)", frames, headers, pos, nbytes, error);
fail:
    PyBuffer_Release(&view);
    Py_XDECREF(frames);
    Py_XDECREF(headers);
    Py_XDECREF(error);
    return NULL;
}

/* encode_records(frames, vnet_headers_or_None) -> bytes: the body of transport.encode_frames. */
static PyObject *encode_records(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "encode_records takes 2 arguments");
        return NULL;
    }
    PyObject *frames = PySequence_Fast(args[0], "frames must be a sequence");
    if (frames == NULL)
        return NULL;
    PyObject *headers = NULL;
    PyObject *result = NULL;
    Py_buffer *views = NULL;
    Py_ssize_t nviews = 0;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(frames);
    int vnet = args[1] != Py_None;
    if (vnet) {
        headers = PySequence_Fast(args[1], "vnet headers must be a sequence");
        if (headers == NULL)
            goto done;
        if (PySequence_Fast_GET_SIZE(headers) != n) {
            PyErr_SetString(PyExc_ValueError, "one vnet header per frame");
            goto done;
        }
    }
    Py_ssize_t per = vnet ? 2 : 1;
    views = PyMem_Calloc((size_t)(n * per) + 1, sizeof(Py_buffer));
    if (views == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        for (Py_ssize_t k = 0; k < per; k++) {
            PyObject *o = k == 0 ? PySequence_Fast_GET_ITEM(frames, i) : PySequence_Fast_GET_ITEM(headers, i);
            if (PyObject_GetBuffer(o, &views[nviews], PyBUF_SIMPLE) < 0)
                goto done;
            total += views[nviews].len + (k == 0 ? (vnet ? 8 : 4) : 0);
            nviews++;
        }
    }
    result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_buffer *f = &views[i * per];
        if (!vnet) {
            put32(out, (uint32_t)f->len);
            memcpy(out + 4, f->buf, (size_t)f->len);
            out += 4 + f->len;
        } else {
            Py_buffer *h = &views[i * per + 1];
            put32(out, (uint32_t)(h->len + f->len));
            put32(out + 4, (uint32_t)h->len);
            memcpy(out + 8, h->buf, (size_t)h->len);
            memcpy(out + 8 + h->len, f->buf, (size_t)f->len);
            out += 8 + h->len + f->len;
        }
    }
done:
    for (Py_ssize_t i = 0; i < nviews; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    Py_DECREF(frames);
    Py_XDECREF(headers);
    return result;
}

/* ------------------------------------------------------------------------------------------- */
/* The comparator's run loop (colo_compare.core)                                               */
/* ------------------------------------------------------------------------------------------- */

/* One IPv4 (IHL 5) / TCP frame continuing the open run: the exact test of the Python loop
 * (seq == rnxt, same key, data offset 5..15 without SYN/FIN/RST, IPv4 without options, TCP,
 * not a fragment, the IP total length inside the frame). */
typedef struct {
    uint32_t seq, ack, offflags;
    Py_ssize_t pstart, ip_end;
} run_hdr;

static inline int continues_run(const unsigned char *p, Py_ssize_t n, const unsigned char *rkey,
                                 long long rnxt, run_hdr *h)
{
    if (n < 54)
        return 0;
    uint32_t w1 = be32(p + 12), tot = be16(p + 16), w2 = be32(p + 20);
    h->seq = be32(p + 38);
    h->ack = be32(p + 42);
    h->offflags = be16(p + 46);
    h->ip_end = 14 + (Py_ssize_t)tot;
    h->pstart = 34 + (Py_ssize_t)((h->offflags >> 10) & 0x3C);
    return (long long)h->seq == rnxt && memcmp(p + 26, rkey, 12) == 0 && (h->offflags & 0x0007) == 0 &&
           (h->offflags >> 12) >= 5 && (w1 & 0xFFFFFF00u) == 0x08004500u && (w2 & 0x3FFF00FFu) == 6 &&
           h->pstart <= h->ip_end && h->ip_end <= n;
}

static int append_payload(PyObject *parts, const unsigned char *p, const run_hdr *h)
{
    PyObject *part = PyBytes_FromStringAndSize((const char *)p + h->pstart, h->ip_end - h->pstart);
    if (part == NULL)
        return -1;
    int rc = PyList_Append(parts, part);
    Py_DECREF(part);
    return rc;
}

static int get_run_key(PyObject *rkey, const unsigned char **key)
{
    if (!PyBytes_CheckExact(rkey) || PyBytes_GET_SIZE(rkey) != 12) {
        PyErr_SetString(PyExc_TypeError, "the run key must be 12 bytes");
        return -1;
    }
    *key = (const unsigned char *)PyBytes_AS_STRING(rkey);
    return 0;
}

/* One frame of the primary's run (already known to continue it): payload, tracker, held entry. */
static int scan_primary_one(PyObject *frame, const unsigned char *p, const run_hdr *h, PyObject *key,
                            PyObject *parts, PyObject *held_append, PyObject *now, PyObject *track,
                            PyObject *minus_one, long long *rnxt, long long *rend, long long *rack,
                            long long *cack)
{
    Py_ssize_t plen = h->ip_end - h->pstart;
    if (plen) {
        if (append_payload(parts, p, h) < 0)
            return -1;
        *rend += plen;
        *rnxt = (h->seq + (uint32_t)plen) & 0xFFFFFFFFu;
    }
    PyObject *ackobj;
    if (h->offflags & 0x10) {
        *rack = h->ack;
        if ((long long)h->ack != *cack) {
            PyObject *r = PyObject_CallFunction(track, "OkkO", key, (unsigned long)h->ack,
                                                (unsigned long)h->offflags, plen > 0 ? Py_True : Py_False);
            if (r == NULL)
                return -1;
            *cack = PyLong_AsLongLong(r);
            Py_DECREF(r);
            if (*cack == -1 && PyErr_Occurred())
                return -1;
        }
        ackobj = PyLong_FromUnsignedLong(h->ack);
        if (ackobj == NULL)
            return -1;
    } else {
        ackobj = Py_NewRef(minus_one);
    }
    PyObject *endobj = PyLong_FromLongLong(*rend);
    if (endobj == NULL) {
        Py_DECREF(ackobj);
        return -1;
    }
    PyObject *entry = PyTuple_New(4);
    if (entry == NULL) {
        Py_DECREF(ackobj);
        Py_DECREF(endobj);
        return -1;
    }
    PyTuple_SET_ITEM(entry, 0, endobj);
    PyTuple_SET_ITEM(entry, 1, ackobj);
    PyTuple_SET_ITEM(entry, 2, Py_NewRef(frame));
    PyTuple_SET_ITEM(entry, 3, Py_NewRef(now));
    PyObject *r = PyObject_CallOneArg(held_append, entry);
    Py_DECREF(entry);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* scan_primary_run(frames, i, rkey, rnxt, rend, rack, cack, parts, held_append, now, track)
 *   -> (i, rnxt, rend, rack, cack)
 * Consumes frames[i:] while they continue the open run: each payload goes to parts, each frame
 * to held_append((rend, ack|-1, frame, now)), and the client tracker is called where the ACK
 * number differs from the flow's settled one -- as the "continues the open run" branch of
 * Comparator._feed_colo_primary does.  Returns at the first frame that does not continue it. */
static PyObject *scan_primary_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "scan_primary_run takes 11 arguments");
        return NULL;
    }
    PyObject *frames = args[0], *parts = args[7], *held_append = args[8], *now = args[9], *track = args[10];
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    long long rnxt = PyLong_AsLongLong(args[3]), rend = PyLong_AsLongLong(args[4]);
    long long rack = PyLong_AsLongLong(args[5]), cack = PyLong_AsLongLong(args[6]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyList_CheckExact(frames) || !PyList_CheckExact(parts)) {
        PyErr_SetString(PyExc_TypeError, "frames and parts must be lists");
        return NULL;
    }
    const unsigned char *rkey;
    if (get_run_key(args[2], &rkey) < 0)
        return NULL;
    PyObject *minus_one = PyLong_FromLong(-1);
    if (minus_one == NULL)
        return NULL;
    for (; i < PyList_GET_SIZE(frames); i++) {
        PyObject *frame = PyList_GET_ITEM(frames, i);
        if (!PyBytes_CheckExact(frame)) {
            PyErr_SetString(PyExc_TypeError, "frames must be bytes (the core converts them)");
            goto fail;
        }
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(frame);
        run_hdr h;
        if (!continues_run(p, PyBytes_GET_SIZE(frame), rkey, rnxt, &h))
            break;
        /* a strong reference while the tracker and held_append (Python code) run */
        Py_INCREF(frame);
        int rc = scan_primary_one(frame, p, &h, args[2], parts, held_append, now, track, minus_one, &rnxt,
                                  &rend, &rack, &cack);
        Py_DECREF(frame);
        if (rc < 0)
            goto fail;
    }
    Py_DECREF(minus_one);
    return Py_BuildValue("(nLLLL)", i, rnxt, rend, rack, cack);
fail:
    Py_DECREF(minus_one);
    return NULL;
}

/* scan_secondary_run(frames, i, rkey, rnxt, rend, rack, parts) -> (i, rnxt, rend, rack)
 * The same for the secondary (no held frames, no client tracker). */
static PyObject *scan_secondary_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "scan_secondary_run takes 7 arguments");
        return NULL;
    }
    PyObject *frames = args[0], *parts = args[6];
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    long long rnxt = PyLong_AsLongLong(args[3]), rend = PyLong_AsLongLong(args[4]);
    long long rack = PyLong_AsLongLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyList_CheckExact(frames) || !PyList_CheckExact(parts)) {
        PyErr_SetString(PyExc_TypeError, "frames and parts must be lists");
        return NULL;
    }
    const unsigned char *rkey;
    if (get_run_key(args[2], &rkey) < 0)
        return NULL;
    for (; i < PyList_GET_SIZE(frames); i++) {
        PyObject *frame = PyList_GET_ITEM(frames, i);
        if (!PyBytes_CheckExact(frame)) {
            PyErr_SetString(PyExc_TypeError, "frames must be bytes (the core converts them)");
            return NULL;
        }
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(frame);
        run_hdr h;
        if (!continues_run(p, PyBytes_GET_SIZE(frame), rkey, rnxt, &h))
            break;
        Py_ssize_t plen = h.ip_end - h.pstart;
        if (plen) {
            if (append_payload(parts, p, &h) < 0)
                return NULL;
            rend += plen;
            rnxt = (h.seq + (uint32_t)plen) & 0xFFFFFFFFu;
        }
        if (h.offflags & 0x10)
            rack = h.ack;
    }
    return Py_BuildValue("(nLLL)", i, rnxt, rend, rack);
}

/* releasable(held, v, sack) -> n: how many of the held (end, ack|-1, frame, arrival) entries, from
 * the front, may leave: end <= v and the ACK number does not run ahead of the secondary's latest
 * (sack, -1 = none), in serial arithmetic.  The counting loop of Comparator._advance_tcp. */
static PyObject *releasable(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "releasable takes 3 arguments");
        return NULL;
    }
    long long v = PyLong_AsLongLong(args[1]), sack = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *it = PyObject_GetIter(args[0]);
    if (it == NULL)
        return NULL;
    Py_ssize_t n = 0;
    long long okack = -2;
    PyObject *item;
    while ((item = PyIter_Next(it)) != NULL) {
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) < 2) {
            Py_DECREF(item);
            Py_DECREF(it);
            PyErr_SetString(PyExc_TypeError, "held entries are tuples");
            return NULL;
        }
        long long end = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 0));
        long long ack = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 1));
        Py_DECREF(item);
        if (PyErr_Occurred()) {
            Py_DECREF(it);
            return NULL;
        }
        if (end > v)
            break;
        if (ack != okack) {
            if (ack >= 0 && (sack < 0 || (((uint64_t)(sack - ack)) & 0xFFFFFFFFu) >= 0x80000000u))
                break;
            okack = ack;
        }
        n++;
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromSsize_t(n);
}

/* ------------------------------------------------------------------------------------------- */
/* NBD transmission codec (disk_buffer.nbd)                                                    */
/* ------------------------------------------------------------------------------------------- */

#define NBD_REQUEST_MAGIC 0x25609513u
#define NBD_REQUEST_SIZE 28
#define NBD_CMD_WRITE 1

static inline uint64_t be64(const unsigned char *p) { return ((uint64_t)be32(p) << 32) | be32(p + 4); }

/* nbd_next_request(buf, start, end, max_payload, Request)
 *   -> (request | None, start, need, discard)    or raises ValueError(magic) on a bad magic
 * The body of RequestParser.next_request once a whole header is buffered: the caller stores
 * start/need/discard back (need and discard are -1 where next_request leaves them unchanged). */
static PyObject *nbd_next_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "nbd_next_request takes 5 arguments");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]), end = PyLong_AsSsize_t(args[2]);
    long long max_payload = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *rtype = args[4];
    if (!PyType_Check(rtype) || !PyType_IsSubtype((PyTypeObject *)rtype, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "Request must be a tuple type");
        return NULL;
    }
    Py_ssize_t avail = end - start;
    if (avail < NBD_REQUEST_SIZE) { /* the caller handles this case itself (it also resets end) */
        PyErr_SetString(PyExc_ValueError, "less than one request header buffered");
        return NULL;
    }
    Py_buffer view;
    if (get_span(args[0], start, end, &view) < 0)
        return NULL;
    const unsigned char *p = (const unsigned char *)view.buf + start;
    uint32_t magic = be32(p);
    if (magic != NBD_REQUEST_MAGIC) {
        PyBuffer_Release(&view);
        PyObject *m = PyLong_FromUnsignedLong(magic);
        if (m != NULL) {
            PyErr_SetObject(PyExc_ValueError, m);
            Py_DECREF(m);
        }
        return NULL;
    }
    uint32_t flags = be16(p + 4), command = be16(p + 6);
    uint64_t cookie = be64(p + 8), offset = be64(p + 16);
    uint32_t length = be32(p + 24);
    PyObject *payload = Py_None, *oversized = Py_False;
    Py_ssize_t new_start, need = -1, discard = -1;
    int complete = 1;
    if (command != NBD_CMD_WRITE) {
        new_start = start + NBD_REQUEST_SIZE;
        Py_INCREF(payload);
    } else if ((long long)length > max_payload) {
        Py_ssize_t take = (Py_ssize_t)length < avail - NBD_REQUEST_SIZE ? (Py_ssize_t)length
                                                                         : avail - NBD_REQUEST_SIZE;
        new_start = start + NBD_REQUEST_SIZE + take;
        discard = (Py_ssize_t)length - take;
        need = NBD_REQUEST_SIZE;
        oversized = Py_True;
        Py_INCREF(payload);
    } else {
        Py_ssize_t stop = start + NBD_REQUEST_SIZE + (Py_ssize_t)length;
        if (stop > end) {
            complete = 0;
            new_start = start;
            need = NBD_REQUEST_SIZE + (Py_ssize_t)length;
        } else {
            payload = PyBytes_FromStringAndSize((const char *)p + NBD_REQUEST_SIZE, length);
            if (payload == NULL) {
                PyBuffer_Release(&view);
                return NULL;
            }
            new_start = stop;
            need = NBD_REQUEST_SIZE;
        }
    }
    PyBuffer_Release(&view);
    if (!complete)
        return Py_BuildValue("(Onnn)", Py_None, new_start, need, discard);
    PyObject *req = PyTuple_New(7);
    if (req == NULL) {
        Py_DECREF(payload);
        return NULL;
    }
    /* a NamedTuple's instances are plain tuples whose type is the subclass */
    PyObject *items[5] = {PyLong_FromUnsignedLong(flags), PyLong_FromUnsignedLong(command),
                          PyLong_FromUnsignedLongLong(cookie), PyLong_FromUnsignedLongLong(offset),
                          PyLong_FromUnsignedLong(length)};
    for (int k = 0; k < 5; k++) {
        if (items[k] == NULL) {
            for (int j = 0; j < 5; j++)
                Py_XDECREF(items[j]);
            Py_DECREF(payload);
            Py_DECREF(req);
            return NULL;
        }
        PyTuple_SET_ITEM(req, k, items[k]);
    }
    PyTuple_SET_ITEM(req, 5, payload);
    PyTuple_SET_ITEM(req, 6, Py_NewRef(oversized));
    /* tuple.__new__(Request, req), as the Python parser does (a NamedTuple's own __new__ is slower) */
    PyObject *targs = PyTuple_Pack(1, req);
    Py_DECREF(req);
    if (targs == NULL)
        return NULL;
    PyObject *typed = PyTuple_Type.tp_new((PyTypeObject *)rtype, targs, NULL);
    Py_DECREF(targs);
    if (typed == NULL)
        return NULL;
    return Py_BuildValue("(Nnnn)", typed, new_start, need, discard);
}

/* nbd_take_writes(buf, start, end, max_payload, size, min_block, max_count, max_bytes, min_count)
 *   -> (offsets, payloads, replies, start) | None
 * RequestParser.take_writes_python: the run of plain writes (complete NBD_CMD_WRITE, no flags,
 * 0 < length <= max_payload, in range of an export of `size` bytes, aligned to min_block) at
 * buf[start:end], at most max_count of them and stopping once max_bytes of payload are taken;
 * replies is the OK simple reply of each, concatenated.  None when the head holds fewer than
 * min_count plain writes. */
static PyObject *nbd_take_writes(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "nbd_take_writes takes 9 arguments");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]), end = PyLong_AsSsize_t(args[2]);
    long long max_payload = PyLong_AsLongLong(args[3]);
    unsigned long long size = PyLong_AsUnsignedLongLong(args[4]);
    unsigned long long min_block = PyLong_AsUnsignedLongLong(args[5]);
    Py_ssize_t max_count = PyLong_AsSsize_t(args[6]);
    long long max_bytes = PyLong_AsLongLong(args[7]);
    Py_ssize_t min_count = PyLong_AsSsize_t(args[8]);
    if (PyErr_Occurred())
        return NULL;
    if (min_block == 0 || (min_block & (min_block - 1))) {
        PyErr_SetString(PyExc_ValueError, "min_block must be a power of two");
        return NULL;
    }
    Py_buffer view;
    if (get_span(args[0], start, end, &view) < 0)
        return NULL;
    const unsigned char *base = (const unsigned char *)view.buf;
    const unsigned long long mask = min_block - 1;
    /* first pass: how many, so the lists and the replies are allocated once */
    Py_ssize_t count = 0, pos = start;
    long long taken = 0;
    while (count < max_count && taken < max_bytes && end - pos >= NBD_REQUEST_SIZE) {
        const unsigned char *p = base + pos;
        uint64_t offset = be64(p + 16);
        uint32_t length = be32(p + 24);
        Py_ssize_t stop = pos + NBD_REQUEST_SIZE + (Py_ssize_t)length;
        if (be32(p) != NBD_REQUEST_MAGIC || be16(p + 6) != NBD_CMD_WRITE || be16(p + 4) != 0 ||
            length == 0 || (long long)length > max_payload || stop > end || offset > size ||
            length > size - offset || ((offset | length) & mask))
            break;
        count++;
        taken += length;
        pos = stop;
    }
    if (count == 0 || count < min_count) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    PyObject *offsets = PyList_New(count), *payloads = PyList_New(count);
    PyObject *replies = PyBytes_FromStringAndSize(NULL, count * 16);
    if (offsets == NULL || payloads == NULL || replies == NULL)
        goto fail;
    unsigned char *r = (unsigned char *)PyBytes_AS_STRING(replies);
    pos = start;
    for (Py_ssize_t i = 0; i < count; i++) {
        const unsigned char *p = base + pos;
        uint32_t length = be32(p + 24);
        PyObject *off = PyLong_FromUnsignedLongLong(be64(p + 16));
        if (off == NULL)
            goto fail;
        PyList_SET_ITEM(offsets, i, off);
        PyObject *payload = PyBytes_FromStringAndSize((const char *)p + NBD_REQUEST_SIZE, length);
        if (payload == NULL)
            goto fail;
        PyList_SET_ITEM(payloads, i, payload);
        put32(r, 0x67446698u); /* simple reply magic, error 0, the request's cookie as sent */
        put32(r + 4, 0);
        memcpy(r + 8, p + 8, 8);
        r += 16;
        pos += NBD_REQUEST_SIZE + (Py_ssize_t)length;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(NNNn)", offsets, payloads, replies, pos);
fail:
    PyBuffer_Release(&view);
    Py_XDECREF(offsets);
    Py_XDECREF(payloads);
    Py_XDECREF(replies);
    return NULL;
}

static PyMethodDef methods[] = {
    {"decode_records", (PyCFunction)(void (*)(void))decode_records, METH_FASTCALL,
     "decode_records(buf, start, end, vnet_hdr, max_record) -> (frames, headers, pos, nbytes, error)"},
    {"encode_records", (PyCFunction)(void (*)(void))encode_records, METH_FASTCALL,
     "encode_records(frames, vnet_headers_or_None) -> bytes"},
    {"scan_primary_run", (PyCFunction)(void (*)(void))scan_primary_run, METH_FASTCALL,
     "scan_primary_run(frames, i, rkey, rnxt, rend, rack, cack, parts, held_append, now, track)"},
    {"scan_secondary_run", (PyCFunction)(void (*)(void))scan_secondary_run, METH_FASTCALL,
     "scan_secondary_run(frames, i, rkey, rnxt, rend, rack, parts)"},
    {"releasable", (PyCFunction)(void (*)(void))releasable, METH_FASTCALL, "releasable(held, v, sack) -> n"},
    {"nbd_next_request", (PyCFunction)(void (*)(void))nbd_next_request, METH_FASTCALL,
     "nbd_next_request(buf, start, end, max_payload, Request) -> (request|None, start, need, discard)"},
    {"nbd_take_writes", (PyCFunction)(void (*)(void))nbd_take_writes, METH_FASTCALL,
     "nbd_take_writes(buf, start, end, max_payload, size, min_block, max_count, max_bytes, min_count)"
     " -> (offsets, payloads, replies, start) | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "hybridft_common._speedups",
    "Compiled inner loops of the data plane; see hybridft_common/fastpath.py.", -1, methods,
};

PyMODINIT_FUNC PyInit__speedups(void) { return PyModule_Create(&module); }
