/*
 * fdatasync latency of small appends, by how the file was laid out beforehand.
 * docs/benchmarks.md ("Pre-sized write-ahead log; applied state out of the WAL").
 *
 *   gcc -O2 -o fdatasync chaos-tests/tools/fdatasync.c
 *   ./fdatasync MODE [BYTES]          # in the directory to measure; writes ./fdatasync.dat
 *
 * MODE 0: an empty file that grows with every append (no preallocation)
 *      1: 64 MiB allocated with FALLOC_FL_KEEP_SIZE (RocksDB's own WAL preallocation)
 *      2: 64 MiB allocated with the size set (etcd's WAL segments; plinth's presized WAL)
 *      3: 64 MiB written with zeros first (what RocksDB's WAL recycling would give)
 *      4: 64 MiB sparse (ftruncate)
 * BYTES: bytes per append (default 2000, at most 4096). 3000 appends, each followed by
 * fdatasync; prints p50/p90/p99 of the fdatasync alone.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define N 3000
#define SIZE (64L << 20)

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void check(int ok, const char *what) {
    if (!ok) {
        perror(what);
        exit(1);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODE [BYTES]\n", argv[0]);
        return 2;
    }
    int mode = atoi(argv[1]);
    int bytes = argc > 2 ? atoi(argv[2]) : 2000;
    check(bytes > 0 && bytes <= 4096, "BYTES must be 1-4096");
    static char buf[4096];
    memset(buf, 'x', sizeof buf);
    unlink("fdatasync.dat");
    int fd = open("fdatasync.dat", O_CREAT | O_RDWR, 0600);
    check(fd >= 0, "open");
    if (mode == 1) check(fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, SIZE) == 0, "fallocate");
    if (mode == 2) check(fallocate(fd, 0, 0, SIZE) == 0, "fallocate");
    if (mode == 4) check(ftruncate(fd, SIZE) == 0, "ftruncate");
    if (mode == 3) {
        char *zeros = calloc(1, 1 << 20);
        check(zeros != NULL, "calloc");
        for (int i = 0; i < 64; i++) check(write(fd, zeros, 1 << 20) == 1 << 20, "write");
        check(lseek(fd, 0, SEEK_SET) == 0, "lseek");
        free(zeros);
    }
    check(fsync(fd) == 0, "fsync");
    static double took[N];
    for (int i = 0; i < N; i++) {
        check(write(fd, buf, bytes) == bytes, "write");
        double t = now_us();
        check(fdatasync(fd) == 0, "fdatasync");
        took[i] = now_us() - t;
    }
    qsort(took, N, sizeof took[0], cmp);
    printf("mode %d, %d bytes: fdatasync p50 %.0f us, p90 %.0f, p99 %.0f\n", mode, bytes,
           took[N / 2], took[N * 9 / 10], took[N * 99 / 100]);
    unlink("fdatasync.dat");
    return 0;
}
