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
 * out explicitly, or (colo_feed_runs, extents_put_many) the function reads and writes the very
 * attributes the Python code uses, so the Python and the C versions share one class and one set of
 * attributes.
 */
/* What hybridft_common/fastpath.py's INTERFACE checks: bump both whenever a function is added,
 * removed or changes its arguments or results (an extension built from older sources is then
 * refused, and the Python reference runs, instead of failing on a missing function). */
#define SPEEDUPS_INTERFACE 6

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

/* Every function below is METH_FASTCALL with a fixed argument count: refuse any other. */
#define REQUIRE_NARGS(name, count)                                                                  \
    do {                                                                                            \
        if (nargs != (count)) {                                                                     \
            PyErr_Format(PyExc_TypeError, "%s takes %d arguments (%zd given)", (name), (count), nargs); \
            return NULL;                                                                            \
        }                                                                                           \
    } while (0)

/* A tuple made of new references, which it takes over (NULL if any is NULL: the others are then
 * released).  Why not Py_BuildValue: it parses its format string on every call, about 700
 * instructions for a 4-tuple, and the results of the NBD and journal fast paths are built once per
 * request (callgrind, bench.disk_micro --qd 1). */
static PyObject *tuple_steal(Py_ssize_t n, PyObject *const *items)
{
    PyObject *tuple = NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        if (items[i] == NULL)
            goto fail;
    tuple = PyTuple_New(n);
    if (tuple == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(tuple, i, items[i]);
    return tuple;
fail:
    for (Py_ssize_t i = 0; i < n; i++)
        Py_XDECREF(items[i]);
    return NULL;
}
#define TUPLE_STEAL(...) tuple_steal(sizeof((PyObject *[]){__VA_ARGS__}) / sizeof(PyObject *), (PyObject *[]){__VA_ARGS__})

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
    REQUIRE_NARGS("decode_records", 5);
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
    return TUPLE_STEAL(frames, headers, PyLong_FromSsize_t(pos), PyLong_FromLongLong(nbytes), error);
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
    REQUIRE_NARGS("encode_records", 2);
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

/* The fields of an IPv4/TCP header the run loop uses. */
typedef struct {
    uint32_t seq, ack, offflags;
    Py_ssize_t pstart, ip_end;
} run_hdr;

/* The IPv4 (IHL 5) / TCP fast-path test of the Python loop: IPv4 without options, TCP, not a
 * fragment, data offset 5..15, the IP total length inside the frame. */
static inline int fast_tcp4(const unsigned char *p, Py_ssize_t n, run_hdr *h)
{
    if (n < 54)
        return 0;
    uint32_t w1 = be32(p + 12), tot = be16(p + 16), w2 = be32(p + 20);
    h->seq = be32(p + 38);
    h->ack = be32(p + 42);
    h->offflags = be16(p + 46);
    h->ip_end = 14 + (Py_ssize_t)tot;
    h->pstart = 34 + (Py_ssize_t)((h->offflags >> 10) & 0x3C);
    return (h->offflags >> 12) >= 5 && (w1 & 0xFFFFFF00u) == 0x08004500u && (w2 & 0x3FFF00FFu) == 6 &&
           h->pstart <= h->ip_end && h->ip_end <= n;
}

/* A frame continuing the open run: the fast path, the run's flow and next sequence number, no
 * SYN/FIN/RST. */
static inline int continues_run(const unsigned char *p, Py_ssize_t n, const unsigned char *rkey,
                                 long long rnxt, run_hdr *h)
{
    return fast_tcp4(p, n, h) && (long long)h->seq == rnxt && memcmp(p + 26, rkey, 12) == 0 &&
           (h->offflags & 0x0007) == 0;
}

/* A run's payloads, as (frame, offset, length) spans into the frames themselves: a payload that
 * is verified in place is never copied, and one that is stored is copied once, with the rest of
 * its run, into one chunk. */
typedef struct {
    PyObject *frame; /* a strong reference */
    Py_ssize_t start, len;
} span;

typedef struct {
    span *v;
    Py_ssize_t n, cap;
} span_list;

static int spans_add(span_list *l, PyObject *frame, Py_ssize_t start, Py_ssize_t len)
{
    if (l->n == l->cap) {
        Py_ssize_t cap = l->cap ? 2 * l->cap : 16;
        span *v = PyMem_Realloc(l->v, (size_t)cap * sizeof(span));
        if (v == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = (span){Py_NewRef(frame), start, len};
    return 0;
}

static void spans_clear(span_list *l)
{
    for (Py_ssize_t j = 0; j < l->n; j++)
        Py_DECREF(l->v[j].frame);
    l->n = 0;
}

static inline const char *span_data(const span *sp) { return PyBytes_AS_STRING(sp->frame) + sp->start; }

/* The run's bytes from offset `from` (relative to its start) to `size`, as one new bytes. */
static PyObject *spans_bytes(const span_list *l, long long from, long long size)
{
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(size - from));
    if (out == NULL)
        return NULL;
    char *dst = PyBytes_AS_STRING(out);
    long long pos = 0;
    for (Py_ssize_t j = 0; j < l->n; j++) {
        long long len = l->v[j].len, lo = from > pos ? from - pos : 0;
        if (lo < len) {
            memcpy(dst, span_data(&l->v[j]) + lo, (size_t)(len - lo));
            dst += len - lo;
        }
        pos += len;
    }
    return out;
}

/* The run's payloads as a list of bytes, one per segment (the per-segment rule's input). */
static PyObject *spans_parts(const span_list *l)
{
    PyObject *parts = PyList_New(l->n);
    if (parts == NULL)
        return NULL;
    for (Py_ssize_t j = 0; j < l->n; j++) {
        PyObject *part = PyBytes_FromStringAndSize(span_data(&l->v[j]), l->v[j].len);
        if (part == NULL) {
            Py_DECREF(parts);
            return NULL;
        }
        PyList_SET_ITEM(parts, j, part);
    }
    return parts;
}

/* ------------------------------------------------------------------------------------------- */
/* Attributes of the comparator's and the disk buffer's objects; the client tracker              */
/* ------------------------------------------------------------------------------------------- */

static PyObject *s_p, *s_s, *s_nxt, *s_end, *s_start, *s_cur, *s_off, *s_chunks, *s_ack, *s_v, *s_diverged,
    *s_held, *s_append, *s_fin, *s_rst, *s_released, *s_popleft, *s_clear;

/* Attributes of the Python objects the comparator and disk paths work on.
 *
 * Those objects are instances of classes with __slots__ (_Side, _TcpFlow, the extent map's
 * regions), and C read and wrote them through PyObject_GetAttr/SetAttr: a generic lookup of the
 * name through the type (dict probes, the descriptor call, argument checks) of about 150
 * instructions, several dozen times per frame -- a quarter of the comparator's instructions per
 * frame on short runs (bench.compare_micro bursts, callgrind).  attr_get/attr_set read and write
 * such a slot directly at its offset in the object, as the slot's own descriptor does.
 *
 * What makes the shortcut exact: a (type, name) is cached only when the type looks attributes up
 * the generic way (no __getattribute__/__getattr__/__setattr__ of its own) and the name resolves
 * on the type to a writable object slot (a member descriptor of T_OBJECT_EX, which a data
 * descriptor is and so takes precedence over any instance dict).  The entry holds the type's
 * version tag, which CPython changes whenever the type or a base is modified (an attribute set or
 * deleted on the class) and never gives to another type, so a stale entry or a new type at a
 * reused address never matches.  Anything else -- another type, an unset slot (AttributeError),
 * a method, a property -- goes the generic way.  The cache is only touched with the GIL held (the
 * code that releases it -- write_extents and the CRC loops -- touches no Python
 * object meanwhile). */
typedef struct {
    PyTypeObject *type; /* borrowed: compared, never dereferenced unless it is Py_TYPE(obj) */
    PyObject *name;     /* borrowed: the interned s_* names above live as long as the module */
    unsigned int version;
    Py_ssize_t offset; /* of the slot in the object, or 0: not a plain slot, go the generic way */
} slot_entry;

#define SLOT_CACHE_SIZE 256 /* a few classes times a few dozen names: collisions are rare */
_Static_assert(SLOT_CACHE_SIZE == 256, "slot_of indexes with the top 8 bits of a 64-bit hash");
static slot_entry slot_cache[SLOT_CACHE_SIZE];

/* Fill entry e for (tp, name): the slot's offset, or 0 (not a plain slot).  Out of line and cold, so
 * that the hit path below stays a few instructions with no registers to save (callgrind: 45
 * instructions per attr_get with this inlined, most of them the spills the miss path needed). */
__attribute__((noinline, cold)) static Py_ssize_t slot_fill(slot_entry *e, PyTypeObject *tp, PyObject *name)
{
    e->type = NULL; /* (re)filled below, or left empty */
    e->offset = 0;
    if (tp->tp_getattro != PyObject_GenericGetAttr || tp->tp_setattro != PyObject_GenericSetAttr)
        return 0;
    PyObject *d = _PyType_Lookup(tp, name); /* borrowed; assigns tp a version tag if it can */
    if (tp->tp_version_tag == 0)
        return 0;
    e->type = tp;
    e->name = name;
    e->version = tp->tp_version_tag;
    if (d != NULL && Py_IS_TYPE(d, &PyMemberDescr_Type)) {
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type == T_OBJECT_EX && !(m->flags & READONLY) && m->offset > 0)
            e->offset = m->offset;
    }
    return e->offset;
}

/* The slot of obj.name, or NULL when the generic lookup must be used. */
static inline PyObject **slot_of(PyObject *obj, PyObject *name)
{
    PyTypeObject *tp = Py_TYPE(obj);
    /* both pointers are aligned and close to others of their kind: mix them before taking bits */
    uint64_t h = ((uint64_t)(uintptr_t)tp * 0x9E3779B97F4A7C15u) ^ ((uint64_t)(uintptr_t)name * 0xC2B2AE3D27D4EB4Fu);
    slot_entry *e = &slot_cache[h >> 56]; /* SLOT_CACHE_SIZE == 256 */
    Py_ssize_t offset;
    if (e->type == tp && e->name == name && e->version == tp->tp_version_tag && e->version != 0)
        offset = e->offset;
    else
        offset = slot_fill(e, tp, name);
    return offset ? (PyObject **)((char *)obj + offset) : NULL;
}

/* PyObject_GetAttr(obj, name), directly from the slot when it is one (see above). */
static inline PyObject *attr_get(PyObject *obj, PyObject *name)
{
    PyObject **slot = slot_of(obj, name);
    if (slot != NULL && *slot != NULL)
        return Py_NewRef(*slot);
    return PyObject_GetAttr(obj, name); /* not a slot, or an unset one (its AttributeError) */
}

/* PyObject_SetAttr(obj, name, value) for a value that is not NULL: what the slot's descriptor
 * does (PyMember_SetOne, T_OBJECT_EX), without the lookup. */
static inline int attr_set(PyObject *obj, PyObject *name, PyObject *value)
{
    PyObject **slot = slot_of(obj, name);
    if (slot == NULL)
        return PyObject_SetAttr(obj, name, value);
    PyObject *old = *slot;
    *slot = Py_NewRef(value);
    Py_XDECREF(old);
    return 0;
}

/* Integer attributes. */

/* PyLong_AsLongLong, fast: CPython 3.11 converts an int of more than one 30-bit digit (any disk
 * offset past 1 GiB) through _PyLong_AsByteArray there, PyLong_AsLong by a loop over the digits;
 * with a 64-bit long they mean the same.  Inside the extent-map bisection this was 7 % of the disk
 * server's CPU. */
static inline long long long_value(PyObject *obj)
{
#if LONG_MAX == LLONG_MAX
    return PyLong_AsLong(obj);
#else
    return PyLong_AsLongLong(obj);
#endif
}

static int get_long_attr(PyObject *obj, PyObject *name, long long *out)
{
    PyObject *v = attr_get(obj, name);
    if (v == NULL)
        return -1;
    *out = long_value(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int set_long_attr(PyObject *obj, PyObject *name, long long value)
{
    PyObject *v = PyLong_FromLongLong(value);
    if (v == NULL)
        return -1;
    int rc = attr_set(obj, name, v);
    Py_DECREF(v);
    return rc;
}

/* obj.name += delta */
static int add_to_attr(PyObject *obj, PyObject *name, long long delta)
{
    long long v;
    if (delta == 0)
        return 0;
    if (get_long_attr(obj, name, &v) < 0)
        return -1;
    return set_long_attr(obj, name, v + delta);
}

/* The client tracker: colo_compare.core._ClientTracker.one, on the tracker's own attributes (its
 * `flows` dict of key -> [highest ACK, ACK at the last turn], and the counters acked_bytes,
 * advances, turns).  The primary's runs called the Python method at the first frame of every run
 * (where the settled ACK number is not yet known): a Python call per run, about a tenth of the
 * core's time on short runs.  Returns the flow's settled ACK number after the frame, -1 for none,
 * -2 with an exception set. */
#define CLIENT_MAX_FLOWS (1 << 16) /* core._MAX_CLIENT_FLOWS (a test checks they agree) */
static PyObject *s_flows, *s_acked_bytes, *s_advances, *s_turns;

static long long client_one(PyObject *tracker, PyObject *key, unsigned long ack, unsigned long flags, int payload)
{
    if (!(flags & 0x10)) /* no ACK */
        return -1;
    PyObject *flows = attr_get(tracker, s_flows);
    if (flows == NULL)
        return -2;
    if (!PyDict_CheckExact(flows)) {
        PyErr_SetString(PyExc_TypeError, "the client tracker's flows must be a dict");
        goto fail;
    }
    PyObject *st = PyDict_GetItemWithError(flows, key); /* borrowed */
    if (st == NULL && PyErr_Occurred())
        goto fail;
    if (st == NULL || (flags & 0x02)) { /* a new flow, or a SYN: a fresh baseline */
        if (PyDict_GET_SIZE(flows) >= CLIENT_MAX_FLOWS)
            PyDict_Clear(flows); /* bounded memory: at most one turn per flow is missed */
        PyObject *a = PyLong_FromUnsignedLong(ack), *fresh = a == NULL ? NULL : PyList_New(2);
        if (fresh == NULL) {
            Py_XDECREF(a);
            goto fail;
        }
        PyList_SET_ITEM(fresh, 0, Py_NewRef(a));
        PyList_SET_ITEM(fresh, 1, a);
        int rc = PyDict_SetItem(flows, key, fresh);
        Py_DECREF(fresh);
        Py_DECREF(flows);
        return rc < 0 ? -2 : (long long)ack;
    }
    if (!PyList_CheckExact(st) || PyList_GET_SIZE(st) != 2) {
        PyErr_SetString(PyExc_TypeError, "a client tracker entry must be a list of two ACK numbers");
        goto fail;
    }
    Py_INCREF(st); /* the dict may drop it below */
    long long hi = long_value(PyList_GET_ITEM(st, 0)), turn = long_value(PyList_GET_ITEM(st, 1));
    if ((hi == -1 || turn == -1) && PyErr_Occurred())
        goto fail_st;
    if ((long long)ack != hi) {
        unsigned long long d = ((unsigned long long)ack - (unsigned long long)hi) & 0xFFFFFFFFull;
        if (d < 0x80000000ull) {
            PyObject *a = PyLong_FromUnsignedLong(ack);
            if (a == NULL || add_to_attr(tracker, s_acked_bytes, (long long)d) < 0 ||
                add_to_attr(tracker, s_advances, 1) < 0) {
                Py_XDECREF(a);
                goto fail_st;
            }
            PyList_SetItem(st, 0, a); /* steals a */
            hi = (long long)ack;
        }
    }
    if (payload && turn != hi) {
        PyObject *a = PyLong_FromLongLong(hi);
        if (a == NULL || add_to_attr(tracker, s_turns, 1) < 0) {
            Py_XDECREF(a);
            goto fail_st;
        }
        PyList_SetItem(st, 1, a);
        turn = hi;
    }
    Py_DECREF(st);
    if (flags & (0x01 | 0x04)) { /* FIN or RST: the flow is over */
        int rc = PyDict_DelItem(flows, key);
        Py_DECREF(flows);
        return rc < 0 ? -2 : -1;
    }
    Py_DECREF(flows);
    return ((long long)ack == hi && hi == turn) ? (long long)ack : -1;
fail_st:
    Py_DECREF(st);
fail:
    Py_DECREF(flows);
    return -2;
}

/* bytes_total(frames) -> the bytes in a list of bytes objects, or -1 when frames is not a list or
 * holds anything else (colo_compare.core._bytes_total_python: the caller then converts). */
static PyObject *bytes_total(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    REQUIRE_NARGS("bytes_total", 1);
    PyObject *frames = args[0];
    if (!PyList_CheckExact(frames))
        return PyLong_FromLong(-1);
    Py_ssize_t total = 0;
    for (Py_ssize_t j = 0; j < PyList_GET_SIZE(frames); j++) {
        PyObject *f = PyList_GET_ITEM(frames, j);
        if (!PyBytes_CheckExact(f))
            return PyLong_FromLong(-1);
        total += PyBytes_GET_SIZE(f);
    }
    return PyLong_FromSsize_t(total);
}

/* client_track_one(tracker, key, ack, flags, payload) -> int: client_one for the tests, which run it
 * against _ClientTracker.one on the same frames. */
static PyObject *client_track_one(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    REQUIRE_NARGS("client_track_one", 5);
    unsigned long ack = PyLong_AsUnsignedLong(args[2]), flags = PyLong_AsUnsignedLong(args[3]);
    int payload = PyObject_IsTrue(args[4]);
    if (((ack == (unsigned long)-1 || flags == (unsigned long)-1) && PyErr_Occurred()) || payload < 0)
        return NULL;
    long long r = client_one(args[0], args[1], ack, flags, payload);
    return r == -2 ? NULL : PyLong_FromLongLong(r);
}

/* One frame of the primary's run (already known to continue it): payload, tracker, held entry. */
static int scan_primary_one(PyObject *frame, const run_hdr *h, PyObject *key, span_list *spans,
                            PyObject *held_append, PyObject *now, PyObject *track, PyObject *minus_one,
                            long long *rnxt, long long *rend, long long *rack, long long *cack)
{
    Py_ssize_t plen = h->ip_end - h->pstart;
    if (plen) {
        if (spans_add(spans, frame, h->pstart, plen) < 0)
            return -1;
        *rend += plen;
        *rnxt = (h->seq + (uint32_t)plen) & 0xFFFFFFFFu;
    }
    PyObject *ackobj;
    if (h->offflags & 0x10) {
        *rack = h->ack;
        if ((long long)h->ack != *cack) {
            *cack = client_one(track, key, (unsigned long)h->ack, (unsigned long)h->offflags, plen > 0);
            if (*cack == -2)
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

/* ------------------------------------------------------------------------------------------- */
/* Whole in-order runs: start, continue, store or verify (Comparator._feed_colo_*_compiled)      */
/* ------------------------------------------------------------------------------------------- */

static int call_method_one(PyObject *obj, PyObject *name, PyObject *arg)
{
    PyObject *r = PyObject_CallMethodOneArg(obj, name, arg);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* 1 if the first k bytes of the run equal cur[off:off + k] (str.startswith's answer, so False
 * where cur is too short), 0 if not, -1 with an exception. */
static int spans_match(const span_list *l, PyObject *cur, long long off, long long k)
{
    Py_buffer cb;
    if (PyObject_GetBuffer(cur, &cb, PyBUF_SIMPLE) < 0)
        return -1;
    int same = off >= 0 && off + k <= cb.len;
    const char *at = (const char *)cb.buf + (same ? off : 0);
    for (Py_ssize_t j = 0; same && k > 0 && j < l->n; j++) {
        long long take = l->v[j].len < k ? l->v[j].len : k;
        same = memcmp(at, span_data(&l->v[j]), (size_t)take) == 0;
        at += take;
        k -= take;
    }
    PyBuffer_Release(&cb);
    return same;
}

/* core._ensure(side, upto) where cur does not reach upto: cur becomes cur[off:] and all pending
 * chunks joined, off 0, chunks empty.  Chunks that are not all bytes go to the Python helper
 * (`ensure`).  0, or -1 with an exception. */
static int join_chunks(PyObject *side, PyObject *ensure, long long upto)
{
    PyObject *chunks = attr_get(side, s_chunks), *cur = NULL, *joined = NULL, *it = NULL, *c;
    long long off;
    int rc = -1;
    if (chunks == NULL || (cur = attr_get(side, s_cur)) == NULL || get_long_attr(side, s_off, &off) < 0)
        goto out;
    Py_ssize_t nchunks = PyObject_Length(chunks), total;
    if (nchunks < 0)
        goto out;
    if (!PyBytes_CheckExact(cur) || off < 0 || off > PyBytes_GET_SIZE(cur))
        goto python;
    total = PyBytes_GET_SIZE(cur) - (Py_ssize_t)off;
    if ((it = PyObject_GetIter(chunks)) == NULL)
        goto out;
    while ((c = PyIter_Next(it)) != NULL) {
        int ok = PyBytes_CheckExact(c);
        if (ok) {
            total += PyBytes_GET_SIZE(c);
            if (total == PyBytes_GET_SIZE(c) && nchunks == 1)
                joined = Py_NewRef(c); /* cur used up and one chunk: it becomes cur, uncopied */
        }
        Py_DECREF(c);
        if (!ok) {
            Py_CLEAR(joined);
            goto python;
        }
    }
    if (PyErr_Occurred())
        goto out;
    Py_CLEAR(it);
    if (joined == NULL) {
        if ((joined = PyBytes_FromStringAndSize(NULL, total)) == NULL)
            goto out;
        char *dst = PyBytes_AS_STRING(joined);
        Py_ssize_t head = PyBytes_GET_SIZE(cur) - (Py_ssize_t)off;
        memcpy(dst, PyBytes_AS_STRING(cur) + off, (size_t)head);
        dst += head;
        if ((it = PyObject_GetIter(chunks)) == NULL)
            goto out;
        while ((c = PyIter_Next(it)) != NULL) {
            memcpy(dst, PyBytes_AS_STRING(c), (size_t)PyBytes_GET_SIZE(c));
            dst += PyBytes_GET_SIZE(c);
            Py_DECREF(c);
        }
        if (PyErr_Occurred())
            goto out;
    }
    if (attr_set(side, s_cur, joined) < 0 || set_long_attr(side, s_off, 0) < 0)
        goto out;
    PyObject *r = PyObject_CallMethodNoArgs(chunks, s_clear);
    if (r == NULL)
        goto out;
    Py_DECREF(r);
    rc = 0;
    goto out;
python:
    {
        PyObject *u = PyLong_FromLongLong(upto), *r;
        if (u == NULL)
            goto out;
        r = PyObject_CallFunctionObjArgs(ensure, side, u, NULL);
        Py_DECREF(u);
        if (r != NULL) {
            Py_DECREF(r);
            rc = 0;
        }
    }
out:
    Py_XDECREF(it);
    Py_XDECREF(joined);
    Py_XDECREF(cur);
    Py_XDECREF(chunks);
    return rc;
}

/* Comparator._flush_primary_run / _flush_secondary_run: store, or (where the other side is ahead
 * and everything before is verified) compare in place, a run of in-order payloads covering stream
 * offsets [begin, end).  The secondary's stored-byte count changes by *sec_delta. */
static int flush_run(PyObject *flow, PyObject *side, int primary, int comparing, long long begin, long long end,
                     long long nxt, const span_list *spans, long long ack, PyObject *ensure, PyObject *segments,
                     long long *sec_delta)
{
    if (ack >= 0 && set_long_attr(side, s_ack, ack) < 0)
        return -1;
    if (end == begin)
        return 0;
    long long size = end - begin, oe;
    PyObject *other = attr_get(flow, primary ? s_s : s_p), *cur = NULL, *num = NULL;
    int rc = -1, verify = 0;
    if (other == NULL || get_long_attr(other, s_end, &oe) < 0)
        goto out;
    if (oe > begin && comparing) {
        PyObject *v = attr_get(flow, s_v);
        if (v == NULL)
            goto out;
        long long vv = v == Py_None ? begin - 1 : PyLong_AsLongLong(v);
        Py_DECREF(v);
        if (vv == -1 && PyErr_Occurred())
            goto out;
        if (vv == begin) {
            PyObject *d = attr_get(flow, s_diverged);
            if (d == NULL)
                goto out;
            verify = d == Py_None;
            Py_DECREF(d);
        }
    }
    if (!verify) {
        PyObject *chunks = attr_get(side, s_chunks);
        if (chunks == NULL)
            goto out;
        /* the run's payloads, copied once, as one chunk */
        PyObject *joined = spans_bytes(spans, 0, size);
        int arc = joined == NULL ? -1 : call_method_one(chunks, s_append, joined);
        Py_XDECREF(joined);
        Py_DECREF(chunks);
        if (arc < 0)
            goto out;
        if (!primary)
            *sec_delta += size;
    } else {
        long long k = oe - begin < size ? oe - begin : size, ostart, ooff;
        if (get_long_attr(other, s_start, &ostart) < 0 || get_long_attr(other, s_off, &ooff) < 0)
            goto out;
        if ((cur = attr_get(other, s_cur)) == NULL)
            goto out;
        Py_ssize_t curlen = PyObject_Length(cur);
        if (curlen < 0)
            goto out;
        if (ostart + curlen - ooff < begin + k) {
            Py_CLEAR(cur);
            if (join_chunks(other, ensure, begin + k) < 0 || (cur = attr_get(other, s_cur)) == NULL ||
                get_long_attr(other, s_off, &ooff) < 0)
                goto out;
        }
        int same = spans_match(spans, cur, ooff, k);
        if (same < 0)
            goto out;
        if (same) {
            if (set_long_attr(other, s_off, ooff + k) < 0 || (num = PyLong_FromLongLong(begin + k)) == NULL ||
                attr_set(other, s_start, num) < 0 || attr_set(side, s_start, num) < 0 ||
                attr_set(flow, s_v, num) < 0)
                goto out;
            if (primary)
                *sec_delta -= k; /* the secondary's stored bytes, now verified */
            else
                *sec_delta += size - k; /* what of this run stays stored */
            if (k < size) {
                PyObject *tail = spans_bytes(spans, k, size), *chunks;
                if (tail == NULL)
                    goto out;
                chunks = attr_get(side, s_chunks);
                int arc = chunks == NULL ? -1 : call_method_one(chunks, s_append, tail);
                Py_XDECREF(chunks);
                Py_DECREF(tail);
                if (arc < 0)
                    goto out;
            }
        } else {
            /* a difference in this run: the per-segment rule pinpoints it (Python, which also
             * counts the secondary bytes it stores) */
            PyObject *b = PyLong_FromLongLong(begin), *parts = spans_parts(spans), *r = NULL;
            if (b != NULL && parts != NULL)
                r = PyObject_CallFunctionObjArgs(segments, flow, b, parts, NULL);
            Py_XDECREF(b);
            Py_XDECREF(parts);
            if (r == NULL)
                goto out;
            Py_DECREF(r);
        }
    }
    if (set_long_attr(side, s_end, end) < 0 || set_long_attr(side, s_nxt, nxt) < 0)
        goto out;
    rc = 0;
out:
    Py_XDECREF(num);
    Py_XDECREF(cur);
    Py_XDECREF(other);
    return rc;
}

/* colo_feed_runs(frames, i, tcp, touched, primary, comparing, now, track, ensure, segments)
 *   -> (i, sec_delta)
 * From frames[i], every in-order run of IPv4/TCP frames of a known flow, whole: a frame whose flow
 * is in `tcp` and whose sequence number is the side's next (no SYN/FIN/RST) starts a run, the
 * frames that continue it join it (payloads; on the primary a held entry each and the client
 * tracker where the ACK number moves), and the run is then stored or verified as
 * Comparator._flush_*_run does; each run's flow goes into `touched`.  Returns at the first frame
 * that starts no run (another protocol, a new flow, out of order, SYN/FIN/RST): the Python loop
 * takes that one, then calls again.  sec_delta: the change to the core's secondary byte count.
 * track: on the primary the core's _ClientTracker (client_one runs its `one` on it), else None. */
static PyObject *colo_feed_runs(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    REQUIRE_NARGS("colo_feed_runs", 10);
    PyObject *frames = args[0], *tcp = args[2], *touched = args[3], *now = args[6], *track = args[7];
    PyObject *ensure = args[8], *segments = args[9];
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    int primary = PyObject_IsTrue(args[4]), comparing = PyObject_IsTrue(args[5]);
    if ((i == -1 || primary < 0 || comparing < 0) && PyErr_Occurred())
        return NULL;
    if (!PyList_CheckExact(frames) || !PyDict_CheckExact(tcp) || !PyDict_CheckExact(touched)) {
        PyErr_SetString(PyExc_TypeError, "frames must be a list, tcp and touched dicts");
        return NULL;
    }
    PyObject *minus_one = PyLong_FromLong(-1);
    if (minus_one == NULL)
        return NULL;
    long long sec_delta = 0;
    PyObject *key = NULL, *flow = NULL, *side = NULL, *held_append = NULL;
    span_list spans = {NULL, 0, 0};
    while (i >= 0 && i < PyList_GET_SIZE(frames)) {
        PyObject *frame = PyList_GET_ITEM(frames, i);
        if (!PyBytes_CheckExact(frame)) {
            PyErr_SetString(PyExc_TypeError, "frames must be bytes (the core converts them)");
            goto fail;
        }
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(frame);
        run_hdr h;
        if (!fast_tcp4(p, PyBytes_GET_SIZE(frame), &h) || (h.offflags & 7))
            break;
        if ((key = PyBytes_FromStringAndSize((const char *)p + 26, 12)) == NULL)
            goto fail;
        flow = PyDict_GetItemWithError(tcp, key);
        if (flow == NULL) {
            if (PyErr_Occurred())
                goto fail;
            break; /* a new flow: the Python loop creates it */
        }
        Py_INCREF(flow);
        long long begin, nxt;
        if ((side = attr_get(flow, primary ? s_p : s_s)) == NULL || get_long_attr(side, s_nxt, &nxt) < 0)
            goto fail;
        if ((long long)h.seq != nxt)
            break;
        if (PyDict_SetItem(touched, flow, Py_None) < 0 || get_long_attr(side, s_end, &begin) < 0)
            goto fail;
        if (primary) {
            PyObject *held = attr_get(flow, s_held);
            if (held == NULL)
                goto fail;
            held_append = PyObject_GetAttr(held, s_append);
            Py_DECREF(held);
            if (held_append == NULL)
                goto fail;
        }
        long long rnxt = nxt, rend = begin, rack = -1, cack = -1;
        const unsigned char *rkey = (const unsigned char *)PyBytes_AS_STRING(key);
        for (;;) {
            if (primary) {
                /* a strong reference while the tracker and held_append (Python code) run */
                Py_INCREF(frame);
                int rc = scan_primary_one(frame, &h, key, &spans, held_append, now, track, minus_one, &rnxt, &rend,
                                          &rack, &cack);
                Py_DECREF(frame);
                if (rc < 0)
                    goto fail;
            } else {
                Py_ssize_t plen = h.ip_end - h.pstart;
                if (plen) {
                    if (spans_add(&spans, frame, h.pstart, plen) < 0)
                        goto fail;
                    rend += plen;
                    rnxt = (h.seq + (uint32_t)plen) & 0xFFFFFFFFu;
                }
                if (h.offflags & 0x10)
                    rack = h.ack;
            }
            i++;
            if (i >= PyList_GET_SIZE(frames))
                break;
            frame = PyList_GET_ITEM(frames, i);
            if (!PyBytes_CheckExact(frame))
                break; /* refused at the top of the loop, after this run is stored */
            p = (const unsigned char *)PyBytes_AS_STRING(frame);
            if (!continues_run(p, PyBytes_GET_SIZE(frame), rkey, rnxt, &h))
                break;
        }
        if (flush_run(flow, side, primary, comparing, begin, rend, rnxt, &spans, rack, ensure, segments,
                      &sec_delta) < 0)
            goto fail;
        spans_clear(&spans);
        Py_CLEAR(key);
        Py_CLEAR(flow);
        Py_CLEAR(side);
        Py_CLEAR(held_append);
    }
    Py_XDECREF(key);
    Py_XDECREF(flow);
    Py_XDECREF(side);
    Py_DECREF(minus_one);
    PyMem_Free(spans.v);
    return TUPLE_STEAL(PyLong_FromSsize_t(i), PyLong_FromLongLong(sec_delta));
fail:
    Py_XDECREF(key);
    Py_XDECREF(flow);
    Py_XDECREF(side);
    Py_XDECREF(held_append);
    Py_DECREF(minus_one);
    spans_clear(&spans);
    PyMem_Free(spans.v);
    return NULL;
}

/* How many of the held (end, ack|-1, frame, arrival) entries, from the front, may leave: end <= v
 * and the ACK number does not run ahead of the secondary's latest (sack, -1 = none), in serial
 * arithmetic.  The counting loop of Comparator._advance_tcp.  0 with *count set, or -1. */
static int count_releasable(PyObject *held, long long v, long long sack, Py_ssize_t *count)
{
    PyObject *it = PyObject_GetIter(held);
    if (it == NULL)
        return -1;
    Py_ssize_t n = 0;
    long long okack = -2;
    PyObject *item;
    while ((item = PyIter_Next(it)) != NULL) {
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) < 3) {
            Py_DECREF(item);
            Py_DECREF(it);
            PyErr_SetString(PyExc_TypeError, "held entries are (end, ack, frame, arrival) tuples");
            return -1;
        }
        long long end = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 0));
        long long ack = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 1));
        Py_DECREF(item);
        if (PyErr_Occurred()) {
            Py_DECREF(it);
            return -1;
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
        return -1;
    *count = n;
    return 0;
}

/* releasable(held, v, sack) -> n: count_releasable for the Python loop. */
static PyObject *releasable(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    REQUIRE_NARGS("releasable", 3);
    long long v = PyLong_AsLongLong(args[1]), sack = PyLong_AsLongLong(args[2]);
    Py_ssize_t n;
    if (PyErr_Occurred() || count_releasable(args[0], v, sack, &n) < 0)
        return NULL;
    return PyLong_FromSsize_t(n);
}


/* What a side has at sequence-space offset v once data is verified up to v (core._event):
 * 1 data, 2 its FIN, 3 its RST, 0 nothing yet; -1 with an exception. */
static int side_event(PyObject *side, long long v)
{
    long long end, fin, rst;
    if (get_long_attr(side, s_end, &end) < 0)
        return -1;
    if (end > v)
        return 1;
    if (get_long_attr(side, s_fin, &fin) < 0 || get_long_attr(side, s_rst, &rst) < 0)
        return -1;
    if (fin == v && end == v)
        return 2;
    if (rst == v && end <= v)
        return 3;
    return 0;
}

/* One TCP flow's settle (Comparator._advance_tcp) where nothing is left to compare: 1 done (its
 * releasable held frames moved to out), 0 if the flow needs the Python path (bytes to compare, an
 * event on both sides, SYNs not both seen), -1 with an exception. */
static int settle_tcp_flow(PyObject *flow, PyObject *out)
{
    PyObject *vobj = attr_get(flow, s_v), *p = NULL, *s = NULL, *held = NULL;
    if (vobj == NULL)
        return -1;
    if (vobj == Py_None) {
        Py_DECREF(vobj);
        return 1;
    }
    long long v = PyLong_AsLongLong(vobj);
    Py_DECREF(vobj);
    if (v == -1 && PyErr_Occurred())
        return -1;
    int rc = -1;
    PyObject *diverged = attr_get(flow, s_diverged);
    if (diverged == NULL)
        return -1;
    int comparing = diverged == Py_None;
    Py_DECREF(diverged);
    if ((s = attr_get(flow, s_s)) == NULL)
        goto out;
    if (comparing) {
        long long pe, se;
        if (v < 0) {
            rc = 0;
            goto out;
        }
        if ((p = attr_get(flow, s_p)) == NULL || get_long_attr(p, s_end, &pe) < 0 ||
            get_long_attr(s, s_end, &se) < 0)
            goto out;
        if ((pe < se ? pe : se) > v) {
            rc = 0;
            goto out;
        }
        int pk = side_event(p, v), sk = pk > 0 ? side_event(s, v) : 0;
        if (pk < 0 || sk < 0)
            goto out;
        if (pk && sk) {
            rc = 0;
            goto out;
        }
    }
    if ((held = attr_get(flow, s_held)) == NULL)
        goto out;
    Py_ssize_t nheld = PyObject_Length(held), n;
    long long sack;
    if (nheld < 0)
        goto out;
    if (nheld == 0) {
        rc = 1;
        goto out;
    }
    if (get_long_attr(s, s_ack, &sack) < 0 || count_releasable(held, v, sack, &n) < 0)
        goto out;
    if (n == 0) {
        rc = 1;
        goto out;
    }
    if (n == nheld) {
        PyObject *it = PyObject_GetIter(held), *item;
        if (it == NULL)
            goto out;
        while ((item = PyIter_Next(it)) != NULL) {
            int arc = PyList_Append(out, PyTuple_GET_ITEM(item, 2));
            Py_DECREF(item);
            if (arc < 0) {
                Py_DECREF(it);
                goto out;
            }
        }
        Py_DECREF(it);
        if (PyErr_Occurred())
            goto out;
        PyObject *r = PyObject_CallMethodNoArgs(held, s_clear);
        if (r == NULL)
            goto out;
        Py_DECREF(r);
    } else {
        for (Py_ssize_t j = 0; j < n; j++) {
            PyObject *item = PyObject_CallMethodNoArgs(held, s_popleft);
            if (item == NULL)
                goto out;
            int arc = PyList_Append(out, PyTuple_GET_ITEM(item, 2));
            Py_DECREF(item);
            if (arc < 0)
                goto out;
        }
    }
    rc = add_to_attr(flow, s_released, n) < 0 ? -1 : 1;
out:
    Py_XDECREF(p);
    Py_XDECREF(s);
    Py_XDECREF(held);
    return rc;
}

/* colo_settle(flows, out, actions, tcp_flow_type, advance_tcp, advance_other) -> None
 * The loop of Comparator._settle: each flow of exactly tcp_flow_type whose streams hold nothing
 * left to compare is settled here (settle_tcp_flow); the others go to advance_tcp(flow, out,
 * actions) (the Python _advance_tcp) and every other flow to advance_other(flow, out, actions). */
static PyObject *colo_settle(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    REQUIRE_NARGS("colo_settle", 6);
    PyObject *flows = args[0], *out = args[1], *actions = args[2], *tcp_type = args[3];
    if (!PyList_CheckExact(flows) || !PyList_CheckExact(out) || !PyType_Check(tcp_type)) {
        PyErr_SetString(PyExc_TypeError, "colo_settle(list, list, actions, type, callable, callable)");
        return NULL;
    }
    for (Py_ssize_t j = 0; j < PyList_GET_SIZE(flows); j++) {
        PyObject *flow = PyList_GET_ITEM(flows, j), *fallback;
        Py_INCREF(flow);
        if (Py_IS_TYPE(flow, (PyTypeObject *)tcp_type)) {
            int rc = settle_tcp_flow(flow, out);
            if (rc < 0) {
                Py_DECREF(flow);
                return NULL;
            }
            fallback = rc ? NULL : args[4];
        } else {
            fallback = args[5];
        }
        if (fallback != NULL) {
            PyObject *r = PyObject_CallFunctionObjArgs(fallback, flow, out, actions, NULL);
            if (r == NULL) {
                Py_DECREF(flow);
                return NULL;
            }
            Py_DECREF(r);
        }
        Py_DECREF(flow);
    }
    Py_RETURN_NONE;
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
    REQUIRE_NARGS("nbd_next_request", 5);
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
        return TUPLE_STEAL(Py_NewRef(Py_None), PyLong_FromSsize_t(new_start), PyLong_FromSsize_t(need),
                           PyLong_FromSsize_t(discard));
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
    return TUPLE_STEAL(typed, PyLong_FromSsize_t(new_start), PyLong_FromSsize_t(need), PyLong_FromSsize_t(discard));
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
    REQUIRE_NARGS("nbd_take_writes", 9);
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
    return TUPLE_STEAL(offsets, payloads, replies, PyLong_FromSsize_t(pos));
fail:
    PyBuffer_Release(&view);
    Py_XDECREF(offsets);
    Py_XDECREF(payloads);
    Py_XDECREF(replies);
    return NULL;
}

/* ------------------------------------------------------------------------------------------- */
/* The disk buffer: CRC-32, journal record encoding, extent-map batches (disk_buffer)          */
/* ------------------------------------------------------------------------------------------- */

/* CRC-32 exactly as zlib.crc32 computes it (reflected polynomial 0xEDB88320), so the journal's
 * format does not change.  Why not zlib's own: the journal CRCs every byte the guest writes, and
 * zlib 1.2.13's table code runs at about 2 GB/s here and holds the GIL for buffers under 5 KiB --
 * 2.4 us per 4 KiB record on the journal thread, a sixth of the disk server's CPU at QD16.  With
 * PCLMULQDQ the same CRC folds 64 bytes per step (Intel's "Fast CRC Computation for Generic
 * Polynomials Using PCLMULQDQ"; the constants are x^n mod P for the fold distances, checked by
 * tests/test_disk_fastpath.py against zlib); without it, slicing-by-8 tables. */
static uint32_t crc_tables[8][256];
static int crc_use_clmul;

static void crc_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_tables[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = crc_tables[0][n];
        for (int t = 1; t < 8; t++) { /* table t: byte n followed by t zero bytes */
            c = crc_tables[0][c & 0xff] ^ (c >> 8);
            crc_tables[t][n] = c;
        }
    }
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    crc_use_clmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
#endif
}

/* s: the running CRC register (the complement of zlib's value) */
static uint32_t crc_tables_update(uint32_t s, const unsigned char *p, size_t n)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    while (n && ((uintptr_t)p & 7)) {
        s = crc_tables[0][(s ^ *p++) & 0xff] ^ (s >> 8);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= s;
        s = crc_tables[7][w & 0xff] ^ crc_tables[6][(w >> 8) & 0xff] ^ crc_tables[5][(w >> 16) & 0xff] ^
            crc_tables[4][(w >> 24) & 0xff] ^ crc_tables[3][(w >> 32) & 0xff] ^
            crc_tables[2][(w >> 40) & 0xff] ^ crc_tables[1][(w >> 48) & 0xff] ^ crc_tables[0][w >> 56];
        p += 8;
        n -= 8;
    }
#endif
    while (n--)
        s = crc_tables[0][(s ^ *p++) & 0xff] ^ (s >> 8);
    return s;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

/* x * x^distance mod P, folded onto the next 128 bits d: x.lo (the older half) times k.lo, x.hi
 * times k.hi */
__attribute__((target("pclmul,sse4.1"))) static inline __m128i crc_fold(__m128i x, __m128i k, __m128i d)
{
    __m128i lo = _mm_clmulepi64_si128(x, k, 0x00);
    __m128i hi = _mm_clmulepi64_si128(x, k, 0x11);
    return _mm_xor_si128(_mm_xor_si128(lo, hi), d);
}

/* n >= 64 and a multiple of 16 */
__attribute__((target("pclmul,sse4.1"))) static uint32_t crc_clmul_update(uint32_t s, const unsigned char *p,
                                                                         size_t n)
{
    /* reflected x^(4*128+32), x^(4*128-32); x^(128+32), x^(128-32); x^64 mod P, each shifted left
     * by one; P and floor(x^64 / P), reflected */
    const __m128i k1k2 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);
    const __m128i k3k4 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
    const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124LL);
    const __m128i poly = _mm_set_epi64x(0x1f7011641LL, 0x1db710641LL);
    const __m128i mask32 = _mm_set_epi32(0, 0, 0, -1);
    __m128i x0 = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p), _mm_cvtsi32_si128((int)s));
    __m128i x1 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 48));
    p += 64;
    n -= 64;
    while (n >= 64) { /* four lanes, each folded 512 bits forward */
        x0 = crc_fold(x0, k1k2, _mm_loadu_si128((const __m128i *)p));
        x1 = crc_fold(x1, k1k2, _mm_loadu_si128((const __m128i *)(p + 16)));
        x2 = crc_fold(x2, k1k2, _mm_loadu_si128((const __m128i *)(p + 32)));
        x3 = crc_fold(x3, k1k2, _mm_loadu_si128((const __m128i *)(p + 48)));
        p += 64;
        n -= 64;
    }
    x0 = crc_fold(x0, k3k4, x1); /* four lanes into one */
    x0 = crc_fold(x0, k3k4, x2);
    x0 = crc_fold(x0, k3k4, x3);
    while (n >= 16) {
        x0 = crc_fold(x0, k3k4, _mm_loadu_si128((const __m128i *)p));
        p += 16;
        n -= 16;
    }
    /* 128 -> 64 bits (and the 32 zero bits a CRC appends), 64 -> 32, then Barrett reduction */
    __m128i t = _mm_clmulepi64_si128(x0, k3k4, 0x10);
    x0 = _mm_xor_si128(_mm_srli_si128(x0, 8), t);
    t = _mm_and_si128(x0, mask32);
    x0 = _mm_srli_si128(x0, 4);
    x0 = _mm_xor_si128(x0, _mm_clmulepi64_si128(t, k5, 0x00));
    t = _mm_and_si128(x0, mask32);
    t = _mm_clmulepi64_si128(t, poly, 0x10);
    t = _mm_and_si128(t, mask32);
    t = _mm_clmulepi64_si128(t, poly, 0x00);
    x0 = _mm_xor_si128(x0, t);
    return (uint32_t)_mm_extract_epi32(x0, 1);
}
#endif

