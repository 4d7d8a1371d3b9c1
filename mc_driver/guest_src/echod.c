/*
 * echod [PORT]   (default 7)
 *
 * TCP echo for many concurrent connections in one process with epoll.  Each connection has a small
 * pending buffer: while the peer does not read, we stop reading from it (EPOLLOUT only), so a slow
 * client applies back-pressure instead of growing memory.  Every byte received is sent back exactly
 * once and in order: the COLO tests compare these streams byte for byte.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 65536

struct conn {
    int fd;
    size_t len, off; /* pending bytes buf[off..len) still to send */
    char buf[BUF];
};

static void set_events(int ep, struct conn *c, unsigned ev) {
    struct epoll_event e = {.events = ev, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
}

static void drop(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 7;
    if (argc > 2 || port <= 0 || port > 65535) {
        fprintf(stderr, "usage: echod [PORT]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 512)) {
        perror("echod: bind/listen");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event e = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &e);
    struct epoll_event evs[64];
    for (;;) {
        int n = epoll_wait(ep, evs, 64, -1);
        if (n < 0 && errno != EINTR) {
            perror("echod: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c == NULL) {
                int fd;
                while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = malloc(sizeof *c);
                    if (!c) {
                        close(fd);
                        continue;
                    }
                    c->fd = fd;
                    c->len = c->off = 0;
                    struct epoll_event ce = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ce);
                }
                continue;
            }
            if (c->len == 0) {
                ssize_t r = read(c->fd, c->buf, BUF);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                    drop(ep, c);
                    continue;
                }
                if (r < 0) continue;
                c->len = (size_t)r;
                c->off = 0;
            }
            while (c->off < c->len) {
                ssize_t w = write(c->fd, c->buf + c->off, c->len - c->off);
                if (w < 0) break;
                c->off += (size_t)w;
            }
            if (c->off < c->len) {
                if (errno != EAGAIN && errno != EINTR) {
                    drop(ep, c);
                    continue;
                }
                set_events(ep, c, EPOLLOUT); /* stop reading until the peer takes our bytes */
            } else {
                c->len = c->off = 0;
                set_events(ep, c, EPOLLIN | EPOLLRDHUP);
            }
        }
    }
}
