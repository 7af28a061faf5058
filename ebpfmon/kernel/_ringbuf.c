/* The ring buffer reader's loop in C (ebpfmon/kernel/ringbuf.py maps the
 * buffer and waits for wakeups; this takes the records).
 *
 * It runs once per record, so it is C (what it saves: bench/README.md). This
 * is libbpf's ringbuf_process_ring() (src/ringbuf.c) with a
 * Python callback: positions and record lengths are read with acquire loads
 * and the consumer position written with a release store, as the kernel's
 * side (kernel/bpf/ringbuf.c) expects, so it is right on any architecture.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define BUSY_BIT (1U << 31)
#define DISCARD_BIT (1U << 30)
#define HEADER_SIZE 8

typedef struct {
	PyObject_HEAD
	Py_buffer consumer;  /* page 0: the consumer position, ours to write */
	Py_buffer producer;  /* the producer position's page, then the data mapped twice */
	size_t mask;         /* data size - 1 */
	size_t data_start;   /* offset of the data in producer */
	PyObject *callback;  /* callback(record bytes) */
} Consumer;

static int Consumer_traverse(Consumer *self, visitproc visit, void *arg)
{
	Py_VISIT(self->callback);
	return 0;
}

static void release(Consumer *self)
{
	if (self->consumer.obj)
		PyBuffer_Release(&self->consumer);
	if (self->producer.obj)
		PyBuffer_Release(&self->producer);
}

static int Consumer_clear(Consumer *self)
{
	Py_CLEAR(self->callback);
	return 0;
}

static void Consumer_dealloc(Consumer *self)
{
	PyObject_GC_UnTrack(self);
	release(self);
	Consumer_clear(self);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Consumer_init(Consumer *self, PyObject *args, PyObject *kwargs)
{
	static char *names[] = {"consumer", "producer", "data_start", "data_size", "callback", NULL};
	PyObject *consumer, *producer, *callback;
	Py_ssize_t data_start, data_size;

	if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOnnO", names, &consumer, &producer, &data_start, &data_size,
					 &callback))
		return -1;
	release(self);
	if (data_size <= 0 || (data_size & (data_size - 1)) || data_start < 8) {
		PyErr_Format(PyExc_ValueError, "data size %zd is not a power of two, or data start %zd is not past "
			     "the producer position", data_size, data_start);
		return -1;
	}
	if (PyObject_GetBuffer(consumer, &self->consumer, PyBUF_WRITABLE) < 0)
		return -1;
	if (PyObject_GetBuffer(producer, &self->producer, PyBUF_SIMPLE) < 0) {
		release(self);
		return -1;
	}
	if (self->consumer.len < 8 || self->producer.len < data_start + 2 * data_size ||
	    ((uintptr_t)self->consumer.buf | (uintptr_t)self->producer.buf | (uintptr_t)data_start) & 7) {
		release(self);
		PyErr_SetString(PyExc_ValueError, "the consumer page or the producer and data are too short or "
				"not 8-byte aligned");
		return -1;
	}
	self->mask = (size_t)data_size - 1;
	self->data_start = (size_t)data_start;
	Py_XSETREF(self->callback, Py_NewRef(callback));
	return 0;
}

/* Every record there is now, in order; returns how many. Each record's space is given back as
 * soon as it is copied out, before the callback runs (as libbpf does). */
static PyObject *Consumer_consume(Consumer *self, PyObject *Py_UNUSED(ignored))
{
	uint64_t *consumer_pos = self->consumer.buf;
	const char *base = self->producer.buf;
	const uint64_t *producer_pos = (const uint64_t *)base;
	const char *data = base + self->data_start;
	uint64_t position, end;
	long taken = 0;

	if (!self->consumer.obj) {
		PyErr_SetString(PyExc_ValueError, "the consumer is closed");
		return NULL;
	}
	position = __atomic_load_n(consumer_pos, __ATOMIC_ACQUIRE);
	for (;;) {
		int progressed = 0;

		end = __atomic_load_n(producer_pos, __ATOMIC_ACQUIRE);
		while (position < end) {
			const uint32_t *header = (const uint32_t *)(data + (position & self->mask));
			uint32_t length = __atomic_load_n(header, __ATOMIC_ACQUIRE);
			uint32_t size;
			PyObject *record = NULL;

			if (length & BUSY_BIT)  /* reserved, not yet submitted: the rest waits behind it */
				goto done;
			size = length & (DISCARD_BIT - 1);
			if (!(length & DISCARD_BIT)) {
				record = PyBytes_FromStringAndSize((const char *)header + HEADER_SIZE, size);
				if (!record)
					return NULL;
			}
			position += (size + HEADER_SIZE + 7) & ~(uint64_t)7;
			__atomic_store_n(consumer_pos, position, __ATOMIC_RELEASE);
			progressed = 1;
			if (record) {
				PyObject *result = PyObject_CallOneArg(self->callback, record);
				Py_DECREF(record);
				if (!result)
					return NULL;
				Py_DECREF(result);
				taken++;
			}
		}
		if (!progressed)
			break;
	}
done:
	return PyLong_FromLong(taken);
}

static PyObject *Consumer_close(Consumer *self, PyObject *Py_UNUSED(ignored))
{
	release(self);
	Py_RETURN_NONE;
}

static PyMethodDef Consumer_methods[] = {
	{"consume", (PyCFunction)Consumer_consume, METH_NOARGS, "Every record there is now, in order: how many."},
	{"close", (PyCFunction)Consumer_close, METH_NOARGS, "Lets go of the buffers (the maps can close)."},
	{NULL},
};

static PyTypeObject ConsumerType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "ebpfmon.kernel._ringbuf.Consumer",
	.tp_doc = PyDoc_STR("Consumer(consumer, producer, data_start, data_size, callback): takes a BPF ring "
			    "buffer's records from its mapped pages and calls callback(record) for each."),
	.tp_basicsize = sizeof(Consumer),
	.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Consumer_init,
	.tp_dealloc = (destructor)Consumer_dealloc,
	.tp_traverse = (traverseproc)Consumer_traverse,
	.tp_clear = (inquiry)Consumer_clear,
	.tp_methods = Consumer_methods,
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "ebpfmon.kernel._ringbuf",
	.m_doc = PyDoc_STR("the ring buffer reader's loop in C (see ebpfmon/kernel/ringbuf.py)"),
	.m_size = -1,
};

PyMODINIT_FUNC PyInit__ringbuf(void)
{
	PyObject *m;

	if (PyType_Ready(&ConsumerType) < 0)
		return NULL;
	m = PyModule_Create(&module);
	if (!m)
		return NULL;
	if (PyModule_AddObjectRef(m, "Consumer", (PyObject *)&ConsumerType) < 0) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