/* zlib.crc32(data, value) */
static uint32_t crc32_update(uint32_t value, const unsigned char *p, size_t n)
{
    uint32_t s = ~value;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (crc_use_clmul && n >= 64) {
        size_t bulk = n & ~(size_t)15;
        s = crc_clmul_update(s, p, bulk);
        p += bulk;
        n -= bulk;
    }
#endif
    return ~crc_tables_update(s, p, n);
}

#define CRC_NOGIL_AT (64 * 1024) /* below this, releasing the GIL costs more than it lends */

/* crc32(data, value=0) -> int: zlib.crc32 */
static PyObject *crc32(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "crc32(data, value=0)");
        return NULL;
    }
    uint32_t value = 0;
    if (nargs == 2) {
        unsigned long v = PyLong_AsUnsignedLongMask(args[1]);
        if (v == (unsigned long)-1 && PyErr_Occurred())
            return NULL;
        value = (uint32_t)v;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (view.len >= CRC_NOGIL_AT) {
        Py_BEGIN_ALLOW_THREADS value = crc32_update(value, view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
    } else {
        value = crc32_update(value, view.buf, (size_t)view.len);
    }
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(value);
}

static inline void put_le32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static inline void put_le64(unsigned char *p, uint64_t v)
{
    put_le32(p, (uint32_t)v);
    put_le32(p + 4, (uint32_t)(v >> 32));
}

#define JR_HEADER 52 /* journal_codec.HEADER: <4sBBHIQQQQQ */
#define JR_CRC 4

typedef struct {
    unsigned char *header; /* inside a glue buffer */
    unsigned char *crc;    /* inside a glue buffer */
    Py_buffer payload;     /* .obj NULL for a zero extent */
} jr_record;

/* journal_encode_records(generation, records, group_crcs) -> list of buffers
 * journal_codec.encode_records_python: the same bytes when joined, and the same group_crcs.  The
 * buffers differ: what lies between two payloads (a CRC and the next header) is one bytes object,
 * so a record costs one buffer besides its payload, not two.  The CRCs -- all the work -- run
 * without the GIL (the records list keeps every payload alive), so the event loop thread runs
 * while the journal thread encodes. */
static PyObject *journal_encode_records(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    REQUIRE_NARGS("journal_encode_records", 3);
    unsigned long generation = PyLong_AsUnsignedLong(args[0]);
    if (PyErr_Occurred())
        return NULL;
    if (generation > 0xffffffffUL) {
        PyErr_SetString(PyExc_OverflowError, "generation does not fit 32 bits");
        return NULL;
    }
    PyObject *records = PySequence_Fast(args[1], "records must be a sequence");
    if (records == NULL)
        return NULL;
    PyObject *group_crcs = args[2];
    if (!PyDict_Check(group_crcs)) {
        Py_DECREF(records);
        PyErr_SetString(PyExc_TypeError, "group_crcs must be a dict");
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(records);
    PyObject *parts = PyList_New(0);
    jr_record *rec = PyMem_Calloc(n ? (size_t)n : 1, sizeof(jr_record));
    uint64_t *seqs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(uint64_t));
    Py_ssize_t got = 0; /* records whose payload view is held */
    if (parts == NULL || rec == NULL || seqs == NULL) {
        if (parts != NULL)
            PyErr_NoMemory();
        goto fail;
    }
    /* pass 1 (GIL): the layout.  Glue runs from after one payload to the next payload. */
    Py_ssize_t glue_len = 0, i;
    size_t payload_bytes = 0;
    for (i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(records, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 6) {
            PyErr_SetString(PyExc_TypeError, "a pending record is a 6-tuple");
            goto fail;
        }
        PyObject *data = PyTuple_GET_ITEM(item, 4);
        glue_len += JR_HEADER;
        if (data != Py_None) {
            if (PyObject_GetBuffer(data, &rec[i].payload, PyBUF_SIMPLE) < 0)
                goto fail;
            got = i + 1;
            payload_bytes += (size_t)rec[i].payload.len;
            PyObject *glue = PyBytes_FromStringAndSize(NULL, glue_len);
            if (glue == NULL || PyList_Append(parts, glue) < 0) {
                Py_XDECREF(glue);
                goto fail;
            }
            Py_DECREF(glue);
            if (PyList_Append(parts, data) < 0)
                goto fail;
            glue_len = 0;
        }
        glue_len += JR_CRC;
    }
    if (n > 0) {
        PyObject *glue = PyBytes_FromStringAndSize(NULL, glue_len);
        if (glue == NULL || PyList_Append(parts, glue) < 0) {
            Py_XDECREF(glue);
            goto fail;
        }
        Py_DECREF(glue);
    }
    /* pass 2 (GIL): headers into the glue, pointers for the CRCs */
    Py_ssize_t part = 0, at = 0;
    unsigned char *g = n > 0 ? (unsigned char *)PyBytes_AS_STRING(PyList_GET_ITEM(parts, 0)) : NULL;
    for (i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(records, i);
        unsigned long long f[5];
        for (int k = 0; k < 4; k++) { /* position, group seq, epoch, image offset */
            f[k] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, k));
        }
        f[4] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 5)); /* length */
        if (PyErr_Occurred())
            goto fail;
        int zero = rec[i].payload.obj == NULL;
        unsigned char *h = g + at;
        memcpy(h, "HJR1", 4);
        h[4] = 1;           /* REC_EXTENT */
        h[5] = zero ? 1 : 0; /* FLAG_ZERO */
        h[6] = h[7] = 0;
        put_le32(h + 8, (uint32_t)generation);
        put_le64(h + 12, f[0]);
        put_le64(h + 20, f[1]);
        put_le64(h + 28, f[2]);
        put_le64(h + 36, f[3]);
        put_le64(h + 44, f[4]);
        rec[i].header = h;
        seqs[i] = f[1];
        at += JR_HEADER;
        if (!zero) { /* the payload, then the next glue buffer */
            part += 2;
            g = (unsigned char *)PyBytes_AS_STRING(PyList_GET_ITEM(parts, part));
            at = 0;
        }
        rec[i].crc = g + at;
        at += JR_CRC;
    }
    /* pass 3: the CRCs, without the GIL when there is enough to do */
    PyThreadState *saved = payload_bytes >= CRC_NOGIL_AT ? PyEval_SaveThread() : NULL;
    for (i = 0; i < n; i++) {
        uint32_t v = crc32_update(0, rec[i].header, JR_HEADER);
        if (rec[i].payload.obj != NULL)
            v = crc32_update(v, rec[i].payload.buf, (size_t)rec[i].payload.len);
        put_le32(rec[i].crc, v);
    }
    if (saved != NULL)
        PyEval_RestoreThread(saved);
    /* pass 4 (GIL): per group, the record count and the CRC over the records' CRCs */
    for (i = 0; i < n;) {
        Py_ssize_t j = i;
        PyObject *key = PyTuple_GET_ITEM(PySequence_Fast_GET_ITEM(records, i), 1);
        unsigned long long count = 0;
        uint32_t acc = 0;
        PyObject *old = PyDict_GetItemWithError(group_crcs, key);
        if (old == NULL && PyErr_Occurred())
            goto fail;
        if (old != NULL) {
            if (!PyTuple_Check(old) || PyTuple_GET_SIZE(old) != 2) {
                PyErr_SetString(PyExc_TypeError, "group_crcs values are (count, crc) tuples");
                goto fail;
            }
            count = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(old, 0));
            acc = (uint32_t)PyLong_AsUnsignedLongMask(PyTuple_GET_ITEM(old, 1));
            if (PyErr_Occurred())
                goto fail;
        }
        for (; j < n && seqs[j] == seqs[i]; j++) {
            count++;
            acc = crc32_update(acc, rec[j].crc, JR_CRC);
        }
        PyObject *value = Py_BuildValue("(Kk)", count, (unsigned long)acc);
        if (value == NULL || PyDict_SetItem(group_crcs, key, value) < 0) {
            Py_XDECREF(value);
            goto fail;
        }
        Py_DECREF(value);
        i = j;
    }
    for (i = 0; i < got; i++)
        if (rec[i].payload.obj != NULL)
            PyBuffer_Release(&rec[i].payload);
    PyMem_Free(rec);
    PyMem_Free(seqs);
    Py_DECREF(records);
    return parts;
