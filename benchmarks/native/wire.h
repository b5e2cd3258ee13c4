/* What the native load generators (latload.c, fanload.c) share: protocol.md's
 * frame types, the batch CRC, big-endian fields, blocking socket helpers and
 * the handshake (HELLO -> WELCOME, SUBSCRIBE -> SUBACK). Each includes it
 * after defining PROG, the name its messages start with. Header-only: each
 * program is still built from its one .c file. */
#ifndef PYBROKER_NATIVE_WIRE_H
#define PYBROKER_NATIVE_WIRE_H

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>

#ifndef PROG
#error "define PROG (the program's name) before including wire.h"
#endif

#define T_HELLO 0x01
#define T_WELCOME 0x02
#define T_PUBLISH 0x10
#define T_SUBSCRIBE 0x20
#define T_SUBACK 0x21
#define T_DELIVER 0x30
#define T_PING 0x40
#define T_PONG 0x41
#define T_ERROR 0x50
#define T_GOODBYE 0x60
/* Bytes each subscriber connection reads into at once. */
#define RBUF (1 << 20)

static uint32_t crc_table[256];

static inline void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static inline uint32_t crc32_ieee(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    while (n--) c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static inline void die(const char *what) {
    fprintf(stderr, PROG ": %s: %s\n", what, strerror(errno));
    exit(2);
}

static inline void fail(const char *what) {
    fprintf(stderr, PROG ": %s\n", what);
    exit(2);
}

static inline void put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v; }
static inline void put32(uint8_t *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }
static inline uint32_t get32(const uint8_t *p) { return (uint32_t)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3]; }
static inline uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static inline void send_all(int fd, const uint8_t *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            die("send");  /* includes EAGAIN: SO_SNDTIMEO ran out */
        }
        p += w;
        n -= (size_t)w;
    }
}

static inline void recv_exact(int fd, uint8_t *p, size_t n) {
    while (n) {
        ssize_t r = recv(fd, p, n, 0);
        if (r == 0) fail("connection closed during the handshake");
        if (r < 0) {
            if (errno == EINTR) continue;
            die("recv during the handshake");
        }
        p += r;
        n -= (size_t)r;
    }
}

/* Read one whole frame (handshake answers are small); returns its type. */
static inline int read_frame(int fd, uint8_t *body, size_t cap, uint32_t *size) {
    uint8_t h[6];
    recv_exact(fd, h, 6);
    *size = get32(h);
    if (*size > cap) fail("handshake frame too large");
    recv_exact(fd, body, *size);
    return h[4];
}

/* A TCP connection with TCP_NODELAY. With timeout > 0 (seconds) the
 * handshake reads and every send are bounded by it: a stuck broker must not
 * hang the run (connect on loopback is bounded by SO_SNDTIMEO too). */
static inline int connect_to(const char *host, int port, double timeout) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    if (timeout > 0) {
        struct timeval tv = {(time_t)timeout, (suseconds_t)((timeout - (time_t)timeout) * 1e6)};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    }
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) fail("bad host (an IPv4 address is wanted)");
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static inline void hello(int fd, const char *name) {
    uint8_t f[64];
    size_t nl = strlen(name), body = 4 + 2 + 2 + nl + 2;
    put32(f, (uint32_t)body);
    f[4] = T_HELLO;
    f[5] = 0;
    memcpy(f + 6, "PYBK", 4);
    put16(f + 10, 1);
    put16(f + 12, (uint16_t)nl);
    memcpy(f + 14, name, nl);
    put16(f + 14 + nl, 0);
    send_all(fd, f, 6 + body);
    static uint8_t ans[65536];
    uint32_t size;
    if (read_frame(fd, ans, sizeof ans, &size) != T_WELCOME) fail("no WELCOME");
}

/* SUBSCRIBE sub_id 1 to new messages of ``topic`` with unlimited credit. */
static inline void subscribe(int fd, const char *topic) {
    uint8_t f[512];
    size_t tl = strlen(topic), body = 4 + 2 + tl + 1 + 8 + 4 + 2;
    put32(f, (uint32_t)body);
    f[4] = T_SUBSCRIBE;
    f[5] = 0;
    uint8_t *p = f + 6;
    put32(p, 1); p += 4;                      /* sub_id */
    put16(p, (uint16_t)tl); p += 2;
    memcpy(p, topic, tl); p += tl;
    *p++ = 0;                                  /* start: new messages only */
    memset(p, 0, 8); p += 8;                   /* start_value */
    put32(p, 0xFFFFFFFFu); p += 4;             /* credit: unlimited */
    put16(p, 0);                               /* no options */
    send_all(fd, f, 6 + body);
    static uint8_t ans[65536];
    uint32_t size;
    int t = read_frame(fd, ans, sizeof ans, &size);
    if (t != T_SUBACK) {
        fprintf(stderr, PROG ": no SUBACK (frame type 0x%02x)\n", t);
        exit(2);
    }
}

#endif
