/*
 * loadgen: a closed-loop load generator for the gaspar wire protocol
 * (docs/protocol.md), versions 1 and 2, light enough not to be the
 * bottleneck on a small machine.
 *
 *   loadgen --host 127.0.0.1 --port P --protocol v1|v2 --concurrency N
 *           --duration S [--warmup S] [--threads T] [--connections K]
 *           [--timeout S] [--expect echo|any]
 *           (--size B | --payload-file F | --mix W:TEXT[,W:TEXT...])
 *
 * Closed loop: N requests are in flight at all times; each one that ends
 * (well or badly) immediately starts the next in its place.
 *
 * v1: each of the N slots opens a connection, writes the length-prefixed
 * request, reads the reply until end of stream, closes, and starts over.
 * Latency runs from the connect to the end of stream.
 *
 * v2: K persistent connections share the N slots; each slot is one pipelined
 * request whose reply starts the slot's next request on the same connection.
 * Latency runs from the frame being queued for sending to its reply parsed.
 *
 * T threads each run their own epoll loop over their share of the slots (v1)
 * or connections (v2).  Everything is non-blocking and edge-triggered; the
 * replies are checked as they stream in (never buffered whole).
 *
 * Timing: the first --warmup seconds are not recorded, then --duration
 * seconds are; a request counts in the window when it ends in it.  After the
 * window no request starts, those in flight get one more second, and the
 * run stops.  The result is one JSON object on stdout.
 *
 * Exit status: 0 after a run (even with request errors), 2 on bad arguments or
 * when a first probe connection to the server fails, 1 on an internal error.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 512
#define MAX_THREADS 256           /* the request tag has two hex digits for the thread */
#define SCRATCH_SIZE (256 * 1024) /* per-thread receive buffer */
#define TAG_LEN 12                /* bytes of unique tag at the start of --size payloads */
#define GRACE_NS 1000000000ULL    /* time given to requests in flight after the window */
#define V1_HEADER 4
#define V2_REQ_HEADER 8
#define V2_REPLY_HEADER 9
#define NS_PER_S 1000000000.0

static const uint8_t PREAMBLE[4] = {0xff, 0x47, 0x53, 0x02};

/* ================================================================ errors */

/* Why a request failed.  The v2 statuses keep their protocol names; a v2
 * TIMEOUT status shares "timeout" with the client's own timeout. */
enum err_kind {
    E_RESET,    /* ECONNRESET (or EPIPE after one): the v1 failure signal */
    E_REFUSED,  /* ECONNREFUSED */
    E_TIMEOUT,  /* no reply within --timeout, or v2 status 2 */
    E_MISMATCH, /* --expect echo and the reply is not the request */
    E_OTHER,    /* anything else: other errno, early end of stream, bad frame */
    E_HANDLER_ERROR,
    E_WORKER_LOST,
    E_OVERLOADED,
    E_TOO_LARGE,
    E_BAD_REQUEST,
    E_SHUTTING_DOWN,
    E_COUNT
};

static const char *const ERR_NAMES[E_COUNT] = {
    "reset",         "refused",     "timeout",    "mismatch",  "other",        "handler_error",
    "worker_lost",   "overloaded",  "too_large",  "bad_request", "shutting_down",
};

static enum err_kind errno_kind(int e)
{
    switch (e) {
    case ECONNRESET:
    case EPIPE:
        return E_RESET;
    case ECONNREFUSED:
        return E_REFUSED;
    default:
        return E_OTHER;
    }
}

static enum err_kind status_kind(uint8_t status)
{
    static const enum err_kind by_status[] = {
        E_OTHER, E_HANDLER_ERROR, E_TIMEOUT, E_WORKER_LOST, E_OVERLOADED,
        E_TOO_LARGE, E_BAD_REQUEST, E_SHUTTING_DOWN,
    };
    return status < sizeof by_status / sizeof by_status[0] ? by_status[status] : E_OTHER;
}

/* ================================================================ configuration */

/* One kind of request body: the --size pattern, the --payload-file bytes, or
 * one --mix item. */
struct payload {
    uint8_t *data;
    size_t len;
    bool tagged;      /* bytes [0, TAG_LEN) are replaced by a per-request tag */
    const char *text; /* --mix: the item's text, for the report */
    double weight;    /* --mix: relative frequency */
};

static struct {
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int protocol; /* 1 or 2 */
    unsigned concurrency, threads, connections;
    double duration, warmup, timeout;
    bool expect_echo;
    bool mix;
    struct payload *classes;
    unsigned nclasses;
    double total_weight;
} cfg;

/* Run boundaries, CLOCK_MONOTONIC nanoseconds. */
static uint64_t t_warm; /* the recorded window starts */
static uint64_t t_end;  /* the window ends: no new request from here */
static uint64_t t_stop; /* the run ends, whatever is in flight */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* ================================================================ per-thread state */

/* Latency samples, nanoseconds. */
struct samples {
    uint64_t *v;
    size_t n, cap;
};

/* One request: what was sent and how much of the reply checked out so far. */
struct request {
    unsigned cls;       /* index into cfg.classes */
    char tag[TAG_LEN];  /* the unique tag, when the payload is tagged */
    uint64_t start;     /* ns */
    size_t received;    /* reply bytes so far */
    bool mismatch;      /* --expect echo: some reply byte differed already */
};

struct thread;

/* v1: one in-flight slot, one connection per request. */
struct v1slot {
    struct thread *t;
    int fd; /* -1 when idle */
    bool writing;
    bool nodelay; /* TCP_NODELAY set on this connection */
    uint8_t header[V1_HEADER];
    size_t sent; /* bytes of the frame (header and payload) written */
    struct request req;
};

/* v2: one in-flight slot of a connection. */
struct v2slot {
    bool busy;
    uint32_t id;
    uint32_t seq; /* bumped for every request, so ids vary over time */
    struct request req;
};

