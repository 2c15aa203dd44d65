/*
 * The per-packet relay path in C: ChannelData and Send indications from UDP clients to
 * peers, and peers' datagrams back to clients as ChannelData or Data indications.
 *
 * Only the hot, happy path lives here. The TURN core (pure Python) stays the only writer of
 * the state that decides where a packet may go: this code reads the very dictionaries the
 * Python path reads (a listener's client address -> allocation, an allocation's
 * permissions, channels and peer_channels) while holding the GIL, on the event loop's
 * thread. Anything it does not recognise as relayable right now -- STUN requests, unknown
 * channels, missing permissions, unusual attributes -- is handed unchanged to the Python
 * path, which decides and counts exactly as it does without this module.
 *
 * What it saves per packet: the interpreter, a socket-module call with its GIL release and
 * address parsing and formatting, and, under load, system calls (recvmmsg reads up to a batch
 * from a busy socket in one call; sendmmsg sends a relay socket's batch to its client).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 32
/* Room in front of a received datagram for the header wrapped around it: 4 bytes of
 * ChannelData, or a Data indication's 20-byte header, XOR-PEER-ADDRESS (up to 24 bytes)
 * and the DATA attribute's header (4 bytes). */
#define HEADROOM 48
#define MAX_DATAGRAM 65536
#define SLOT (HEADROOM + MAX_DATAGRAM + 4)
/* Address tuples are cached by their raw socket address; a flood of new sources empties
 * the cache rather than growing it. The client cache is also emptied once it holds more
 * than twice the listener's allocations and CLIENT_CACHE_SLACK: clients come and go, and
 * the addresses of those gone would otherwise stay until 65536 had been seen. */
#define CACHE_LIMIT 65536
#define CLIENT_CACHE_SLACK 1024
#define COOKIE 0x2112A442u
/* Bandwidth limits (turn/bandwidth.py): nanoseconds per second, the longest refill (the
 * burst time, one second), and at most this many buckets per direction (the allocation's,
 * its user's, the worker's). */
#define NS 1000000000LL
#define MAX_ELAPSED NS
#define MAX_BUCKETS 4

static unsigned char *pool;
static struct mmsghdr rmsgs[BATCH];
static struct iovec riov[BATCH];
static struct sockaddr_storage rnames[BATCH];
static struct mmsghdr smsgs[BATCH];
static struct iovec siov[BATCH];
static size_t spayload[BATCH];
/* The receive pool is shared: a read must never start while another is running. */
static int busy;

static PyObject *peer_cache;   /* raw peer address -> (ip, port) */
static PyObject *client_cache; /* raw client address -> (ip, port) or (ip, port, flow, scope) */
static PyObject *s_permissions, *s_peer_channels, *s_channels, *s_relays;
static PyObject *s_limits, *s_to_peers, *s_to_client, *s_drops, *s_bandwidth;
static PyObject *v4_key, *v6_key;

static PyTypeObject RelayType;

static inline unsigned be16(const unsigned char *p) { return ((unsigned)p[0] << 8) | p[1]; }

static inline void put16(unsigned char *p, unsigned v)
{
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

static inline void put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* ------------------------------------------------------------------ bandwidth */

/* turn/bandwidth.py's admit() to the letter: each bucket is int64 [tokens, stamp, rate,
 * capacity], tokens in bytes x 10^9, the stamp in CLOCK_MONOTONIC nanoseconds (Python's
 * time.monotonic_ns). 1 when ``size`` bytes may pass at ``now`` (and every bucket paid). */
static int admit_buckets(int64_t *const *buckets, int count, int64_t now, int64_t size)
{
    int64_t cost = size * NS;
    for (int i = 0; i < count; i++) {
        int64_t *bucket = buckets[i];
        int64_t elapsed = now - bucket[1];
        if (elapsed > 0) {
            if (elapsed > MAX_ELAPSED)
                elapsed = MAX_ELAPSED;
            int64_t tokens = bucket[0] + elapsed * bucket[2];
            bucket[0] = tokens < bucket[3] ? tokens : bucket[3];
            bucket[1] = now;
        }
        if (bucket[0] < cost)
            return 0;
    }
    for (int i = 0; i < count; i++)
        buckets[i][0] -= cost;
    return 1;
}

static inline int64_t monotonic_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * NS + (int64_t)now.tv_nsec;
}

/* Exports a bucket's memory for as long as the view is held (the array cannot be resized
 * meanwhile), -1 with an exception when it is not a bucket. */
static int bucket_view(PyObject *bucket, Py_buffer *view)
{
    if (PyObject_GetBuffer(bucket, view, PyBUF_WRITABLE | PyBUF_FORMAT) < 0)
        return -1;
    if (view->itemsize != 8 || view->len != 4 * 8 || view->format == NULL ||
        strcmp(view->format, "q") != 0) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_TypeError, "a bucket is an array('q') of 4 integers");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ addresses */

/* A new reference to a hashable key for a socket address, NULL without an error for a
 * family this module does not relay. */
static PyObject *address_key(const struct sockaddr_storage *ss)
{
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        uint64_t key = ((uint64_t)ntohl(sin->sin_addr.s_addr) << 16) | ntohs(sin->sin_port);
        return PyLong_FromUnsignedLongLong(key);
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
        unsigned char raw[26];
        memcpy(raw, &sin6->sin6_addr, 16);
        memcpy(raw + 16, &sin6->sin6_port, 2);
        memcpy(raw + 18, &sin6->sin6_flowinfo, 4);
        memcpy(raw + 22, &sin6->sin6_scope_id, 4);
        return PyBytes_FromStringAndSize((const char *)raw, sizeof raw);
    }
    return NULL;
}

/* The tuple Python's socket module would give: (ip, port) for IPv4; for IPv6 the same, or
 * with ``full``, (ip, port, flowinfo, scope_id). */
