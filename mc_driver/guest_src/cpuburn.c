/*
 * cpuburn [SECONDS]
 *
 * Keeps one vCPU busy with integer work that touches no memory beyond its stack, so it costs CPU
 * (and TCG translation time) without dirtying pages: the counterpart of memdirty for separating
 * "busy guest" from "dirtying guest" in the policy experiments.  Without SECONDS it runs until killed.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    double seconds = -1;
    if (argc > 2 || (argc == 2 && (seconds = atof(argv[1])) <= 0)) {
        fprintf(stderr, "usage: cpuburn [SECONDS>0]\n");
        return 2;
    }
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
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
        if (seconds > 0) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            double el = (double)(now.tv_sec - start.tv_sec) + (double)(now.tv_nsec - start.tv_nsec) / 1e9;
            if (el >= seconds) break;
        }
    }
    printf("cpuburn: %llu Mrounds\n", (unsigned long long)rounds);
    (void)sink;
    return 0;
}
