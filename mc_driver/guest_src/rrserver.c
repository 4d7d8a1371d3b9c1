/*
 * rrserver [PORT]   (default 8000)
 *
 * Request/response service: a client sends a decimal byte count and a newline ("N\n"); the server
 * answers with the first N bytes of the project's deterministic stream (see blobgen.c), then waits
 * for the next request on the same connection.  N is capped at 64 MiB; a malformed request gets
 * "ERR\n" and the connection is closed.  One forked child per connection keeps it simple and lets
 * many clients run at once; the guest has no other use for its CPU while this is measured.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#define SEED 0x4859425249444654ULL
#define MAX_REPLY (64ULL << 20)

static uint64_t stream_word(uint64_t seed, uint64_t i) {
    uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static int write_all(int fd, const unsigned char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Say ERR and close gracefully: unread request bytes would otherwise turn our close into a reset. */
static void reject(int fd) {
    char sink[256];
    struct timeval tv = {.tv_sec = 1};
    write_all(fd, (const unsigned char *)"ERR\n", 4);
    shutdown(fd, SHUT_WR);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    while (read(fd, sink, sizeof sink) > 0) {
    }
}

static void serve(int fd) {
    static unsigned char out[65536];
    char line[32];
    size_t used = 0;
    for (;;) {
        char ch;
        ssize_t r = read(fd, &ch, 1);
        if (r <= 0) return;
        if (ch != '\n') {
            if (used + 1 >= sizeof line || ch < '0' || ch > '9') {
                reject(fd);
                return;
            }
            line[used++] = ch;
            continue;
        }
        line[used] = '\0';
        unsigned long long n = used ? strtoull(line, NULL, 10) : 0;
        used = 0;
        if (n > MAX_REPLY) {
            reject(fd);
            return;
        }
        uint64_t word = 0;
        while (n > 0) {
            size_t chunk = n < sizeof out ? (size_t)n : sizeof out;
            for (size_t k = 0; k < chunk; k += 8, word++) {
                uint64_t v = stream_word(SEED, word);
                for (int b = 0; b < 8; b++) out[k + b] = (unsigned char)(v >> (8 * b));
            }
            if (write_all(fd, out, chunk)) return;
            n -= chunk;
        }
    }
}

/* The service is its own process group: one SIGTERM to the listener (the control loop's "stop") ends
 * every connection too, so a stopped service leaves nothing answering. */
static void stop_all(int sig) {
    (void)sig;
    signal(SIGTERM, SIG_IGN);
    kill(0, SIGTERM);
    /* Exit only after every connection's process (SIGCHLD is ignored: wait() returns once none is
     * left): a child that had not yet closed its copy of the listening socket would still accept. */
    while (wait(NULL) != -1 || errno == EINTR) {
    }
    _exit(0);
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 8000;
    if (argc > 2 || port <= 0 || port > 65535) {
        fprintf(stderr, "usage: rrserver [PORT]\n");
        return 2;
    }
    setpgid(0, 0);
    signal(SIGTERM, stop_all);
    signal(SIGCHLD, SIG_IGN); /* children are reaped automatically */
    signal(SIGPIPE, SIG_IGN);
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 128)) {
        perror("rrserver: bind/listen");
        return 1;
    }
    for (;;) {
        int fd = accept(ls, NULL, NULL);
        if (fd < 0) continue;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        pid_t pid = fork();
        if (pid == 0) {
            signal(SIGTERM, SIG_DFL);
            close(ls);
            serve(fd);
            _exit(0);
        }
        close(fd);
    }
}
