/* A native latency load generator for pybroker, written from protocol.md.
 *
 * `pybroker bench latency` reads its subscribers in Python: ten of them on
 * one core taking ~100,000 deliveries a second set the upper percentiles
 * (the reference relay, which only forwards, shows a p99 of ~1.3 ms with
 * them), so its figures are the load side's. This one's are the broker's.
 *
 * One publisher thread sends RATE messages a second for DURATION seconds,
 * PER_FRAME messages per PUBLISH frame (request_id 0: no PUBACK wanted, so
 * nothing comes back to read but ERRORs). It paces by an absolute schedule
 * (CLOCK_MONOTONIC, clock_nanosleep with TIMER_ABSTIME): frame k is due at
 * t0 + k * PER_FRAME / RATE, and a late send does not shift later ones.
 * With TICK_US 0 it wakes at each frame's due time (at 10,000 msg/s, a
 * write every 100 µs: a publisher sending each message as it comes); with
 * TICK_US > 0 it wakes every tick, as `pybroker bench latency` does (1 ms
 * by default there), and sends the frames due by then in one write. Frames
 * already due when it wakes go out together, in one write. Each message
 * carries, in its first 16 payload bytes, the CLOCK_MONOTONIC time (ns)
 * read just before the write that carries it -- the actual send time, as
 * `pybroker bench latency` stamps `time.time_ns()` just before encoding --
 * and its sequence number. How far behind schedule the publisher woke is
 * reported, so a publisher that could not keep up is seen, not hidden.
 *
 * One epoll thread reads every subscriber connection. For each message of
 * each whole DELIVER it records (time of the read that completed the frame)
 * - (payload timestamp), and checks the sequence numbers per subscriber:
 * a jump forward counts as lost, a step back as out of order (or
 * duplicate). Messages whose sequence falls in the first WARMUP seconds of
 * the schedule are counted but not sampled. Samples go into one array
 * sized RATE x DURATION x SUBSCRIBERS up front (bounded, never grown).
 * The batch CRC is not checked: the broker checks it on PUBLISH and it
 * would be load-side work per message; sequence numbers catch what matters
 * here (loss, reordering, duplication).
 *
 * Everything is bounded by TIMEOUT_S: socket timeouts on the handshakes
 * and sends, the read loop's deadline, and an alarm as a backstop.
 *
 * It prints one JSON line:
 *   {"count": samples taken (after the warm-up), "expected": samples due,
 *    "delivered": messages received (all subscribers, warm-up included),
 *    "published": messages sent, "lost": L, "out_of_order": O,
 *    "p50_us", "p90_us", "p99_us", "p99.9_us", "max_us", "mean_us": ...,
 *    "publisher_max_behind_us": ..., "complete": true|false, ...}
 * and exits 0 when every subscriber got every message in order, 1 if not,
 * 2 on a setup error. Built and run by benchmarks/native_latency.py.
 *
 *   latload HOST PORT TOPIC PAYLOAD_BYTES SUBSCRIBERS RATE DURATION_S WARMUP_S PER_FRAME TICK_US TIMEOUT_S
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PROG "latload"
#include "wire.h"

/* What a payload starts with: send time (ns, CLOCK_MONOTONIC), sequence. */
#define STAMP 16
/* The most samples it will hold (8 bytes each: 1.6 GB would be too many). */
#define MAX_SAMPLES 200000000ULL

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void on_alarm(int sig) {
    (void)sig;
    static const char msg[] = "latload: timed out (alarm)\n";
    ssize_t ignored = write(2, msg, sizeof msg - 1);
    (void)ignored;
    _exit(3);
}

struct sub {
    int fd;
    uint8_t *buf;
    size_t len;
    uint64_t next_seq;  /* the sequence number this subscriber expects next */
    uint64_t received, lost, out_of_order;
    int closed;
    int is_pub;  /* the publisher's connection: read for ERRORs only, never written here */
};