fail:
    if (rec != NULL)
        for (i = 0; i < got; i++)
            if (rec[i].payload.obj != NULL)
                PyBuffer_Release(&rec[i].payload);
    PyMem_Free(rec);
    PyMem_Free(seqs);
    Py_XDECREF(parts);
    Py_DECREF(records);
    return NULL;
}

/* journal_queue_writes(pending, pos, seq, epoch, offsets, payloads, overhead) -> end position
 * Journal.append_many_python: one pending record (pos, seq, epoch, offset, payload, length) per
 * write, appended to the list `pending`, positions allocated back to back from `pos`. */
static PyObject *journal_queue_writes(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    REQUIRE_NARGS("journal_queue_writes", 7);
    PyObject *pending = args[0], *seq = args[2], *epoch = args[3], *offsets = args[4], *payloads = args[5];
    long long pos = PyLong_AsLongLong(args[1]), overhead = PyLong_AsLongLong(args[6]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyList_Check(pending) || !PyList_Check(offsets) || !PyList_Check(payloads)) {
        PyErr_SetString(PyExc_TypeError, "pending, offsets and payloads must be lists");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(offsets);
    if (PyList_GET_SIZE(payloads) != n) {
        PyErr_SetString(PyExc_ValueError, "as many offsets as payloads");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *data = PyList_GET_ITEM(payloads, i);
        Py_ssize_t length = PyObject_Length(data);
        if (length < 0)
            return NULL;
        PyObject *item = TUPLE_STEAL(PyLong_FromLongLong(pos), Py_NewRef(seq), Py_NewRef(epoch),
                                      Py_NewRef(PyList_GET_ITEM(offsets, i)), Py_NewRef(data),
                                      PyLong_FromSsize_t(length));
        if (item == NULL)
            return NULL;
        int rc = PyList_Append(pending, item);
        Py_DECREF(item);
        if (rc < 0)
            return NULL;
        pos += overhead + length;
    }
    return PyLong_FromLongLong(pos);
}

static PyObject *s_regions, *s_data_bytes, *s_starts, *s_ends, *s_datas;

/* One write inside one region: the two cases a VM's writes nearly always are (an exact rewrite of
 * an extent, or a range that overlaps nothing) in C; anything else through region.put.
 * 0 with *delta set to the change in the region's data_bytes, or -1 with an exception. */
static int region_put(PyObject *region, long long start, long long end, PyObject *data, long long overhead,
                      long shift, long long *delta)
{
    PyObject *starts = attr_get(region, s_starts);
    PyObject *ends = attr_get(region, s_ends);
    PyObject *datas = attr_get(region, s_datas);
    int rc = -1;
    if (starts == NULL || ends == NULL || datas == NULL)
        goto out;
    if (!PyList_CheckExact(starts) || !PyList_CheckExact(ends) || !PyList_CheckExact(datas)) {
        PyErr_SetString(PyExc_TypeError, "a region's starts, ends and datas are lists");
        goto out;
    }
    Py_ssize_t n = PyList_GET_SIZE(starts);
    if (PyList_GET_SIZE(ends) != n || PyList_GET_SIZE(datas) != n)
        goto slow; /* not a state put() leaves: let it say what is wrong */
    Py_ssize_t lo = 0, hi = n;
    if (n > 0) {
        /* First probe where the start would be if the region's extents were evenly spread: in a
         * region full of 4 KiB blocks (a guest's random writes fill them) that is the extent
         * itself, and each bisection step costs a cache miss on an int object. */
        long long base = (start >> shift) << shift;
        Py_ssize_t g = (Py_ssize_t)(((unsigned long long)(start - base) * (unsigned long long)n) >> shift);
        if (g >= n)
            g = n - 1;
        long long v = long_value(PyList_GET_ITEM(starts, g));
        if (v == -1 && PyErr_Occurred())
            goto out;
        if (start < v)
            hi = g;
        else
            lo = g + 1;
    }
    while (lo < hi) { /* bisect_right(starts, start) */
        Py_ssize_t mid = (lo + hi) / 2;
        long long v = long_value(PyList_GET_ITEM(starts, mid));
        if (v == -1 && PyErr_Occurred())
            goto out;
        if (start < v)
            hi = mid;
        else
            lo = mid + 1;
    }
    Py_ssize_t i = lo - 1;
    long long cost = overhead + (data != Py_None ? end - start : 0);
    if (i >= 0) {
        long long s_i = long_value(PyList_GET_ITEM(starts, i));
        long long e_i = long_value(PyList_GET_ITEM(ends, i));
        if (PyErr_Occurred())
            goto out;
        if (e_i > start) {
            if (s_i == start && e_i == end) { /* exact rewrite */
                PyObject *old = PyList_GET_ITEM(datas, i);
                long long old_cost = overhead + (old != Py_None ? end - start : 0);
                Py_INCREF(data);
                PyList_SetItem(datas, i, data); /* steals data, drops old */
                *delta = cost - old_cost;
                rc = add_to_attr(region, s_data_bytes, *delta);
                goto out;
            }
            goto slow;
        }
    }
    {
        Py_ssize_t first = i + 1;
        if (first < n) {
            long long s_next = long_value(PyList_GET_ITEM(starts, first));
            if (s_next == -1 && PyErr_Occurred())
                goto out;
            if (s_next < end)
                goto slow;
        }
        PyObject *ps = PyLong_FromLongLong(start), *pe = PyLong_FromLongLong(end);
        if (ps == NULL || pe == NULL || PyList_Insert(starts, first, ps) < 0) {
            Py_XDECREF(ps);
            Py_XDECREF(pe);
            goto out;
        }
        Py_DECREF(ps);
        if (PyList_Insert(ends, first, pe) < 0 || PyList_Insert(datas, first, data) < 0) {
            Py_DECREF(pe);
            goto out;
        }
        Py_DECREF(pe);
        *delta = cost;
        rc = add_to_attr(region, s_data_bytes, cost);
        goto out;
    }
slow : {
    long long before, after;
    if (get_long_attr(region, s_data_bytes, &before) < 0)
        goto out;
    PyObject *r = PyObject_CallMethod(region, "put", "LLO", start, end, data);
    if (r == NULL)
        goto out;
    Py_DECREF(r);
    if (get_long_attr(region, s_data_bytes, &after) < 0)
        goto out;
    *delta = after - before;
    rc = 0;
}
out:
    Py_XDECREF(starts);
    Py_XDECREF(ends);
    Py_XDECREF(datas);
    return rc;
}

/* extents_put_many(extent_map, offsets, payloads, region_type, overhead, region_shift) -> None
 * ExtentMap.put_many_python: extent_map.put(offset, len(payload), payload) of each write, in
 * order, with the map's data_bytes kept exact even when a write fails part way. */
static PyObject *extents_put_many(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    REQUIRE_NARGS("extents_put_many", 6);
    PyObject *map = args[0], *offsets = args[1], *payloads = args[2], *region_type = args[3];
    long long overhead = long_value(args[4]);
    long shift = PyLong_AsLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyList_Check(offsets) || !PyList_Check(payloads) || PyList_GET_SIZE(offsets) != PyList_GET_SIZE(payloads)) {
        PyErr_SetString(PyExc_ValueError, "offsets and payloads: lists of one length");
        return NULL;
    }
    if (shift <= 0 || shift >= 62) {
        PyErr_SetString(PyExc_ValueError, "region_shift out of range");
        return NULL;
    }
    PyObject *regions = attr_get(map, s_regions);
    if (regions == NULL)
        return NULL;
    if (!PyDict_Check(regions)) {
        Py_DECREF(regions);
        PyErr_SetString(PyExc_TypeError, "extent_map.regions must be a dict");
        return NULL;
    }
    long long grown = 0;
    int failed = 0;
    Py_ssize_t n = PyList_GET_SIZE(offsets);
    for (Py_ssize_t i = 0; i < n && !failed; i++) {
        PyObject *data = PyList_GET_ITEM(payloads, i);
        long long start = long_value(PyList_GET_ITEM(offsets, i));
        Py_ssize_t length = PyObject_Length(data);
        if ((start == -1 && PyErr_Occurred()) || length < 0) {
            failed = 1;
            break;
        }
        if (length == 0)
            continue;
        long long index = start >> shift;
        if ((start + length - 1) >> shift != index) { /* crosses regions: the map's own put */
            if (add_to_attr(map, s_data_bytes, grown) < 0) {
                failed = 1;
                break;
            }
            grown = 0;
            PyObject *r = PyObject_CallMethod(map, "put", "LnO", start, length, data);
            if (r == NULL)
                failed = 1;
            Py_XDECREF(r);
            continue;
        }
        PyObject *key = PyLong_FromLongLong(index);
        if (key == NULL) {
            failed = 1;
            break;
        }
        PyObject *region = PyDict_GetItemWithError(regions, key);
        if (region == NULL) {
            if (PyErr_Occurred() || (region = PyObject_CallNoArgs(region_type)) == NULL) {
                Py_DECREF(key);
                failed = 1;
                break;
            }
            if (PyDict_SetItem(regions, key, region) < 0) {
                Py_DECREF(region);
                Py_DECREF(key);
                failed = 1;
                break;
            }
            Py_DECREF(region); /* the dict holds it */
        }
        Py_INCREF(region);
        Py_DECREF(key);
        long long delta = 0;
        if (region_put(region, start, start + length, data, overhead, shift, &delta) < 0)
            failed = 1;
        else
            grown += delta;
        Py_DECREF(region);
    }
    Py_DECREF(regions);
    if (failed) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        if (add_to_attr(map, s_data_bytes, grown) < 0)
            PyErr_Clear();
        PyErr_Restore(type, value, tb);
        return NULL;
    }
    if (add_to_attr(map, s_data_bytes, grown) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* write_extents(fd, extents, first, stop) -> index
 * The write-out's inner loop (DiskBuffer._apply_python): extents[first:stop] are (start, end,
 * data) tuples in offset order; each data extent is written at its start, adjacent ones in one
 * pwritev, all without the GIL -- one 4 KiB pwrite with the GIL taken and given back per extent
 * cost the write-out thread 5 us per guest write and made the event loop thread wait for the GIL.
 * Stops at the first zero extent (data None: the caller zeroes the range and goes on) or at stop;
 * returns the index it stopped at.  OSError on a failed write, as os.pwrite raises. */