/* v2: a persistent connection. */
struct v2conn {
    struct thread *t;
    int fd; /* -1 when closed */
    struct v2slot *slots;
    unsigned nslots;
    unsigned id_bits; /* id = seq << id_bits | slot index */
    unsigned in_flight;
    /* Frames waiting to be written: out[out_head, out_len). */
    uint8_t *out;
    size_t out_head, out_len, out_cap;
    /* Reply parser. */
    uint8_t preamble[4];
    size_t preamble_got;
    uint8_t header[V2_REPLY_HEADER];
    size_t header_got;
    bool in_body;
    struct v2slot *cur;
    uint8_t cur_status;
    uint32_t body_left;
};

struct thread {
    unsigned index;
    pthread_t tid;
    int epfd;
    uint64_t now;  /* the loop's clock, read after each epoll_wait */
    uint64_t rng;  /* xorshift64* state, for --mix */
    uint64_t tags; /* requests made, for the unique tags */
    uint8_t *scratch;
    unsigned in_flight;

    /* Slots (v1) or connections (v2) to (re)start from the loop, not from
     * inside a failing call: a double buffer, swapped on each pass. */
    void **pending, **pending_next;
    unsigned npending;

    struct v1slot *v1;
    unsigned nv1;
    struct v2conn *v2;
    unsigned nv2;

    /* Results, for the window only. */
    uint64_t ok;
    uint64_t errors[E_COUNT];
    uint64_t warmup_errors;
    uint64_t unfinished; /* still in flight when the run stopped */
    uint64_t bytes_sent, bytes_received, payload_received;
    struct samples *lat; /* per class */
};

/* Print "loadgen: <message>" on stderr. */
static void vreport(const char *fmt, va_list ap)
{
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
}

_Noreturn static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(fmt, ap);
    va_end(ap);
    exit(1);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        die("out of memory");
    return p;
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (p == NULL)
        die("out of memory");
    return p;
}

static bool in_window(uint64_t t)
{
    return t >= t_warm && t < t_end;
}

static void samples_push(struct samples *s, uint64_t v)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 4096;
        s->v = realloc(s->v, s->cap * sizeof *s->v);
        if (s->v == NULL)
            die("out of memory");
    }
    s->v[s->n++] = v;
}

/* Counts bytes moved on the sockets, when inside the window. */
static void count_sent(struct thread *t, size_t n)
{
    if (in_window(t->now))
        t->bytes_sent += n;
}

static void count_received(struct thread *t, size_t n)
{
    if (in_window(t->now))
        t->bytes_received += n;
}

static void record_error(struct thread *t, enum err_kind kind, uint64_t when)
{
    if (in_window(when))
        t->errors[kind]++;
    else if (when < t_warm)
        t->warmup_errors++;
    /* errors in the grace period after the window are not counted */
}

/* ================================================================ requests */

static uint64_t rng_next(struct thread *t)
{
    t->rng ^= t->rng >> 12;
    t->rng ^= t->rng << 25;
    t->rng ^= t->rng >> 27;
    return t->rng * 0x2545F4914F6CDD1DULL;
}

/* Picks the body of a new request and stamps its start. */
static void request_new(struct thread *t, struct request *r, uint64_t start)
{
    unsigned cls = 0;
    if (cfg.nclasses > 1) {
        /* 53 random bits as a double in [0, total weight). */
        double x = (double)(rng_next(t) >> 11) / 9007199254740992.0 * cfg.total_weight;
        while (cls + 1 < cfg.nclasses && x >= cfg.classes[cls].weight) {
            x -= cfg.classes[cls].weight;
            cls++;
        }
    }
    r->cls = cls;
    if (cfg.classes[cls].tagged) {
        /* 12 hex digits: the thread, then a 40-bit count of its requests. */
        static const char hex[] = "0123456789abcdef";
        uint64_t v = (uint64_t)t->index << 40 | (t->tags++ & 0xffffffffffULL);
        for (int i = TAG_LEN - 1; i >= 0; i--, v >>= 4)
            r->tag[i] = hex[v & 15];
    }
    r->start = start;
    r->received = 0;
    r->mismatch = false;
}

/* Checks `n` reply bytes that belong at offset r->received of the reply. */
static void request_reply_bytes(struct request *r, const uint8_t *d, size_t n)
{
    if (cfg.expect_echo && !r->mismatch) {
        const struct payload *p = &cfg.classes[r->cls];
        size_t off = r->received;
        if (off + n > p->len) {
            r->mismatch = true;
        } else {
            size_t head = 0;
            if (p->tagged && off < TAG_LEN) {
                head = n < TAG_LEN - off ? n : TAG_LEN - off;
                if (memcmp(d, r->tag + off, head) != 0)
                    r->mismatch = true;
            }
            if (memcmp(d + head, p->data + off + head, n - head) != 0)
                r->mismatch = true;
        }
    }
    r->received += n;
}

/* Records a request whose reply arrived whole (v1: end of stream; v2: status 0). */
static void request_done(struct thread *t, struct request *r, uint64_t when)
{
    if (cfg.expect_echo && (r->mismatch || r->received != cfg.classes[r->cls].len)) {
        record_error(t, E_MISMATCH, when);
        return;
    }
    if (!in_window(when))
        return;
    t->ok++;
    t->payload_received += r->received;
    samples_push(&t->lat[r->cls], when - r->start);
}

/* The pieces of a request frame from byte `off` on, as an iovec array:
 * header, then tag, then the rest of the payload.  Returns the count. */
static int frame_iov(struct iovec *iov, const uint8_t *header, size_t header_len,
                     const struct request *r, size_t off)
{
    const struct payload *p = &cfg.classes[r->cls];
    const uint8_t *base[3];
    size_t len[3];
    int parts = 0;
    base[parts] = header;
    len[parts++] = header_len;
    if (p->tagged) {
        base[parts] = (const uint8_t *)r->tag;
        len[parts++] = TAG_LEN;
        base[parts] = p->data + TAG_LEN;
        len[parts++] = p->len - TAG_LEN;
    } else {
        base[parts] = p->data;
        len[parts++] = p->len;
    }
    int n = 0;
    for (int i = 0; i < parts; i++) {
        if (off >= len[i]) {
            off -= len[i];
            continue;
        }
        iov[n].iov_base = (void *)(base[i] + off);
        iov[n].iov_len = len[i] - off;
        off = 0;
        n++;
    }
    return n;
}