static PyObject *address_tuple(const struct sockaddr_storage *ss, int full)
{
    char text[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        if (inet_ntop(AF_INET, &sin->sin_addr, text, sizeof text) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(si)", text, (int)ntohs(sin->sin_port));
    }
    const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
    if (inet_ntop(AF_INET6, &sin6->sin6_addr, text, sizeof text) == NULL)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (full)
        return Py_BuildValue("(siII)", text, (int)ntohs(sin6->sin6_port),
                             (unsigned int)ntohl(sin6->sin6_flowinfo),
                             (unsigned int)sin6->sin6_scope_id);
    return Py_BuildValue("(si)", text, (int)ntohs(sin6->sin6_port));
}

/* A new reference to the address tuple of ``ss``; NULL without an error for an unknown
 * family, NULL with one on failure. */
static PyObject *cached_address(PyObject *cache, const struct sockaddr_storage *ss, int full,
                                Py_ssize_t limit)
{
    PyObject *key = address_key(ss);
    if (key == NULL)
        return NULL;
    PyObject *value = PyDict_GetItemWithError(cache, key);
    if (value != NULL) {
        Py_INCREF(value);
        Py_DECREF(key);
        return value;
    }
    if (PyErr_Occurred() || (value = address_tuple(ss, full)) == NULL) {
        Py_DECREF(key);
        return NULL;
    }
    if (PyDict_GET_SIZE(cache) >= limit)
        PyDict_Clear(cache);
    if (PyDict_SetItem(cache, key, value) < 0) {
        Py_DECREF(key);
        Py_DECREF(value);
        return NULL;
    }
    Py_DECREF(key);
    return value;
}

/* Fills ``ss`` from an (ip, port[, flowinfo, scope_id]) tuple. -1 with an exception set
 * when it is not one. */
static int parse_address(PyObject *address, struct sockaddr_storage *ss, socklen_t *length)
{
    if (!PyTuple_Check(address) || PyTuple_GET_SIZE(address) < 2 ||
        !PyUnicode_Check(PyTuple_GET_ITEM(address, 0)) ||
        !PyLong_Check(PyTuple_GET_ITEM(address, 1))) {
        PyErr_SetString(PyExc_TypeError, "address must be an (ip, port) tuple");
        return -1;
    }
    const char *ip = PyUnicode_AsUTF8(PyTuple_GET_ITEM(address, 0));
    if (ip == NULL)
        return -1;
    long port = PyLong_AsLong(PyTuple_GET_ITEM(address, 1));
    if (port < 0 || port > 65535) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_OverflowError, "port must be 0-65535");
        return -1;
    }
    if (strchr(ip, ':') != NULL) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
        memset(sin6, 0, sizeof *sin6);
        if (inet_pton(AF_INET6, ip, &sin6->sin6_addr) != 1) {
            PyErr_Format(PyExc_ValueError, "not an IPv6 address: %s", ip);
            return -1;
        }
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        if (PyTuple_GET_SIZE(address) >= 4) {
            unsigned long flow = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(address, 2));
            unsigned long scope = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(address, 3));
            if (PyErr_Occurred())
                return -1;
            sin6->sin6_flowinfo = htonl((uint32_t)flow);
            sin6->sin6_scope_id = (uint32_t)scope;
        }
        *length = sizeof *sin6;
        return 0;
    }
    struct sockaddr_in *sin = (struct sockaddr_in *)ss;
    memset(sin, 0, sizeof *sin);
    if (inet_pton(AF_INET, ip, &sin->sin_addr) != 1) {
        PyErr_Format(PyExc_ValueError, "not an IPv4 address: %s", ip);
        return -1;
    }
    sin->sin_family = AF_INET;
    sin->sin_port = htons((uint16_t)port);
    *length = sizeof *sin;
    return 0;
}

static int receive_batch(int fd, int count)
{
    for (int i = 0; i < count; i++) {
        riov[i].iov_base = pool + (size_t)i * SLOT + HEADROOM;
        riov[i].iov_len = MAX_DATAGRAM;
        rmsgs[i].msg_hdr.msg_iov = &riov[i];
        rmsgs[i].msg_hdr.msg_iovlen = 1;
        rmsgs[i].msg_hdr.msg_name = &rnames[i];
        rmsgs[i].msg_hdr.msg_namelen = sizeof rnames[i];
        rmsgs[i].msg_hdr.msg_control = NULL;
        rmsgs[i].msg_hdr.msg_controllen = 0;
        rmsgs[i].msg_hdr.msg_flags = 0;
    }
    return recvmmsg(fd, rmsgs, (unsigned)count, MSG_DONTWAIT, NULL);
}

/* Keeps the first exception raised while a batch goes on, so that one bad datagram does
 * not cost the others queued behind it. */
typedef struct {
    PyObject *type, *value, *traceback;
} Pending;

static void keep_error(Pending *pending)
{
    if (pending->type == NULL)
        PyErr_Fetch(&pending->type, &pending->value, &pending->traceback);
    else
        PyErr_Clear();
}

static PyObject *finish(Pending *pending)
{
    busy = 0;
    if (pending->type != NULL) {
        PyErr_Restore(pending->type, pending->value, pending->traceback);
        return NULL;
    }
    Py_RETURN_NONE;
}

static int enter(void)
{
    if (busy) {
        PyErr_SetString(PyExc_RuntimeError, "relay read re-entered");
        return -1;
    }
    busy = 1;
    return 0;
}

/* ------------------------------------------------------------------ Relay */

typedef struct {
    PyObject_HEAD
    int fd;
    int client_fd; /* the UDP listener's socket, or -1 */
    socklen_t client_length;
    struct sockaddr_storage client;
    PyObject *allocation; /* the Allocation, or NULL before it is attached */
    /* The allocation's own dictionaries (the core changes them in place, never rebinds). */
    PyObject *permissions, *peer_channels;
    /* The last peer heard from, and the last one sent to, with their converted forms:
     * a call's packets come from and go to the same peer. */
    struct sockaddr_storage last_from;
    socklen_t last_from_length;
    PyObject *last_from_tuple;
    PyObject *last_to_tuple;
    struct sockaddr_storage last_to;
    socklen_t last_to_length;
    uint64_t last_wakeup_ns;
    PyObject *to_client;  /* for stream clients: callable(message) */
    char pad_stream;      /* pad ChannelData to 4 bytes before to_client (RFC 8656 §12.5) */
    char paused;          /* the stream client's transport asked us to stop writing */
    unsigned char tid_prefix[4];
    unsigned long long tid_counter;
    unsigned long long packets_to_peers, bytes_to_peers;
    unsigned long long packets_to_client, bytes_to_client;
    unsigned long long dropped;
    /* The allocation's bandwidth buckets, by direction; none without limits. Their arrays
     * stay exported (views) while the allocation is attached. */
    int n_up, n_down, n_views;
    int64_t *up[MAX_BUCKETS], *down[MAX_BUCKETS];
    Py_buffer views[2 * MAX_BUCKETS];
    PyObject *drops; /* the core's drop counter, for the cause "bandwidth" */
    unsigned long long bandwidth_dropped;
} Relay;

static int Relay_init(Relay *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"fd", "tid_prefix", NULL};
    int fd;
    Py_buffer prefix;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iy*", names, &fd, &prefix))
        return -1;
    if (prefix.len != 4) {
        PyBuffer_Release(&prefix);
        PyErr_SetString(PyExc_ValueError, "tid_prefix must be 4 bytes");
        return -1;
    }
    memcpy(self->tid_prefix, prefix.buf, 4);
    PyBuffer_Release(&prefix);
    self->fd = fd;
    self->client_fd = -1;
    return 0;
}

static int Relay_traverse(Relay *self, visitproc visit, void *arg)
{
    Py_VISIT(self->allocation);
    Py_VISIT(self->permissions);
    Py_VISIT(self->peer_channels);
    Py_VISIT(self->last_from_tuple);
    Py_VISIT(self->last_to_tuple);
    Py_VISIT(self->to_client);
    Py_VISIT(self->drops);
    return 0;
}

static void forget_limits(Relay *self)
{
    self->n_up = self->n_down = 0;
    for (int i = 0; i < self->n_views; i++)
        PyBuffer_Release(&self->views[i]);
    self->n_views = 0;
    Py_CLEAR(self->drops);
}

