/*
 * privtmpd_spank.c - put every task of a job into the job's private mount
 * namespace.
 *
 * privtmpd (running in the host namespace) creates one mount namespace per
 * job from the Prolog and pins it by bind-mounting /proc/<pid>/ns/mnt onto
 * <rundir>/ns/<jobid>.  This plugin runs in slurm_spank_task_init_privileged,
 * i.e. in the forked task (batch script or srun task) as root, before Slurm
 * drops privileges and execs.  It opens the pin, checks that it really is a
 * mount namespace, setns()es into it and points TMPDIR at the private /tmp.
 *
 * It runs as root inside every task on every node, so it stays small enough
 * to audit at a glance: no allocations, no configuration files, no helpers.
 * Everything that needs thought (creating, sizing, cleaning up) is done by
 * the daemon.
 *
 * Failures return -1, not ESPANK_ERROR: Slurm 22.05 only logs a positive
 * spank error from this callback and then runs the task anyway, which would
 * silently put the job on the shared host /tmp.  A negative value makes the
 * task fail, which is the only safe outcome.
 *
 * plugstack.conf:
 *   required /usr/lib/privtmpd/privtmpd_spank.so rundir=/run/privtmpd tmpdir=/tmp
 * tmpdir=none leaves TMPDIR alone.
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

#define HINT_NOPIN "no private namespace for this job: " \
	"is privtmpd running and did the Prolog succeed?"
#define HINT_STALE "stale pin: the file exists but no namespace is " \
	"mounted on it; privtmpd should recreate or remove it"

/*
 * Walk an absolute path one component at a time with O_NOFOLLOW, so that no
 * symlink anywhere in it is followed, and require every directory to be
 * root-owned and not writable by group or other: anyone who could write to
 * one of them could rename a directory of their own into place and have us
 * setns() into a namespace they built.
 */
static int open_trusted_dir(const char *path, const char **what)
{
	char buf[PATH_MAX];
	char *comp, *save = NULL;
	struct stat st;
	int fd, next, saved;

	*what = "rundir must be an absolute path";
	if (path[0] != '/' || strlen(path) >= sizeof(buf))
		return (errno = EINVAL, -1);
	strcpy(buf, path);
	*what = "cannot open /";
	fd = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	for (comp = strtok_r(buf, "/", &save); fd >= 0;
	     comp = strtok_r(NULL, "/", &save)) {
		*what = "cannot stat a directory of the pin path";
		if (fstat(fd, &st) < 0)
			break;
		*what = "a directory of the pin path is not root-owned "
			"or is writable by group/other";
		if (st.st_uid != 0 || (st.st_mode & (S_IWGRP | S_IWOTH))) {
			errno = EPERM;
			break;
		}
		if (!comp)
			return fd;
		*what = "cannot open a directory of the pin path "
			"(missing, or a symlink)";
		next = openat(fd, comp,
			      O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		saved = errno;
		close(fd);
		errno = saved;
		fd = next;
	}
	if (fd >= 0) {
		saved = errno;
		close(fd);
		errno = saved;
	}
	return -1;
}

int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
	char rundir[PATH_MAX] = "/run/privtmpd", nsdir[PATH_MAX + 4];
	const char *tmpdir = "/tmp", *what = NULL, *hint = "";
	struct stat pin, self;
	uint32_t jobid = 0;
	char idstr[16];
	int i, dirfd = -1, nsfd = -1, type;

	if (!spank_remote(sp))
		return 0;
	if (spank_get_item(sp, S_JOB_ID, &jobid) != ESPANK_SUCCESS) {
		slurm_error("privtmpd: cannot get the job id");
		return -1;
	}
	for (i = 0; i < ac; i++) {
		if (!strncmp(av[i], "rundir=", 7) && strlen(av[i] + 7) < PATH_MAX) {
			strcpy(rundir, av[i] + 7);
		} else if (!strncmp(av[i], "tmpdir=", 7) && av[i][7]) {
			tmpdir = strcmp(av[i] + 7, "none") ? av[i] + 7 : NULL;
		} else {
			slurm_error("privtmpd: job %u: unknown or invalid plugin "
				    "argument '%s' (fix plugstack.conf)",
				    jobid, av[i]);
			return -1;
		}
	}
	snprintf(idstr, sizeof(idstr), "%u", jobid);
	snprintf(nsdir, sizeof(nsdir), "%s/ns", rundir);

	/* Open and check everything first; setns() is the last step. */
	dirfd = open_trusted_dir(nsdir, &what);
	if (dirfd < 0) {
		hint = errno == ENOENT ? HINT_NOPIN : "check the pin directory";
		goto fail;
	}
	/* O_NONBLOCK: never hang on a FIFO someone left at the pin path. */
	nsfd = openat(dirfd, idstr,
		      O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	if (nsfd < 0) {
		what = "cannot open the pin";
		hint = errno == ENOENT ? HINT_NOPIN : "";
		goto fail;
	}
	/* A plain file (pin never mounted, or left after an unmount) answers
	 * ENOTTY; any other namespace type is a daemon bug. */
	type = ioctl(nsfd, NS_GET_NSTYPE);
	if (type != CLONE_NEWNS) {
		what = "the pin is not a mount namespace";
		if (type >= 0)
			errno = EINVAL;
		hint = HINT_STALE;
		goto fail;
	}
	/* Entering the namespace we are already in would "succeed" and leave
	 * the job on the host /tmp: refuse a pin of the host namespace. */
	if (fstat(nsfd, &pin) < 0 || stat("/proc/self/ns/mnt", &self) < 0) {
		what = "cannot stat the namespaces";
		goto fail;
	}
	if (pin.st_dev == self.st_dev && pin.st_ino == self.st_ino) {
		what = "the pin is the host mount namespace";
		errno = EINVAL;
		goto fail;
	}
	/* Also resets cwd and root; slurmstepd chdir()s to the job's working
	 * directory right after this callback. */
	if (setns(nsfd, CLONE_NEWNS) < 0) {
		what = "setns into the job namespace failed";
		goto fail;
	}
	close(nsfd);
	close(dirfd);
	/* A TMPDIR inherited from the submit side would win over Slurm's own
	 * default, so it must be overwritten, not merely set when missing. */
	if (tmpdir && spank_setenv(sp, "TMPDIR", tmpdir, 1) != ESPANK_SUCCESS) {
		slurm_error("privtmpd: job %u: cannot set TMPDIR=%s", jobid,
			    tmpdir);
		return -1;
	}
	return 0;

fail:
	slurm_error("privtmpd: job %u: %s: %s/%s: %s%s%s%s", jobid, what, nsdir,
		    idstr, strerror(errno), *hint ? " (" : "", hint,
		    *hint ? ")" : "");
	if (nsfd >= 0)
		close(nsfd);
	if (dirfd >= 0)
		close(dirfd);
	return -1;
}
