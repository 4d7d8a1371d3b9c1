/*
 * blobd [PORT]   (default 8080)
 *
 * A minimal HTTP/1.1 server for the same content as busybox httpd's /blob, but deterministic down to
 * the header: no Date, Last-Modified or ETag, so the two COLO replicas answer byte-identically and any
 * divergence seen on it is not the clock.  Comparing it with busybox httpd on port 80 (which stamps
 * every answer with Date:) separates clock-driven divergences from everything else.
 *
 *   GET /blob       -> the 8 MiB blob (the project's stream, see blobgen.c)
 *   GET /bytes/N    -> the first N bytes of the stream (N <= 64 MiB)
 *   anything else   -> 404 (a malformed request line: 400 and close)
 * Connections are persistent (HTTP/1.1 keep-alive) unless the client sends "Connection: close".
 * One forked child per connection.
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
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#define SEED 0x4859425249444654ULL
#define BLOB_SIZE (8ULL << 20)
#define MAX_BYTES (64ULL << 20)
#define MAX_HEAD 8192

static uint64_t stream_word(uint64_t seed, uint64_t i) {
    uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static int write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
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

static int send_stream(int fd, unsigned long long n) {
    static unsigned char out[65536];
    uint64_t word = 0;
    while (n > 0) {
        size_t chunk = n < sizeof out ? (size_t)n : sizeof out;
        for (size_t k = 0; k < chunk; k += 8, word++) {
            uint64_t v = stream_word(SEED, word);
            for (int b = 0; b < 8; b++) out[k + b] = (unsigned char)(v >> (8 * b));
        }
        if (write_all(fd, out, chunk)) return -1;
        n -= chunk;
    }
    return 0;
}

static int respond(int fd, int status, const char *reason, unsigned long long length, int close_after) {
    char head[256];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 %d %s\r\nContent-Type: application/octet-stream\r\nContent-Length: %llu\r\n%s\r\n",
                     status, reason, length, close_after ? "Connection: close\r\n" : "");
    return write_all(fd, head, (size_t)n);
}

/* Serve requests on one connection until it closes. The head is read up to its blank line; a
 * request body is not expected (GET only) and a head over MAX_HEAD bytes is refused. */
static void serve(int fd) {
    char buf[MAX_HEAD + 1];
    size_t used = 0;
    for (;;) {
        char *end;
        while ((end = memmem(buf, used, "\r\n\r\n", 4)) == NULL) {
            if (used == MAX_HEAD) {
                respond(fd, 431, "Request Header Fields Too Large", 0, 1);
                return;
            }
            ssize_t r = read(fd, buf + used, MAX_HEAD - used);
            if (r <= 0) return;
            used += (size_t)r;
        }
        size_t head_len = (size_t)(end - buf) + 4;
        buf[head_len - 2] = '\0';
        char method[8], path[256];
        int close_after = strcasestr(buf, "\r\nConnection: close") != NULL;
        if (sscanf(buf, "%7s %255s HTTP/1.", method, path) != 2) {
            respond(fd, 400, "Bad Request", 0, 1);
            return;
        }
        int ok;
        if (strcmp(method, "GET") != 0) {
            ok = respond(fd, 405, "Method Not Allowed", 0, close_after);
        } else if (strcmp(path, "/blob") == 0) {
            ok = respond(fd, 200, "OK", BLOB_SIZE, close_after) || send_stream(fd, BLOB_SIZE);
        } else if (strncmp(path, "/bytes/", 7) == 0 && path[7] >= '0' && path[7] <= '9') {
            char *rest;
            unsigned long long n = strtoull(path + 7, &rest, 10);
            if (*rest || n > MAX_BYTES)
                ok = respond(fd, 404, "Not Found", 0, close_after);
            else
                ok = respond(fd, 200, "OK", n, close_after) || send_stream(fd, n);
        } else {
            ok = respond(fd, 404, "Not Found", 0, close_after);
        }
        if (ok != 0 || close_after) return;
        memmove(buf, buf + head_len, used - head_len);
        used -= head_len;
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
    int port = argc > 1 ? atoi(argv[1]) : 8080;
    if (argc > 2 || port <= 0 || port > 65535) {
        fprintf(stderr, "usage: blobd [PORT]\n");
        return 2;
    }
    setpgid(0, 0);
    signal(SIGTERM, stop_all);
    signal(SIGCHLD, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 128)) {
        perror("blobd: bind/listen");
        return 1;
    }
    for (;;) {
        int fd = accept(ls, NULL, NULL);
        if (fd < 0) continue;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (fork() == 0) {
            signal(SIGTERM, SIG_DFL);
            close(ls);
            serve(fd);
            /* close gracefully: unread request bytes would otherwise turn close() into a reset */
            char sink[4096];
            struct timeval tv = {.tv_sec = 1};
            shutdown(fd, SHUT_WR);
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
            while (read(fd, sink, sizeof sink) > 0) {
            }
            _exit(0);
        }
        close(fd);
    }
}
