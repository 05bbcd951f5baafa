/*
 * What one message between two processes costs on this machine: a TCP round trip on
 * loopback (900 bytes out, 100 back, about an AppendEntries and its answer), between a parent
 * and a child that each block in read() until the other writes.
 * docs/benchmarks.md ("Log sync time beside etcd's; where a 1-client write's time goes; the apply yields").
 *
 *   gcc -O2 -o wake chaos-tests/tools/wake.c
 *   ./wake [SPINNERS]                  # the two processes on whichever CPUs the kernel picks
 *   taskset -c 0 ./wake                # both on one CPU
 *
 * SPINNERS: busy loops at nice 19 started for the measurement (default 0). With one per CPU,
 * no CPU is ever idle, so a wake-up never has to bring an idle (halted) virtual CPU back; it
 * preempts a spinner instead. 20 000 round trips; prints p50 and p99.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define N 20000
#define OUT 900
#define BACK 100
#define MAX_SPINNERS 64

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

/* Reads exactly n bytes; 0 at end of stream. */
static int read_all(int fd, char *buf, int n) {
    int got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r <= 0)
            return 0;
        got += (int)r;
    }
    return 1;
}

static void write_all(int fd, const char *buf, int n) {
    int put = 0;
    while (put < n) {
        ssize_t w = write(fd, buf + put, n - put);
        if (w <= 0)
            die("write");
        put += (int)w;
    }
}

static int cmp(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return a < b ? -1 : a > b;
}

int main(int argc, char **argv) {
    int spinners = argc > 1 ? atoi(argv[1]) : 0;
    if (spinners < 0 || spinners > MAX_SPINNERS) {
        fprintf(stderr, "SPINNERS is 0 to %d\n", MAX_SPINNERS);
        return 2;
    }
    pid_t spin[MAX_SPINNERS];
    for (int i = 0; i < spinners; i++) {
        spin[i] = fork();
        if (spin[i] < 0)
            die("fork");
        if (spin[i] == 0) {
            if (setpriority(PRIO_PROCESS, 0, 19) != 0)
                die("setpriority");
            for (volatile unsigned long x = 0;; x++)
                ;
        }
    }

    int one = 1;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    if (ls < 0)
        die("socket");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    if (bind(ls, (struct sockaddr *)&a, sizeof a) != 0 || listen(ls, 1) != 0 ||
        getsockname(ls, (struct sockaddr *)&a, &alen) != 0)
        die("listen");

    char buf[OUT];
    memset(buf, 1, sizeof buf);
    pid_t peer = fork();
    if (peer < 0)
        die("fork");
    if (peer == 0) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) != 0)
            die("connect");
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        while (read_all(s, buf, OUT))
            write_all(s, buf, BACK);
        _exit(0);
    }
    int s = accept(ls, NULL, NULL);
    if (s < 0)
        die("accept");
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);

    static double lat[N];
    for (int i = 0; i < N; i++) {
        double t = now_us();
        write_all(s, buf, OUT);
        if (!read_all(s, buf, BACK)) {
            fprintf(stderr, "the peer closed\n");
            return 1;
        }
        lat[i] = now_us() - t;
    }
    close(s);
    waitpid(peer, NULL, 0);
    for (int i = 0; i < spinners; i++) {
        kill(spin[i], SIGKILL);
        waitpid(spin[i], NULL, 0);
    }
    qsort(lat, N, sizeof lat[0], cmp);
    printf("loopback TCP round trip (%d B out, %d B back), %d spinners: p50 %.1f us, p99 %.1f us\n",
           OUT, BACK, spinners, lat[N / 2], lat[N * 99 / 100]);
    return 0;
}
