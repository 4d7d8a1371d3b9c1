/*
 * tokend [PORT]   (default 9000)
 *
 * The token service: every request line (any bytes up to a newline) is answered with one line
 *
 *     TOKEN <seq> <ns>\n
 *
 * <seq> numbers the answers of this service from 1, across all its connections; <ns> is the guest's
 * CLOCK_REALTIME in nanoseconds when the answer was made.  It stands for what TLS handshakes, session
 * ids and timestamps do to a replicated server: two COLO replicas answer every request differently,
 * because each reads its own clock at its own instant.  Random bytes would not do: the kernel's CRNG
 * state is in the checkpointed RAM, so both replicas can draw the same bytes.  The sequence number
 * keeps consecutive answers distinct even where the clock is coarse.
 *
 * One forked child per connection; the answer counter lives in memory they all share.  SIGTERM (the
 * control loop's "stop tokend") ends the listener and every open connection with it.
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
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_ANSWER 64 /* "TOKEN " + two 20-digit numbers + blank + newline = 48 */

static uint64_t *answered; /* shared by every connection's process */

static int write_all(int fd, const char *p, size_t n) {
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

static void serve(int fd) {
    char in[4096];
    static char out[65536];
    for (;;) {
        ssize_t r = read(fd, in, sizeof in);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return;
        size_t used = 0;
        for (ssize_t k = 0; k < r; k++) {
            if (in[k] != '\n') continue;
            struct timespec now;
            clock_gettime(CLOCK_REALTIME, &now);
            unsigned long long ns =
                (unsigned long long)now.tv_sec * 1000000000ULL + (unsigned long long)now.tv_nsec;
            unsigned long long seq = __atomic_add_fetch(answered, 1, __ATOMIC_SEQ_CST);
            used += (size_t)snprintf(out + used, sizeof out - used, "TOKEN %llu %llu\n", seq, ns);
            if (sizeof out - used < MAX_ANSWER) { /* many pipelined requests: send what is ready */
                if (write_all(fd, out, used)) return;
                used = 0;
            }
        }
        if (used > 0 && write_all(fd, out, used)) return;
    }
}

/* The service is its own process group: one SIGTERM to the listener ends every connection too, so a
 * stopped service leaves nothing answering. */
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
    int port = argc > 1 ? atoi(argv[1]) : 9000;
    if (argc > 2 || port <= 0 || port > 65535) {
        fprintf(stderr, "usage: tokend [PORT]\n");
        return 2;
    }
    answered = mmap(NULL, sizeof *answered, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (answered == MAP_FAILED) {
        perror("tokend: mmap");
        return 1;
    }
    setpgid(0, 0);
    signal(SIGTERM, stop_all);
    signal(SIGCHLD, SIG_IGN); /* children are reaped automatically */
    signal(SIGPIPE, SIG_IGN);
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 128)) {
        perror("tokend: bind/listen");
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
