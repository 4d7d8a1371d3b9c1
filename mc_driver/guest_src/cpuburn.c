/*
 * cpuburn [SECONDS [REPORT_SECONDS]]
 *
 * Keeps one vCPU busy with integer work that touches no memory beyond its stack, so it costs CPU
 * (and TCG translation time) without dirtying pages: the counterpart of memdirty for separating
 * "busy guest" from "dirtying guest" in the policy experiments.  Without SECONDS (or with 0 when a
 * REPORT_SECONDS follows) it runs until killed.  With REPORT_SECONDS > 0 it prints
 * "cpuburn: rounds=N" (rounds of 10^6 steps done so far) every REPORT_SECONDS, so a host can read the
 * guest's own work count while it runs (the experiment runner's cpu score).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    double seconds = -1, report_s = 0;
    if (argc > 3 || (argc == 2 && (seconds = atof(argv[1])) <= 0) ||
        (argc == 3 && ((seconds = atof(argv[1])) < 0 || (report_s = atof(argv[2])) <= 0))) {
        fprintf(stderr, "usage: cpuburn [SECONDS>0] | cpuburn SECONDS>=0 REPORT_SECONDS>0\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    double last_report = 0;
    volatile uint64_t sink = 0;
    uint64_t x = 88172645463325252ULL, rounds = 0;
    for (;;) {
        for (int i = 0; i < 1000000; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        sink = x;
        rounds++;
        if (seconds > 0 || report_s > 0) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            double el = (double)(now.tv_sec - start.tv_sec) + (double)(now.tv_nsec - start.tv_nsec) / 1e9;
            if (report_s > 0 && el - last_report >= report_s) {
                printf("cpuburn: rounds=%llu\n", (unsigned long long)rounds);
                last_report = el;
            }
            if (seconds > 0 && el >= seconds) break;
        }
    }
    printf("cpuburn: %llu Mrounds\n", (unsigned long long)rounds);
    (void)sink;
    return 0;
}
