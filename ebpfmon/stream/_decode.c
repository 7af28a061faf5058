/* The decode stage's hot path in C: connect and datagram records -> events.
 *
 * Every connect an agent makes comes through here, thousands a second in a
 * connect storm. In Python, unpacking the header and the socket address into
 * tuples and the calls around them were a large part of the daemon's work per
 * connect (bench/instructions.py counts it). This reads the record through the
 * probes' own struct (probes/events.h: no layout is written twice) and builds the
 * same objects ebpfmon/stream/decode.py did, through the event classes' own __init__
 * (construct()); text (comm, addresses) comes from the decoder's caches,
 * filled by its Python functions on a miss. Any other record, and any record whose sizes do
 * not add up, goes to the Python decoder, which builds it or says what is
 * wrong with it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stddef.h>
#include <string.h>
#include <linux/types.h>

#include "events.h"

/* bytes of a connect or datagram record before its payload (the probes send no payload for a
 * connect: size = offsetof(payload)) */
#define SOCKADDR_FIXED offsetof(struct sockaddr_event, payload)

typedef struct {
	PyObject_HEAD
	vectorcallfunc vectorcall;  /* called as a function: no argument tuple per record */
	long long clock_offset;   /* ns from CLOCK_BOOTTIME to the wall clock */
	PyObject *comms;          /* dict: raw comm (16 bytes) -> str */
	PyObject *sockets;        /* dict: (family, addr, sock_type, protocol) -> 4-tuple of text */
	PyObject *comm_text;      /* callable(raw comm) -> str, remembered in comms */
	PyObject *socket_text;    /* callable(family, addr, sock_type, protocol) -> 4-tuple, remembered */
	PyObject *dns_query;      /* callable(payload) -> name or None */
	PyObject *process;        /* events.Process */
	PyObject *connect;        /* events.ConnectEvent */
	PyObject *udp_send;       /* events.UdpSendEvent */
	PyObject *process_init;   /* their __init__ functions (see construct()) */
	PyObject *connect_init;
	PyObject *udp_send_init;
	PyObject *other;          /* callable(record): every other record */
	PyObject *source_syscall; /* "syscall" */
	PyObject *source_hook;    /* "cgroup_hook" */
} Decoder;

static PyObject *Decoder_call(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames);

static int Decoder_traverse(Decoder *self, visitproc visit, void *arg)
{
	Py_VISIT(self->comms);
	Py_VISIT(self->sockets);
	Py_VISIT(self->comm_text);
	Py_VISIT(self->socket_text);
	Py_VISIT(self->dns_query);
	Py_VISIT(self->process);
	Py_VISIT(self->connect);
	Py_VISIT(self->udp_send);
	Py_VISIT(self->process_init);
	Py_VISIT(self->connect_init);
	Py_VISIT(self->udp_send_init);
	Py_VISIT(self->other);
	return 0;
}

static int Decoder_clear(Decoder *self)
{
	Py_CLEAR(self->comms);
	Py_CLEAR(self->sockets);
	Py_CLEAR(self->comm_text);
	Py_CLEAR(self->socket_text);
	Py_CLEAR(self->dns_query);
	Py_CLEAR(self->process);
	Py_CLEAR(self->connect);
	Py_CLEAR(self->udp_send);
	Py_CLEAR(self->process_init);
	Py_CLEAR(self->connect_init);
	Py_CLEAR(self->udp_send_init);
	Py_CLEAR(self->other);
	Py_CLEAR(self->source_syscall);
	Py_CLEAR(self->source_hook);
	return 0;
}

static void Decoder_dealloc(Decoder *self)
{
	PyObject_GC_UnTrack(self);
	Decoder_clear(self);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *empty_tuple;

/* cls.__init__, a Python function: construct() calls it directly */
static PyObject *init_of(PyObject *cls)
{
	PyObject *init;

	if (!PyType_Check(cls)) {
		PyErr_Format(PyExc_TypeError, "%R is not a class", cls);
		return NULL;
	}
	init = PyObject_GetAttrString(cls, "__init__");
	if (init && !PyFunction_Check(init)) {
		PyErr_Format(PyExc_TypeError, "%R.__init__ is not a Python function", cls);
		Py_CLEAR(init);
	}
	return init;
}

/* cls(*args) as type.__call__ makes it: an instance from cls's tp_new, then cls.__init__(it,
 * *args). Here the function is called straight, with no argument tuple made and no __init__
 * looked up per object (calling the class costs more than the fields). items[0] is
 * free for the instance, items[1..n] are the arguments; a new reference or NULL. */
static PyObject *construct(PyObject *cls, PyObject *init, PyObject **items, size_t n)
{
	PyObject *instance, *result;

	instance = ((PyTypeObject *)cls)->tp_new((PyTypeObject *)cls, empty_tuple, NULL);
	if (!instance)
		return NULL;
	items[0] = instance;
	result = PyObject_Vectorcall(init, items, n + 1, NULL);
	items[0] = NULL;
	if (!result) {
		Py_DECREF(instance);
		return NULL;
	}
	Py_DECREF(result);  /* None: a dataclass's __init__ */
	return instance;
}

static int Decoder_init(Decoder *self, PyObject *args, PyObject *kwargs)
{
	static char *names[] = {"comms", "sockets", "comm_text", "socket_text", "dns_query", "process",
				"connect", "udp_send", "other", NULL};
	PyObject *comms, *sockets, *comm_text, *socket_text, *dns_query, *process, *connect, *udp_send, *other;

	if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!OOOOOOO", names, &PyDict_Type, &comms, &PyDict_Type,
					 &sockets, &comm_text, &socket_text, &dns_query, &process, &connect,
					 &udp_send, &other))
		return -1;
	Decoder_clear(self);
	self->comms = Py_NewRef(comms);
	self->sockets = Py_NewRef(sockets);
	self->comm_text = Py_NewRef(comm_text);
	self->socket_text = Py_NewRef(socket_text);
	self->dns_query = Py_NewRef(dns_query);
	self->process = Py_NewRef(process);
	self->connect = Py_NewRef(connect);
	self->udp_send = Py_NewRef(udp_send);
	self->other = Py_NewRef(other);
	self->process_init = init_of(process);
	self->connect_init = init_of(connect);
	self->udp_send_init = init_of(udp_send);
	if (!self->process_init || !self->connect_init || !self->udp_send_init)
		return -1;
	self->source_syscall = PyUnicode_InternFromString("syscall");
	self->source_hook = PyUnicode_InternFromString("cgroup_hook");
	self->vectorcall = Decoder_call;
	return self->source_syscall && self->source_hook ? 0 : -1;
}

