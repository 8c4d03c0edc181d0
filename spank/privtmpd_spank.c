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
 * plugstack.conf (tmpdir=none leaves TMPDIR alone; shm=N% with the
 * daemon's shm=job:N% sizes the job's private /dev/shm to N% of the job's
 * memory on this node):
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
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <linux/nsfs.h>
#include <slurm/spank.h>

#include "trusted_dir.h"

SPANK_PLUGIN(privtmpd, 1);

#define HINT_NOPIN "no private namespace for this job: is privtmpd running " \
	"and did the Prolog succeed?"
#define HINT_STALE "stale pin: a plain file with no namespace mounted on " \
	"it; privtmpd must recreate or remove it"

/*
 * create=yes (no Prolog): ask privtmpd to build the job's namespace.  The
 * daemon handles one request at a time and answers an existing namespace
 * as is, so all tasks of the job, racing here, get the same one.  Every
 * reply starts with its verdict: {"ok":true
 */
static int ask_create(spank_t sp, const char *rundir, uint32_t jobid)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct timeval tv = { .tv_sec = 300 };
	uint32_t restart = 0;
	uid_t uid;
	gid_t gid;
	char req[160], rep[10];
	ssize_t n, got = 0;
	int fd, len;

	errno = EINVAL;
	if (spank_get_item(sp, S_JOB_UID, &uid) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_GID, &gid) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_SLURM_RESTART_COUNT, &restart) != ESPANK_SUCCESS
	    || snprintf(sa.sun_path, sizeof(sa.sun_path), "%s/privtmpd.sock",
			rundir) >= (int)sizeof(sa.sun_path))
		return -1;
	len = snprintf(req, sizeof(req), "{\"op\":\"create\",\"job\":\"%u\","
		       "\"restart\":\"%u\",\"uid\":\"%u\",\"gid\":\"%u\"}\n",
		       jobid, restart, (unsigned)uid, (unsigned)gid);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	/* SO_SNDTIMEO also bounds connect() on a full listen backlog. */
	if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) == 0 &&
	    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) == 0 &&
	    connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
	    write(fd, req, len) == len && shutdown(fd, SHUT_WR) == 0)
		while (got < (ssize_t)sizeof(rep) &&
		       (n = read(fd, rep + got, sizeof(rep) - got)) > 0)
			got += n;
	close_keep_errno(fd);
	if (got == sizeof(rep) && !memcmp(rep, "{\"ok\":true", sizeof(rep)))
		return 0;
	errno = got ? EPROTO : (errno ? errno : ECONNRESET);
	return -1;
}

/*
 * The job's /dev/shm must be a tmpfs of its own (mountinfo root "/"):
 * MS_REMOUNT changes the whole superblock, so a bind of a directory of
 * some other filesystem (mount=/dev/shm) would resize that filesystem for
 * every job on the node.  The last matching line is the mount on top.
 */
static int shm_is_own_tmpfs(void)
{
	char line[4096], root[PATH_MAX], mp[PATH_MAX], fstype[64], *dash;
	FILE *f = fopen("/proc/self/mountinfo", "re");
	int ok = 0;

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f)) {
		dash = strstr(line, " - ");
		if (dash && sscanf(line, "%*d %*d %*s %4095s %4095s", root, mp) == 2
		    && sscanf(dash + 3, "%63s", fstype) == 1
		    && !strcmp(mp, "/dev/shm"))
			ok = !strcmp(root, "/") && !strcmp(fstype, "tmpfs");
	}
	fclose(f);
	return ok;
}