#include <sys/uio.h>
#include <errno.h>
#define WRITE_EXTENTS_IOV 64

typedef struct {
    long long start;
    Py_buffer data;
} wx_extent;

static int full_pwritev(int fd, struct iovec *iov, int cnt, long long offset)
{
    while (cnt > 0) {
        ssize_t n = pwritev(fd, iov, cnt, (off_t)offset);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0) {
            errno = ENOSPC;
            return -1;
        }
        offset += n;
        while (cnt > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (char *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

static PyObject *write_extents(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    REQUIRE_NARGS("write_extents", 4);
    long fd_value = PyLong_AsLong(args[0]);
    if (!PyErr_Occurred() && (fd_value < 0 || fd_value > INT_MAX)) {
        PyErr_SetString(PyExc_ValueError, "bad file descriptor");
        return NULL;
    }
    int fd = (int)fd_value;
    Py_ssize_t first = PyLong_AsSsize_t(args[2]), stop = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "extents must be a list");
        return NULL;
    }
    PyObject *extents = args[1];
    if (stop > PyList_GET_SIZE(extents))
        stop = PyList_GET_SIZE(extents);
    if (first < 0 || first > stop) {
        PyErr_SetString(PyExc_ValueError, "first out of range");
        return NULL;
    }
    Py_ssize_t n = 0, end_index = first;
    wx_extent *wx = PyMem_Calloc((size_t)(stop - first) + 1, sizeof(wx_extent));
    if (wx == NULL)
        return PyErr_NoMemory();
    int failed = 0;
    for (Py_ssize_t i = first; i < stop; i++) { /* with the GIL: the buffers and offsets */
        PyObject *item = PyList_GET_ITEM(extents, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) {
            PyErr_SetString(PyExc_TypeError, "an extent is a (start, end, data) tuple");
            failed = 1;
            break;
        }
        PyObject *data = PyTuple_GET_ITEM(item, 2);
        if (data == Py_None)
            break;
        long long start = long_value(PyTuple_GET_ITEM(item, 0));
        long long end = long_value(PyTuple_GET_ITEM(item, 1));
        if (PyErr_Occurred()) {
            failed = 1;
            break;
        }
        if (start < 0) {
            PyErr_SetString(PyExc_ValueError, "negative extent start");
            failed = 1;
            break;
        }
        if (PyObject_GetBuffer(data, &wx[n].data, PyBUF_SIMPLE) < 0) {
            failed = 1;
            break;
        }
        if (wx[n].data.len != end - start) {
            PyBuffer_Release(&wx[n].data);
            PyErr_SetString(PyExc_ValueError, "an extent's data is not end - start bytes");
            failed = 1;
            break;
        }
        wx[n].start = start;
        n++;
        end_index = i + 1;
    }
    int err = 0;
    if (!failed && n > 0) {
        Py_BEGIN_ALLOW_THREADS
        struct iovec iov[WRITE_EXTENTS_IOV];
        Py_ssize_t k = 0;
        while (k < n && !err) {
            int cnt = 0;
            long long at = wx[k].start, next = at;
            while (k < n && cnt < WRITE_EXTENTS_IOV && wx[k].start == next) {
                iov[cnt].iov_base = wx[k].data.buf;
                iov[cnt].iov_len = (size_t)wx[k].data.len;
                next += wx[k].data.len;
                cnt++;
                k++;
            }
            if (full_pwritev(fd, iov, cnt, at) < 0)
                err = errno;
        }
        Py_END_ALLOW_THREADS
    }
    for (Py_ssize_t k = 0; k < n; k++)
        PyBuffer_Release(&wx[k].data);
    PyMem_Free(wx);
    if (failed)
        return NULL;
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(end_index);
}

/* ------------------------------------------------------------------------------------------- */
/* Busy-polling a socket (hybridft_common/busypoll.py)                                          */
/* ------------------------------------------------------------------------------------------- */

#include <poll.h>
#include <time.h>

static long long monotonic_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* wait_readable(fds, max_ns) -> ns waited until one of the descriptors in the tuple fds was
 * readable (or had an error or hang-up to report), or -1 once max_ns passed.
 * busypoll.wait_readable_python is the reference.  The GIL is released while spinning: the
 * service's other threads (the disk buffer's journal writer) run meanwhile. */
