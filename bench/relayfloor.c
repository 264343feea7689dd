/* The floor of relaying SSE events on this machine, without HTTP: a source process
 * writes one 128-byte event to each of 16 loopback TCP connections every PERIOD_US
 * microseconds (the bursts of a batched decode step), a relay forwards each read to a
 * second connection, a sink reads. The relay is this program (epoll, recv, send) or the
 * command given after the arguments, run with the source listener's fd and the sink's
 * port appended. The relay prints "EVENTS CPU_SECONDS" (user + system, getrusage).
 *
 *   relayfloor PERIOD_US SECONDS [RELAY_CMD [ARG...]]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define STREAMS 16
#define EVENT 128

static int listen_loopback(int *port) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (s < 0 || bind(s, (void *)&a, sizeof a) || listen(s, 64) || getsockname(s, (void *)&a, &len)) {
        perror("listen");
        exit(1);
    }
    *port = ntohs(a.sin_port);
    return s;
}

static int dial(int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (s < 0 || connect(s, (void *)&a, sizeof a)) {
        perror("connect");
        exit(1);
    }
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return s;
}

static double seconds(struct timeval t) { return t.tv_sec + t.tv_usec / 1e6; }

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s PERIOD_US SECONDS [RELAY_CMD [ARG...]]\n", argv[0]);
        return 2;
    }
    long period = atol(argv[1]), steps = atol(argv[2]) * 1000000L / period;
    int src_port, sink_port;
    int src_listen = listen_loopback(&src_port), sink_listen = listen_loopback(&sink_port);
    char event[EVENT];
    memset(event, 'x', sizeof event);
    memcpy(event, "data: ", 6);
    event[EVENT - 2] = event[EVENT - 1] = '\n';

    if (fork() == 0) { /* source: bursts of one event per stream, on an absolute clock */
        int s[STREAMS];
        struct timespec t;
        for (int i = 0; i < STREAMS; i++) s[i] = dial(src_port);
        clock_gettime(CLOCK_MONOTONIC, &t);
        for (long k = 0; k < steps; k++) {
            for (int i = 0; i < STREAMS; i++) send(s[i], event, sizeof event, 0);
            t.tv_nsec += period * 1000L;
            while (t.tv_nsec >= 1000000000L) { t.tv_nsec -= 1000000000L; t.tv_sec++; }
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL);
        }
        _exit(0);
    }
    if (fork() == 0) { /* sink */
        int ep = epoll_create1(0), open = STREAMS;
        char buf[65536];
        struct epoll_event evs[STREAMS];
        for (int i = 0; i < STREAMS; i++) {
            struct epoll_event e = {.events = EPOLLIN, .data.fd = accept(sink_listen, NULL, NULL)};
            epoll_ctl(ep, EPOLL_CTL_ADD, e.data.fd, &e);
        }
        while (open > 0) {
            int n = epoll_wait(ep, evs, STREAMS, 30000);
            if (n <= 0) _exit(1);
            for (int j = 0; j < n; j++)
                if (recv(evs[j].data.fd, buf, sizeof buf, 0) <= 0) {
                    epoll_ctl(ep, EPOLL_CTL_DEL, evs[j].data.fd, NULL);
                    open--;
                }
        }
        _exit(0);
    }
    if (argc > 3) { /* someone else's relay */
        char fd[16], port[16], *cmd[argc];
        snprintf(fd, sizeof fd, "%d", src_listen);
        snprintf(port, sizeof port, "%d", sink_port);
        for (int i = 3; i < argc; i++) cmd[i - 3] = argv[i];
        cmd[argc - 3] = fd;
        cmd[argc - 2] = port;
        cmd[argc - 1] = NULL;
        if (fork() == 0) {
            execvp(cmd[0], cmd);
            _exit(127);
        }
        close(src_listen);
        close(sink_listen);
        int status, failed = 0;
        while (wait(&status) > 0) failed |= !WIFEXITED(status) || WEXITSTATUS(status);
        return failed;
    }
    int up[STREAMS], down[STREAMS], ep = epoll_create1(0), open = STREAMS;
    long events = 0;
    char buf[65536];
    struct epoll_event evs[STREAMS];
    struct rusage r0, r1;
    for (int i = 0; i < STREAMS; i++) {
        struct epoll_event e = {.events = EPOLLIN, .data.u32 = i};
        up[i] = accept(src_listen, NULL, NULL);
        down[i] = dial(sink_port);
        epoll_ctl(ep, EPOLL_CTL_ADD, up[i], &e);
    }
    getrusage(RUSAGE_SELF, &r0);
    while (open > 0) {
        int n = epoll_wait(ep, evs, STREAMS, 30000);
        if (n <= 0) return 1;
        for (int j = 0; j < n; j++) {
            int i = evs[j].data.u32;
            ssize_t got = recv(up[i], buf, sizeof buf, 0);
            if (got <= 0) {
                epoll_ctl(ep, EPOLL_CTL_DEL, up[i], NULL);
                close(up[i]);
                close(down[i]);
                open--;
                continue;
            }
            events += got / EVENT;
            send(down[i], buf, got, 0);
        }
    }
    getrusage(RUSAGE_SELF, &r1);
    double cpu = seconds(r1.ru_utime) - seconds(r0.ru_utime) + seconds(r1.ru_stime) - seconds(r0.ru_stime);
    printf("%ld %.9f\n", events, cpu);
    int status, failed = 0;
    while (wait(&status) > 0) failed |= !WIFEXITED(status) || WEXITSTATUS(status);
    return failed;
}