/* Takes the buckets of ``allocation.limits`` (a bandwidth.Limits, or None). */
static int load_limits(Relay *self, PyObject *allocation)
{
    PyObject *limits = PyObject_GetAttr(allocation, s_limits);
    if (limits == NULL)
        return -1;
    if (limits == Py_None) {
        Py_DECREF(limits);
        return 0;
    }
    PyObject *sides[2] = {PyObject_GetAttr(limits, s_to_peers), NULL};
    sides[1] = sides[0] ? PyObject_GetAttr(limits, s_to_client) : NULL;
    PyObject *drops = sides[1] ? PyObject_GetAttr(limits, s_drops) : NULL;
    Py_DECREF(limits);
    int result = -1;
    if (drops == NULL)
        goto done;
    if (!PyDict_Check(drops)) {
        PyErr_SetString(PyExc_TypeError, "limits.drops must be a dict");
        goto done;
    }
    for (int side = 0; side < 2; side++) {
        PyObject *buckets = sides[side];
        if (!PyTuple_Check(buckets) || PyTuple_GET_SIZE(buckets) > MAX_BUCKETS) {
            PyErr_SetString(PyExc_TypeError, "limits hold a tuple of at most 4 buckets each way");
            goto done;
        }
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(buckets); i++) {
            Py_buffer *view = &self->views[self->n_views];
            if (bucket_view(PyTuple_GET_ITEM(buckets, i), view) < 0)
                goto done;
            self->n_views++;
            if (side == 0)
                self->up[self->n_up++] = view->buf;
            else
                self->down[self->n_down++] = view->buf;
        }
    }
    Py_INCREF(drops);
    self->drops = drops;
    result = 0;
done:
    if (result < 0)
        forget_limits(self);
    Py_XDECREF(sides[0]);
    Py_XDECREF(sides[1]);
    Py_XDECREF(drops);
    return result;
}

/* A packet a bandwidth limit refused: counted here, and by cause in the core's counter. */
static void bandwidth_drop(Relay *self)
{
    self->dropped++;
    self->bandwidth_dropped++;
    PyObject *drops = self->drops;
    if (drops == NULL)
        return;
    PyObject *old = PyDict_GetItemWithError(drops, s_bandwidth);
    if (old == NULL && PyErr_Occurred()) {
        PyErr_Clear();
        return;
    }
    long long count = old != NULL ? PyLong_AsLongLong(old) : 0;
    PyObject *new = count >= 0 ? PyLong_FromLongLong(count + 1) : NULL;
    if (new == NULL || PyDict_SetItem(drops, s_bandwidth, new) < 0)
        PyErr_Clear(); /* a count lost is not worth failing a packet for */
    Py_XDECREF(new);
}

static void forget_allocation(Relay *self)
{
    forget_limits(self);
    Py_CLEAR(self->allocation);
    Py_CLEAR(self->permissions);
    Py_CLEAR(self->peer_channels);
    Py_CLEAR(self->last_from_tuple);
    Py_CLEAR(self->last_to_tuple);
}

static int Relay_clear(Relay *self)
{
    forget_allocation(self);
    Py_CLEAR(self->to_client);
    return 0;
}

static PyObject *Relay_get_allocation(Relay *self, void *closure)
{
    PyObject *allocation = self->allocation ? self->allocation : Py_None;
    Py_INCREF(allocation);
    return allocation;
}

static int Relay_set_allocation(Relay *self, PyObject *value, void *closure)
{
    if (value == NULL || value == Py_None) {
        forget_allocation(self);
        return 0;
    }
    PyObject *permissions = PyObject_GetAttr(value, s_permissions);
    PyObject *peer_channels = permissions ? PyObject_GetAttr(value, s_peer_channels) : NULL;
    if (peer_channels == NULL || !PyDict_Check(permissions) || !PyDict_Check(peer_channels)) {
        if (peer_channels != NULL)
            PyErr_SetString(PyExc_TypeError, "permissions and peer_channels must be dicts");
        Py_XDECREF(permissions);
        Py_XDECREF(peer_channels);
        return -1;
    }
    forget_allocation(self);
    if (load_limits(self, value) < 0) {
        Py_DECREF(permissions);
        Py_DECREF(peer_channels);
        return -1;
    }
    Py_INCREF(value);
    self->allocation = value;
    self->permissions = permissions;
    self->peer_channels = peer_channels;
    return 0;
}

static PyGetSetDef Relay_getset[] = {
    {"allocation", (getter)Relay_get_allocation, (setter)Relay_set_allocation,
     "the Allocation this socket relays for, or None", NULL},
    {NULL},
};

