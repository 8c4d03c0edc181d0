/*
 * privtmpd_spank.c - run every task of a job inside the job's private mount
 * namespace.
 *
 * privtmpd, in the host namespace, builds one mount namespace per job from
 * the Prolog and pins it by bind-mounting /proc/<pid>/ns/mnt onto
 * <rundir>/ns/<jobid>.  slurm_spank_task_init_privileged runs in each forked
 * task (batch script and srun tasks alike), as root, before Slurm drops
 * privileges and execs; there we open the pin, check it, setns() into it and
 * point TMPDIR at the private /tmp.
 *
 * This code runs as root in every task on every node, so it stays small
 * enough to audit at a glance: no allocation, no config file, no helper
 * process.  Everything that needs judgement lives in the daemon.
 *
 * Failures return -1, never ESPANK_ERROR: Slurm 22.05 only logs a positive
 * error from this callback and starts the task anyway, on the shared host
 * /tmp.  A negative value fails the task, the only safe outcome.
 *
 * plugstack.conf (tmpdir=none leaves TMPDIR alone):
 *   required /usr/local/lib/privtmpd/privtmpd_spank.so rundir=/run/privtmpd tmpdir=/tmp
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <linux/nsfs.h>
#include <slurm/spank.h>

SPANK_PLUGIN(privtmpd, 1);

#define HINT_NOPIN "no private namespace for this job: is privtmpd running " \
	"and did the Prolog succeed?"
#define HINT_STALE "stale pin: a plain file with no namespace mounted on " \
	"it; privtmpd must recreate or remove it"

static void close_keep_errno(int fd)
{
	int saved = errno;

	if (fd >= 0)
		close(fd);
	errno = saved;
}

/*
 * Open an absolute directory path one component at a time with O_NOFOLLOW,
 * so no symlink anywhere in it is followed, and insist that every directory
 * on the way is root-owned and not writable by group or other: whoever can
 * write to one of them can rename a directory of their own into the path
 * and have us enter a namespace they built.
 */
static int open_trusted_dir(char *path, const char **what)
{
	char *comp, *save = NULL;
	struct stat st;
	int fd, next;

	fd = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	for (comp = strtok_r(path, "/", &save); fd >= 0;
	     comp = strtok_r(NULL, "/", &save)) {
		*what = "cannot stat a directory of the pin path";
		if (fstat(fd, &st) < 0)
			break;
		*what = "a directory of the pin path is not root-owned or is "
			"writable by group/other";
		if (st.st_uid != 0 || (st.st_mode & (S_IWGRP | S_IWOTH))) {
			errno = EPERM;
			break;
		}
		if (!comp)
			return fd;
		*what = "cannot open a directory of the pin path (missing, "
			"or a symlink)";
		next = openat(fd, comp,
			      O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		close_keep_errno(fd);
		fd = next;
	}
	close_keep_errno(fd);
	return -1;
}

int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
	const char *rundir = "/run/privtmpd", *tmpdir = "/tmp";
	const char *what = "cannot open /", *hint = "";
	char nsdir[PATH_MAX], walk[PATH_MAX], idstr[16];
	uint32_t jobid = 0;
	int i, dirfd = -1, nsfd = -1, type;

	if (!spank_remote(sp))
		return 0;
	if (spank_get_item(sp, S_JOB_ID, &jobid) != ESPANK_SUCCESS) {
		slurm_error("privtmpd: cannot get the job id");
		return -1;
	}
	for (i = 0; i < ac; i++) {
		if (!strncmp(av[i], "rundir=", 7) && av[i][7] == '/')
			rundir = av[i] + 7;
		else if (!strncmp(av[i], "tmpdir=", 7) && av[i][7] == '/')
			tmpdir = av[i] + 7;
		else if (!strcmp(av[i], "tmpdir=none"))
			tmpdir = NULL;
		else {
			slurm_error("privtmpd: job %u: invalid plugin argument "
				    "'%s' (expected rundir=/absolute/dir, "
				    "tmpdir=/absolute/dir or tmpdir=none; fix "
				    "plugstack.conf)", jobid, av[i]);
			return -1;
		}
	}
	snprintf(idstr, sizeof(idstr), "%u", jobid);
	if (snprintf(nsdir, sizeof(nsdir), "%s/ns", rundir) >= PATH_MAX) {
		slurm_error("privtmpd: job %u: rundir too long", jobid);
		return -1;
	}
	strcpy(walk, nsdir);

	/* Open and check everything first; setns() is the very last step. */
	dirfd = open_trusted_dir(walk, &what);
	if (dirfd < 0) {
		hint = errno == ENOENT ? HINT_NOPIN : "";
		goto fail;
	}
	/* O_NONBLOCK: never hang on a FIFO left at the pin path. */
	nsfd = openat(dirfd, idstr,
		      O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	if (nsfd < 0) {
		what = "cannot open the pin";
		hint = errno == ENOENT ? HINT_NOPIN : "";
		goto fail;
	}
	/* An unmounted pin is a plain file: nsfs ioctls on it fail with
	 * ENOTTY, where setns() would only say EINVAL. */
	type = ioctl(nsfd, NS_GET_NSTYPE);
	if (type != CLONE_NEWNS) {
		what = type < 0 ? "the pin is not a namespace" :
			"the pin is not a mount namespace";
		hint = type < 0 ? HINT_STALE : "";
		errno = type < 0 ? errno : EINVAL;
		goto fail;
	}
	/* Overwrite: a TMPDIR inherited from the submit side wins over
	 * Slurm's own default and would point outside the private /tmp. */
	what = "cannot set TMPDIR";
	if (tmpdir && spank_setenv(sp, "TMPDIR", tmpdir, 1) != ESPANK_SUCCESS) {
		errno = EINVAL;
		goto fail;
	}
	/* setns() also resets cwd and root to the namespace's; slurmstepd
	 * chdir()s to the job's working directory after this callback. */
	what = "setns into the job namespace failed";
	if (setns(nsfd, CLONE_NEWNS) < 0)
		goto fail;
	close(nsfd);
	close(dirfd);
	return 0;

fail:
	slurm_error("privtmpd: job %u: %s: %s/%s: %s%s%s%s", jobid, what, nsdir,
		    idstr, strerror(errno), *hint ? " (" : "", hint,
		    *hint ? ")" : "");
	close_keep_errno(nsfd);
	close_keep_errno(dirfd);
	return -1;
}
