/*
 * echo_server: a minimal epoll server for gaspar wire protocol v1 that
 * returns every request unchanged.
 *
 * It does the least a v1 server can do (no worker processes, no queue, no
 * Python), so the figures a load generator measures against it are the limit
 * of the protocol itself on this machine: one TCP connection per request,
 * a 4-byte length, the payload, the reply, a close.
 *
 *   echo_server --host 127.0.0.1 --port 0 [--threads 1]
 *               [--max-message-size 16777216]
 *
 * Per connection: read the 4-byte big-endian length; if it is above the
 * maximum, reset the connection (SO_LINGER 0, then close: an RST, as gaspar
 * does); else read the payload, write it back, and close normally (FIN).
 * An empty payload gets an empty reply.
 *
 * Payload memory: the buffer grows with what has arrived (doubling from
 * 64 KiB, capped at the declared length), so a client that declares 16 MiB and
 * sends nothing costs nothing.
 *
 * With --threads N, N threads each run their own epoll loop on their own
 * SO_REUSEPORT listening socket bound to the same port; the kernel spreads
 * new connections over them.  The server prints "listening on HOST:PORT" on
 * stderr once every socket listens, and exits 0 on SIGINT or SIGTERM.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_EVENTS 256
#define FIRST_CHUNK (64 * 1024) /* first payload allocation, before doubling */
#define DEFAULT_MAX_MESSAGE 16777216UL
#define MAX_THREADS 256

/* Where a connection is in its single request. */
enum conn_state {
    READ_LENGTH,  /* reading the 4 length bytes */
    READ_PAYLOAD, /* reading `length` payload bytes */
    WRITE_REPLY,  /* writing the payload back */
};

struct conn {
    int fd;
    enum conn_state state;
    uint8_t header[4];
    size_t header_got;
    uint8_t *buf;  /* payload, `cap` bytes allocated */
    size_t cap;
    size_t length; /* declared payload length */
    size_t got;    /* payload bytes read so far */
    size_t sent;   /* reply bytes written so far */
    struct conn *prev, *next; /* the thread's list of open connections */
};

struct worker {
    int index;
    int listen_fd;
    int stop_fd; /* eventfd shared by all workers, readable once we must stop */
    int epoll_fd;
    size_t max_message;
    struct conn *conns; /* open connections, freed at exit */
};

/* epoll data for the two non-connection descriptors, told apart by address. */
static char listen_marker, stop_marker;

static void usage(void)
{
    fprintf(stderr,
            "usage: echo_server [--host HOST] [--port PORT] [--threads N]\n"
            "                   [--max-message-size BYTES]\n");
}

static bool parse_ulong(const char *text, unsigned long max, unsigned long *out)
{
    char *end;
    errno = 0;
    if (text == NULL || *text == '\0' || *text == '-')
        return false;
    unsigned long value = strtoul(text, &end, 10);
    if (errno != 0 || *end != '\0' || value > max)
        return false;
    *out = value;
    return true;
}

/* ---------------------------------------------------------------- sockets */

/* Creates a non-blocking listening socket bound to `addr`, or returns -1. */
static int open_listener(const struct sockaddr *addr, socklen_t addrlen, bool reuseport)
{
    int fd = socket(addr->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        perror("socket");
        return -1;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0) {
        perror("setsockopt(SO_REUSEPORT)");
        close(fd);
        return -1;
    }
    /* Wake the accept only once the request's first bytes are there: saves a
     * round of epoll for every connection. */
    int defer = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &defer, sizeof defer);
    if (bind(fd, addr, addrlen) < 0) {
        perror("bind");
        close(fd);
        return -1;
    }
    if (listen(fd, SOMAXCONN) < 0) {
        perror("listen");
        close(fd);
        return -1;
    }
    return fd;
}

/* Closes normally: the client reads the reply then end of stream. */
static void conn_close(struct worker *w, struct conn *c)
{
    close(c->fd); /* also removes it from the epoll set */
    if (c->prev)
        c->prev->next = c->next;
    else
        w->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    free(c->buf);
    free(c);
}

/* Closes abortively: the client sees ECONNRESET, the v1 failure signal. */
static void conn_reset(struct worker *w, struct conn *c)
{
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    conn_close(w, c);
}

/* ---------------------------------------------------------------- one request */

/*
 * Writes what is left of the reply.  Returns true when the connection is
 * finished with (closed), false when the socket is full and we wait for
 * EPOLLOUT.
 */