static void Relay_dealloc(Relay *self)
{
    PyObject_GC_UnTrack(self);
    Relay_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Relay_set_client(Relay *self, PyObject *args)
{
    int fd;
    PyObject *address;
    if (!PyArg_ParseTuple(args, "iO", &fd, &address))
        return NULL;
    if (parse_address(address, &self->client, &self->client_length) < 0)
        return NULL;
    self->client_fd = fd;
    Py_RETURN_NONE;
}

static PyObject *Relay_clear_client(Relay *self, PyObject *unused)
{
    self->client_fd = -1;
    Py_CLEAR(self->to_client);
    forget_allocation(self);
    Py_RETURN_NONE;
}

static PyObject *Relay_sendto(Relay *self, PyObject *args)
{
    Py_buffer data;
    PyObject *address;
    struct sockaddr_storage peer;
    socklen_t length;
    if (!PyArg_ParseTuple(args, "y*O", &data, &address))
        return NULL;
    if (parse_address(address, &peer, &length) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    ssize_t sent = sendto(self->fd, data.buf, (size_t)data.len, 0, (struct sockaddr *)&peer, length);
    PyBuffer_Release(&data);
    if (sent < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromSsize_t(sent);
}

/* Wraps a peer's datagram for the client, in place in front of it. Returns the message's
 * start and sets *total, or NULL when it does not fit a Data indication. */
static unsigned char *wrap_for_client(Relay *self, unsigned char *data, size_t size,
                                      const struct sockaddr_storage *from, PyObject *channel,
                                      size_t *total)
{
    if (channel != NULL) {
        unsigned long number = PyLong_AsUnsignedLong(channel);
        if (number > 0xFFFF) {
            PyErr_Clear();
            return NULL;
        }
        put16(data - 4, (unsigned)number);
        put16(data - 2, (unsigned)size);
        *total = 4 + size;
        return data - 4;
    }
    size_t pad = (4 - (size & 3)) & 3;
    size_t value_length = from->ss_family == AF_INET ? 8 : 20;
    size_t length = 4 + value_length + 4 + size + pad;
    if (length > 0xFFFF)
        return NULL;
    unsigned char *start = data - (20 + 4 + value_length + 4);
    unsigned char *p = start;
    put16(p, 0x0017);
    put16(p + 2, (unsigned)length);
    put32(p + 4, COOKIE);
    memcpy(p + 8, self->tid_prefix, 4);
    self->tid_counter++;
    for (int i = 0; i < 8; i++)
        p[12 + i] = (unsigned char)(self->tid_counter >> (56 - 8 * i));
    p += 20;
    put16(p, 0x0012);
    put16(p + 2, (unsigned)value_length);
    p[4] = 0;
    if (from->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)from;
        p[5] = 1;
        put16(p + 6, ntohs(sin->sin_port) ^ (COOKIE >> 16));
        put32(p + 8, ntohl(sin->sin_addr.s_addr) ^ COOKIE);
        p += 12;
    } else {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)from;
        unsigned char mask[16];
        put32(mask, COOKIE);
        memcpy(mask + 4, start + 8, 12);
        p[5] = 2;
        put16(p + 6, ntohs(sin6->sin6_port) ^ (COOKIE >> 16));
        for (int i = 0; i < 16; i++)
            p[8 + i] = sin6->sin6_addr.s6_addr[i] ^ mask[i];
        p += 24;
    }
    put16(p, 0x0013);
    put16(p + 2, (unsigned)size);
    memset(data + size, 0, pad);
    *total = 20 + length;
    return start;
}

static void send_to_udp_client(Relay *self, int count)
{
    for (int i = 0; i < count; i++) {
        smsgs[i].msg_hdr.msg_iov = &siov[i];
        smsgs[i].msg_hdr.msg_iovlen = 1;
        smsgs[i].msg_hdr.msg_name = &self->client;
        smsgs[i].msg_hdr.msg_namelen = self->client_length;
        smsgs[i].msg_hdr.msg_control = NULL;
        smsgs[i].msg_hdr.msg_controllen = 0;
        smsgs[i].msg_hdr.msg_flags = 0;
    }
    int i = 0;
    while (i < count) {
        int sent;
        if (count - i == 1) {
            sent = sendto(self->client_fd, siov[i].iov_base, siov[i].iov_len, 0,
                          (struct sockaddr *)&self->client, self->client_length) < 0
                       ? -1
                       : 1;
        } else {
            sent = sendmmsg(self->client_fd, smsgs + i, (unsigned)(count - i), 0);
        }
        if (sent < 0) {
            /* A full buffer (or an error about this one datagram) drops it, as a router
             * would, and the rest are tried. */
            if (errno == EINTR)
                continue;
            self->dropped++;
            i++;
            continue;
        }
        for (int j = i; j < i + sent; j++) {
            self->packets_to_client++;
            self->bytes_to_client += spayload[j];
        }
        i += sent;
    }
}

static PyObject *Relay_readable(Relay *self, PyObject *unused)
{
    if (enter() < 0)
        return NULL;
    Pending pending = {NULL, NULL, NULL};
    /* Most relay sockets hold one datagram when they wake (a call's packets are
     * milliseconds apart): one is read, without a second try that would find nothing. One
     * woken again within 100 µs is busy and gets a whole batch. */
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    uint64_t now_ns = (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
    int busy_socket = now_ns - self->last_wakeup_ns < 100000;
    self->last_wakeup_ns = now_ns;
    int n = receive_batch(self->fd, busy_socket ? BATCH : 1);
    if (n <= 0) {
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            self->dropped++; /* an ICMP error queued on the socket */
        return finish(&pending);
    }
    if (self->allocation == NULL || (self->client_fd < 0 && self->to_client == NULL)) {
        self->dropped += (unsigned long long)n;
        return finish(&pending);
    }
    PyObject *permissions = self->permissions;
    PyObject *peer_channels = self->peer_channels;
    Py_INCREF(permissions);
    Py_INCREF(peer_channels);
    int out = 0;
    for (int i = 0; i < n; i++) {
        unsigned char *data = pool + (size_t)i * SLOT + HEADROOM;
        size_t size = rmsgs[i].msg_len;
        socklen_t from_length = rmsgs[i].msg_hdr.msg_namelen;
        PyObject *peer;
        if (self->last_from_tuple != NULL && from_length == self->last_from_length &&
            memcmp(&rnames[i], &self->last_from, from_length) == 0) {
            peer = self->last_from_tuple;
            Py_INCREF(peer);
        } else {
            peer = cached_address(peer_cache, &rnames[i], 0, CACHE_LIMIT);
            if (peer == NULL) {
                if (PyErr_Occurred())
                    keep_error(&pending);
                self->dropped++;
                continue;
            }
            Py_INCREF(peer);
            Py_XSETREF(self->last_from_tuple, peer);
            memcpy(&self->last_from, &rnames[i], from_length);
            self->last_from_length = from_length;
        }
        int allowed = PyDict_Contains(permissions, PyTuple_GET_ITEM(peer, 0));
        if (allowed <= 0) {
            if (allowed < 0)
                keep_error(&pending);
            self->dropped++;
            Py_DECREF(peer);
            continue;
        }
        PyObject *channel = PyDict_GetItemWithError(peer_channels, peer);
        Py_DECREF(peer);
        if (channel == NULL && PyErr_Occurred()) {
            keep_error(&pending);
            self->dropped++;
            continue;
        }
        /* A paused stream client's packets are dropped below without paying, as in Python. */
        if (self->n_down && !self->paused &&
            !admit_buckets(self->down, self->n_down, (int64_t)now_ns, (int64_t)size)) {
            bandwidth_drop(self);
            continue;
        }
        size_t total;
        unsigned char *start = wrap_for_client(self, data, size, &rnames[i], channel, &total);
        if (start == NULL) {
            self->dropped++;
            continue;
        }
        siov[out].iov_base = start;
        siov[out].iov_len = total;
        spayload[out] = size;
        out++;
    }
    Py_DECREF(permissions);
    Py_DECREF(peer_channels);
    if (out == 0)
        return finish(&pending);
    if (self->client_fd >= 0) {
        send_to_udp_client(self, out);
        return finish(&pending);
    }
    /* A stream client: its transport queues each message; one that lets too much pile up
     * unread (paused) loses packets instead of the server's memory. */
    PyObject *to_client = self->to_client;
    Py_INCREF(to_client);
    for (int i = 0; i < out; i++) {
        if (self->paused) {
            self->dropped++;
            continue;
        }
        size_t length = siov[i].iov_len;
        if (self->pad_stream) {
            size_t pad = (4 - (length & 3)) & 3;
            memset((unsigned char *)siov[i].iov_base + length, 0, pad);
            length += pad;
        }
        PyObject *message = PyBytes_FromStringAndSize(siov[i].iov_base, (Py_ssize_t)length);
        PyObject *result = message ? PyObject_CallOneArg(to_client, message) : NULL;
        Py_XDECREF(message);
        if (result == NULL) {
            if (PyErr_ExceptionMatches(PyExc_OSError) || PyErr_ExceptionMatches(PyExc_ValueError))
                PyErr_Clear();
            else
                keep_error(&pending);
            self->dropped++;
            continue;
        }
        Py_DECREF(result);
        self->packets_to_client++;
        self->bytes_to_client += spayload[i];
    }
    Py_DECREF(to_client);
    return finish(&pending);
}

static PyMethodDef Relay_methods[] = {
    {"readable", (PyCFunction)Relay_readable, METH_NOARGS,
     "Read one datagram, or a batch if the socket is busy, and relay it to the client."},
    {"set_client", (PyCFunction)Relay_set_client, METH_VARARGS,
     "set_client(fd, address): relay to a UDP client through the listener socket fd."},
    {"clear_client", (PyCFunction)Relay_clear_client, METH_NOARGS,
     "Forget the client and the allocation: nothing is relayed any more."},
    {"sendto", (PyCFunction)Relay_sendto, METH_VARARGS,
     "sendto(data, address): send a datagram to a peer; raises OSError like socket.sendto."},
    {NULL},
};

static PyMemberDef Relay_members[] = {
    {"fd", T_INT, offsetof(Relay, fd), READONLY, NULL},
    {"to_client", T_OBJECT, offsetof(Relay, to_client), 0, NULL},
    {"pad_stream", T_BOOL, offsetof(Relay, pad_stream), 0, NULL},
    {"paused", T_BOOL, offsetof(Relay, paused), 0, NULL},
    {"packets_to_peers", T_ULONGLONG, offsetof(Relay, packets_to_peers), READONLY, NULL},
    {"bytes_to_peers", T_ULONGLONG, offsetof(Relay, bytes_to_peers), READONLY, NULL},
    {"packets_to_client", T_ULONGLONG, offsetof(Relay, packets_to_client), READONLY, NULL},
    {"bytes_to_client", T_ULONGLONG, offsetof(Relay, bytes_to_client), READONLY, NULL},
    {"dropped", T_ULONGLONG, offsetof(Relay, dropped), READONLY, NULL},
    {"bandwidth_dropped", T_ULONGLONG, offsetof(Relay, bandwidth_dropped), READONLY,
     "of dropped, those a bandwidth limit refused"},
    {NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tsunagu.transport._fastpath.Relay",
    .tp_basicsize = sizeof(Relay),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One relay socket's per-packet state; the socket itself is owned by Python.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Relay_init,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_traverse = (traverseproc)Relay_traverse,
    .tp_clear = (inquiry)Relay_clear,
    .tp_methods = Relay_methods,
    .tp_members = Relay_members,
    .tp_getset = Relay_getset,
};

/* ------------------------------------------------------------------ Listener */

typedef struct {
    PyObject_HEAD
    int fd;
    PyObject *allocations; /* dict: client address tuple -> Allocation */
    PyObject *fallback;    /* callable(data, address): the Python path */
    unsigned long long relayed;
    unsigned long long bindings;
    char answer_binding; /* plain Binding requests are answered here (see answer_binding) */
} Listener;

static int Listener_init(Listener *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"fd", "allocations", "fallback", NULL};
    int fd;
    PyObject *allocations, *fallback;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iO!O", names, &fd, &PyDict_Type, &allocations,
                                     &fallback))
        return -1;
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "fallback must be callable");
        return -1;
    }
    self->fd = fd;
    Py_INCREF(allocations);
    Py_XSETREF(self->allocations, allocations);
    Py_INCREF(fallback);
    Py_XSETREF(self->fallback, fallback);
    return 0;
}

