/* The passthrough of tests/latency_fs.py in C (libfuse2's high-level API), for measurements.
 *
 * The same file system: a read-only passthrough of SOURCE whose operations named in --ops wait
 * --latency seconds before they answer, multithreaded so that waits overlap. What differs is the
 * cost of the daemon itself: a call into this process costs microseconds of CPU where fusepy
 * costs tens, so on a 2-core machine the emulator no longer takes the loader's cores. A parallel
 * file system's client lives in the kernel; this is the closer stand-in for it.
 *
 * Built and started by latency_fs.mounted(engine="c"):
 *     cc -O2 latency_fs.c $(pkg-config --cflags --libs fuse) -o latency_fs_c
 *     latency_fs_c SOURCE MOUNTPOINT LATENCY_S OPS FUSE_OPTIONS
 */
#define FUSE_USE_VERSION 26
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static char source[PATH_MAX];
static struct timespec delay;
static int wait_open, wait_getattr, wait_opendir, wait_readdir;

static void wait_if(int enabled) {
    if (enabled && (delay.tv_sec || delay.tv_nsec)) {
        struct timespec left = delay;
        while (nanosleep(&left, &left) == -1 && errno == EINTR) {}
    }
}

static void real_path(char *out, const char *path) {
    snprintf(out, PATH_MAX, "%s%s", source, path);
}

static int lt_getattr(const char *path, struct stat *st) {
    char real[PATH_MAX];
    wait_if(wait_getattr);
    real_path(real, path);
    return lstat(real, st) == -1 ? -errno : 0;
}

static int lt_opendir(const char *path, struct fuse_file_info *fi) {
    char real[PATH_MAX];
    wait_if(wait_opendir);
    real_path(real, path);
    DIR *dir = opendir(real);
    if (!dir) return -errno;
    closedir(dir);
    (void)fi;
    return 0;
}

/* Real offsets, so that each kernel request (about a page of entries) pays the latency. */
static int lt_readdir(const char *path, void *buf, fuse_fill_dir_t filler, off_t offset,
                      struct fuse_file_info *fi) {
    char real[PATH_MAX];
    struct dirent **names;
    wait_if(wait_readdir);
    real_path(real, path);
    int n = scandir(real, &names, NULL, alphasort);
    if (n < 0) return -errno;
    int full = 0;
    for (int k = 0; k < n; k++) {
        if (!full && k >= offset) {
            struct stat st = {0};
            st.st_ino = names[k]->d_ino;
            st.st_mode = names[k]->d_type << 12;
            full = filler(buf, names[k]->d_name, &st, k + 1) != 0;
        }
        free(names[k]);
    }
    free(names);
    (void)fi;
    return 0;
}

static int lt_open(const char *path, struct fuse_file_info *fi) {
    char real[PATH_MAX];
    wait_if(wait_open);
    if ((fi->flags & O_ACCMODE) != O_RDONLY) return -EROFS;
    real_path(real, path);
    int fd = open(real, fi->flags);
    if (fd == -1) return -errno;
    fi->fh = fd;
    return 0;
}

static int lt_read(const char *path, char *buf, size_t size, off_t offset,
                   struct fuse_file_info *fi) {
    (void)path;
    ssize_t got = pread(fi->fh, buf, size, offset);
    return got == -1 ? -errno : (int)got;
}

static int lt_release(const char *path, struct fuse_file_info *fi) {
    (void)path;
    close(fi->fh);
    return 0;
}

static int lt_statfs(const char *path, struct statvfs *st) {
    char real[PATH_MAX];
    real_path(real, path);
    return statvfs(real, st) == -1 ? -errno : 0;
}

static struct fuse_operations operations = {
    .getattr = lt_getattr,
    .opendir = lt_opendir,
    .readdir = lt_readdir,
    .open = lt_open,
    .read = lt_read,
    .release = lt_release,
    .statfs = lt_statfs,
};

int main(int argc, char *argv[]) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s SOURCE MOUNTPOINT LATENCY_S OPS FUSE_OPTIONS\n", argv[0]);
        return 2;
    }
    if (!realpath(argv[1], source)) {
        perror(argv[1]);
        return 2;
    }
    double latency = atof(argv[3]);
    delay.tv_sec = (time_t)latency;
    delay.tv_nsec = (long)((latency - (double)delay.tv_sec) * 1e9);
    char ops[256];
    snprintf(ops, sizeof ops, "%s", argv[4]);
    for (char *op = strtok(ops, ","); op; op = strtok(NULL, ",")) {
        if (!strcmp(op, "open")) wait_open = 1;
        else if (!strcmp(op, "getattr")) wait_getattr = 1;
        else if (!strcmp(op, "opendir")) wait_opendir = 1;
        else if (!strcmp(op, "readdir")) wait_readdir = 1;
        else {
            fprintf(stderr, "unknown op %s\n", op);
            return 2;
        }
    }
    char *fuse_argv[] = {argv[0], argv[2], "-f", "-o", argv[5], NULL};
    return fuse_main(5, fuse_argv, &operations, NULL);
}