static bool conn_write(struct worker *w, struct conn *c)
{
    while (c->sent < c->length) {
        ssize_t n = send(c->fd, c->buf + c->sent, c->length - c->sent, MSG_NOSIGNAL);
        if (n > 0) {
            c->sent += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
            if (epoll_ctl(w->epoll_fd, EPOLL_CTL_MOD, c->fd, &ev) < 0) {
                conn_close(w, c);
                return true;
            }
            return false;
        } else {
            conn_close(w, c); /* the client went away: nothing to tell it */
            return true;
        }
    }
    conn_close(w, c);
    return true;
}

/* Makes room for more payload bytes: doubles the buffer, never past `length`. */
static bool conn_grow(struct conn *c)
{
    size_t cap = c->cap == 0 ? FIRST_CHUNK : c->cap * 2;
    if (cap > c->length)
        cap = c->length;
    uint8_t *buf = realloc(c->buf, cap);
    if (buf == NULL)
        return false;
    c->buf = buf;
    c->cap = cap;
    return true;
}

/*
 * Reads what the socket has for this connection and moves it along: to the
 * payload once the length is known, to writing once the payload is whole.
 */
static void conn_read(struct worker *w, struct conn *c)
{
    for (;;) {
        ssize_t n;
        if (c->state == READ_LENGTH) {
            n = recv(c->fd, c->header + c->header_got, sizeof c->header - c->header_got, 0);
            if (n > 0) {
                c->header_got += (size_t)n;
                if (c->header_got < sizeof c->header)
                    continue;
                c->length = (size_t)c->header[0] << 24 | (size_t)c->header[1] << 16 |
                            (size_t)c->header[2] << 8 | (size_t)c->header[3];
                if (c->length > w->max_message) {
                    conn_reset(w, c); /* too large: refused as soon as known */
                    return;
                }
                c->state = READ_PAYLOAD;
                if (c->length == 0) {
                    conn_close(w, c); /* empty request, empty reply */
                    return;
                }
                continue;
            }
        } else {
            if (c->got == c->cap && !conn_grow(c)) {
                conn_reset(w, c);
                return;
            }
            n = recv(c->fd, c->buf + c->got, c->cap - c->got, 0);
            if (n > 0) {
                c->got += (size_t)n;
                if (c->got < c->length)
                    continue;
                c->state = WRITE_REPLY;
                conn_write(w, c);
                return;
            }
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return; /* level-triggered: epoll tells us when more comes */
        conn_close(w, c); /* end of stream or error before the request was whole */
        return;
    }
}

/* Accepts every pending connection and tries a first read on each. */
static void accept_all(struct worker *w)
{
    for (;;) {
        int fd = accept4(w->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            /* EAGAIN: none left.  EMFILE and the like: leave the rest queued
             * and come back on the next wake-up. */
            return;
        }
        struct conn *c = calloc(1, sizeof *c);
        if (c == NULL) {
            close(fd);
            continue;
        }
        c->fd = fd;
        c->state = READ_LENGTH;
        c->next = w->conns;
        if (w->conns)
            w->conns->prev = c;
        w->conns = c;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(w->epoll_fd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            conn_close(w, c);
            continue;
        }
        /* With TCP_DEFER_ACCEPT the request is usually here already. */
        conn_read(w, c);
    }
}

/* ---------------------------------------------------------------- threads */

/* Every request in flight holds a descriptor: allow as many as we may. */
static void raise_fd_limit(void)
{
    struct rlimit lim;
    if (getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
        lim.rlim_cur = lim.rlim_max;
        setrlimit(RLIMIT_NOFILE, &lim);
    }
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &listen_marker};
    if (epoll_ctl(w->epoll_fd, EPOLL_CTL_ADD, w->listen_fd, &ev) < 0) {
        perror("epoll_ctl");
        exit(1);
    }
    ev.data.ptr = &stop_marker;
    if (epoll_ctl(w->epoll_fd, EPOLL_CTL_ADD, w->stop_fd, &ev) < 0) {
        perror("epoll_ctl");
        exit(1);
    }

    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(w->epoll_fd, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            exit(1);
        }
        for (int i = 0; i < n; i++) {
            void *p = events[i].data.ptr;
            if (p == &stop_marker)
                goto done;
            if (p == &listen_marker) {
                accept_all(w);
                continue;
            }
            struct conn *c = p;
            if (c->state == WRITE_REPLY)
                conn_write(w, c);
            else
                conn_read(w, c);
        }
    }