static int Listener_traverse(Listener *self, visitproc visit, void *arg)
{
    Py_VISIT(self->allocations);
    Py_VISIT(self->fallback);
    return 0;
}

static int Listener_clear(Listener *self)
{
    Py_CLEAR(self->allocations);
    Py_CLEAR(self->fallback);
    return 0;
}

static void Listener_dealloc(Listener *self)
{
    PyObject_GC_UnTrack(self);
    Listener_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* 1: relayed; 0: not for this path (the Python path decides); -1: error. */
static int relay_channel_data(PyObject *allocation, const unsigned char *data, size_t size)
{
    size_t length = be16(data + 2);
    if (4 + length > size)
        return 0;
    int result = 0;
    PyObject *permissions = NULL, *number = NULL;
    PyObject *channels = PyObject_GetAttr(allocation, s_channels);
    if (channels == NULL || (number = PyLong_FromLong((long)be16(data))) == NULL)
        goto error;
    PyObject *entry = PyDict_GetItemWithError(channels, number);
    if (entry == NULL) {
        if (PyErr_Occurred())
            goto error;
        goto done;
    }
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2 ||
        !PyObject_TypeCheck(PyTuple_GET_ITEM(entry, 0), &RelayType))
        goto done;
    Relay *relay = (Relay *)PyTuple_GET_ITEM(entry, 0);
    PyObject *peer = PyTuple_GET_ITEM(entry, 1);
    /* A relay not yet handed its allocation has not got its limits either: Python decides. */
    if (!PyTuple_Check(peer) || PyTuple_GET_SIZE(peer) < 2 || relay->allocation != allocation)
        goto done;
    if ((permissions = PyObject_GetAttr(allocation, s_permissions)) == NULL)
        goto error;
    int allowed = PyDict_Contains(permissions, PyTuple_GET_ITEM(peer, 0));
    if (allowed < 0)
        goto error;
    if (allowed == 0)
        goto done;
    if (relay->n_up &&
        !admit_buckets(relay->up, relay->n_up, monotonic_ns(), (int64_t)length)) {
        bandwidth_drop(relay);
        result = 1;
        goto done;
    }
    if (peer != relay->last_to_tuple) {
        if (parse_address(peer, &relay->last_to, &relay->last_to_length) < 0) {
            PyErr_Clear();
            Py_CLEAR(relay->last_to_tuple);
            goto done;
        }
        Py_INCREF(peer);
        Py_XSETREF(relay->last_to_tuple, peer);
    }
    if (sendto(relay->fd, data + 4, length, 0, (struct sockaddr *)&relay->last_to,
               relay->last_to_length) < 0) {
        relay->dropped++; /* unreachable peer or full buffer: the datagram is lost */
    } else {
        relay->packets_to_peers++;
        relay->bytes_to_peers += length;
    }
    result = 1;
    goto done;
error:
    result = -1;
done:
    Py_XDECREF(channels);
    Py_XDECREF(number);
    Py_XDECREF(permissions);
    return result;
}

/* A Send indication carrying exactly XOR-PEER-ADDRESS and DATA to a permitted peer; any
 * other shape is for the Python path. Same return values as relay_channel_data. */