/* cache[key], or make(key's items) on a miss (make remembers it); a new reference */
static PyObject *cached(PyObject *cache, PyObject *key, PyObject *make, PyObject *const *items, size_t n)
{
	PyObject *value = PyDict_GetItemWithError(cache, key);
	if (value)
		return Py_NewRef(value);
	if (PyErr_Occurred())
		return NULL;
	return PyObject_Vectorcall(make, items, n, NULL);
}

/* the Process of a record's header, its comm's text from the cache */
static PyObject *process_of(Decoder *self, const struct event_header *hdr)
{
	PyObject *slots[7] = {NULL}, **items = slots + 1;  /* slots[0]: the instance (construct) */
	PyObject *raw = NULL, *result = NULL;

	raw = PyBytes_FromStringAndSize(hdr->comm, COMM_LEN);
	if (!raw)
		return NULL;
	items[5] = cached(self->comms, raw, self->comm_text, &raw, 1);
	items[0] = PyLong_FromUnsignedLong(hdr->pid);
	items[1] = PyLong_FromUnsignedLong(hdr->tid);
	items[2] = PyLong_FromUnsignedLong(hdr->ppid);
	items[3] = PyLong_FromUnsignedLong(hdr->uid);
	items[4] = PyLong_FromUnsignedLong(hdr->gid);
	if (items[0] && items[1] && items[2] && items[3] && items[4] && items[5])
		result = construct(self->process, self->process_init, slots, 6);
	for (int i = 0; i < 6; i++)
		Py_XDECREF(items[i]);
	Py_DECREF(raw);
	return result;
}

/* family, address, socket type and protocol as text (a 4-tuple), from the cache */
static PyObject *socket_of(Decoder *self, const struct sockaddr_event *e)
{
	PyObject *items[4], *key, *known = NULL;

	items[0] = PyLong_FromUnsignedLong(e->family);
	items[1] = PyBytes_FromStringAndSize((const char *)e->addr, sizeof(e->addr));
	items[2] = PyLong_FromUnsignedLong(e->sock_type);
	items[3] = PyLong_FromUnsignedLong(e->protocol);
	if (!items[0] || !items[1] || !items[2] || !items[3])
		goto out;
	key = PyTuple_Pack(4, items[0], items[1], items[2], items[3]);
	if (!key)
		goto out;
	known = cached(self->sockets, key, self->socket_text, items, 4);
	Py_DECREF(key);
	if (known && (!PyTuple_CheckExact(known) || PyTuple_GET_SIZE(known) != 4)) {
		PyErr_SetString(PyExc_TypeError, "socket_text must give a 4-tuple");
		Py_CLEAR(known);
	}
out:
	for (int i = 0; i < 4; i++)
		Py_XDECREF(items[i]);
	return known;
}

/* ConnectEvent(time_ns, cgroup_id, cgroup, proc, ancestry, family, address, port, sock_type,
 * protocol, retval, fd, source) or UdpSendEvent(the same, length, dns_query): positional, in
 * the order the classes declare their fields (tests/test_decode.py checks every field) */