done:
    while (w->conns)
        conn_close(w, w->conns);
    return NULL;
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1";
    const char *port = "0";
    unsigned long threads = 1;
    unsigned long max_message = DEFAULT_MAX_MESSAGE;

    for (int i = 1; i < argc; i += 2) {
        const char *opt = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        unsigned long port_number;
        bool ok;
        if (strcmp(opt, "--help") == 0 || strcmp(opt, "-h") == 0) {
            usage();
            return 0;
        }
        if (strcmp(opt, "--host") == 0) {
            host = val;
            ok = val != NULL && *val != '\0';
        } else if (strcmp(opt, "--port") == 0) {
            port = val;
            ok = parse_ulong(val, 65535, &port_number);
        } else if (strcmp(opt, "--threads") == 0) {
            ok = parse_ulong(val, MAX_THREADS, &threads) && threads > 0;
        } else if (strcmp(opt, "--max-message-size") == 0) {
            ok = parse_ulong(val, UINT32_MAX, &max_message);
        } else {
            fprintf(stderr, "echo_server: unknown option %s\n", opt);
            usage();
            return 2;
        }
        if (!ok) {
            fprintf(stderr, "echo_server: bad value for %s: %s\n", opt, val ? val : "(none)");
            usage();
            return 2;
        }
    }

    /* SIGPIPE is ignored (MSG_NOSIGNAL covers sends, this covers the rest);
     * SIGINT and SIGTERM are blocked in every thread and taken by sigwait. */
    signal(SIGPIPE, SIG_IGN);
    raise_fd_limit();
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);

    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *ai;
    int rc = getaddrinfo(host, port, &hints, &ai);
    if (rc != 0) {
        fprintf(stderr, "echo_server: %s: %s\n", host, gai_strerror(rc));
        return 2;
    }

    /* Bind the first socket (the kernel picks the port if 0 was asked), then
     * bind the others to that same port. */
    struct sockaddr_storage addr;
    socklen_t addrlen = ai->ai_addrlen;
    memcpy(&addr, ai->ai_addr, ai->ai_addrlen);
    freeaddrinfo(ai);

    int stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (stop_fd < 0) {
        perror("eventfd");
        return 1;
    }
    struct worker *workers = calloc(threads, sizeof *workers);
    pthread_t *tids = calloc(threads, sizeof *tids);
    if (workers == NULL || tids == NULL) {
        perror("calloc");
        return 1;
    }
    for (unsigned long t = 0; t < threads; t++) {
        int fd = open_listener((struct sockaddr *)&addr, addrlen, threads > 1);
        if (fd < 0)
            return 1;
        if (t == 0 && getsockname(fd, (struct sockaddr *)&addr, &addrlen) < 0) {
            perror("getsockname");
            return 1;
        }
        workers[t].index = (int)t;
        workers[t].listen_fd = fd;
        workers[t].stop_fd = stop_fd;
        workers[t].max_message = max_message;
        workers[t].epoll_fd = epoll_create1(EPOLL_CLOEXEC);
        if (workers[t].epoll_fd < 0) {
            perror("epoll_create1");
            return 1;
        }
    }

    char hostbuf[NI_MAXHOST], portbuf[NI_MAXSERV];
    rc = getnameinfo((struct sockaddr *)&addr, addrlen, hostbuf, sizeof hostbuf, portbuf,
                     sizeof portbuf, NI_NUMERICHOST | NI_NUMERICSERV);
    if (rc != 0) {
        fprintf(stderr, "echo_server: getnameinfo: %s\n", gai_strerror(rc));
        return 1;
    }

    for (unsigned long t = 0; t < threads; t++) {
        rc = pthread_create(&tids[t], NULL, worker_main, &workers[t]);
        if (rc != 0) {
            fprintf(stderr, "echo_server: pthread_create: %s\n", strerror(rc));
            return 1;
        }
    }
    fprintf(stderr, "listening on %s:%s\n", hostbuf, portbuf);
    fflush(stderr);

    int sig;
    while (sigwait(&stop_signals, &sig) != 0) {
    }
    uint64_t one = 1;
    if (write(stop_fd, &one, sizeof one) < 0)
        perror("write(eventfd)");
    for (unsigned long t = 0; t < threads; t++) {
        pthread_join(tids[t], NULL);
        close(workers[t].listen_fd);
        close(workers[t].epoll_fd);
    }
    close(stop_fd);
    free(workers);
    free(tids);
    return 0;
}