static void put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Turns Nagle's algorithm off: a small segment goes out without waiting for
 * the ACK of the previous one. */
static void set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* A non-blocking TCP socket connecting to the server.  Returns the fd, or -1
 * with errno set when the attempt failed at once. */
static int connect_socket(void)
{
    int fd = socket(cfg.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&cfg.addr, cfg.addrlen) < 0 && errno != EINPROGRESS) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

/*
 * Whether a read of `n` bytes emptied the socket, so that the next recv would
 * only say EAGAIN: true when it filled less than the buffer.  Edge-triggered
 * epoll reports any data that arrives after this, so stopping here loses
 * nothing, and saves a system call per wake-up.  The exception is an end of
 * stream (or error) that was already there when epoll reported the socket:
 * it raises no new edge, so with `drain` (the event carried EPOLLRDHUP,
 * EPOLLHUP or EPOLLERR) the caller reads on until recv says so.
 */
static bool read_drained(ssize_t n, bool drain)
{
    return !drain && (size_t)n < SCRATCH_SIZE;
}

/* Queues a v1 slot or v2 connection to be (re)started by the thread loop. */
static void defer(struct thread *t, void *what)
{
    t->pending[t->npending++] = what;
}

/* ================================================================ protocol v1 */

static void v1_start(struct v1slot *s);

/* Closes the slot's connection: its request is over. */
static void v1_close(struct v1slot *s)
{
    close(s->fd);
    s->fd = -1;
    s->t->in_flight--;
}

/* The request failed with `kind`: count it and, during the run, start the
 * next one in its place. */
static void v1_fail(struct v1slot *s, enum err_kind kind)
{
    uint64_t when = now_ns();
    record_error(s->t, kind, when);
    v1_close(s);
    if (when < t_end)
        v1_start(s);
}

/* Writes what is left of the request.  Returns 1 when all is written, 0 when
 * the socket is full (or still connecting), and -1 when the write failed,
 * with the reason in *why (the caller fails the request). */
static int v1_send(struct v1slot *s, enum err_kind *why)
{
    size_t total = V1_HEADER + cfg.classes[s->req.cls].len;
    while (s->sent < total) {
        struct iovec iov[3];
        struct msghdr msg = {.msg_iov = iov};
        msg.msg_iovlen = (size_t)frame_iov(iov, s->header, V1_HEADER, &s->req, s->sent);
        ssize_t n = sendmsg(s->fd, &msg, MSG_NOSIGNAL);
        if (n > 0) {
            s->sent += (size_t)n;
            count_sent(s->t, (size_t)n);
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            /* A frame that does not fit the socket at once goes out in
             * pieces: without Nagle, its tail is not held back for an ACK.
             * (A frame written whole needs no such setsockopt.) */
            if (s->sent > 0 && !s->nodelay) {
                set_nodelay(s->fd);
                s->nodelay = true;
            }
            return 0;
        } else {
            *why = n < 0 ? errno_kind(errno) : E_OTHER;
            return -1;
        }
    }
    s->writing = false;
    return 1;
}

/* Reads the reply to its end; at end of stream the request is done and the
 * next one starts.  `drain`: see read_drained. */
static void v1_read(struct v1slot *s, bool drain)
{
    struct thread *t = s->t;
    for (;;) {
        ssize_t n = recv(s->fd, t->scratch, SCRATCH_SIZE, 0);
        if (n > 0) {
            count_received(t, (size_t)n);
            request_reply_bytes(&s->req, t->scratch, (size_t)n);
            if (read_drained(n, drain))
                return;
        } else if (n == 0) {
            uint64_t when = now_ns();
            request_done(t, &s->req, when);
            v1_close(s);
            if (when < t_end)
                v1_start(s);
            return;
        } else if (errno == EINTR) {
            continue;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return;
        } else {
            v1_fail(s, errno_kind(errno));
            return;
        }
    }
}

/*
 * Opens a connection for a new request and writes as much as it can at once.
 * A failure here is counted and the slot is retried from the loop (never from
 * here, so that a refusing server cannot make this recurse).
 */
static void v1_start(struct v1slot *s)
{
    struct thread *t = s->t;
    request_new(t, &s->req, now_ns());
    put_u32(s->header, (uint32_t)cfg.classes[s->req.cls].len);
    s->sent = 0;
    s->writing = true;
    s->nodelay = false;
    s->fd = connect_socket();
    if (s->fd < 0) {
        record_error(t, errno_kind(errno), now_ns());
        defer(t, s);
        return;
    }
    t->in_flight++;
    /* While still connecting, the send says EAGAIN and EPOLLOUT comes later. */
    enum err_kind why = E_OTHER;
    int sent = v1_send(s, &why);
    if (sent >= 0) {
        /* Adding reports readiness that already exists, so nothing is missed. */
        struct epoll_event ev = {
            .events = EPOLLIN | EPOLLRDHUP | EPOLLET | (sent ? 0 : EPOLLOUT),
            .data.ptr = s,
        };
        if (epoll_ctl(t->epfd, EPOLL_CTL_ADD, s->fd, &ev) == 0)
            return;
    }
    record_error(t, why, now_ns());
    v1_close(s);
    defer(t, s);
}

