/* The scan of proxy.analysis.shape._shape, compiled: a statement's text with its constants cut out.
 *
 * Optional, like proxy/wire/_scan.c: the package builds it when a C compiler is at
 * hand, and proxy.analysis.shape keeps the Python reading (``_shape_py``) as the
 * fallback and as the reference. Both must give the same answer for every text;
 * tests/unit/test_cache.py compares them on generated and hand-picked texts.
 *
 * scan(sql) returns (key, constants) or None, exactly as the Python reading:
 *   - None if the text holds a backslash anywhere;
 *   - pieces, left to right: a quoted identifier "..." ("" inside) is kept in the key;
 *     a string constant '...' ('' inside) becomes \x01 in the key and is listed in
 *     constants; an unsigned number \d+(\.\d+)? whose neighbours are not one of
 *     [A-Za-z0-9_$.'"] becomes \x02 and is listed. (The regular expression's
 *     backtracking cannot find a shorter number: a shorter one is followed by a digit
 *     or a '.'.)
 *   - the text outside the pieces, read as one string (pairs across a piece count),
 *     must be ASCII and hold no quote, no control character other than white space,
 *     no '&', no "--", no "slash star", and no '$' that is not followed by a digit;
 *     else None.
 * An unterminated quote ends the scan with None: the Python reading leaves a quote
 * outside then (whatever its regular expression backtracks to), which it refuses.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define STRING_MARK 0x01
#define NUMBER_MARK 0x02

typedef struct {
    Py_ssize_t start, end; /* [start, end) of the piece in the text */
    char kind;             /* 'i' identifier (kept), 's' string, 'n' number */
} piece_t;

static int
is_word(Py_UCS4 c)
{
    /* \w under re.ASCII, plus the other characters the lookarounds refuse: $ . ' " */
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_' || c == '$'
           || c == '.' || c == '\'' || c == '"';
}

/* The end (one past the closing quote) of the quoted run that opens at ``i``, or -1 if unterminated. */
static Py_ssize_t
quoted_end(int kind, const void *data, Py_ssize_t n, Py_ssize_t i, Py_UCS4 quote)
{
    Py_ssize_t j = i + 1;
    while (j < n) {
        if (PyUnicode_READ(kind, data, j) == quote) {
            if (j + 1 < n && PyUnicode_READ(kind, data, j + 1) == quote) {
                j += 2; /* a doubled quote stands for one inside */
                continue;
            }
            return j + 1;
        }
        j++;
    }
    return -1;
}

