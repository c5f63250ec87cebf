/*
 * How fast can a consumer get live bytes it does not hold, and compare them with
 * page-cached shard bytes? A probe for the fresh-consumer row of issue 2.
 *
 * Given the pieces of a model (one line per tensor: shard path, offset of its
 * bytes in the shard, path of the live copy in /dev/shm, length), it times, on
 * T threads, each tensor read in 256 KiB chunks with pread from the shard and
 * compared block by block (4 KiB memcmp, no early exit) against the live bytes:
 *
 *   resident       live bytes already in this process (anonymous memory);
 *   shm pread      live bytes read with pread from the /dev/shm file (what a
 *                  fresh `apollo-sync sync` does today);
 *   shm mapped     live bytes in a fresh read-only mapping of the /dev/shm file;
 *   vm_readv       live bytes copied with process_vm_readv from anonymous memory
 *                  (here this process's own: the kernel path is the one a
 *                  consumer reading another process's memory would take).
 *
 * The anonymous copy is made with MADV_HUGEPAGE (argument thp=1) or without.
 *
 * Build and run (e2e.py leaves a model, its /dev/shm copy and the pieces file):
 *   python3 benches/e2e.py --size-gb 4 --keep --pieces /tmp/pieces --only apollo_sync
 *   cc -O2 -o /tmp/live_read benches/probes/live_read.c -lpthread
 *   /tmp/live_read /tmp/pieces 2 1
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum { RESIDENT, SHM_PREAD, SHM_MAPPED, VM_READV, MODES };
static const char *NAMES[MODES] = {"resident", "shm pread", "shm mapped", "vm_readv"};
static const long CHUNK = 256 << 10, BLOCK = 4096;

typedef struct {
    char shard[512], shm[512];
    long off, len, at;
} piece;

static piece P[8192];
static int n_pieces, next_piece, mode;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static char *arena;

static long differing(const char *a, const char *b, long n) {
    long d = 0;
    for (long j = 0; j < n; j += BLOCK) d += memcmp(a + j, b + j, n - j < BLOCK ? n - j : BLOCK) != 0;
    return d;
}

static void *work(void *unused) {
    (void)unused;
    char *disk = aligned_alloc(4096, CHUNK), *buf = aligned_alloc(4096, CHUNK);
    long d = 0;
    for (;;) {
        pthread_mutex_lock(&mu);
        int i = next_piece++;
        pthread_mutex_unlock(&mu);
        if (i >= n_pieces) break;
        int fd = open(P[i].shard, O_RDONLY), sd = open(P[i].shm, O_RDONLY);
        char *map = mode == SHM_MAPPED ? mmap(0, P[i].len, PROT_READ, MAP_SHARED, sd, 0) : NULL;
        for (long o = 0; o < P[i].len; o += CHUNK) {
            long k = P[i].len - o < CHUNK ? P[i].len - o : CHUNK;
            if (pread(fd, disk, k, P[i].off + o) != k) { perror("pread shard"); exit(1); }
            const char *live = arena + P[i].at + o;
            if (mode == SHM_PREAD) {
                if (pread(sd, buf, k, o) != k) { perror("pread shm"); exit(1); }
                live = buf;
            } else if (mode == SHM_MAPPED) {
                live = map + o;
            } else if (mode == VM_READV) {
                struct iovec l = {buf, k}, r = {(void *)live, k};
                if (process_vm_readv(getpid(), &l, 1, &r, 1, 0) != k) { perror("vm_readv"); exit(1); }
                live = buf;
            }
            d += differing(disk, live, k);
        }
        if (map) munmap(map, P[i].len);
        close(fd);
        close(sd);
    }
    free(disk);
    free(buf);
    return (void *)d;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s PIECES THREADS THP\n", argv[0]); return 2; }
    FILE *pf = fopen(argv[1], "r");
    int threads = atoi(argv[2]), thp = atoi(argv[3]);
    long total = 0;
    while (n_pieces < 8192 && fscanf(pf, "%511s %ld %511s %ld", P[n_pieces].shard, &P[n_pieces].off,
                                     P[n_pieces].shm, &P[n_pieces].len) == 4) {
        P[n_pieces].at = total;
        total += (P[n_pieces].len + 4095) & ~4095L;
        n_pieces++;
    }
    char *raw = mmap(0, total + (2 << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    arena = (char *)(((unsigned long)raw + (2 << 20) - 1) & ~((2UL << 20) - 1));
    madvise(arena, total, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    for (int i = 0; i < n_pieces; i++) {
        int sd = open(P[i].shm, O_RDONLY);
        if (pread(sd, arena + P[i].at, P[i].len, 0) != P[i].len) { perror("fill"); return 1; }
        close(sd);
    }
    printf("%.2f GB in %d tensors, %d threads, anonymous copy %s\n", total / 1e9, n_pieces, threads,
           thp ? "MADV_HUGEPAGE" : "MADV_NOHUGEPAGE");
    for (mode = 0; mode < MODES; mode++) {
        printf("%-11s", NAMES[mode]);
        for (int rep = 0; rep < 3; rep++) {
            next_piece = 0;
            long d = 0;
            struct timespec t0, t1;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            pthread_t th[64];
            for (int t = 0; t < threads; t++) pthread_create(&th[t], 0, work, 0);
            for (int t = 0; t < threads; t++) {
                void *r;
                pthread_join(th[t], &r);
                d += (long)r;
            }
            clock_gettime(CLOCK_MONOTONIC, &t1);
            printf(" %.3f s", (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
            if (rep == 2) printf("  (%ld differing blocks)\n", d);
        }
    }
    return 0;
}
