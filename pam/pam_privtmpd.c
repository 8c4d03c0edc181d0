/*
 * pam_privtmpd.c - put an ssh session adopted into a Slurm job (by
 * pam_slurm_adopt) into that job's private mount namespace, so it sees the
 * job's /tmp, /var/tmp (and /dev/shm) like the job's own tasks.
 *
 * pam_slurm_adopt, in the account stack, moves the session's process into
 * the cgroup of the job's extern step (.../job_<id>/step_extern).  Here, in
 * the session stack, that cgroup names the job: we open the pin privtmpd
 * made for it (<rundir>/ns/<id>) with the same checks as the entry helper
 * (no symlinks, root-owned path, a mount namespace) and setns() into it.
 * sshd opens the session in the process that then forks the user's shell,
 * so the shell and everything it starts are in the job's namespace.
 *
 * A session that was not adopted into a job (no job_<id> in its cgroups)
 * is left alone.  An adopted session whose job has no usable namespace is
 * refused (PAM_SESSION_ERR): it must never get the host's /tmp instead.
 *
 * /etc/pam.d/sshd, after pam_slurm_adopt in the account stack:
 *   session required pam_privtmpd.so rundir=/run/privtmpd tmpdir=/tmp
 */
#define _GNU_SOURCE
#include <syslog.h>
#include <security/pam_modules.h>
#include <security/pam_ext.h>

#include "../spank/privtmpd_entry.h"

/* The job id in /proc/self/cgroup (job_<id> components); 0 if none, -1 if
 * the lines disagree (then we do not guess). */
static long adopted_job(void)
{
	char line[4096], *p;
	long job = 0, id;
	FILE *f = fopen("/proc/self/cgroup", "re");

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		for (p = strstr(line, "/job_"); p; p = *p ? strstr(p + 1, "/job_") : NULL) {
			id = strtol(p + 5, &p, 10);
			if (id <= 0 || (*p != '/' && *p != '\n' && *p))
				continue;
			if (job && job != id) {
				fclose(f);
				return -1;
			}
			job = id;
		}
	}
	fclose(f);
	return job;
}

int pam_sm_open_session(pam_handle_t *pamh, int flags, int argc,
			const char **argv)
{
	struct entry_args args;
	struct pin pin;
	const char *bad;
	char env[PATH_MAX + 8];
	long job;

	(void)flags;
	bad = parse_entry_args(&args, argc, argv, 0);
	if (bad) {
		pam_syslog(pamh, LOG_ERR, "invalid argument '%s' (rundir=/dir, "
			   "tmpdir=/dir or tmpdir=none)", bad);
		return PAM_SESSION_ERR;
	}
	job = adopted_job();
	if (job == 0)
		return PAM_IGNORE;      /* not adopted into a job */
	if (job < 0) {
		pam_syslog(pamh, LOG_ERR, "cannot tell the job of this session "
			   "from /proc/self/cgroup");
		return PAM_SESSION_ERR;
	}
	if (pin_init(&pin, args.rundir, job) < 0 || open_pin_dir(&pin) < 0 ||
	    open_pin(&pin) < 0 || check_pin(&pin) < 0 || enter_pin(&pin) < 0) {
		pam_syslog(pamh, LOG_ERR, PIN_FMT, PIN_ARGS(&pin));
		close_pin(&pin);
		return PAM_SESSION_ERR;
	}
	close_pin(&pin);
	if (chdir("/") < 0)     /* the old cwd belongs to the host namespace */
		return PAM_SESSION_ERR;
	snprintf(env, sizeof(env), "TMPDIR=%s", args.tmpdir ? args.tmpdir : "");
	if (args.tmpdir && pam_putenv(pamh, env) != PAM_SUCCESS)
		return PAM_SESSION_ERR;
	return PAM_SUCCESS;
}

int pam_sm_close_session(pam_handle_t *pamh, int flags, int argc,
			 const char **argv)
{
	(void)pamh; (void)flags; (void)argc; (void)argv;
	return PAM_SUCCESS;
}
