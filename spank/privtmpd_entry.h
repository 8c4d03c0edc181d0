/*
 * privtmpd_entry.h: what the SPANK entry helper (spank/) and the PAM module
 * (pam/) share on their way into a job's pinned namespace: their arguments
 * and the steps open, check, enter.  Header-only (static functions), like
 * trusted_dir.h: each of them is one C file built on its own.
 *
 * Each step returns -1 with errno set and the pin's what (and hint) naming
 * the step that failed; the caller logs one line, PIN_FMT with PIN_ARGS,
 * under its own prefix.  Every open and check comes before setns(), so a
 * task or session refused is still wholly in the host namespace.
 */
#ifndef PRIVTMPD_ENTRY_H
#define PRIVTMPD_ENTRY_H

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/nsfs.h>

#include "trusted_dir.h"

#define HINT_NOPIN "no private namespace for this job: is privtmpd running " \
	"and did the Prolog succeed?"
#define HINT_STALE "stale pin: a plain file with no namespace mounted on " \
	"it; privtmpd must recreate or remove it"

struct entry_args {
	const char *rundir;     /* rundir=/dir: privtmpd's run directory */
	const char *tmpdir;     /* tmpdir=/dir; NULL for tmpdir=none */
	int create;             /* create=yes (SPANK only) */
	unsigned long shm;      /* shm=N% (SPANK only); 0 when not given */
	const char *host_tmp;   /* host_tmp=/base (SPANK only, sbcast=yes) */
};

/*
 * Arguments from plugstack.conf or the PAM stack.  Paths must be absolute:
 * a relative one would be resolved against whatever cwd the loading
 * process has.  Returns NULL, or the first argument not understood (the
 * caller says what was expected); create=, shm= and host_tmp= only when
 * spank is set.
 */
static const char *parse_entry_args(struct entry_args *a, int ac,
				    const char **av, int spank)
{
	char *end;
	int i;

	*a = (struct entry_args){ .rundir = "/run/privtmpd", .tmpdir = "/tmp" };
	for (i = 0; i < ac; i++) {
		if (!strncmp(av[i], "rundir=", 7) && av[i][7] == '/')
			a->rundir = av[i] + 7;
		else if (!strncmp(av[i], "tmpdir=", 7) && av[i][7] == '/')
			a->tmpdir = av[i] + 7;
		else if (!strcmp(av[i], "tmpdir=none"))
			a->tmpdir = NULL;
		else if (spank && !strcmp(av[i], "create=yes"))
			a->create = 1;
		else if (spank && !strncmp(av[i], "host_tmp=", 9) &&
			 av[i][9] == '/')
			a->host_tmp = av[i] + 9;
		else if (!(spank && !strncmp(av[i], "shm=", 4) &&
			   av[i][4] >= '1' && av[i][4] <= '9' &&
			   (a->shm = strtoul(av[i] + 4, &end, 10)) <= 100 &&
			   !strcmp(end, "%")))
			return av[i];
	}
	return NULL;
}

/* The pin <rundir>/ns/<job> on its way from path to entered namespace. */
struct pin {
	char dir[PATH_MAX];     /* <rundir>/ns */
	char id[24];            /* the job id, the pin's name in dir */
	int dirfd, fd;
	const char *what, *hint;
};

#define PIN_FMT "job %s: %s: %s/%s: %s%s%s%s"
#define PIN_ARGS(p) (p)->id, (p)->what, (p)->dir, (p)->id, strerror(errno), \
	*(p)->hint ? " (" : "", (p)->hint, *(p)->hint ? ")" : ""

static int pin_init(struct pin *p, const char *rundir, unsigned long job)
{
	p->dirfd = p->fd = -1;
	p->what = "rundir too long";
	p->hint = "";
	snprintf(p->id, sizeof(p->id), "%lu", job);
	errno = ENAMETOOLONG;
	return snprintf(p->dir, sizeof(p->dir), "%s/ns", rundir) <
		(int)sizeof(p->dir) ? 0 : -1;
}

static int open_pin_dir(struct pin *p)
{
	char walk[PATH_MAX];

	strcpy(walk, p->dir);
	p->dirfd = open_trusted_dir(walk, &p->what);
	if (p->dirfd < 0)
		p->hint = errno == ENOENT ? HINT_NOPIN : "";
	return p->dirfd;
}

/* O_NONBLOCK: never hang on a FIFO left at the pin path. */
static int open_pin(struct pin *p)
{
	p->fd = openat(p->dirfd, p->id,
		       O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	if (p->fd < 0) {
		p->what = "cannot open the pin";
		p->hint = errno == ENOENT ? HINT_NOPIN : "";
	}
	return p->fd;
}

/* An unmounted pin is a plain file: nsfs ioctls on it fail with ENOTTY,
 * where setns() would only say EINVAL. */
static int check_pin(struct pin *p)
{
	int type = ioctl(p->fd, NS_GET_NSTYPE);

	if (type == CLONE_NEWNS)
		return 0;
	p->what = type < 0 ? "the pin is not a namespace" :
		"the pin is not a mount namespace";
	p->hint = type < 0 ? HINT_STALE : "";
	if (type >= 0)
		errno = EINVAL;
	return -1;
}

/* setns() also resets cwd and root to the namespace's. */
static int enter_pin(struct pin *p)
{
	p->what = "setns into the job namespace failed";
	return setns(p->fd, CLONE_NEWNS);
}

static void close_pin(struct pin *p)
{
	close_keep_errno(p->fd);
	close_keep_errno(p->dirfd);
	p->fd = p->dirfd = -1;
}

#endif