/* Shared by the two threads; the publisher writes, main reads after join. */
struct pub_args {
    int fd;
    uint8_t *frame;        /* one PUBLISH frame: the template every frame is copied from */
    size_t frame_len;
    size_t stamp_at[1024]; /* offsets in a frame of each message's timestamp and sequence */
    size_t crc_at, records_at, records_len;
    long per_frame;
    uint64_t frames;
    double rate;
    int64_t tick_ns;       /* 0: each frame at its own due time; else wake every tick */
    int64_t t0;            /* the schedule's origin (CLOCK_MONOTONIC ns) */
    int64_t end;           /* when the last frame went out */
    int64_t max_behind;    /* the latest a wake-up came after its scheduled time */
    uint64_t late_wakes;   /* wake-ups more than 100 µs after their scheduled time */
    uint64_t writes;       /* send() calls that carried frames */
    uint64_t sent;         /* messages sent */
};

/* The most frames put into one write (a publisher far behind catches up in
   writes of this many). */
#define WBATCH 256

static void *publisher(void *arg) {
    struct pub_args *a = arg;
    double interval_ns = 1e9 * (double)a->per_frame / a->rate;
    uint8_t *wbuf = malloc(a->frame_len * WBATCH);
    if (!wbuf) die("malloc");
    uint64_t k = 0;  /* frames sent */
    int64_t step = 0;
    while (k < a->frames) {
        /* Absolute schedule: the next wake-up is the next frame's due time
           (or the next tick), never "now + interval". */
        int64_t wake = a->tick_ns ? a->t0 + ++step * a->tick_ns
                                  : a->t0 + (int64_t)llround((double)k * interval_ns);
        if (mono_ns() < wake) {
            struct timespec ts = {wake / 1000000000, wake % 1000000000};
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {}
        }
        int64_t now = mono_ns();
        if (now - wake > a->max_behind) a->max_behind = now - wake;
        if (now - wake > 100000) a->late_wakes++;
        /* Every frame due by now goes out, in one write (WBATCH at most). */
        uint64_t due = (uint64_t)((double)(now - a->t0) / interval_ns) + 1;
        if (due > a->frames) due = a->frames;
        while (k < due) {
            uint64_t n = due - k < WBATCH ? due - k : WBATCH;
            int64_t at = mono_ns();  /* the actual send time, stamped in the payloads */
            for (uint64_t j = 0; j < n; j++) {
                uint8_t *f = wbuf + j * a->frame_len;
                memcpy(f, a->frame, a->frame_len);
                for (long i = 0; i < a->per_frame; i++) {
                    uint64_t seq = (k + j) * (uint64_t)a->per_frame + (uint64_t)i;
                    memcpy(f + a->stamp_at[i], &at, 8);
                    memcpy(f + a->stamp_at[i] + 8, &seq, 8);
                }
                put32(f + a->crc_at, crc32_ieee(f + a->records_at, a->records_len));
            }
            send_all(a->fd, wbuf, n * a->frame_len);
            a->writes++;
            k += n;
            a->sent = k * (uint64_t)a->per_frame;
        }
    }
    a->end = mono_ns();
    free(wbuf);
    return NULL;
}

/* Everything the reader needs to sample and check a message. */
struct reader {
    int64_t *samples;
    uint64_t nsamples, cap;
    uint64_t warmup_seq;   /* messages with a lower sequence are not sampled */
    uint64_t total;        /* messages published per subscriber */
    int64_t last_arrival;
    int error;
};

/* Handle every whole frame in s->buf; keep a partial one's bytes for the
   next read. `now` is the time of the read that completed them. Returns -1
   on an ERROR or GOODBYE from the server or a malformed DELIVER. */
