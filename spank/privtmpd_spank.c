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
 * plugstack.conf (tmpdir=none leaves TMPDIR alone; shm=N% is accepted and
 * ignored: the share now comes from privtmpd.conf, see resize_job_tmpfs):
 *   required /usr/local/lib/privtmpd/privtmpd_spank.so rundir=/run/privtmpd tmpdir=/tmp
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <sys/mount.h>
#include <sys/statvfs.h>
#include <sys/sysmacros.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <slurm/spank.h>

#include "privtmpd_entry.h"

SPANK_PLUGIN(privtmpd, 1);

/* The prefix of every line this plugin logs. */
#define LOG "privtmpd: "

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

/* create=yes: a missing pin is asked for, then opened again. */
static int open_or_create_pin(spank_t sp, struct pin *p,
			      const struct entry_args *a, uint32_t jobid)
{
	if (open_pin(p) >= 0 || errno != ENOENT || !a->create)
		return p->fd;
	p->what = "create=yes: privtmpd did not create the namespace "
		"(see its log)";
	p->hint = "";
	if (ask_create(sp, a->rundir, jobid) < 0)
		return -1;
	return open_pin(p);
}

/* Overwrite: a TMPDIR inherited from the submit side wins over Slurm's own
 * default and would point outside the private /tmp. */
static int set_tmpdir(spank_t sp, const char *tmpdir, struct pin *p)
{
	p->what = "cannot set TMPDIR";
	errno = EINVAL;
	return tmpdir && spank_setenv(sp, "TMPDIR", tmpdir, 1) !=
		ESPANK_SUCCESS ? -1 : 0;
}

/* host_tmp=BASE (privtmpd's sbcast=yes): where the job's /tmp is on the
 * host, the same path on every node, for sbcast, which writes as the user
 * from slurmd's (the host's) namespace. */
static int set_host_tmp(spank_t sp, const char *base, uint32_t jobid,
			struct pin *p)
{
	char path[PATH_MAX];
	uint32_t restart = 0;

	if (!base)
		return 0;
	p->what = "cannot set PRIVTMPD_HOST_TMP";
	errno = EINVAL;
	return spank_get_item(sp, S_SLURM_RESTART_COUNT, &restart) !=
		ESPANK_SUCCESS ||
		snprintf(path, sizeof(path), "%s.%u.%u/tmp", base, jobid,
			 restart) >= (int)sizeof(path) ||
		spank_setenv(sp, "PRIVTMPD_HOST_TMP", path, 1) !=
		ESPANK_SUCCESS ? -1 : 0;
}

/*
 * tmpfs=<dir>:job:N% and shm=job:N% in privtmpd.conf: the daemon cannot know
 * the job's memory on this node when the Prolog runs, so it mounts N% of the
 * RAM with the source "privtmpd.<job>:job:N%"; here, in the namespace, each
 * such mount is resized to N% of S_JOB_ALLOC_MEM.  The mark cannot be forged:
 * the pinned namespace belongs to the initial user namespace, so only root
 * on the host mounts in it.  Only a tmpfs mounted whole (root "/") is
 * resized, since MS_REMOUNT changes the superblock; and only the mount the
 * job sees at that path (its device is the one stat() finds).  The first
 * task resizes, later ones find the size right and leave it: shrinking
 * under files already written would fail with EINVAL.
 */
