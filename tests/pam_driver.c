/* Test driver for pam_privtmpd: what sshd does with the session stack,
 * without sshd.  pam_driver CONFDIR USER CMD...: opens a PAM session for
 * service "privtmpd-test" (configured in CONFDIR), exports the PAM
 * environment and execs CMD in the resulting process. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <security/pam_appl.h>

static int no_conv(int n, const struct pam_message **m, struct pam_response **r, void *d)
{
	(void)n; (void)m; (void)r; (void)d;
	return PAM_CONV_ERR;
}

int main(int argc, char **argv)
{
	struct pam_conv conv = { no_conv, NULL };
	pam_handle_t *h;
	char **env;
	int r;

	if (argc < 4)
		return 2;
	r = pam_start_confdir("privtmpd-test", argv[2], &conv, argv[1], &h);
	if (r == PAM_SUCCESS)
		r = pam_open_session(h, 0);
	if (r != PAM_SUCCESS) {
		fprintf(stderr, "pam_open_session: %s\n", pam_strerror(h, r));
		return 10;
	}
	for (env = pam_getenvlist(h); env && *env; env++)
		putenv(*env);
	execvp(argv[3], argv + 3);
	perror("execvp");
	return 127;
}