static void v1_event(struct v1slot *s, uint32_t events)
{
    if (s->fd < 0)
        return;
    if (s->writing) {
        enum err_kind why;
        int sent = v1_send(s, &why);
        if (sent < 0)
            v1_fail(s, why);
        if (sent <= 0)
            return;
    }
    v1_read(s, (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0);
}

/* Fails the requests older than --timeout. */
static void v1_expire(struct thread *t, uint64_t oldest)
{
    for (unsigned i = 0; i < t->nv1; i++) {
        struct v1slot *s = &t->v1[i];
        if (s->fd >= 0 && s->req.start < oldest)
            v1_fail(s, E_TIMEOUT);
    }
}

/* ================================================================ protocol v2 */

/* Appends `n` bytes to the connection's output. */
static void v2_append(struct v2conn *c, const void *data, size_t n)
{
    if (c->out_head == c->out_len)
        c->out_head = c->out_len = 0;
    if (c->out_len + n > c->out_cap && c->out_head > 0) {
        memmove(c->out, c->out + c->out_head, c->out_len - c->out_head);
        c->out_len -= c->out_head;
        c->out_head = 0;
    }
    if (c->out_len + n > c->out_cap) {
        size_t cap = c->out_cap ? c->out_cap : 64 * 1024;
        while (cap < c->out_len + n)
            cap *= 2;
        c->out = realloc(c->out, cap);
        if (c->out == NULL)
            die("out of memory");
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, data, n);
    c->out_len += n;
}

/* Starts a new request in a slot: queues its frame on the connection. */
static void v2_enqueue(struct v2conn *c, struct v2slot *s)
{
    struct thread *t = c->t;
    request_new(t, &s->req, now_ns());
    s->seq++;
    s->id = (uint32_t)((uint64_t)s->seq << c->id_bits) | (uint32_t)(s - c->slots);
    s->busy = true;
    c->in_flight++;
    t->in_flight++;

    uint8_t header[V2_REQ_HEADER];
    put_u32(header, s->id);
    put_u32(header + 4, (uint32_t)cfg.classes[s->req.cls].len);
    struct iovec iov[3];
    int parts = frame_iov(iov, header, sizeof header, &s->req, 0);
    for (int i = 0; i < parts; i++)
        v2_append(c, iov[i].iov_base, iov[i].iov_len);
}

/* Closes the connection; the requests in flight on it fail with `kind`.
 * During the run the connection is reopened from the loop. */
static void v2_fail(struct v2conn *c, enum err_kind kind)
{
    struct thread *t = c->t;
    uint64_t when = now_ns();
    for (unsigned i = 0; i < c->nslots; i++) {
        if (c->slots[i].busy) {
            c->slots[i].busy = false;
            record_error(t, kind, when);
        }
    }
    t->in_flight -= c->in_flight;
    c->in_flight = 0;
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    if (when < t_end)
        defer(t, c);
}

/* Writes queued frames.  Returns false when the connection failed. */
static bool v2_flush(struct v2conn *c)
{
    while (c->out_head < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_head, c->out_len - c->out_head, MSG_NOSIGNAL);
        if (n > 0) {
            c->out_head += (size_t)n;
            count_sent(c->t, (size_t)n);
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return true; /* EPOLLOUT (edge-triggered) will call us again */
        } else {
            v2_fail(c, n < 0 ? errno_kind(errno) : E_OTHER);
            return false;
        }
    }
    c->out_head = c->out_len = 0;
    return true;
}

/* (Re)opens a connection: the preamble, then one request per slot. */
static void v2_open(struct v2conn *c)
{
    struct thread *t = c->t;
    c->out_head = c->out_len = 0;
    c->preamble_got = 0;
    c->header_got = 0;
    c->in_body = false;
    v2_append(c, PREAMBLE, sizeof PREAMBLE);
    for (unsigned i = 0; i < c->nslots; i++)
        v2_enqueue(c, &c->slots[i]);
    c->fd = connect_socket();
    if (c->fd < 0) {
        v2_fail(c, errno_kind(errno));
        return;
    }
    set_nodelay(c->fd); /* pipelined small frames must not wait for ACKs */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = c};
    if (epoll_ctl(t->epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
        v2_fail(c, E_OTHER);
        return;
    }
    v2_flush(c); /* EAGAIN while connecting: EPOLLOUT follows */
}

/* A reply frame is whole: record it, start the slot's next request. */
static void v2_complete(struct v2conn *c)
{
    struct thread *t = c->t;
    struct v2slot *s = c->cur;
    uint64_t when = now_ns();
    if (c->cur_status == 0)
        request_done(t, &s->req, when);
    else
        record_error(t, status_kind(c->cur_status), when);
    s->busy = false;
    c->in_flight--;
    t->in_flight--;
    c->in_body = false;
    if (when < t_end) {
        v2_enqueue(c, s);
    } else if (c->in_flight == 0) {
        close(c->fd); /* the run is over for this connection */
        c->fd = -1;
    }
}

/* Parses received bytes: the server's preamble, then reply frames, which may
 * come split anywhere or several at once.  Returns false when the connection
 * failed or closed. */
static bool v2_parse(struct v2conn *c, const uint8_t *p, size_t n)
{
    while (n > 0) {
        if (c->preamble_got < sizeof PREAMBLE) {
            size_t k = sizeof PREAMBLE - c->preamble_got;
            if (k > n)
                k = n;
            memcpy(c->preamble + c->preamble_got, p, k);
            c->preamble_got += k;
            p += k;
            n -= k;
            if (c->preamble_got == sizeof PREAMBLE &&
                memcmp(c->preamble, PREAMBLE, sizeof PREAMBLE) != 0) {
                v2_fail(c, E_OTHER); /* not a v2 server */
                return false;
            }
            continue;
        }
        if (!c->in_body) {
            size_t k = V2_REPLY_HEADER - c->header_got;
            if (k > n)
                k = n;
            memcpy(c->header + c->header_got, p, k);
            c->header_got += k;
            p += k;
            n -= k;
            if (c->header_got < V2_REPLY_HEADER)
                break;
            c->header_got = 0;
            uint32_t id = get_u32(c->header);
            uint32_t index = id & ((1U << c->id_bits) - 1);
            if (index >= c->nslots || !c->slots[index].busy || c->slots[index].id != id) {
                v2_fail(c, E_OTHER); /* a reply to no request of ours */
                return false;
            }
            c->cur = &c->slots[index];
            c->cur_status = c->header[4];
            c->body_left = get_u32(c->header + 5);
            c->in_body = true;
        } else {
            size_t k = c->body_left < n ? c->body_left : n;
            if (c->cur_status == 0)
                request_reply_bytes(&c->cur->req, p, k);
            c->body_left -= (uint32_t)k;
            p += k;
            n -= k;
        }
        if (c->body_left == 0) {
            v2_complete(c);
            if (c->fd < 0)
                return false;
        }
    }
    return true;
}

