/*
 * memdirty MIB_PER_S WORKING_SET_MIB [REPORT_SECONDS]
 *
 * Dirties guest memory at a steady rate: the working set is allocated and touched once, then every
 * 10 ms tick writes one word into the next pages of the working set (round robin), so that the
 * migration dirty bitmap sees MIB_PER_S MiB of distinct dirty pages per second (as long as the rate
 * is below working set / checkpoint interval).  Ticks are scheduled on CLOCK_MONOTONIC absolute
 * deadlines; a delay of up to 100 ms is caught up (the average stays exact), a longer one -- the vCPU
 * starved by a busy host, or a paused VM -- is written off, so the rate never bursts far above the
 * asked one after a stall.
 * MIB_PER_S 0 means "as fast as possible".  Every REPORT_SECONDS (default 5, 0 = never) it prints
 * "memdirty: pages=N mib_per_s=R" to stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096UL
#define TICK_NS 10000000L
#define MAX_CATCH_UP_S 0.1

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int parse_nonneg(const char *s, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end != '\0' || v < 0) return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv) {
    double rate_mib, ws_mib, report_s = 5;
    if (argc < 3 || argc > 4 || parse_nonneg(argv[1], &rate_mib) || parse_nonneg(argv[2], &ws_mib) ||
        (argc == 4 && parse_nonneg(argv[3], &report_s)) || ws_mib < 1) {
        fprintf(stderr, "usage: memdirty MIB_PER_S WORKING_SET_MIB [REPORT_SECONDS]  (working set >= 1)\n");
        return 2;
    }
    size_t pages = (size_t)(ws_mib * 1024 * 1024 / PAGE);
    uint8_t *ws = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ws == MAP_FAILED) {
        perror("memdirty: mmap");
        return 1;
    }
    for (size_t i = 0; i < pages; i++) ws[i * PAGE] = 1; /* fault everything in first */
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("memdirty: started rate=%.1f MiB/s working_set=%zu pages\n", rate_mib, pages);

    double pages_per_tick = rate_mib * 1024 * 1024 / PAGE * ((double)TICK_NS / 1e9);
    double owed = 0;
    size_t next = 0;
    uint64_t stamp = 0, done = 0, done_at_report = 0;
    double t0 = now_s(), last_report = t0;
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    for (;;) {
        size_t n;
        if (rate_mib == 0) {
            n = pages;
        } else {
            owed += pages_per_tick;
            n = (size_t)owed;
            owed -= (double)n;
        }
        for (size_t k = 0; k < n; k++) {
            /* a different value each round so the page really changes */
            stamp++;
            *(volatile uint64_t *)(ws + next * PAGE + (stamp % 64) * 8) = stamp;
            if (++next == pages) next = 0;
        }
        done += n;
        if (report_s > 0) {
            double t = now_s();
            if (t - last_report >= report_s) {
                printf("memdirty: pages=%llu mib_per_s=%.2f\n", (unsigned long long)done,
                       (double)(done - done_at_report) * PAGE / 1048576.0 / (t - last_report));
                done_at_report = done;
                last_report = t;
            }
        }
        if (rate_mib == 0) continue;
        deadline.tv_nsec += TICK_NS;
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_nsec -= 1000000000L;
            deadline.tv_sec += 1;
        }
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        double behind = (double)(now.tv_sec - deadline.tv_sec) + (double)(now.tv_nsec - deadline.tv_nsec) / 1e9;
        if (behind > MAX_CATCH_UP_S) deadline = now;
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &deadline, NULL) == EINTR) {
        }
    }
}