static int resize_job_tmpfs(uint64_t mem_mb, struct pin *p)
{
	static char what[PATH_MAX + 48];
	char line[4096], root[PATH_MAX], mp[PATH_MAX], fstype[16], src[32];
	char opt[64], *dash;
	unsigned int maj, min;
	unsigned long pct;
	uint64_t mb;
	struct stat st;
	struct statvfs vfs;
	int n, err = 0;
	FILE *f;

	if (!mem_mb)    /* Slurm does not track memory: keep N% of the RAM */
		return 0;
	p->what = "cannot read the job's /proc/self/mountinfo";
	f = fopen("/proc/self/mountinfo", "re");
	if (!f)
		return -1;
	while (!err && fgets(line, sizeof(line), f)) {
		n = 0;
		dash = strstr(line, " - ");
		if (!dash || sscanf(line, "%*d %*d %u:%u %4095s %4095s", &maj,
				    &min, root, mp) != 4 ||
		    sscanf(dash + 3, "%15s %31s", fstype, src) != 2 ||
		    strcmp(fstype, "tmpfs") || strcmp(root, "/") ||
		    sscanf(src, "privtmpd.%*u:job:%lu%%%n", &pct, &n) != 1 ||
		    !n || src[n] || pct < 1 || pct > 100)
			continue;
		snprintf(what, sizeof(what), "cannot resize the job's tmpfs "
			 "at %s", mp);
		p->what = what;
		if (stat(mp, &st) < 0 || statvfs(mp, &vfs) < 0) {
			err = -1;
			break;
		}
		if (major(st.st_dev) != maj || minor(st.st_dev) != min)
			continue;       /* covered by another mount */
		mb = mem_mb * pct / 100;
		mb = mb ? mb : 1;       /* size=0 would mean unlimited */
		if ((uint64_t)vfs.f_blocks * vfs.f_frsize == mb << 20)
			continue;
		/* nr_inodes as the daemon sets it (one per 4 KiB, at least
		 * 1024; mountopts.tmpfs_inodes): a remount keeps the old count,
		 * sized for N% of the RAM. */
		snprintf(opt, sizeof(opt), "size=%llum,nr_inodes=%llu",
			 (unsigned long long)mb,
			 (unsigned long long)(mb * 256 > 1024 ? mb * 256 : 1024));
		/* A remount sets every per-mount flag: keep noexec, ro and the
		 * atime flags the daemon gave (ST_* equal MS_* for these). */
		err = mount(NULL, mp, NULL, MS_REMOUNT | MS_NOSUID | MS_NODEV |
			    (vfs.f_flag & (ST_RDONLY | ST_NOEXEC | ST_NOATIME |
					   ST_NODIRATIME)), opt);
	}
	fclose(f);
	return err;
}

/* Open and check everything first; setns() is the last step but for
 * sizing the job's own tmpfs mounts.  slurmstepd chdir()s to the job's working directory
 * after this callback. */
int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
	struct entry_args args;
	uint64_t mem_mb = 0;
	struct pin pin;
	const char *bad;
	uint32_t jobid = 0;
	int ok;

	if (!spank_remote(sp))
		return 0;
	if (spank_get_item(sp, S_JOB_ID, &jobid) != ESPANK_SUCCESS) {
		slurm_error(LOG "cannot get the job id");
		return -1;
	}
	bad = parse_entry_args(&args, ac, (const char **)av, 1);
	if (bad) {
		slurm_error(LOG "job %u: invalid plugin argument '%s' (expected "
			    "rundir=/absolute/dir, tmpdir=/absolute/dir, "
			    "tmpdir=none, shm=1%%..100%%, host_tmp=/base or "
			    "create=yes; fix plugstack.conf)", jobid, bad);
		return -1;
	}
	/* 0 (no resize) where Slurm does not track the job's memory. */
	if (spank_get_item(sp, S_JOB_ALLOC_MEM, &mem_mb) != ESPANK_SUCCESS)
		mem_mb = 0;
	ok = pin_init(&pin, args.rundir, jobid) == 0 &&
		open_pin_dir(&pin) >= 0 &&
		open_or_create_pin(sp, &pin, &args, jobid) >= 0 &&
		check_pin(&pin) == 0 &&
		set_tmpdir(sp, args.tmpdir, &pin) == 0 &&
		set_host_tmp(sp, args.host_tmp, jobid, &pin) == 0 &&
		enter_pin(&pin) == 0 &&
		resize_job_tmpfs(mem_mb, &pin) == 0;
	if (!ok)
		slurm_error(LOG PIN_FMT, PIN_ARGS(&pin));
	close_pin(&pin);
	return ok ? 0 : -1;
}