static void v2_event(struct v2conn *c, uint32_t events)
{
    struct thread *t = c->t;
    if (c->fd < 0)
        return;
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
        for (;;) {
            ssize_t n = recv(c->fd, t->scratch, SCRATCH_SIZE, 0);
            if (n > 0) {
                count_received(t, (size_t)n);
                if (!v2_parse(c, t->scratch, (size_t)n))
                    return;
                if (read_drained(n, (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0))
                    break;
            } else if (n == 0) {
                v2_fail(c, E_OTHER); /* the server closed with requests in flight */
                return;
            } else if (errno == EINTR) {
                continue;
            } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
                break;
            } else {
                v2_fail(c, errno_kind(errno));
                return;
            }
        }
    }
    /* Whatever the replies queued, and what waited for EPOLLOUT. */
    v2_flush(c);
}

/* Fails the connections with a request older than --timeout: its id cannot
 * be reused until a reply comes, so the whole connection goes. */
static void v2_expire(struct thread *t, uint64_t oldest)
{
    for (unsigned i = 0; i < t->nv2; i++) {
        struct v2conn *c = &t->v2[i];
        if (c->fd < 0)
            continue;
        for (unsigned j = 0; j < c->nslots; j++) {
            if (c->slots[j].busy && c->slots[j].req.start < oldest) {
                v2_fail(c, E_TIMEOUT);
                break;
            }
        }
    }
}

/* ================================================================ thread loop */

static void *thread_main(void *arg)
{
    struct thread *t = arg;
    struct epoll_event events[MAX_EVENTS];
    uint64_t timeout_ns = (uint64_t)(cfg.timeout * NS_PER_S);
    uint64_t scan_every = timeout_ns / 4;
    if (scan_every > 50000000ULL)
        scan_every = 50000000ULL;
    if (scan_every < 1000000ULL)
        scan_every = 1000000ULL;

    t->now = now_ns();
    uint64_t next_scan = t->now + scan_every;
    for (unsigned i = 0; i < t->nv1; i++)
        defer(t, &t->v1[i]);
    for (unsigned i = 0; i < t->nv2; i++)
        defer(t, &t->v2[i]);

    for (;;) {
        /* (Re)start what is waiting; a failure now waits for the next pass. */
        if (t->npending > 0) {
            unsigned n = t->npending;
            void **batch = t->pending;
            t->pending = t->pending_next;
            t->pending_next = batch;
            t->npending = 0;
            if (t->now < t_end) {
                for (unsigned i = 0; i < n; i++) {
                    if (cfg.protocol == 1)
                        v1_start(batch[i]);
                    else
                        v2_open(batch[i]);
                }
            }
        }
        if (t->now >= t_stop || (t->now >= t_end && t->in_flight == 0))
            break;

        uint64_t wake = next_scan < t_stop ? next_scan : t_stop;
        int wait_ms = 0;
        if (t->npending == 0 && wake > t->now)
            wait_ms = (int)((wake - t->now + 999999) / 1000000);
        int n = epoll_wait(t->epfd, events, MAX_EVENTS, wait_ms);
        if (n < 0 && errno != EINTR)
            die("epoll_wait: %s", strerror(errno));
        t->now = now_ns();
        for (int i = 0; i < n; i++) {
            if (cfg.protocol == 1)
                v1_event(events[i].data.ptr, events[i].events);
            else
                v2_event(events[i].data.ptr, events[i].events);
        }
        if (t->now >= next_scan) {
            uint64_t oldest = t->now > timeout_ns ? t->now - timeout_ns : 0;
            if (cfg.protocol == 1)
                v1_expire(t, oldest);
            else
                v2_expire(t, oldest);
            next_scan = t->now + scan_every;
        }
    }

    /* The run is over: drop what is still in flight. */
    t->unfinished = t->in_flight;
    for (unsigned i = 0; i < t->nv1; i++)
        if (t->v1[i].fd >= 0)
            close(t->v1[i].fd);
    for (unsigned i = 0; i < t->nv2; i++)
        if (t->v2[i].fd >= 0)
            close(t->v2[i].fd);
    return NULL;
}

/* ================================================================ probe */

/* Waits for `events` on fd until `deadline`; false on timeout. */
static bool wait_fd(int fd, short events, uint64_t deadline)
{
    for (;;) {
        uint64_t now = now_ns();
        if (now >= deadline)
            return false;
        struct pollfd pfd = {.fd = fd, .events = events};
        int n = poll(&pfd, 1, (int)((deadline - now + 999999) / 1000000));
        if (n > 0)
            return true;
        if (n < 0 && errno != EINTR)
            return false;
    }
}

/* One connection before the run, so that a server that is not there (or, for
 * v2, does not speak v2) is an error at once rather than a run of errors.
 * Returns NULL on success, else what went wrong. */
