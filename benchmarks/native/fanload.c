/* A native fan-out load generator for pybroker, written from protocol.md.
 *
 * Python load processes cannot offer or take more than about 1.5 M messages
 * a second of 1 KiB on this machine's spare core, which is less than the
 * broker can forward; this one can, so the broker (or the reference relay)
 * is the limit it measures. One publisher thread sends the same PUBLISH
 * frame (request_id 0: no PUBACK wanted) `frames` times as fast as TCP
 * takes it; one epoll thread reads every subscriber connection and counts
 * the messages of each DELIVER from its batch header, never copying the
 * records. It prints one JSON line:
 *   {"delivered": D, "expected": E, "seconds": S, "rate": D/S, ...}
 * where S runs from the publisher's first send to the last message's
 * arrival. Built and run by benchmarks/native_fanout.py.
 *
 *   fanload HOST PORT TOPIC PAYLOAD_BYTES SUBSCRIBERS MSGS_PER_FRAME FRAMES TIMEOUT_S
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PROG "fanload"
#include "wire.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

struct sub {
    int fd;
    uint8_t *buf;
    size_t len, pos;
    uint64_t skip;     /* body bytes of the current frame still to pass over */
    uint64_t messages;
    int closed;
};

struct pub_args {
    const char *host;
    int port;
    const uint8_t *frame;
    size_t frame_len;
    long frames;
    double started;
};

static void *publisher(void *arg) {
    struct pub_args *a = arg;
    int fd = connect_to(a->host, a->port, 0);
    hello(fd, "fanload-pub");
    int big = 8 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    a->started = now();
    for (long i = 0; i < a->frames; i++) send_all(fd, a->frame, a->frame_len);
    /* Keep the connection open until the readers finish: closing it could
       race the broker's reading of the last frames. */
    return (void *)(intptr_t)fd;
}

/* Count the messages of every DELIVER in what has arrived; keep a partial
   frame's first bytes for the next read. Returns -1 on an ERROR frame. */
static int consume(struct sub *s) {
    for (;;) {
        if (s->skip) {
            size_t avail = s->len - s->pos;
            size_t step = s->skip < avail ? (size_t)s->skip : avail;
            s->pos += step;
            s->skip -= step;
            if (s->skip) break;
        }
        size_t avail = s->len - s->pos;
        if (avail < 6) break;
        const uint8_t *h = s->buf + s->pos;
        uint32_t size = get32(h);
        int type = h[4];
        if (type == T_DELIVER) {
            /* sub_id 4, base 8, timestamp 8, topic str16, then count. */
            if (avail < 6 + 22) break;
            uint16_t tl = get16(h + 6 + 20);
            size_t need = 6 + 22 + tl + 4;
            if (avail < need) break;
            s->messages += get32(h + 6 + 22 + tl);
        } else if (type == T_ERROR) {
            fprintf(stderr, "fanload: the server sent ERROR\n");
            return -1;
        }
        s->pos += 6;
        s->skip = size;
    }
    if (s->pos) {
        memmove(s->buf, s->buf + s->pos, s->len - s->pos);
        s->len -= s->pos;
        s->pos = 0;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: fanload HOST PORT TOPIC PAYLOAD_BYTES SUBSCRIBERS MSGS_PER_FRAME FRAMES TIMEOUT_S\n");
        return 2;
    }
    const char *host = argv[1], *topic = argv[3];
    int port = atoi(argv[2]), nsubs = atoi(argv[5]);
    long payload = atol(argv[4]), per_frame = atol(argv[6]), frames = atol(argv[7]);
    double timeout = atof(argv[8]);
    size_t tl = strlen(topic);
    if (nsubs < 1 || nsubs > 1000 || payload < 0 || per_frame < 1 || frames < 1 || tl < 1 || tl > 255) {
        fprintf(stderr, "fanload: bad arguments\n");
        return 2;
    }
    crc_init();

    /* The PUBLISH frame: header, request_id 0, topic, count, crc, records. */
    size_t rec = 4 + 2 + (size_t)payload;
    size_t records = rec * (size_t)per_frame;
    size_t body = 8 + 2 + tl + 4 + 4 + records;
    uint8_t *frame = malloc(6 + body);
    if (!frame) die("malloc");
    put32(frame, (uint32_t)body);
    frame[4] = T_PUBLISH;
    frame[5] = 0;
    uint8_t *p = frame + 6;
    memset(p, 0, 8); p += 8;
    put16(p, (uint16_t)tl); p += 2;
    memcpy(p, topic, tl); p += tl;
    put32(p, (uint32_t)per_frame); p += 4;
    uint8_t *crc_at = p; p += 4;
    uint8_t *recs = p;
    for (long i = 0; i < per_frame; i++) {
        put32(p, (uint32_t)payload); p += 4;
        put16(p, 0); p += 2;
        memset(p, 'x', (size_t)payload); p += payload;
    }
    put32(crc_at, crc32_ieee(recs, records));

    struct sub *subs = calloc((size_t)nsubs, sizeof *subs);
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    for (int i = 0; i < nsubs; i++) {
        subs[i].fd = connect_to(host, port, 0);
        int big = 4 << 20;
        setsockopt(subs[i].fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
        hello(subs[i].fd, "fanload-sub");
        subscribe(subs[i].fd, topic);
        subs[i].buf = malloc(RBUF);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, subs[i].fd, &ev) < 0) die("epoll_ctl");
    }

    struct pub_args pa = {host, port, frame, 6 + body, frames, 0};
    pthread_t pt;
    pthread_create(&pt, NULL, publisher, &pa);

    uint64_t expected = (uint64_t)frames * (uint64_t)per_frame * (uint64_t)nsubs, delivered = 0;
    double deadline = now() + timeout, last = 0;
    struct epoll_event evs[64];
    int failed = 0;
    while (delivered < expected && !failed) {
        double left = deadline - now();
        if (left <= 0) break;
        int n = epoll_wait(ep, evs, 64, (int)(left * 1000) + 1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int k = 0; k < n; k++) {
            struct sub *s = &subs[evs[k].data.u32];
            ssize_t r = recv(s->fd, s->buf + s->len, RBUF - s->len, 0);
            if (r <= 0) {
                if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
                s->closed = 1;
                epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
                failed = 1;
                break;
            }
            s->len += (size_t)r;
            uint64_t before = s->messages;
            if (consume(s) < 0) failed = 1;
            delivered += s->messages - before;
            last = now();
        }
    }
    void *pub_fd;
    pthread_join(pt, &pub_fd);
    double seconds = last > pa.started ? last - pa.started : 0;
    printf("{\"delivered\": %llu, \"expected\": %llu, \"seconds\": %.6f, \"rate\": %.1f, "
           "\"frame_bytes\": %zu, \"complete\": %s}\n",
           (unsigned long long)delivered, (unsigned long long)expected, seconds,
           seconds > 0 ? delivered / seconds : 0.0, 6 + body,
           delivered == expected ? "true" : "false");
    close((int)(intptr_t)pub_fd);
    for (int i = 0; i < nsubs; i++) close(subs[i].fd);
    return delivered == expected ? 0 : 1;
}