static int relay_send_indication(PyObject *allocation, const unsigned char *data, size_t size)
{
    size_t length = be16(data + 2);
    if (20 + length != size || (length & 3) || be16(data + 4) != (COOKIE >> 16) ||
        be16(data + 6) != (COOKIE & 0xFFFF))
        return 0;
    const unsigned char *peer_value = NULL, *payload = NULL;
    size_t peer_length = 0, payload_length = 0;
    size_t offset = 20;
    while (offset < size) {
        if (offset + 4 > size)
            return 0;
        unsigned type = be16(data + offset);
        size_t value_length = be16(data + offset + 2);
        size_t padded = (value_length + 3) & ~(size_t)3;
        if (offset + 4 + padded > size)
            return 0;
        if (type == 0x0012 && peer_value == NULL) {
            peer_value = data + offset + 4;
            peer_length = value_length;
        } else if (type == 0x0013 && payload == NULL) {
            payload = data + offset + 4;
            payload_length = value_length;
        } else {
            return 0;
        }
        offset += 4 + padded;
    }
    if (peer_value == NULL || payload == NULL || peer_value[0] != 0)
        return 0;
    struct sockaddr_storage to;
    socklen_t to_length;
    long version;
    char text[INET6_ADDRSTRLEN];
    memset(&to, 0, sizeof to);
    if (peer_length == 8 && peer_value[1] == 1) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&to;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)(be16(peer_value + 2) ^ (COOKIE >> 16)));
        uint32_t ip = ((uint32_t)be16(peer_value + 4) << 16 | be16(peer_value + 6)) ^ COOKIE;
        sin->sin_addr.s_addr = htonl(ip);
        to_length = sizeof *sin;
        version = 4;
        inet_ntop(AF_INET, &sin->sin_addr, text, sizeof text);
    } else if (peer_length == 20 && peer_value[1] == 2) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&to;
        unsigned char mask[16];
        put32(mask, COOKIE);
        memcpy(mask + 4, data + 8, 12);
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)(be16(peer_value + 2) ^ (COOKIE >> 16)));
        for (int i = 0; i < 16; i++)
            sin6->sin6_addr.s6_addr[i] = peer_value[4 + i] ^ mask[i];
        to_length = sizeof *sin6;
        version = 6;
        inet_ntop(AF_INET6, &sin6->sin6_addr, text, sizeof text);
    } else {
        return 0;
    }
    int result = 0;
    PyObject *relays = NULL, *key = NULL, *ip = NULL, *permissions = NULL;
    if ((relays = PyObject_GetAttr(allocation, s_relays)) == NULL)
        goto error;
    key = version == 4 ? v4_key : v6_key;
    Py_INCREF(key);
    PyObject *relay = PyDict_GetItemWithError(relays, key);
    if (relay == NULL) {
        if (PyErr_Occurred())
            goto error;
        goto done;
    }
    if (!PyObject_TypeCheck(relay, &RelayType) || ((Relay *)relay)->allocation != allocation)
        goto done;
    if ((permissions = PyObject_GetAttr(allocation, s_permissions)) == NULL ||
        (ip = PyUnicode_FromString(text)) == NULL)
        goto error;
    int allowed = PyDict_Contains(permissions, ip);
    if (allowed < 0)
        goto error;
    if (allowed == 0)
        goto done;
    Relay *r = (Relay *)relay;
    if (r->n_up && !admit_buckets(r->up, r->n_up, monotonic_ns(), (int64_t)payload_length)) {
        bandwidth_drop(r);
        result = 1;
        goto done;
    }
    if (sendto(r->fd, payload, payload_length, 0, (struct sockaddr *)&to, to_length) < 0) {
        r->dropped++;
    } else {
        r->packets_to_peers++;
        r->bytes_to_peers += payload_length;
    }
    result = 1;
    goto done;
error:
    result = -1;
done:
    Py_XDECREF(relays);
    Py_XDECREF(key);
    Py_XDECREF(ip);
    Py_XDECREF(permissions);
    return result;
}

/* ------------------------------------------------------------------ Binding */

static uint32_t crc_table[256];

static void crc_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
}

static uint32_t crc32_of(const unsigned char *p, size_t n)
{
    uint32_t c = 0xFFFFFFFFu;
    while (n--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

#define FINGERPRINT_XOR 0x5354554Eu
#define BINDING_RESPONSE_MAX (20 + 24 + 8)

static unsigned char binding_out[BATCH][BINDING_RESPONSE_MAX];

/* A Binding request with no attribute but a valid FINGERPRINT gets its success response
 * built into ``out`` (its length is returned); anything else returns 0, for the Python
 * path (ICE's authenticated checks, RFC 3489 clients, bad fingerprints...). */
static size_t answer_binding(const unsigned char *data, size_t size,
                             const struct sockaddr_storage *from, unsigned char *out)
{
    size_t length = be16(data + 2);
    if (20 + length != size || be16(data + 4) != (COOKIE >> 16) ||
        be16(data + 6) != (COOKIE & 0xFFFF))
        return 0;
    int fingerprint = 0;
    if (length == 8) {
        if (be16(data + 20) != 0x8028 || be16(data + 22) != 4)
            return 0;
        uint32_t got = ((uint32_t)be16(data + 24) << 16) | be16(data + 26);
        if (got != (crc32_of(data, 20) ^ FINGERPRINT_XOR))
            return 0;
        fingerprint = 1;
    } else if (length != 0) {
        return 0;
    }
    size_t value_length = from->ss_family == AF_INET ? 8 : 20;
    size_t total = 20 + 4 + value_length + (fingerprint ? 8 : 0);
    put16(out, 0x0101);
    put16(out + 2, (unsigned)(total - 20));
    memcpy(out + 4, data + 4, 16); /* the cookie and the transaction id */
    unsigned char *p = out + 20;
    put16(p, 0x0020);
    put16(p + 2, (unsigned)value_length);
    p[4] = 0;
    if (from->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)from;
        p[5] = 1;
        put16(p + 6, ntohs(sin->sin_port) ^ (COOKIE >> 16));
        put32(p + 8, ntohl(sin->sin_addr.s_addr) ^ COOKIE);
    } else {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)from;
        p[5] = 2;
        put16(p + 6, ntohs(sin6->sin6_port) ^ (COOKIE >> 16));
        for (int i = 0; i < 16; i++)
            p[8 + i] = sin6->sin6_addr.s6_addr[i] ^ out[4 + i];
    }
    if (fingerprint) {
        unsigned char *f = out + total - 8;
        put16(f, 0x8028);
        put16(f + 2, 4);
        put32(f + 4, crc32_of(out, total - 8) ^ FINGERPRINT_XOR);
    }
    return total;
}

/* One sendmmsg for all the Binding responses of a batch; a full buffer loses one. */
static void send_answers(Listener *self, int count)
{
    for (int i = 0; i < count; i++) {
        smsgs[i].msg_hdr.msg_iov = &siov[i];
        smsgs[i].msg_hdr.msg_iovlen = 1;
        smsgs[i].msg_hdr.msg_control = NULL;
        smsgs[i].msg_hdr.msg_controllen = 0;
        smsgs[i].msg_hdr.msg_flags = 0;
    }
    int i = 0;
    while (i < count) {
        int sent = sendmmsg(self->fd, smsgs + i, (unsigned)(count - i), 0);
        if (sent < 0) {
            if (errno != EINTR)
                i++;
            continue;
        }
        self->bindings += (unsigned long long)sent;
        i += sent;
    }
}