static const char *probe(void)
{
    static char why[128];
    uint64_t deadline = now_ns() + (uint64_t)(cfg.timeout * NS_PER_S);
    int fd = connect_socket();
    if (fd < 0)
        return strerror(errno);
    const char *result = NULL;
    int err = 0;
    socklen_t len = sizeof err;
    if (!wait_fd(fd, POLLOUT, deadline)) {
        result = "connect timed out";
    } else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err != 0) {
        result = strerror(err ? err : errno);
    } else if (cfg.protocol == 2) {
        /* The server must answer our preamble with its own. */
        uint8_t got[sizeof PREAMBLE];
        size_t have = 0;
        if (send(fd, PREAMBLE, sizeof PREAMBLE, MSG_NOSIGNAL) != (ssize_t)sizeof PREAMBLE)
            result = strerror(errno);
        while (result == NULL && have < sizeof got) {
            if (!wait_fd(fd, POLLIN, deadline)) {
                result = "no v2 preamble from the server (does it speak v2?)";
                break;
            }
            ssize_t n = recv(fd, got + have, sizeof got - have, 0);
            if (n > 0)
                have += (size_t)n;
            else if (n == 0)
                result = "the server closed the connection instead of answering v2";
            else if (errno != EINTR && errno != EAGAIN) {
                snprintf(why, sizeof why, "waiting for the v2 preamble: %s", strerror(errno));
                result = why;
            }
        }
        if (result == NULL && memcmp(got, PREAMBLE, sizeof PREAMBLE) != 0)
            result = "the server answered with a wrong v2 preamble";
    }
    if (result != NULL && result != why) {
        snprintf(why, sizeof why, "%s", result);
        result = why;
    }
    close(fd);
    return result;
}

/* ================================================================ report */

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest rank: the smallest sample with at least pct% of samples <= it. */
static double percentile_ms(const uint64_t *sorted, size_t n, unsigned pct)
{
    size_t rank = (pct * n + 99) / 100;
    if (rank < 1)
        rank = 1;
    return (double)sorted[rank - 1] / 1e6;
}

static void print_ms(const char *name, const uint64_t *sorted, size_t n, unsigned pct)
{
    if (n == 0)
        printf("\"%s\": null", name);
    else
        printf("\"%s\": %.3f", name, percentile_ms(sorted, n, pct));
}

/* Prints a JSON string (the --mix texts come from the command line). */
static void print_json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

static void merge_samples(struct samples *into, const struct samples *from)
{
    for (size_t i = 0; i < from->n; i++)
        samples_push(into, from->v[i]);
}

static double tv_seconds(struct timeval tv)
{
    return (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
}

static void report(struct thread *threads, struct rusage *r0, struct rusage *r1, double wall)
{
    uint64_t ok = 0, errors[E_COUNT] = {0}, warmup_errors = 0, unfinished = 0;
    uint64_t sent = 0, received = 0, payload = 0;
    struct samples all = {0};
    struct samples *per_class = xcalloc(cfg.nclasses, sizeof *per_class);
    for (unsigned i = 0; i < cfg.threads; i++) {
        struct thread *t = &threads[i];
        ok += t->ok;
        for (int k = 0; k < E_COUNT; k++)
            errors[k] += t->errors[k];
        warmup_errors += t->warmup_errors;
        unfinished += t->unfinished;
        sent += t->bytes_sent;
        received += t->bytes_received;
        payload += t->payload_received;
        for (unsigned c = 0; c < cfg.nclasses; c++) {
            merge_samples(&per_class[c], &t->lat[c]);
            merge_samples(&all, &t->lat[c]);
        }
    }
    qsort(all.v, all.n, sizeof *all.v, cmp_u64);
    double sum = 0;
    for (size_t i = 0; i < all.n; i++)
        sum += (double)all.v[i];

    double user = tv_seconds(r1->ru_utime) - tv_seconds(r0->ru_utime);
    double sys = tv_seconds(r1->ru_stime) - tv_seconds(r0->ru_stime);

    printf("{\"protocol\": \"v%d\", \"concurrency\": %u, \"threads\": %u, ", cfg.protocol,
           cfg.concurrency, cfg.threads);
    if (cfg.protocol == 2)
        printf("\"connections\": %u, ", cfg.connections);
    printf("\"duration\": %g, \"requests\": %llu, \"rps\": %.1f, ", cfg.duration,
           (unsigned long long)ok, (double)ok / cfg.duration);
    printf("\"latency_ms\": {");
    print_ms("p50", all.v, all.n, 50);
    printf(", ");
    print_ms("p90", all.v, all.n, 90);
    printf(", ");
    print_ms("p99", all.v, all.n, 99);
    printf(", ");
    print_ms("max", all.v, all.n, 100);
    if (all.n == 0)
        printf(", \"mean\": null}, ");
    else
        printf(", \"mean\": %.3f}, ", sum / (double)all.n / 1e6);
    printf("\"errors\": {");
    for (int k = 0; k < E_COUNT; k++)
        printf("%s\"%s\": %llu", k ? ", " : "", ERR_NAMES[k], (unsigned long long)errors[k]);
    printf("}, \"warmup_errors\": %llu, \"unfinished\": %llu, ",
           (unsigned long long)warmup_errors, (unsigned long long)unfinished);
    printf("\"bytes_sent\": %llu, \"bytes_received\": %llu, \"mb_per_s\": %.3f, ",
           (unsigned long long)sent, (unsigned long long)received,
           (double)payload / cfg.duration / 1e6);
    printf("\"cpu\": {\"user\": %.3f, \"sys\": %.3f, \"share\": %.3f}", user, sys,
           wall > 0 ? (user + sys) / wall : 0.0);
    if (cfg.mix) {
        printf(", \"classes\": [");
        for (unsigned c = 0; c < cfg.nclasses; c++) {
            struct samples *s = &per_class[c];
            qsort(s->v, s->n, sizeof *s->v, cmp_u64);
            printf("%s{\"text\": ", c ? ", " : "");
            print_json_string(cfg.classes[c].text);
            printf(", \"weight\": %g, \"requests\": %zu, ", cfg.classes[c].weight, s->n);
            print_ms("p50", s->v, s->n, 50);
            printf(", ");
            print_ms("p90", s->v, s->n, 90);
            printf(", ");
            print_ms("p99", s->v, s->n, 99);
            printf("}");
        }
        printf("]");
    }
    printf("}\n");
    fflush(stdout);
}

/* ================================================================ arguments */

static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen --host HOST --port PORT --protocol v1|v2 --concurrency N\n"
            "               --duration S [--warmup S] [--threads T] [--connections K]\n"
            "               [--timeout S] [--expect echo|any]\n"
            "               (--size B | --payload-file F | --mix W:TEXT[,W:TEXT...])\n");
}