static PyObject *sockaddr_event(Decoder *self, PyObject *record, const struct sockaddr_event *e, Py_ssize_t length)
{
	PyObject *slots[16] = {NULL}, **items = slots + 1;  /* slots[0]: the instance (construct) */
	PyObject *text = NULL, *result = NULL;
	int udp = e->hdr.kind == EVENT_UDP_SEND;
	size_t n = udp ? 15 : 13, i;

	text = socket_of(self, e);
	if (!text)
		return NULL;
	items[0] = PyLong_FromLongLong((long long)e->hdr.time_ns + self->clock_offset);
	items[1] = PyLong_FromUnsignedLongLong(e->hdr.cgroup_id);
	items[2] = Py_NewRef(Py_None);  /* cgroup: the enricher's */
	items[3] = process_of(self, &e->hdr);
	items[4] = PyList_New(0);  /* ancestry: the enricher's */
	items[5] = Py_NewRef(PyTuple_GET_ITEM(text, 0));  /* family */
	items[6] = Py_NewRef(PyTuple_GET_ITEM(text, 1));  /* address */
	items[7] = PyLong_FromUnsignedLong(e->dport);
	items[8] = Py_NewRef(PyTuple_GET_ITEM(text, 2));  /* socket type */
	items[9] = Py_NewRef(PyTuple_GET_ITEM(text, 3));  /* protocol */
	items[10] = PyLong_FromLong(e->retval);
	items[11] = PyLong_FromLong(e->fd);
	items[12] = Py_NewRef(udp || !(e->hdr.flags & EVENT_F_FROM_HOOK) ? self->source_syscall : self->source_hook);
	if (udp) {
		items[13] = PyLong_FromUnsignedLong(e->length);
		if (e->dport == 53) {
			/* as far as the record goes, like a slice */
			Py_ssize_t avail = length - (Py_ssize_t)SOCKADDR_FIXED;
			Py_ssize_t take = (Py_ssize_t)e->payload_len < avail ? (Py_ssize_t)e->payload_len : avail;
			PyObject *payload = PyBytes_FromStringAndSize(PyBytes_AS_STRING(record) + SOCKADDR_FIXED, take);
			items[14] = payload ? PyObject_Vectorcall(self->dns_query, &payload, 1, NULL) : NULL;
			Py_XDECREF(payload);
		} else {
			items[14] = Py_NewRef(Py_None);
		}
	}
	for (i = 0; i < n && items[i]; i++)
		;
	if (i == n)
		result = udp ? construct(self->udp_send, self->udp_send_init, slots, n)
			     : construct(self->connect, self->connect_init, slots, n);
	for (i = 0; i < n; i++)
		Py_XDECREF(items[i]);
	Py_DECREF(text);
	return result;
}

static PyObject *Decoder_call(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
	Decoder *self = (Decoder *)callable;
	PyObject *record;
	struct sockaddr_event e;
	Py_ssize_t length;

	if (PyVectorcall_NARGS(nargsf) != 1 || kwnames) {
		PyErr_SetString(PyExc_TypeError, "decode takes one record");
		return NULL;
	}
	record = args[0];
	if (!PyBytes_CheckExact(record))
		return PyObject_CallOneArg(self->other, record);
	length = PyBytes_GET_SIZE(record);
	if (length < (Py_ssize_t)SOCKADDR_FIXED)
		return PyObject_CallOneArg(self->other, record);
	memcpy(&e, PyBytes_AS_STRING(record), SOCKADDR_FIXED);  /* bytes carry no alignment promise */
	if ((e.hdr.kind != EVENT_CONNECT && e.hdr.kind != EVENT_UDP_SEND) || e.hdr.size != length)
		return PyObject_CallOneArg(self->other, record);
	return sockaddr_event(self, record, &e, length);
}

static PyMemberDef Decoder_members[] = {
	{"clock_offset", T_LONGLONG, offsetof(Decoder, clock_offset), 0,
	 "ns added to the records' CLOCK_BOOTTIME times to make wall-clock times"},
	{NULL},
};

static PyTypeObject DecoderType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "ebpfmon.stream._decode.SockaddrDecoder",
	.tp_doc = PyDoc_STR("SockaddrDecoder(comms, sockets, comm_text, socket_text, dns_query, process, connect, "
			    "udp_send, other)(record) -> event: connect and datagram records decoded here, "
			    "every other record by other(record)."),
	.tp_basicsize = sizeof(Decoder),
	.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
	.tp_vectorcall_offset = offsetof(Decoder, vectorcall),
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Decoder_init,
	.tp_dealloc = (destructor)Decoder_dealloc,
	.tp_traverse = (traverseproc)Decoder_traverse,
	.tp_clear = (inquiry)Decoder_clear,
	.tp_call = PyVectorcall_Call,
	.tp_members = Decoder_members,
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "ebpfmon.stream._decode",
	.m_doc = PyDoc_STR("connect and datagram records decoded in C (see ebpfmon/stream/decode.py)"),
	.m_size = -1,
};

PyMODINIT_FUNC PyInit__decode(void)
{
	PyObject *m;

	if (PyType_Ready(&DecoderType) < 0)
		return NULL;
	empty_tuple = PyTuple_New(0);
	if (!empty_tuple)
		return NULL;
	m = PyModule_Create(&module);
	if (!m)
		return NULL;
	if (PyModule_AddObjectRef(m, "SockaddrDecoder", (PyObject *)&DecoderType) < 0) {
		Py_DECREF(m);
		return NULL;
	}
	PyModule_AddIntConstant(m, "SOCKADDR_FIXED", SOCKADDR_FIXED);
	return m;
}
