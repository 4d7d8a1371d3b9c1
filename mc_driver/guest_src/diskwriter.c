/*
 * diskwriter DEV [--port P] [--rate RECORDS_PER_S] [--count N]
 *
 * The durability probe for failover tests.  It waits for one TCP client on port P (default 9100),
 * then writes numbered 4 KiB records to the raw block device DEV (e.g. /dev/vda), record number S
 * (from 1) at byte offset (S - 1) * 4096, with O_DIRECT and fdatasync() after each write.  Only after
 * fdatasync returned does it send "S\n" to the client: a number the client has seen is a write the
 * guest was told is durable, so after any failover it must be on the surviving disk.
 *
 * Record layout (little-endian): "HFTDWREC" | u64 S | u64 RUN | 509 x u64 (S ^ RUN ^ 0x5555555555555555).
 * RUN is CLOCK_REALTIME in ns at start, announced to the client first as "RUN <hex>\n".  Every byte
 * is implied by (S, RUN), so a torn or stale record never verifies.  The host side reads records
 * back with mc_driver.guest.expected.read_disk_records.  When the device is full it sends "FULL\n"
 * and stops; if the client goes away it waits for the next one and continues the numbering.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define REC 4096

static int send_line(int fd, const char *s) {
    size_t n = strlen(s);
    while (n > 0) {
        ssize_t w = send(fd, s, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        s += w;
        n -= (size_t)w;
    }
    return 0;
}

static void usage(void) {
    fprintf(stderr, "usage: diskwriter DEV [--port P] [--rate RECORDS_PER_S] [--count N]\n");
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 2 || argv[1][0] == '-') usage();
    const char *dev = argv[1];
    long port = 9100;
    double rate = 0;
    unsigned long long count = 0;
    for (int i = 2; i < argc; i++) {
        if (i + 1 >= argc) usage();
        char *end;
        if (!strcmp(argv[i], "--port")) {
            port = strtol(argv[++i], &end, 10);
            if (*end || port <= 0 || port > 65535) usage();
        } else if (!strcmp(argv[i], "--rate")) {
            rate = strtod(argv[++i], &end);
            if (*end || rate < 0) usage();
        } else if (!strcmp(argv[i], "--count")) {
            count = strtoull(argv[++i], &end, 10);
            if (*end) usage();
        } else {
            usage();
        }
    }
    int dfd = open(dev, O_RDWR | O_DIRECT);
    if (dfd < 0) {
        perror("diskwriter: open");
        return 1;
    }
    off_t size = lseek(dfd, 0, SEEK_END);
    if (size < REC) {
        fprintf(stderr, "diskwriter: %s is too small\n", dev);
        return 1;
    }
    unsigned long long capacity = (unsigned long long)size / REC;
    uint64_t *rec;
    if (posix_memalign((void **)&rec, REC, REC)) {
        perror("diskwriter: posix_memalign");
        return 1;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t run = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;

    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4)) {
        perror("diskwriter: bind/listen");
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("diskwriter: %s capacity=%llu records run=%llx port=%ld\n", dev, capacity,
           (unsigned long long)run, port);
    unsigned long long seq = 0;
    char line[64];
    for (;;) {
        int c = accept(ls, NULL, NULL);
        if (c < 0) continue;
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        snprintf(line, sizeof line, "RUN %llx\n", (unsigned long long)run);
        if (send_line(c, line)) {
            close(c);
            continue;
        }
        struct timespec next;
        clock_gettime(CLOCK_MONOTONIC, &next);
        for (;;) {
            if (seq >= capacity) {
                send_line(c, "FULL\n");
                break;
            }
            if (count && seq >= count) {
                send_line(c, "DONE\n");
                break;
            }
            uint64_t s = seq + 1;
            memcpy(rec, "HFTDWREC", 8);
            rec[1] = s;
            rec[2] = run;
            for (int k = 3; k < REC / 8; k++) rec[k] = s ^ run ^ 0x5555555555555555ULL;
            if (pwrite(dfd, rec, REC, (off_t)(s - 1) * REC) != REC || fdatasync(dfd)) {
                perror("diskwriter: write");
                send_line(c, "ERROR\n");
                return 1;
            }
            seq = s;
            snprintf(line, sizeof line, "%llu\n", (unsigned long long)s);
            if (send_line(c, line)) break; /* client gone: wait for the next one */
            if (rate > 0) {
                long step = (long)(1e9 / rate);
                next.tv_sec += step / 1000000000L;
                next.tv_nsec += step % 1000000000L;
                if (next.tv_nsec >= 1000000000L) {
                    next.tv_nsec -= 1000000000L;
                    next.tv_sec++;
                }
                while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR) {
                }
            }
        }
        close(c);
        if (seq >= capacity || (count && seq >= count)) {
            /* finished: keep answering new clients with the final state */
            for (;;) {
                int d = accept(ls, NULL, NULL);
                if (d < 0) continue;
                snprintf(line, sizeof line, "RUN %llx\n%s\n", (unsigned long long)run,
                         seq >= capacity ? "FULL" : "DONE");
                send_line(d, line);
                close(d);
            }
        }
    }
}