_Noreturn static void bad_args(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(fmt, ap);
    va_end(ap);
    usage();
    exit(2);
}

static unsigned long long parse_uint(const char *opt, const char *val, unsigned long long max)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(val, &end, 10);
    if (*val == '\0' || *val == '-' || *end != '\0' || errno != 0 || v > max)
        bad_args("%s wants a whole number up to %llu, not '%s'", opt, max, val);
    return v;
}

static double parse_seconds(const char *opt, const char *val, bool zero_ok)
{
    char *end;
    errno = 0;
    double v = strtod(val, &end);
    if (*val == '\0' || *end != '\0' || errno != 0 || !isfinite(v) || v < 0 ||
        (v == 0 && !zero_ok) || v > 1e6)
        bad_args("%s wants a number of seconds, not '%s'", opt, val);
    return v;
}

/* --mix W:TEXT[,W:TEXT...]: each item is split on its first colon. */
static void parse_mix(const char *spec)
{
    char *copy = strdup(spec);
    if (copy == NULL)
        die("out of memory");
    unsigned count = 1;
    for (const char *p = copy; *p; p++)
        count += *p == ',';
    cfg.classes = xcalloc(count, sizeof *cfg.classes);
    cfg.nclasses = 0;
    char *save = NULL;
    for (char *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        char *colon = strchr(item, ':');
        if (colon == NULL)
            bad_args("--mix item '%s' is not WEIGHT:TEXT", item);
        *colon = '\0';
        char *end;
        double w = strtod(item, &end);
        if (*item == '\0' || *end != '\0' || !isfinite(w) || w < 0)
            bad_args("--mix weight '%s' is not a number >= 0", item);
        struct payload *p = &cfg.classes[cfg.nclasses++];
        p->text = colon + 1;
        p->data = (uint8_t *)(colon + 1);
        p->len = strlen(p->text);
        p->weight = w;
        cfg.total_weight += w;
    }
    if (cfg.nclasses == 0 || cfg.total_weight <= 0)
        bad_args("--mix needs at least one item with a weight above 0");
    /* `copy` stays allocated: the classes point into it. */
}

static void load_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        bad_args("cannot open --payload-file %s: %s", path, strerror(errno));
    size_t cap = 64 * 1024, len = 0;
    uint8_t *data = xmalloc(cap);
    for (;;) {
        if (len == cap) {
            cap *= 2;
            data = realloc(data, cap);
            if (data == NULL)
                die("out of memory");
        }
        size_t n = fread(data + len, 1, cap - len, f);
        len += n;
        if (n == 0)
            break;
    }
    if (ferror(f))
        bad_args("cannot read --payload-file %s", path);
    fclose(f);
    if (len > UINT32_MAX)
        bad_args("--payload-file %s is larger than 4 GiB", path);
    cfg.classes = xcalloc(1, sizeof *cfg.classes);
    cfg.nclasses = 1;
    cfg.classes[0] = (struct payload){.data = data, .len = len, .weight = 1};
}

static void make_pattern(size_t size)
{
    uint8_t *data = xmalloc(size);
    for (size_t i = 0; i < size; i++)
        data[i] = (uint8_t)('a' + i % 26);
    cfg.classes = xcalloc(1, sizeof *cfg.classes);
    cfg.nclasses = 1;
    cfg.classes[0] = (struct payload){
        .data = data, .len = size, .tagged = size >= TAG_LEN, .weight = 1};
}

static void parse_args(int argc, char **argv)
{
    const char *host = NULL, *port = NULL, *protocol = NULL, *expect = NULL;
    const char *size = NULL, *file = NULL, *mix = NULL;
    bool have_concurrency = false, have_duration = false, have_connections = false;
    cfg.threads = 1;
    cfg.warmup = 1;
    cfg.timeout = 10;

    for (int i = 1; i < argc; i++) {
        char *opt = argv[i];
        const char *val;
        char *eq = strchr(opt, '=');
        if (strcmp(opt, "--help") == 0 || strcmp(opt, "-h") == 0) {
            usage();
            exit(0);
        }
        if (strncmp(opt, "--", 2) != 0)
            bad_args("unexpected argument '%s'", opt);
        if (eq != NULL) { /* --opt=value */
            *eq = '\0';
            val = eq + 1;
        } else if (i + 1 < argc) {
            val = argv[++i];
        } else {
            bad_args("%s needs a value", opt);
        }
        if (strcmp(opt, "--host") == 0)
            host = val;
        else if (strcmp(opt, "--port") == 0)
            port = val;
        else if (strcmp(opt, "--protocol") == 0)
            protocol = val;
        else if (strcmp(opt, "--concurrency") == 0) {
            cfg.concurrency = (unsigned)parse_uint(opt, val, 1000000);
            have_concurrency = true;
        } else if (strcmp(opt, "--duration") == 0) {
            cfg.duration = parse_seconds(opt, val, false);
            have_duration = true;
        } else if (strcmp(opt, "--warmup") == 0)
            cfg.warmup = parse_seconds(opt, val, true);
        else if (strcmp(opt, "--threads") == 0)
            cfg.threads = (unsigned)parse_uint(opt, val, MAX_THREADS);
        else if (strcmp(opt, "--connections") == 0) {
            cfg.connections = (unsigned)parse_uint(opt, val, 1000000);
            have_connections = true;
        } else if (strcmp(opt, "--timeout") == 0)
            cfg.timeout = parse_seconds(opt, val, false);
        else if (strcmp(opt, "--expect") == 0)
            expect = val;
        else if (strcmp(opt, "--size") == 0)
            size = val;
        else if (strcmp(opt, "--payload-file") == 0)
            file = val;
        else if (strcmp(opt, "--mix") == 0)
            mix = val;
        else
            bad_args("unknown option %s", opt);
    }

    if (host == NULL || port == NULL || protocol == NULL || !have_concurrency || !have_duration)
        bad_args("--host, --port, --protocol, --concurrency and --duration are required");
    if (strcmp(protocol, "v1") == 0 || strcmp(protocol, "1") == 0)
        cfg.protocol = 1;
    else if (strcmp(protocol, "v2") == 0 || strcmp(protocol, "2") == 0)
        cfg.protocol = 2;
    else
        bad_args("--protocol is v1 or v2, not '%s'", protocol);
    if (cfg.concurrency == 0 || cfg.threads == 0 || (have_connections && cfg.connections == 0))
        bad_args("--concurrency, --threads and --connections must be at least 1");
    if ((size != NULL) + (file != NULL) + (mix != NULL) != 1)
        bad_args("give exactly one of --size, --payload-file, --mix");
    if (size != NULL)
        make_pattern((size_t)parse_uint("--size", size, UINT32_MAX));
    else if (file != NULL)
        load_file(file);
    else {
        parse_mix(mix);
        cfg.mix = true;
    }
    if (expect == NULL)
        cfg.expect_echo = !cfg.mix;
    else if (strcmp(expect, "echo") == 0)
        cfg.expect_echo = true;
    else if (strcmp(expect, "any") == 0)
        cfg.expect_echo = false;
    else
        bad_args("--expect is echo or any, not '%s'", expect);

    /* Shares: never more threads than slots (v1) or connections (v2), never
     * more connections than requests in flight. */
    if (cfg.protocol == 1) {
        if (cfg.threads > cfg.concurrency)
            cfg.threads = cfg.concurrency;
    } else {
        if (!have_connections)
            cfg.connections = cfg.threads;
        if (cfg.connections > cfg.concurrency)
            cfg.connections = cfg.concurrency;
        if (cfg.threads > cfg.connections)
            cfg.threads = cfg.connections;
    }

    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *ai;
    parse_uint("--port", port, 65535);
    int rc = getaddrinfo(host, port, &hints, &ai);
    if (rc != 0)
        bad_args("cannot resolve %s: %s", host, gai_strerror(rc));
    memcpy(&cfg.addr, ai->ai_addr, ai->ai_addrlen);
    cfg.addrlen = ai->ai_addrlen;
    freeaddrinfo(ai);
}

