/*
 * blobgen BYTES [SEED]
 *
 * Writes BYTES bytes of the project's deterministic pseudo-random stream to stdout: 64-bit word i
 * (from 0) is splitmix64's output function applied to SEED + (i + 1) * 0x9E3779B97F4A7C15, stored
 * little-endian.  It is counter-based, so the host side (mc_driver.guest.expected.stream_bytes)
 * computes the same bytes vectorised with numpy, and rrserver can answer any prefix without state.
 * The init script uses it to create the 8 MiB /www/blob the HTTP server serves.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_SEED 0x4859425249444654ULL /* "HYBRIDFT" */

static uint64_t stream_word(uint64_t seed, uint64_t i) {
    uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: blobgen BYTES [SEED]\n");
        return 2;
    }
    unsigned long long total = strtoull(argv[1], NULL, 0);
    uint64_t seed = argc == 3 ? strtoull(argv[2], NULL, 0) : DEFAULT_SEED;
    static unsigned char buf[65536];
    uint64_t word = 0;
    while (total > 0) {
        size_t n = total < sizeof buf ? (size_t)total : sizeof buf;
        for (size_t k = 0; k < n; k += 8, word++) {
            uint64_t v = stream_word(seed, word);
            for (int b = 0; b < 8; b++) buf[k + b] = (unsigned char)(v >> (8 * b));
        }
        if (fwrite(buf, 1, n, stdout) != n) {
            perror("blobgen: write");
            return 1;
        }
        total -= n;
    }
    return fflush(stdout) == 0 ? 0 : 1;
}