static PyObject *Listener_readable(Listener *self, PyObject *unused)
{
    if (enter() < 0)
        return NULL;
    Pending pending = {NULL, NULL, NULL};
    int n = receive_batch(self->fd, BATCH);
    if (n <= 0)
        return finish(&pending); /* nothing, or an ICMP error about an earlier send */
    PyObject *allocations = self->allocations;
    PyObject *fallback = self->fallback;
    Py_INCREF(allocations);
    Py_INCREF(fallback);
    Py_ssize_t client_limit = 2 * PyDict_GET_SIZE(allocations) + CLIENT_CACHE_SLACK;
    if (client_limit > CACHE_LIMIT)
        client_limit = CACHE_LIMIT;
    int answers = 0;
    for (int i = 0; i < n; i++) {
        const unsigned char *data = pool + (size_t)i * SLOT + HEADROOM;
        size_t size = rmsgs[i].msg_len;
        if (self->answer_binding && size >= 20 && data[0] == 0 && data[1] == 1 &&
            (rnames[i].ss_family == AF_INET || rnames[i].ss_family == AF_INET6)) {
            size_t answer = answer_binding(data, size, &rnames[i], binding_out[answers]);
            if (answer) {
                siov[answers].iov_base = binding_out[answers];
                siov[answers].iov_len = answer;
                smsgs[answers].msg_hdr.msg_name = &rnames[i];
                smsgs[answers].msg_hdr.msg_namelen = rmsgs[i].msg_hdr.msg_namelen;
                answers++;
                continue;
            }
        }
        PyObject *address = cached_address(client_cache, &rnames[i], 1, client_limit);
        if (address == NULL) {
            if (PyErr_Occurred())
                keep_error(&pending);
            continue;
        }
        int handled = 0;
        int channel_data = size >= 4 && data[0] >= 0x40 && data[0] <= 0x7F;
        if (channel_data || (size >= 20 && data[0] == 0x00 && data[1] == 0x16)) {
            PyObject *allocation = PyDict_GetItemWithError(allocations, address);
            if (allocation != NULL) {
                Py_INCREF(allocation);
                handled = channel_data ? relay_channel_data(allocation, data, size)
                                       : relay_send_indication(allocation, data, size);
                Py_DECREF(allocation);
            } else if (PyErr_Occurred()) {
                handled = -1;
            }
        }
        if (handled == 1) {
            self->relayed++;
        } else {
            if (handled < 0)
                keep_error(&pending);
            PyObject *message = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)size);
            PyObject *result = message ? PyObject_CallFunctionObjArgs(fallback, message, address, NULL)
                                       : NULL;
            Py_XDECREF(message);
            if (result == NULL)
                keep_error(&pending);
            Py_XDECREF(result);
        }
        Py_DECREF(address);
    }
    Py_DECREF(allocations);
    Py_DECREF(fallback);
    if (answers)
        send_answers(self, answers);
    return finish(&pending);
}

static PyMethodDef Listener_methods[] = {
    {"readable", (PyCFunction)Listener_readable, METH_NOARGS,
     "Read what the socket holds (up to a batch): relay ChannelData and Send indications, hand "
     "everything else to the fallback."},
    {NULL},
};

static PyMemberDef Listener_members[] = {
    {"fd", T_INT, offsetof(Listener, fd), READONLY, NULL},
    {"relayed", T_ULONGLONG, offsetof(Listener, relayed), READONLY, NULL},
    {"bindings", T_ULONGLONG, offsetof(Listener, bindings), READONLY,
     "Binding requests answered here"},
    {"answer_binding", T_BOOL, offsetof(Listener, answer_binding), 0,
     "answer plain Binding requests here (off: every one goes to the fallback)"},
    {NULL},
};

static PyTypeObject ListenerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tsunagu.transport._fastpath.Listener",
    .tp_basicsize = sizeof(Listener),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A UDP listener's per-packet path; the socket itself is owned by Python.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Listener_init,
    .tp_dealloc = (destructor)Listener_dealloc,
    .tp_traverse = (traverseproc)Listener_traverse,
    .tp_clear = (inquiry)Listener_clear,
    .tp_methods = Listener_methods,
    .tp_members = Listener_members,
};

/* ------------------------------------------------------------------ Stream */

/* A TCP or TLS client's byte stream (RFC 8656 §12.5): 00 starts a STUN message, 01
 * ChannelData padded to four bytes; anything else is not TURN. */
#define STREAM_MAX_FRAME (4 + 0xFFFF + 3)

static PyObject *FramingError;

typedef struct {
    PyObject_HEAD
    PyObject *allocation; /* the connection's Allocation, once it has one */
    PyObject *fallback;   /* callable(is_channel_data, frame) -> true to stop reading */
    unsigned char *buffer;
    size_t used;
    int feeding;
    unsigned long long relayed;
} Stream;

static int Stream_init(Stream *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"fallback", NULL};
    PyObject *fallback;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O", names, &fallback))
        return -1;
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "fallback must be callable");
        return -1;
    }
    Py_INCREF(fallback);
    Py_XSETREF(self->fallback, fallback);
    return 0;
}

static int Stream_traverse(Stream *self, visitproc visit, void *arg)
{
    Py_VISIT(self->allocation);
    Py_VISIT(self->fallback);
    return 0;
}

static int Stream_clear(Stream *self)
{
    Py_CLEAR(self->allocation);
    Py_CLEAR(self->fallback);
    return 0;
}

static void Stream_dealloc(Stream *self)
{
    PyObject_GC_UnTrack(self);
    Stream_clear(self);
    PyMem_Free(self->buffer);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Hands one frame to the fallback: 1 to stop reading, 0 to go on, -1 on error. */
static int stream_fallback(Stream *self, int channel_data, const unsigned char *frame, size_t size)
{
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)frame, (Py_ssize_t)size);
    if (bytes == NULL)
        return -1;
    PyObject *result =
        PyObject_CallFunctionObjArgs(self->fallback, channel_data ? Py_True : Py_False, bytes, NULL);
    Py_DECREF(bytes);
    if (result == NULL)
        return -1;
    int stop = PyObject_IsTrue(result);
    Py_DECREF(result);
    return stop;
}

/* Relays or hands over every complete frame in p[0:size]; returns how many bytes were
 * consumed, or -1 with an exception set. *stop is set when the fallback said so. */
static Py_ssize_t stream_frames(Stream *self, const unsigned char *p, size_t size, int *stop)
{
    size_t offset = 0;
    while (size - offset >= 4) {
        const unsigned char *frame = p + offset;
        size_t length = be16(frame + 2);
        int outcome;
        if (frame[0] < 0x40) {
            if (length & 3) {
                PyErr_SetString(FramingError, "STUN length is not a multiple of 4");
                return -1;
            }
            if (size - offset < 20 + length)
                break;
            offset += 20 + length;
            outcome = stream_fallback(self, 0, frame, 20 + length);
        } else if (frame[0] < 0x80) {
            size_t total = 4 + length + ((4 - (length & 3)) & 3);
            if (size - offset < total)
                break;
            offset += total;
            int relayed = 0;
            PyObject *allocation = self->allocation;
            if (allocation != NULL && allocation != Py_None) {
                Py_INCREF(allocation);
                relayed = relay_channel_data(allocation, frame, 4 + length);
                Py_DECREF(allocation);
                if (relayed < 0)
                    return -1;
            }
            if (relayed) {
                self->relayed++;
                continue;
            }
            outcome = stream_fallback(self, 1, frame, 4 + length);
        } else {
            PyErr_Format(FramingError, "first byte 0x%02x is neither STUN nor ChannelData", frame[0]);
            return -1;
        }
        if (outcome < 0)
            return -1;
        if (outcome) {
            *stop = 1;
            break;
        }
    }
    return (Py_ssize_t)offset;
}