static int consume(struct reader *rd, struct sub *s, int64_t now) {
    size_t pos = 0;
    int rc = 0;
    while (s->len - pos >= 6) {
        const uint8_t *h = s->buf + pos;
        uint32_t size = get32(h);
        int type = h[4];
        if ((size_t)size + 6 > RBUF) { fprintf(stderr, "latload: frame of %u bytes is too large\n", size); return -1; }
        if (s->len - pos < 6 + (size_t)size) break;
        const uint8_t *b = h + 6, *end = b + size;
        if (type == T_DELIVER) {
            /* sub_id 4, base 8, timestamp 8, topic str16, then the batch. */
            if (size < 22) { fprintf(stderr, "latload: short DELIVER\n"); return -1; }
            uint16_t tl = get16(b + 20);
            const uint8_t *p = b + 22 + tl;
            if (p + 8 > end) { fprintf(stderr, "latload: short DELIVER batch\n"); return -1; }
            uint32_t count = get32(p);
            p += 8;  /* count, crc */
            for (uint32_t i = 0; i < count; i++) {
                if (p + 6 > end) { fprintf(stderr, "latload: records run past the DELIVER\n"); return -1; }
                uint32_t plen = get32(p);
                uint16_t hlen = get16(p + 4);
                const uint8_t *payload = p + 6 + hlen;
                if (plen < STAMP || payload + plen > end) { fprintf(stderr, "latload: bad record\n"); return -1; }
                int64_t sent;
                uint64_t seq;
                memcpy(&sent, payload, 8);
                memcpy(&seq, payload + 8, 8);
                s->received++;
                if (seq == s->next_seq) {
                    s->next_seq++;
                } else if (seq > s->next_seq) {
                    s->lost += seq - s->next_seq;
                    s->next_seq = seq + 1;
                } else {
                    s->out_of_order++;
                }
                if (seq >= rd->warmup_seq && rd->nsamples < rd->cap) rd->samples[rd->nsamples++] = now - sent;
                p = payload + plen;
            }
            rd->last_arrival = now;
        } else if (type == T_PING) {
            if (size == 8 && !s->is_pub) {  /* answer, or a long run's idle timeout closes us */
                uint8_t pong[14];
                put32(pong, 8);
                pong[4] = T_PONG;
                pong[5] = 0;
                memcpy(pong + 6, b, 8);
                send_all(s->fd, pong, sizeof pong);
            }
        } else if (type == T_ERROR) {
            /* code u16, ref_kind u8, ref u64, message str16 */
            if (size >= 13) {
                uint16_t ml = get16(b + 11);
                if (13 + (size_t)ml > size) ml = (uint16_t)(size - 13);
                fprintf(stderr, "latload: the server sent ERROR %u: %.*s\n", get16(b), (int)ml, (const char *)b + 13);
            } else {
                fprintf(stderr, "latload: the server sent a short ERROR\n");
            }
            rc = -1;
        } else if (type == T_GOODBYE) {
            fprintf(stderr, "latload: the server said GOODBYE\n");
            rc = -1;
        }
        pos += 6 + (size_t)size;
    }
    if (pos) {
        memmove(s->buf, s->buf + pos, s->len - pos);
        s->len -= pos;
    }
    return rc;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted samples, in µs (as latency.py does). */
static double pct(const int64_t *v, uint64_t n, double p) {
    if (!n) return -1;
    double rank = ceil(p / 100.0 * (double)n);
    uint64_t i = rank < 1 ? 0 : (uint64_t)rank - 1;
    if (i >= n) i = n - 1;
    return v[i] / 1000.0;
}

int main(int argc, char **argv) {
    if (argc != 12) {
        fprintf(stderr, "usage: latload HOST PORT TOPIC PAYLOAD_BYTES SUBSCRIBERS RATE DURATION_S WARMUP_S PER_FRAME TICK_US TIMEOUT_S\n");
        return 2;
    }
    const char *host = argv[1], *topic = argv[3];
    int port = atoi(argv[2]), nsubs = atoi(argv[5]);
    long payload = atol(argv[4]), per_frame = atol(argv[9]);
    double rate = atof(argv[6]), duration = atof(argv[7]), warmup = atof(argv[8]), tick_us = atof(argv[10]),
           timeout = atof(argv[11]);
    size_t tl = strlen(topic);
    if (nsubs < 1 || nsubs > 1000 || payload < STAMP || payload > (1 << 20) || per_frame < 1 || per_frame > 1024 ||
        rate <= 0 || duration <= 0 || warmup < 0 || warmup >= duration || tick_us < 0 || tick_us > 1e6 || timeout <= 0 || tl < 1 || tl > 255) {
        fprintf(stderr, "latload: bad arguments (payload >= %d B, 1 <= per_frame <= 1024, 0 <= warmup < duration, "
                        "0 <= tick_us <= 1e6)\n", STAMP);
        return 2;
    }
    uint64_t total = (uint64_t)llround(rate * duration);
    total -= total % (uint64_t)per_frame;  /* whole frames only */
    if (total == 0) fail("rate x duration is less than one frame");
    if (total * (uint64_t)nsubs > MAX_SAMPLES) fail("rate x duration x subscribers is too many samples");
    signal(SIGALRM, on_alarm);
    alarm((unsigned)ceil(timeout) + 5);
    signal(SIGPIPE, SIG_IGN);
    crc_init();
    /* clock_nanosleep's default 50 µs timer slack is half the 100 µs
       interval at 10,000 msg/s: ask for 1 µs. */
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);

    /* The PUBLISH frame: header, request_id 0, topic, count, crc, records. */
    size_t rec = 4 + 2 + (size_t)payload;
    size_t records = rec * (size_t)per_frame;
    size_t body = 8 + 2 + tl + 4 + 4 + records;
    uint8_t *frame = malloc(6 + body);
    if (!frame) die("malloc");
    struct pub_args pa = {0};
    put32(frame, (uint32_t)body);
    frame[4] = T_PUBLISH;
    frame[5] = 0;
    uint8_t *p = frame + 6;
    memset(p, 0, 8); p += 8;                   /* request_id 0: no PUBACK */
    put16(p, (uint16_t)tl); p += 2;
    memcpy(p, topic, tl); p += tl;
    put32(p, (uint32_t)per_frame); p += 4;
    pa.crc_at = (size_t)(p - frame); p += 4;
    pa.records_at = (size_t)(p - frame);
    for (long i = 0; i < per_frame; i++) {
        put32(p, (uint32_t)payload); p += 4;
        put16(p, 0); p += 2;
        pa.stamp_at[i] = (size_t)(p - frame);
        memset(p, 'x', (size_t)payload); p += payload;
    }
    pa.frame = frame;
    pa.frame_len = 6 + body;
    pa.records_len = records;
    pa.per_frame = per_frame;
    pa.frames = total / (uint64_t)per_frame;
    pa.rate = rate;
    pa.tick_ns = (int64_t)llround(tick_us * 1000);

    struct reader rd = {0};
    rd.total = total;
    rd.cap = total * (uint64_t)nsubs;
    rd.samples = malloc(rd.cap * sizeof *rd.samples);
    if (!rd.samples) die("malloc samples");
    /* Fault the pages in now, not during the measurement. */
    memset(rd.samples, 0, rd.cap * sizeof *rd.samples);
    rd.warmup_seq = (uint64_t)llround(rate * warmup);

    struct sub *subs = calloc((size_t)nsubs, sizeof *subs);
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    for (int i = 0; i < nsubs; i++) {
        subs[i].fd = connect_to(host, port, timeout);
        hello(subs[i].fd, "latload-sub");
        subscribe(subs[i].fd, topic);
        subs[i].buf = malloc(RBUF);
        if (!subs[i].buf) die("malloc");
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, subs[i].fd, &ev) < 0) die("epoll_ctl");
    }
    pa.fd = connect_to(host, port, timeout);
    hello(pa.fd, "latload-pub");
    /* A PUBLISH with request_id 0 is answered only if it fails (ERROR, ref
       0): read the publisher's connection too, so a refusal is reported
       rather than showing up only as lost messages. */
    struct sub pubconn = {.fd = pa.fd, .buf = malloc(RBUF), .is_pub = 1};
    if (!pubconn.buf) die("malloc");
    struct epoll_event pev = {.events = EPOLLIN, .data.u32 = (uint32_t)nsubs};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, pa.fd, &pev) < 0) die("epoll_ctl");

    /* Start the schedule a little ahead so the thread is running by then. */
    pa.t0 = mono_ns() + 5000000;
    int64_t deadline = pa.t0 + (int64_t)(timeout * 1e9);
    pthread_t pt;
    if (pthread_create(&pt, NULL, publisher, &pa) != 0) fail("pthread_create");

    uint64_t expected = total * (uint64_t)nsubs, delivered = 0;
    struct epoll_event evs[64];
    int open_subs = nsubs;
    while (delivered < expected && open_subs > 0 && !rd.error) {
        int64_t left = deadline - mono_ns();
        if (left <= 0) break;
        int n = epoll_wait(ep, evs, 64, (int)(left / 1000000) + 1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int k = 0; k < n; k++) {
            struct sub *s = evs[k].data.u32 == (uint32_t)nsubs ? &pubconn : &subs[evs[k].data.u32];
            if (s->closed) continue;
            ssize_t r = recv(s->fd, s->buf + s->len, RBUF - s->len, MSG_DONTWAIT);
            int64_t now = mono_ns();
            if (r <= 0) {
                if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
                fprintf(stderr, "latload: the %s connection closed\n", s->is_pub ? "publisher's" : "a subscriber's");
                s->closed = 1;
                if (!s->is_pub) open_subs--;
                epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
                rd.error = 1;
                continue;
            }
            s->len += (size_t)r;
            uint64_t before = s->received;
            if (consume(&rd, s, now) < 0) rd.error = 1;
            delivered += s->received - before;
        }
    }
    /* The publisher is bounded by its schedule and SO_SNDTIMEO. */
    pthread_join(pt, NULL);

    uint64_t lost = 0, ooo = 0;
    for (int i = 0; i < nsubs; i++) {
        /* Never arrived at all (the tail after the last one seen) is lost too. */
        uint64_t tail = subs[i].next_seq < total ? total - subs[i].next_seq : 0;
        lost += subs[i].lost + tail;
        ooo += subs[i].out_of_order;
    }
    qsort(rd.samples, rd.nsamples, sizeof *rd.samples, cmp_i64);
    uint64_t n = rd.nsamples;
    double sum = 0;
    for (uint64_t i = 0; i < n; i++) sum += (double)rd.samples[i];
    int complete = delivered == expected && lost == 0 && ooo == 0 && !rd.error;
    double seconds = (pa.end - pa.t0) / 1e9;
    printf("{\"count\": %llu, \"expected\": %llu, \"delivered\": %llu, \"published\": %llu, "
           "\"subscribers\": %d, \"lost\": %llu, \"out_of_order\": %llu, "
           "\"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, \"p99.9_us\": %.1f, \"max_us\": %.1f, "
           "\"mean_us\": %.1f, \"publish_seconds\": %.6f, \"published_per_s\": %.1f, "
           "\"publisher_max_behind_us\": %.1f, \"publisher_late_wakes\": %llu, \"publish_writes\": %llu, "
           "\"tick_us\": %.1f, \"frame_bytes\": %zu, "
           "\"stamp\": \"actual send time, CLOCK_MONOTONIC\", \"complete\": %s}\n",
           (unsigned long long)n, (unsigned long long)((total - (rd.warmup_seq < total ? rd.warmup_seq : total)) * (uint64_t)nsubs),
           (unsigned long long)delivered, (unsigned long long)pa.sent, nsubs,
           (unsigned long long)lost, (unsigned long long)ooo,
           pct(rd.samples, n, 50), pct(rd.samples, n, 90), pct(rd.samples, n, 99), pct(rd.samples, n, 99.9),
           n ? rd.samples[n - 1] / 1000.0 : -1.0, n ? sum / (double)n / 1000.0 : -1.0,
           seconds, seconds > 0 ? (double)pa.sent / seconds : 0.0,
           pa.max_behind / 1000.0, (unsigned long long)pa.late_wakes, (unsigned long long)pa.writes,
           tick_us, pa.frame_len,
           complete ? "true" : "false");
    fflush(stdout);
    close(pa.fd);
    for (int i = 0; i < nsubs; i++) close(subs[i].fd);
    return complete ? 0 : 1;
}