static PyObject *
scan(PyObject *module, PyObject *sql)
{
    if (!PyUnicode_Check(sql)) {
        PyErr_SetString(PyExc_TypeError, "scan(sql): sql must be a str");
        return NULL;
    }
    if (PyUnicode_READY(sql) < 0)
        return NULL;
    const int kind = PyUnicode_KIND(sql);
    const void *data = PyUnicode_DATA(sql);
    const Py_ssize_t n = PyUnicode_GET_LENGTH(sql);

    piece_t small[16];
    piece_t *pieces = small;
    Py_ssize_t count = 0, cap = 16;
    Py_ssize_t key_len = 0;
    Py_UCS4 key_max = 0x7f;
    PyObject *result = NULL;

    Py_UCS4 prev_out = 0; /* the previous character of the outside text (0: none yet) */
    Py_ssize_t i = 0;
    while (i < n) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        piece_t p = {i, -1, 0};
        if (c == '"' || c == '\'') {
            Py_ssize_t end = quoted_end(kind, data, n, i, c);
            if (end < 0)
                goto none;
            p.end = end;
            p.kind = c == '"' ? 'i' : 's';
        }
        else if (c >= '0' && c <= '9' && (i == 0 || !is_word(PyUnicode_READ(kind, data, i - 1)))) {
            Py_ssize_t j = i + 1;
            Py_UCS4 d;
            while (j < n && (d = PyUnicode_READ(kind, data, j)) >= '0' && d <= '9')
                j++;
            if (j + 1 < n && PyUnicode_READ(kind, data, j) == '.') {
                d = PyUnicode_READ(kind, data, j + 1);
                if (d >= '0' && d <= '9') {
                    j += 2;
                    while (j < n && (d = PyUnicode_READ(kind, data, j)) >= '0' && d <= '9')
                        j++;
                }
            }
            if (j == n || !is_word(PyUnicode_READ(kind, data, j))) {
                p.end = j;
                p.kind = 'n';
            }
        }
        if (p.kind) {
            if (count == cap) {
                Py_ssize_t ncap = cap * 2;
                piece_t *grown = PyMem_Malloc(ncap * sizeof(piece_t));
                if (grown == NULL) {
                    PyErr_NoMemory();
                    goto done;
                }
                memcpy(grown, pieces, count * sizeof(piece_t));
                if (pieces != small)
                    PyMem_Free(pieces);
                pieces = grown;
                cap = ncap;
            }
            pieces[count++] = p;
            if (p.kind == 'i') {
                key_len += p.end - p.start;
                for (Py_ssize_t k = p.start + 1; k < p.end - 1; k++) {
                    Py_UCS4 q = PyUnicode_READ(kind, data, k);
                    if (q > key_max)
                        key_max = q;
                }
            }
            else {
                key_len += 1;
            }
            i = p.end;
            continue;
        }
        /* Outside the pieces. */
        if (c == '\\' || c >= 0x80 || c == '\'' || c == '"' || c == '&' || c == 0x7f
            || (c < 0x20 && !(c == '\t' || c == '\n' || c == '\r')))
            goto none;
        if (prev_out == '-' && c == '-')
            goto none;
        if (prev_out == '/' && c == '*')
            goto none;
        if (prev_out == '$' && !(c >= '0' && c <= '9'))
            goto none;
        prev_out = c;
        key_len += 1;
        i++;
    }
    if (prev_out == '$')
        goto none;
    /* A backslash inside a piece counts too (its meaning depends on standard_conforming_strings). */
    for (Py_ssize_t k = 0; k < count; k++) {
        if (pieces[k].kind == 'n')
            continue;
        for (Py_ssize_t j = pieces[k].start + 1; j < pieces[k].end - 1; j++) {
            if (PyUnicode_READ(kind, data, j) == '\\')
                goto none;
        }
    }

    PyObject *key = PyUnicode_New(key_len, key_max);
    if (key == NULL)
        goto done;
    Py_ssize_t nconst = 0;
    for (Py_ssize_t k = 0; k < count; k++)
        nconst += pieces[k].kind != 'i';
    PyObject *constants = PyTuple_New(nconst);
    if (constants == NULL) {
        Py_DECREF(key);
        goto done;
    }
    /* Written character by character: PyUnicode_CopyCharacters of CPython 3.11 checks the wrong
     * characters when it copies part of a non-ASCII text into an ASCII one. */
    const int key_kind = PyUnicode_KIND(key);
    void *key_data = PyUnicode_DATA(key);
    Py_ssize_t at = 0, last = 0, ci = 0;
    for (Py_ssize_t k = 0; k <= count; k++) {
        piece_t *p = k < count ? &pieces[k] : NULL;
        Py_ssize_t upto = p != NULL ? (p->kind == 'i' ? p->end : p->start) : n;
        for (Py_ssize_t j = last; j < upto; j++)
            PyUnicode_WRITE(key_kind, key_data, at++, PyUnicode_READ(kind, data, j));
        if (p == NULL)
            break;
        if (p->kind != 'i') {
            PyObject *text = PyUnicode_Substring(sql, p->start, p->end);
            if (text == NULL)
                goto built;
            PyTuple_SET_ITEM(constants, ci++, text);
            PyUnicode_WRITE(key_kind, key_data, at++, p->kind == 's' ? STRING_MARK : NUMBER_MARK);
        }
        last = p->end;
    }
    assert(at == key_len);
    result = PyTuple_Pack(2, key, constants);
built: /* result is NULL here after an error; the pack holds its own references */
    Py_DECREF(key);
    Py_DECREF(constants);
    goto done;
none:
    result = Py_NewRef(Py_None);
done:
    if (pieces != small)
        PyMem_Free(pieces);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)scan, METH_O,
     "scan(sql) -> (key, constants) or None: proxy.analysis.shape._shape's reading, compiled."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "proxy.analysis._shape",
    "The compiled scan of proxy.analysis.shape (statement shapes).", -1, methods,
};

PyMODINIT_FUNC
PyInit__shape(void)
{
    return PyModule_Create(&module);
}