/* ================================================================ main */

/* Splits `total` into `parts` nearly equal shares; returns share `i`. */
static unsigned share(unsigned total, unsigned parts, unsigned i)
{
    return total / parts + (i < total % parts ? 1 : 0);
}

static void setup_threads(struct thread *threads)
{
    unsigned conn_index = 0;
    for (unsigned i = 0; i < cfg.threads; i++) {
        struct thread *t = &threads[i];
        t->index = i;
        t->rng = 0x9E3779B97F4A7C15ULL * (i + 1) ^ now_ns();
        if (t->rng == 0)
            t->rng = 1;
        t->scratch = xmalloc(SCRATCH_SIZE);
        t->lat = xcalloc(cfg.nclasses, sizeof *t->lat);
        t->epfd = epoll_create1(EPOLL_CLOEXEC);
        if (t->epfd < 0)
            die("epoll_create1: %s", strerror(errno));
        unsigned units;
        if (cfg.protocol == 1) {
            t->nv1 = units = share(cfg.concurrency, cfg.threads, i);
            t->v1 = xcalloc(units, sizeof *t->v1);
            for (unsigned j = 0; j < units; j++) {
                t->v1[j].t = t;
                t->v1[j].fd = -1;
            }
        } else {
            t->nv2 = units = share(cfg.connections, cfg.threads, i);
            t->v2 = xcalloc(units, sizeof *t->v2);
            for (unsigned j = 0; j < units; j++, conn_index++) {
                struct v2conn *c = &t->v2[j];
                c->t = t;
                c->fd = -1;
                c->nslots = share(cfg.concurrency, cfg.connections, conn_index);
                c->slots = xcalloc(c->nslots, sizeof *c->slots);
                while ((1U << c->id_bits) < c->nslots)
                    c->id_bits++;
            }
        }
        t->pending = xcalloc(units, sizeof *t->pending);
        t->pending_next = xcalloc(units, sizeof *t->pending_next);
    }
}

/* Every request in flight holds a descriptor: allow as many as we may. */
static void raise_fd_limit(void)
{
    struct rlimit lim;
    if (getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
        lim.rlim_cur = lim.rlim_max;
        setrlimit(RLIMIT_NOFILE, &lim);
    }
}

static void sleep_until(uint64_t deadline)
{
    struct timespec ts = {.tv_sec = (time_t)(deadline / 1000000000ULL),
                          .tv_nsec = (long)(deadline % 1000000000ULL)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    parse_args(argc, argv);
    raise_fd_limit();

    const char *why = probe();
    if (why != NULL) {
        fprintf(stderr, "loadgen: cannot connect to the server: %s\n", why);
        return 2;
    }

    struct thread *threads = xcalloc(cfg.threads, sizeof *threads);
    setup_threads(threads);

    uint64_t start = now_ns();
    t_warm = start + (uint64_t)(cfg.warmup * NS_PER_S);
    t_end = t_warm + (uint64_t)(cfg.duration * NS_PER_S);
    t_stop = t_end + GRACE_NS;

    for (unsigned i = 0; i < cfg.threads; i++) {
        int rc = pthread_create(&threads[i].tid, NULL, thread_main, &threads[i]);
        if (rc != 0)
            die("pthread_create: %s", strerror(rc));
    }

    /* The process's CPU time over the window, all threads together. */
    struct rusage r0, r1;
    sleep_until(t_warm);
    getrusage(RUSAGE_SELF, &r0);
    uint64_t w0 = now_ns();
    sleep_until(t_end);
    getrusage(RUSAGE_SELF, &r1);
    uint64_t w1 = now_ns();

    for (unsigned i = 0; i < cfg.threads; i++)
        pthread_join(threads[i].tid, NULL);
    report(threads, &r0, &r1, (double)(w1 - w0) / NS_PER_S);
    return 0;
}