static PyObject *Stream_feed(Stream *self, PyObject *data)
{
    if (self->feeding) {
        PyErr_SetString(PyExc_RuntimeError, "stream fed from inside its own feed");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    self->feeding = 1;
    int stop = 0;
    Py_ssize_t consumed;
    const unsigned char *p;
    size_t size;
    if (self->used == 0) {
        /* The usual case: whole frames straight from the caller's bytes, no copy. */
        p = view.buf;
        size = (size_t)view.len;
    } else {
        unsigned char *grown = PyMem_Realloc(self->buffer, self->used + (size_t)view.len);
        if (grown == NULL) {
            self->feeding = 0;
            PyBuffer_Release(&view);
            return PyErr_NoMemory();
        }
        self->buffer = grown;
        memcpy(self->buffer + self->used, view.buf, (size_t)view.len);
        self->used += (size_t)view.len;
        p = self->buffer;
        size = self->used;
    }
    consumed = stream_frames(self, p, size, &stop);
    if (consumed < 0 || stop) {
        /* A broken stream, or the connection is closing: nothing more is read from it. */
        self->used = 0;
    } else if (p == self->buffer) {
        memmove(self->buffer, self->buffer + consumed, size - (size_t)consumed);
        self->used = size - (size_t)consumed;
    } else if ((size_t)consumed < size) {
        /* At most one partial frame is left over. */
        unsigned char *grown = PyMem_Realloc(self->buffer, STREAM_MAX_FRAME + 20);
        if (grown == NULL) {
            self->feeding = 0;
            PyBuffer_Release(&view);
            return PyErr_NoMemory();
        }
        self->buffer = grown;
        memcpy(self->buffer, p + consumed, size - (size_t)consumed);
        self->used = size - (size_t)consumed;
    }
    self->feeding = 0;
    PyBuffer_Release(&view);
    if (consumed < 0)
        return NULL;
    return PyBool_FromLong(stop);
}

static PyMethodDef Stream_methods[] = {
    {"feed", (PyCFunction)Stream_feed, METH_O,
     "feed(data): relay the complete ChannelData frames, hand the other frames to the "
     "fallback; True when the fallback asked to stop. Raises FramingError on a stream that "
     "is not TURN."},
    {NULL},
};

static PyMemberDef Stream_members[] = {
    {"allocation", T_OBJECT, offsetof(Stream, allocation), 0, NULL},
    {"relayed", T_ULONGLONG, offsetof(Stream, relayed), READONLY, NULL},
    {"buffered", T_PYSSIZET, offsetof(Stream, used), READONLY, NULL},
    {NULL},
};

static PyTypeObject StreamType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tsunagu.transport._fastpath.Stream",
    .tp_basicsize = sizeof(Stream),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A TCP/TLS client's framing and ChannelData relaying.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Stream_init,
    .tp_dealloc = (destructor)Stream_dealloc,
    .tp_traverse = (traverseproc)Stream_traverse,
    .tp_clear = (inquiry)Stream_clear,
    .tp_methods = Stream_methods,
    .tp_members = Stream_members,
};

/* ------------------------------------------------------------------ module */

/* admit(buckets, now, size): the C arithmetic on Python's buckets, for the parity tests. */
static PyObject *module_admit(PyObject *module, PyObject *args)
{
    PyObject *buckets;
    long long now, size;
    if (!PyArg_ParseTuple(args, "O!LL", &PyTuple_Type, &buckets, &now, &size))
        return NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(buckets);
    if (count > MAX_BUCKETS) {
        PyErr_SetString(PyExc_ValueError, "at most 4 buckets");
        return NULL;
    }
    Py_buffer views[MAX_BUCKETS];
    int64_t *pointers[MAX_BUCKETS] = {NULL};
    Py_ssize_t held = 0;
    for (; held < count; held++) {
        if (bucket_view(PyTuple_GET_ITEM(buckets, held), &views[held]) < 0)
            break;
        pointers[held] = views[held].buf;
    }
    int admitted = held == count ? admit_buckets(pointers, (int)count, now, size) : -1;
    for (Py_ssize_t i = 0; i < held; i++)
        PyBuffer_Release(&views[i]);
    if (admitted < 0)
        return NULL;
    return PyBool_FromLong(admitted);
}

static PyMethodDef module_methods[] = {
    {"admit", module_admit, METH_VARARGS,
     "admit(buckets, now, size): turn.bandwidth.admit, in the C path's arithmetic."},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tsunagu.transport._fastpath",
    .m_doc = "The per-packet relay path in C (Linux).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    if (PyType_Ready(&RelayType) < 0 || PyType_Ready(&ListenerType) < 0 ||
        PyType_Ready(&StreamType) < 0)
        return NULL;
    crc_init();
    pool = PyMem_RawMalloc((size_t)BATCH * SLOT);
    if (pool == NULL)
        return PyErr_NoMemory();
    if ((peer_cache = PyDict_New()) == NULL || (client_cache = PyDict_New()) == NULL ||
        (s_permissions = PyUnicode_InternFromString("permissions")) == NULL ||
        (s_peer_channels = PyUnicode_InternFromString("peer_channels")) == NULL ||
        (s_channels = PyUnicode_InternFromString("channels")) == NULL ||
        (s_relays = PyUnicode_InternFromString("relays")) == NULL ||
        (s_limits = PyUnicode_InternFromString("limits")) == NULL ||
        (s_to_peers = PyUnicode_InternFromString("to_peers")) == NULL ||
        (s_to_client = PyUnicode_InternFromString("to_client")) == NULL ||
        (s_drops = PyUnicode_InternFromString("drops")) == NULL ||
        (s_bandwidth = PyUnicode_InternFromString("bandwidth")) == NULL ||
        (v4_key = PyLong_FromLong(4)) == NULL || (v6_key = PyLong_FromLong(6)) == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* The Python framer's exception, so that both paths raise the same one. */
    PyObject *framing = PyImport_ImportModule("tsunagu.stun.framing");
    if (framing != NULL) {
        FramingError = PyObject_GetAttrString(framing, "FramingError");
        Py_DECREF(framing);
    }
    if (FramingError == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&RelayType);
    Py_INCREF(&ListenerType);
    Py_INCREF(&StreamType);
    Py_INCREF(FramingError);
    if (PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0 ||
        PyModule_AddObject(m, "Listener", (PyObject *)&ListenerType) < 0 ||
        PyModule_AddObject(m, "Stream", (PyObject *)&StreamType) < 0 ||
        PyModule_AddObject(m, "FramingError", FramingError) < 0 ||
        PyModule_AddIntConstant(m, "BATCH", BATCH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