#define WAIT_READABLE_MAX_FDS 16
static PyObject *wait_readable(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    REQUIRE_NARGS("wait_readable", 2);
    PyObject *fds = args[0];
    if (!PyTuple_Check(fds)) {
        PyErr_SetString(PyExc_TypeError, "fds must be a tuple of file descriptors");
        return NULL;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(fds);
    if (count < 1 || count > WAIT_READABLE_MAX_FDS) {
        PyErr_Format(PyExc_ValueError, "between 1 and %d file descriptors", WAIT_READABLE_MAX_FDS);
        return NULL;
    }
    struct pollfd p[WAIT_READABLE_MAX_FDS];
    for (Py_ssize_t i = 0; i < count; i++) {
        long fd_value = PyLong_AsLong(PyTuple_GET_ITEM(fds, i));
        if (PyErr_Occurred())
            return NULL;
        if (fd_value < 0 || fd_value > INT_MAX) {
            PyErr_SetString(PyExc_ValueError, "bad file descriptor");
            return NULL;
        }
        p[i].fd = (int)fd_value;
        p[i].events = POLLIN;
        p[i].revents = 0;
    }
    long long max_ns = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    if (max_ns < 0) {
        PyErr_SetString(PyExc_ValueError, "max_ns cannot be negative");
        return NULL;
    }
    long long waited = -1;
    int error = 0;
    Py_BEGIN_ALLOW_THREADS
    long long start = monotonic_ns(), now = start;
    for (;;) {
        int rc = poll(p, (nfds_t)count, 0);
        now = monotonic_ns();
        if (rc > 0) {
            waited = now - start;
            break;
        }
        if (rc < 0 && errno != EINTR) {
            error = errno;
            break;
        }
        if (now - start >= max_ns)
            break;
    }
    Py_END_ALLOW_THREADS
    if (error) {
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLongLong(waited);
}

static PyMethodDef methods[] = {
    {"decode_records", (PyCFunction)(void (*)(void))decode_records, METH_FASTCALL,
     "decode_records(buf, start, end, vnet_hdr, max_record) -> (frames, headers, pos, nbytes, error)"},
    {"encode_records", (PyCFunction)(void (*)(void))encode_records, METH_FASTCALL,
     "encode_records(frames, vnet_headers_or_None) -> bytes"},
    {"bytes_total", (PyCFunction)(void (*)(void))bytes_total, METH_FASTCALL,
     "bytes_total(frames) -> bytes in a list of bytes objects, or -1 (anything else)"},
    {"client_track_one", (PyCFunction)(void (*)(void))client_track_one, METH_FASTCALL,
     "client_track_one(tracker, key, ack, flags, payload) -> settled ACK number or -1 (_ClientTracker.one)"},
    {"colo_feed_runs", (PyCFunction)(void (*)(void))colo_feed_runs, METH_FASTCALL,
     "colo_feed_runs(frames, i, tcp, touched, primary, comparing, now, track, ensure, segments) -> (i, sec_delta)"},
    {"releasable", (PyCFunction)(void (*)(void))releasable, METH_FASTCALL, "releasable(held, v, sack) -> n"},
    {"colo_settle", (PyCFunction)(void (*)(void))colo_settle, METH_FASTCALL,
     "colo_settle(flows, out, actions, tcp_flow_type, advance_tcp, advance_other) -> None"},
    {"nbd_next_request", (PyCFunction)(void (*)(void))nbd_next_request, METH_FASTCALL,
     "nbd_next_request(buf, start, end, max_payload, Request) -> (request|None, start, need, discard)"},
    {"nbd_take_writes", (PyCFunction)(void (*)(void))nbd_take_writes, METH_FASTCALL,
     "nbd_take_writes(buf, start, end, max_payload, size, min_block, max_count, max_bytes, min_count)"
     " -> (offsets, payloads, replies, start) | None"},
    {"crc32", (PyCFunction)(void (*)(void))crc32, METH_FASTCALL, "crc32(data, value=0) -> int: zlib.crc32"},
    {"journal_encode_records", (PyCFunction)(void (*)(void))journal_encode_records, METH_FASTCALL,
     "journal_encode_records(generation, records, group_crcs) -> buffers to write back to back"},
    {"journal_queue_writes", (PyCFunction)(void (*)(void))journal_queue_writes, METH_FASTCALL,
     "journal_queue_writes(pending, pos, seq, epoch, offsets, payloads, overhead) -> end position"},
    {"extents_put_many", (PyCFunction)(void (*)(void))extents_put_many, METH_FASTCALL,
     "extents_put_many(extent_map, offsets, payloads, region_type, overhead, region_shift) -> None"},
    {"write_extents", (PyCFunction)(void (*)(void))write_extents, METH_FASTCALL,
     "write_extents(fd, extents, first, stop) -> index of the first extent not written"},
    {"wait_readable", (PyCFunction)(void (*)(void))wait_readable, METH_FASTCALL,
     "wait_readable(fds, max_ns) -> ns waited until one is readable, or -1 once max_ns passed"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "hybridft_common._speedups",
    "Compiled inner loops of the data plane; see hybridft_common/fastpath.py.", -1, methods,
};

PyMODINIT_FUNC PyInit__speedups(void)
{
    crc_init();
    struct {
        PyObject **slot;
        const char *name;
    } names[] = {{&s_p, "p"}, {&s_s, "s"}, {&s_nxt, "nxt"}, {&s_end, "end"}, {&s_start, "start"},
                 {&s_cur, "cur"}, {&s_off, "off"}, {&s_chunks, "chunks"}, {&s_ack, "ack"}, {&s_v, "v"},
                 {&s_diverged, "diverged"}, {&s_held, "held"}, {&s_append, "append"},
                 {&s_fin, "fin"}, {&s_rst, "rst"}, {&s_released, "released"}, {&s_popleft, "popleft"},
                 {&s_clear, "clear"}, {&s_regions, "regions"}, {&s_data_bytes, "data_bytes"},
                 {&s_starts, "starts"}, {&s_ends, "ends"}, {&s_datas, "datas"}, {&s_flows, "flows"},
                 {&s_acked_bytes, "acked_bytes"}, {&s_advances, "advances"}, {&s_turns, "turns"}};
    for (size_t j = 0; j < sizeof names / sizeof names[0]; j++)
        if ((*names[j].slot = PyUnicode_InternFromString(names[j].name)) == NULL)
            return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddIntConstant(m, "crc32_clmul", crc_use_clmul) < 0 ||
                      PyModule_AddIntConstant(m, "interface", SPEEDUPS_INTERFACE) < 0 ||
                      PyModule_AddIntConstant(m, "client_max_flows", CLIENT_MAX_FLOWS) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
