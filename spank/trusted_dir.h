/*
 * open_trusted_dir(): shared by the SPANK entry helper (spank/) and the PAM
 * module (pam/), which both enter a job's namespace through a pin under
 * privtmpd's run directory.  Header-only (static functions): each of them
 * is one C file built on its own, by make or by setup.py.
 */
#ifndef PRIVTMPD_TRUSTED_DIR_H
#define PRIVTMPD_TRUSTED_DIR_H

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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
 * and have us enter a namespace they built.  path is modified (strtok_r);
 * on failure *what says which check failed and errno why.
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

#endif
