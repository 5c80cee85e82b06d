/* The framing loop of proxy.wire.codec.Scanner.feed, compiled: where messages begin and end.
 *
 * Optional: the package builds it when a C compiler is at hand and falls back to
 * the Python loop in codec.py otherwise (PURPOSE_PROXY_NO_EXTENSIONS=1 forces the
 * fallback). Both must give the same answer for every input; tests/unit/test_codec.py
 * runs the framing properties against each.
 *
 * split(data, pos, table, max_size, frame) walks the messages of ``data`` from
 * ``pos`` (a message boundary). Every message is a type byte and a big-endian int32
 * length that counts itself but not the type byte (55.7 "Message Formats"). A message
 * whose type has a nonzero byte in the 256-byte ``table`` becomes ``frame(type, raw)``;
 * runs of other messages are handed out as slices of ``data``, undecoded (a DataRow
 * or CopyData is never looked into). Returns ``(items, pos, skip, need, bad)``:
 *   pos   where the unconsumed tail begins (a partial header, or a partial inspected
 *         message) -- len(data) when everything was consumed;
 *   skip  bytes of an opaque message that continue past the end of ``data``;
 *   need  total length of the partial inspected message held back at ``pos`` (0: none);
 *   bad   None, or (type, length) of the first message whose length is invalid
 *         (under 4, or over ``max_size``): the caller raises, ``items`` is void.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *
split(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "split(data, pos, table, max_size, frame)");
        return NULL;
    }
    PyObject *data = args[0], *table = args[2], *frame = args[4];
    if (!PyBytes_CheckExact(data) || !PyBytes_CheckExact(table) || PyBytes_GET_SIZE(table) != 256) {
        PyErr_SetString(PyExc_TypeError, "split: data must be bytes and table 256 bytes");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    long long max_size = PyLong_AsLongLong(args[3]);
    if (max_size == -1 && PyErr_Occurred())
        return NULL;
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(data);
    const unsigned char *inspect = (const unsigned char *)PyBytes_AS_STRING(table);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    Py_ssize_t seg = 0, skip = 0, need = 0;
    PyObject *bad = NULL;
    PyObject *items = PyList_New(0);
    if (items == NULL)
        return NULL;
    if (pos < 0 || pos > n) {
        PyErr_SetString(PyExc_ValueError, "split: pos out of range");
        goto error;
    }
    while (pos + 5 <= n) {
        unsigned char typ = buf[pos];
        unsigned long long length = ((unsigned long long)buf[pos + 1] << 24) | ((unsigned long long)buf[pos + 2] << 16)
                                    | ((unsigned long long)buf[pos + 3] << 8) | (unsigned long long)buf[pos + 4];
        /* Read unsigned, as codec.py's struct "!BI" does: a "negative" int32 is over any limit. */
        if ((long long)length > max_size || length < 4) {
            bad = Py_BuildValue("(iK)", (int)typ, length);
            if (bad == NULL)
                goto error;
            break;
        }
        Py_ssize_t end = pos + 1 + (Py_ssize_t)length;
        if (inspect[typ]) {
            if (end > n) {
                need = end - pos;
                break;
            }
            if (pos > seg) {
                PyObject *opaque = PyBytes_FromStringAndSize((const char *)buf + seg, pos - seg);
                if (opaque == NULL || PyList_Append(items, opaque) < 0) {
                    Py_XDECREF(opaque);
                    goto error;
                }
                Py_DECREF(opaque);
            }
            PyObject *raw = PyBytes_FromStringAndSize((const char *)buf + pos, end - pos);
            if (raw == NULL)
                goto error;
            PyObject *type_number = PyLong_FromLong(typ);
            if (type_number == NULL) {
                Py_DECREF(raw);
                goto error;
            }
            PyObject *message = PyObject_CallFunctionObjArgs(frame, type_number, raw, NULL);
            Py_DECREF(type_number);
            Py_DECREF(raw);
            if (message == NULL || PyList_Append(items, message) < 0) {
                Py_XDECREF(message);
                goto error;
            }
            Py_DECREF(message);
            seg = pos = end;
        } else if (end > n) {
            skip = end - n;
            pos = n;
        } else {
            pos = end;
        }
    }
    if (bad == NULL && pos > seg) {
        PyObject *opaque;
        if (seg == 0 && pos == n) {  /* the whole of data: no copy */
            Py_INCREF(data);
            opaque = data;
        } else {
            opaque = PyBytes_FromStringAndSize((const char *)buf + seg, pos - seg);
        }
        if (opaque == NULL || PyList_Append(items, opaque) < 0) {
            Py_XDECREF(opaque);
            goto error;
        }
        Py_DECREF(opaque);
    }
    if (bad == NULL) {
        Py_INCREF(Py_None);
        bad = Py_None;
    }
    return Py_BuildValue("(NnnnN)", items, pos, skip, need, bad);

error:
    Py_XDECREF(bad);
    Py_DECREF(items);
    return NULL;
}

static PyMethodDef methods[] = {
    {"split", (PyCFunction)(void (*)(void))split, METH_FASTCALL,
     "split(data, pos, table, max_size, frame) -> (items, pos, skip, need, bad): frame messages."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "proxy.wire._scan", "The framing loop of codec.Scanner, compiled.", -1, methods,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    return PyModule_Create(&module);
}
