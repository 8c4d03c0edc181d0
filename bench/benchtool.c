/*
 * benchtool.c - the native parts of the benchmark suite.
 *
 *   benchtool spank SO RUNDIR JOBID ITERATIONS
 *       Load the entry helper (privtmpd_spank.so) as slurmstepd would and
 *       call slurm_spank_task_init_privileged() ITERATIONS times against
 *       the pinned namespace of JOBID, returning to the host namespace
 *       after each call (not timed).  Prints one line per call: the
 *       callback's wall time in nanoseconds.  The SPANK API it needs is
 *       stubbed here (job id, setenv, error log), so what is timed is the
 *       helper's own work: path walk, checks, ioctl, setns.
 *
 *   benchtool mktree DIR NFILES PERDIR
 *       Create NFILES empty files under DIR (which must exist), PERDIR
 *       per subdirectory d0, d1, ...  Fast and allocation-free, so that
 *       making a million-file tree does not dominate the benchmark.
 *
 * Built by the benchmark itself: gcc -O2 -rdynamic -o benchtool benchtool.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <slurm/spank.h>

static uint32_t job_id;

/* --- the part of the SPANK API the helper uses --------------------------- */

int spank_remote(spank_t sp)
{
	(void)sp;
	return 1;
}

spank_err_t spank_get_item(spank_t sp, spank_item_t item, ...)
{
	va_list ap;
	(void)sp;
	if (item != S_JOB_ID)
		return ESPANK_BAD_ARG;
	va_start(ap, item);
	*va_arg(ap, uint32_t *) = job_id;
	va_end(ap);
	return ESPANK_SUCCESS;
}

spank_err_t spank_setenv(spank_t sp, const char *var, const char *val, int overwrite)
{
	(void)sp;
	return setenv(var, val, overwrite) ? ESPANK_ERROR : ESPANK_SUCCESS;
}

void slurm_error(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

/* ------------------------------------------------------------------------- */

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int cmd_spank(char **argv)
{
	typedef int (*cb_t)(spank_t, int, char **);
	char rundir_arg[4200];
	char *args[2];
	void *so;
	cb_t cb;
	int host, i, n;

	so = dlopen(argv[0], RTLD_NOW | RTLD_LOCAL);
	if (!so) {
		fprintf(stderr, "benchtool: %s\n", dlerror());
		return 1;
	}
	cb = (cb_t)dlsym(so, "slurm_spank_task_init_privileged");
	if (!cb) {
		fprintf(stderr, "benchtool: no slurm_spank_task_init_privileged in %s\n", argv[0]);
		return 1;
	}
	snprintf(rundir_arg, sizeof(rundir_arg), "rundir=%s", argv[1]);
	args[0] = rundir_arg;
	args[1] = "tmpdir=/tmp";
	job_id = (uint32_t)strtoul(argv[2], NULL, 10);
	n = atoi(argv[3]);
	host = open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC);
	if (host < 0) {
		perror("benchtool: /proc/self/ns/mnt");
		return 1;
	}
	for (i = 0; i < n; i++) {
		int64_t t0 = now_ns();
		int rc = cb(NULL, 2, args);
		int64_t t1 = now_ns();

		if (rc != 0) {
			fprintf(stderr, "benchtool: the helper failed (rc %d) on call %d\n", rc, i);
			return 1;
		}
		if (setns(host, CLONE_NEWNS) < 0 || chdir("/") < 0) {
			perror("benchtool: setns back to the host namespace");
			return 1;
		}
		printf("%lld\n", (long long)(t1 - t0));
	}
	return 0;
}

static int cmd_mktree(char **argv)
{
	long nfiles = atol(argv[1]), perdir = atol(argv[2]), made = 0;
	int top, d = 0;
	char name[64];

	if (perdir <= 0)
		perdir = 1000;
	top = open(argv[0], O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (top < 0) {
		perror(argv[0]);
		return 1;
	}
	while (made < nfiles) {
		int dfd;
		long k;

		snprintf(name, sizeof(name), "d%d", d++);
		if (mkdirat(top, name, 0755) < 0 && errno != EEXIST) {
			perror("mkdirat");
			return 1;
		}
		dfd = openat(top, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		if (dfd < 0) {
			perror("openat");
			return 1;
		}
		for (k = 0; k < perdir && made < nfiles; k++, made++) {
			int fd;

			snprintf(name, sizeof(name), "f%ld", k);
			fd = openat(dfd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
			if (fd < 0) {
				perror("openat(file)");
				return 1;
			}
			close(fd);
		}
		close(dfd);
	}
	close(top);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 6 && !strcmp(argv[1], "spank"))
		return cmd_spank(argv + 2);
	if (argc == 5 && !strcmp(argv[1], "mktree"))
		return cmd_mktree(argv + 2);
	fprintf(stderr, "usage: benchtool spank SO RUNDIR JOBID ITERATIONS\n"
			"       benchtool mktree DIR NFILES PERDIR\n");
	return 2;
}