int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
	const char *rundir = "/run/privtmpd", *tmpdir = "/tmp", *host_tmp = NULL;
	const char *what = "cannot open /", *hint = "";
	char nsdir[PATH_MAX], walk[PATH_MAX], idstr[16], opt[32], *end;
	uint32_t jobid = 0, restart = 0;
	uint64_t mem = 0;
	unsigned long shm = 0;
	struct stat host_shm, job_shm;
	int i, dirfd = -1, nsfd = -1, type, create = 0;

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
		else if (!strcmp(av[i], "create=yes"))
			create = 1;
		else if (!strncmp(av[i], "host_tmp=", 9) && av[i][9] == '/')
			host_tmp = av[i] + 9;
		else if (!strncmp(av[i], "shm=", 4) &&
			 av[i][4] >= '1' && av[i][4] <= '9' &&
			 (shm = strtoul(av[i] + 4, &end, 10)) >= 1 &&
			 shm <= 100 && !strcmp(end, "%"))
			;
		else {
			slurm_error("privtmpd: job %u: invalid plugin argument "
				    "'%s' (expected rundir=/absolute/dir, "
				    "tmpdir=/absolute/dir, tmpdir=none, shm=1%%.."
				    "100%%, host_tmp=/base or create=yes; fix "
				    "plugstack.conf)",
				    jobid, av[i]);
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
	if (nsfd < 0 && errno == ENOENT && create) {
		what = "create=yes: privtmpd did not create the namespace "
			"(see its log)";
		if (ask_create(sp, rundir, jobid) < 0)
			goto fail;
		nsfd = openat(dirfd, idstr,
			      O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	}
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
	/* host_tmp=BASE (privtmpd's sbcast=yes): where the job's /tmp is on
	 * the host, the same path on every node, for sbcast, which writes as
	 * the user from slurmd's (the host's) namespace. */
	what = "cannot set PRIVTMPD_HOST_TMP";
	errno = EINVAL;
	if (host_tmp && (spank_get_item(sp, S_SLURM_RESTART_COUNT, &restart)
			 != ESPANK_SUCCESS ||
			 snprintf(walk, sizeof(walk), "%s.%u.%u/tmp", host_tmp,
				  jobid, restart) >= (int)sizeof(walk) ||
			 spank_setenv(sp, "PRIVTMPD_HOST_TMP", walk, 1)
			 != ESPANK_SUCCESS))
		goto fail;
	/* shm=N%: the job's memory on this node (MB; 0 when Slurm does not
	 * track memory, and /dev/shm keeps the daemon's size). */
	if (shm) {
		what = "cannot get the job's memory (S_JOB_ALLOC_MEM)";
		errno = EINVAL;
		if (spank_get_item(sp, S_JOB_ALLOC_MEM, &mem) != ESPANK_SUCCESS)
			goto fail;
		what = "cannot stat the host's /dev/shm";
		if (stat("/dev/shm", &host_shm) < 0)
			goto fail;
	}
	/* setns() also resets cwd and root to the namespace's; slurmstepd
	 * chdir()s to the job's working directory after this callback. */
	what = "setns into the job namespace failed";
	if (setns(nsfd, CLONE_NEWNS) < 0)
		goto fail;
	if (shm && mem) {
		what = "cannot stat /dev/shm in the job";
		if (stat("/dev/shm", &job_shm) < 0)
			goto fail;
		/* Remounting the host's tmpfs would resize it for the node. */
		what = "/dev/shm in the job is the host's (set shm=job:N% in "
			"privtmpd.conf)";
		errno = EEXIST;
		if (job_shm.st_dev == host_shm.st_dev)
			goto fail;
		what = "/dev/shm in the job is not a tmpfs of its own (use "
			"shm=job:N% in privtmpd.conf, not mount=/dev/shm)";
		if (!shm_is_own_tmpfs()) {
			errno = EINVAL;
			goto fail;
		}
		what = "cannot resize the job's /dev/shm";
		/* size=0 would mean unlimited: at least 1 MB. */
		snprintf(opt, sizeof(opt), "size=%llum",
			 (unsigned long long)(mem * shm / 100 ? mem * shm / 100 : 1));
		if (mount(NULL, "/dev/shm", NULL,
			  MS_REMOUNT | MS_NOSUID | MS_NODEV, opt) < 0)
			goto fail;
	}
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
