"""systemd/privtmpd.service under a real systemd: a Debian 12 container
booted with systemd as PID 1 (tests/systemdlab.py), privtmpd installed in
it, and the unit started, restarted, stopped, killed and analysed there.

The tests run in file order on one booted container (module scope), each a
step of a node's life: start, a job made by the Prolog, restart and stop
with that job live, a crash, the hardening's effect on what the daemon
runs, the Epilog.  About 15 s once the root filesystem is cached (it is
made on the first run with debootstrap: about a minute more).
"""

import json
import re
import time

import pytest

from conftest import privileged_skip
from systemdlab import LabUnavailable, SystemdLab, ensure_rootfs

pytestmark = pytest.mark.root

UNIT = "privtmpd.service"
CONF = "/etc/privtmpd/privtmpd.conf"
BASE_CONF = "base=/tmp/slurm\nmount=/tmp\nmount=/var/tmp\nkeep_failed=1h keep_max=1g\n"
SOCKET = "/run/privtmpd/privtmpd.sock"
VENV = "/opt/privtmpd"
HOOKS = f"{VENV}/lib/python3.11/site-packages/privtmpd/hooks"
JOB = "4242"
USER = "65534"
PIN = f"/run/privtmpd/ns/{JOB}"
JOB_DIR = f"/tmp/slurm.{JOB}.0"
MARK = "written-before-the-restart"


UNIT_PATH = f"/lib/systemd/system/{UNIT}"


def install_privtmpd(lab):
    """Install privtmpd on the booted system the way the README's
    virtualenv path does: a venv at /opt/privtmpd, then `privtmpctl
    install`, which writes the launchers (/usr/sbin/privtmpd, privtmpctl,
    the hooks) and the shipped unit at the stable paths.  Offline: Debian's
    psutil and python-daemon through --system-site-packages, no index (the
    container has no network).  The .deb path is tested in
    test_install_deb.py.  Returns the daemon's path."""
    lab.copy_checkout("/usr/src/privtmpd")
    lab.run(["python3", "-m", "venv", "--system-site-packages", VENV])
    lab.run([f"{VENV}/bin/pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
             "/usr/src/privtmpd"], timeout=180)
    lab.run([f"{VENV}/bin/privtmpctl", "install", "--no-spank"], timeout=60)
    unit = lab.run(["cat", UNIT_PATH]).stdout
    execs = re.findall(r"^ExecStart=(\S+) ", unit, re.M)
    assert execs == ["/usr/sbin/privtmpd"], f"the installed unit must start /usr/sbin/privtmpd, has {execs}"
    lab.write(CONF, BASE_CONF)
    lab.run(["systemctl", "daemon-reload"])
    return execs[0]


@pytest.fixture(scope="module")
def lab():
    try:
        ensure_rootfs()
        machine = SystemdLab().start()
    except LabUnavailable as e:
        privileged_skip(f"cannot boot a systemd container here: {e}")
    try:
        install_privtmpd(machine)
        machine.make_loop_nodes()
        yield machine
    finally:
        machine.stop()


# --- helpers ----------------------------------------------------------------

def props(lab, *names):
    return lab.unit_property(UNIT, *names)


def wait_active(lab, timeout=20, changed_from=None):
    """Until the unit is active/running (with a MainPID other than
    changed_from); returns its properties."""
    deadline = time.monotonic() + timeout
    while True:
        p = props(lab, "ActiveState", "SubState", "MainPID", "NRestarts", "Result", "InvocationID")
        if p["ActiveState"] == "active" and p["SubState"] == "running" and p["MainPID"] not in ("0", changed_from):
            return p
        assert time.monotonic() < deadline, f"{UNIT} not active again within {timeout} s: {p}\n{journal(lab)}"
        time.sleep(0.2)


def journal(lab, *args):
    return lab.run(["journalctl", "--no-pager", "-o", "cat", "-u", UNIT, *args], check=False).stdout


def privtmpctl(lab, *args, check=True):
    return lab.run(["privtmpctl", "--config", CONF, *args], check=check)


def ask(lab, **msg):
    """One request to the daemon's socket from inside, no retry: the
    socket must accept at once."""
    code = ("import json, sys\nfrom privtmpd import client\n"
            f"print(json.dumps(client.request(json.loads(sys.argv[1]), {SOCKET!r}, timeout=30, retry=0)))")
    r = lab.run([f"{VENV}/bin/python3", "-c", code, json.dumps(msg)], check=False)
    assert r.returncode == 0, f"request {msg} to {SOCKET} failed: {r.stderr}"
    return json.loads(r.stdout)


def hook(lab, kind, **env):
    slurm = {"SLURM_JOB_ID": JOB, "SLURM_JOB_UID": USER, "SLURM_JOB_GID": USER, "SLURM_JOB_USER": "nobody",
             "SLURM_JOB_RESTART_COUNT": "0", **env}
    return lab.run(["/usr/bin/python3", "-IS", f"{HOOKS}/{kind}.py"], env=slurm, check=False)


def pin_ns(lab, pin=PIN):
    """The inode of the namespace pinned at pin (an nsfs mount), or None."""
    r = lab.sh(f"grep -q ' {pin} .* - nsfs ' /proc/self/mountinfo && stat -L -c %i {pin}", check=False)
    return int(r.stdout) if r.returncode == 0 else None


def in_job(lab, script, pin=PIN, user=USER, check=True):
    argv = ["nsenter", f"--mount={pin}", "--", "setpriv", f"--reuid={user}", f"--regid={user}",
            "--clear-groups", "sh", "-c", script]
    return lab.run(argv, check=check)


# --- the steps ----------------------------------------------------------------

def test_unit_verifies_on_the_booted_system(lab):
    # --man=no: the container has no man(1); test_packaging checks the pages.
    r = lab.run(["systemd-analyze", "verify", "--man=no", UNIT_PATH], check=False)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), \
        f"systemd-analyze verify complained:\n{r.stdout}{r.stderr}"


def test_start_reaches_active_once_the_socket_serves(lab, figures):
    assert lab.boot_state in ("running", "degraded"), lab.boot_state
    t0 = time.monotonic()
    # Type=notify: systemctl start returns when READY=1 arrived (or fails).
    lab.run(["systemctl", "start", UNIT], timeout=60)
    took = time.monotonic() - t0
    # No retry: READY=1 must come after the listening socket exists.
    reply = ask(lab, op="status")
    p = props(lab, "ActiveState", "SubState", "Type", "StatusText", "MainPID", "NotifyAccess", "Result")
    assert (p["ActiveState"], p["SubState"], p["Type"]) == ("active", "running", "notify"), p
    assert p["StatusText"] == f"serving {SOCKET}", \
        f"StatusText {p['StatusText']!r}: READY=1 with the daemon's STATUS= was not received"
    assert reply["ok"], reply
    main = p["MainPID"]
    # The daemon is in systemd's own mount namespace (the host's, for a
    # node): the unit gives it none of its own.
    init_ns = lab.run(["stat", "-L", "-c", "%i", "/proc/1/ns/mnt"]).stdout
    assert lab.run(["stat", "-L", "-c", "%i", f"/proc/{main}/ns/mnt"]).stdout == init_ns, \
        "privtmpd runs in a mount namespace of its own: pins would be invisible to slurmd"
    # The hardening is in force on the daemon itself.
    status = lab.run(["cat", f"/proc/{main}/status"]).stdout
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), "NoNewPrivileges= not applied"
    assert re.search(r"^Seccomp:\s+2$", status, re.M), "no seccomp filter (SystemCallFilter=, RestrictAddressFamilies=)"
    bounding = int(re.search(r"^CapBnd:\s+([0-9a-f]+)$", status, re.M).group(1), 16)
    cap_net_admin, cap_sys_admin = 12, 21
    assert not bounding & (1 << cap_net_admin), "CapabilityBoundingSet= not applied: CAP_NET_ADMIN kept"
    assert bounding & (1 << cap_sys_admin), "CAP_SYS_ADMIN missing: the daemon cannot mount"
    figures("systemd-start", start_s=round(took, 2))


def test_prolog_creates_a_job_namespace(lab):
    r = hook(lab, "prolog")
    assert r.returncode == 0, f"Prolog failed under the unit: {r.stderr}"
    assert pin_ns(lab) is not None, f"no nsfs mount at {PIN} after the Prolog"
    in_job(lab, f"echo {MARK} > /tmp/mark && echo vt > /var/tmp/mark")
    # The job's /tmp is its directory, not the system's /tmp.
    assert lab.run(["cat", f"{JOB_DIR}/tmp/mark"]).stdout.strip() == MARK
    assert lab.run(["test", "!", "-e", "/tmp/mark"], check=False).returncode == 0, \
        "the job's file landed in the system /tmp"
    listed = json.loads(privtmpctl(lab, "list", "--json").stdout)
    assert JOB in json.dumps(listed), f"privtmpctl list does not show job {JOB}: {listed}"


def test_doctor_is_healthy_under_systemd(lab):
    """privtmpctl doctor on a booted systemd: / is shared (systemd makes it
    so at boot, which this host without systemd never shows), the run
    directory's private mount and the daemon are found."""
    r = privtmpctl(lab, "doctor", check=False)
    assert r.returncode == 0 and "\n0 problem(s)" in r.stdout, f"doctor found problems:\n{r.stdout}{r.stderr}"
    assert re.search(r"^\[ ok \] host propagation: / is shared", r.stdout, re.M), r.stdout
    assert re.search(r"^\[ ok \] run directory: .* is a private mount", r.stdout, re.M), r.stdout


def test_restart_keeps_the_live_job(lab):
    before = props(lab, "MainPID")["MainPID"]
    ns = pin_ns(lab)
    lab.run(["systemctl", "restart", UNIT], timeout=60)
    after = wait_active(lab, changed_from=before)
    assert pin_ns(lab) == ns, "the restart changed or dropped the job's pinned namespace"
    assert in_job(lab, "cat /tmp/mark").stdout.strip() == MARK, "the job's /tmp lost its file over the restart"
    assert ask(lab, op="show", job=JOB)["ok"]
    assert after["NRestarts"] == "0"


def test_stop_is_quick_and_leaves_the_job(lab, figures):
    ns = pin_ns(lab)
    t0 = time.monotonic()
    lab.run(["systemctl", "stop", UNIT], timeout=60)
    took = time.monotonic() - t0
    figures("systemd-stop", stop_s=round(took, 2))
    p = props(lab, "ActiveState", "Result")
    assert p["ActiveState"] == "inactive" and p["Result"] == "success", \
        f"stop did not end cleanly: {p}\n{journal(lab, '-n', '20')}"
    assert took < 5, f"systemctl stop took {took:.1f} s (the daemon must stop in well under TimeoutStopSec)"
    assert pin_ns(lab) == ns, "stopping the daemon dropped the job's pinned namespace"
    assert in_job(lab, "cat /tmp/mark").stdout.strip() == MARK
    assert lab.run(["test", "-d", f"{JOB_DIR}/tmp"], check=False).returncode == 0, "the job's directory is gone"
    # The unit's RuntimeDirectoryPreserve=yes keeps the job's state for the next start.
    assert lab.run(["test", "-e", f"/run/privtmpd/ns/{JOB}"], check=False).returncode == 0
    lab.run(["systemctl", "start", UNIT], timeout=60)
    wait_active(lab)
    assert ask(lab, op="show", job=JOB)["ok"], "the started daemon does not know the job kept over the stop"


def test_journal_has_the_key_value_lines(lab):
    inv = props(lab, "InvocationID")["InvocationID"]
    lines = lab.run(["journalctl", "--no-pager", "-o", "json", f"_SYSTEMD_INVOCATION_ID={inv}"]).stdout
    records = [json.loads(x) for x in lines.splitlines() if x.strip()]
    messages = [(r.get("MESSAGE"), r.get("PRIORITY")) for r in records]
    start = [(m, prio) for m, prio in messages if m and re.match(r"job=- user=- op=start result=ok ms=- ", m)]
    assert start, f"no 'op=start result=ok' key=value line in this invocation's journal: {messages}"
    assert start[0][1] == "6", f"the start line's priority is {start[0][1]}, not info (6): the <N> prefix was lost"
    recover = [m for m, _ in messages if m and "op=recover result=ok" in m]
    assert recover and "live_jobs=1" in recover[0], f"no reconcile line with the live job: {recover}"
    # The Prolog's create from before: found with journalctl -u and the job's field.
    created = [ln for ln in journal(lab).splitlines() if ln.startswith(f"job={JOB} user=nobody op=create result=ok")]
    assert created, "the create of job {JOB} is not in journalctl -u privtmpd"


def test_crash_is_restarted_and_reconciles(lab):
    before = props(lab, "MainPID", "NRestarts")
    ns = pin_ns(lab)
    lab.run(["systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", UNIT])
    after = wait_active(lab, timeout=20, changed_from=before["MainPID"])
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1, \
        f"Restart=on-failure did not restart the killed daemon: {before} -> {after}"
    assert pin_ns(lab) == ns, "the crash lost the job's pinned namespace"
    assert in_job(lab, "cat /tmp/mark").stdout.strip() == MARK
    inv = after["InvocationID"]
    text = lab.run(["journalctl", "--no-pager", "-o", "cat", f"_SYSTEMD_INVOCATION_ID={inv}"]).stdout
    assert re.search(r"op=recover result=ok .*live_jobs=1", text), f"no reconcile of the live job:\n{text}"
    assert ask(lab, op="show", job=JOB)["ok"]


def test_hardened_unit_still_runs_mkfs_loop_and_owner_removal(lab):
    """limit= (mkfs.ext4 and a loop mount, run by the daemon) and a kept
    directory's removal by a worker as its owner (setresuid in a fork),
    under the unit's NoNewPrivileges=, RestrictNamespaces=, SystemCallFilter= ..."""
    lab.write(CONF, "base=/tmp/slurm\nmount=/tmp\nmount=/var/tmp\nlimit=32m keep_failed=2s\n")
    lab.run(["systemctl", "restart", UNIT], timeout=60)
    wait_active(lab)
    job = "4343"
    try:
        r = hook(lab, "prolog", SLURM_JOB_ID=job)
        assert r.returncode == 0, f"a limit= job cannot be made under the unit: {r.stderr}\n{journal(lab, '-n', '10')}"
        pin = f"/run/privtmpd/ns/{job}"
        df = in_job(lab, "df -k --output=fstype,size /tmp | tail -1", pin=pin).stdout.split()
        assert df[0] == "ext4" and 20_000 < int(df[1]) <= 32 * 1024, f"the job's /tmp is not a 32 MiB image: {df}"
        full = in_job(lab, "dd if=/dev/zero of=/tmp/fill bs=1M count=64 2>&1; echo rc=$?", pin=pin, check=False)
        assert "No space left" in full.stdout, f"the limit= image did not limit: {full.stdout}"
        in_job(lab, "rm -f /tmp/fill; mkdir -p /tmp/d/e && echo core > /tmp/d/e/core", pin=pin)
        # A failed job's directory is kept (keep_failed=2s); when it expires
        # a removal worker empties the user's directories as that user.
        r = hook(lab, "epilog", SLURM_JOB_ID=job, SLURM_JOB_EXIT_CODE="256")
        assert r.returncode == 0, r.stderr
        kept = ask(lab, op="list")["kept"]
        assert [k["job"] for k in kept] == [int(job)], kept
        deadline = time.monotonic() + 30
        while lab.sh(f"ls -d /tmp/slurm.{job}.* 2>/dev/null", check=False).stdout.split():
            assert time.monotonic() < deadline, \
                f"the kept directory was not removed as its owner under the unit:\n{journal(lab, '-n', '10')}"
            time.sleep(0.5)

        def removal_lines():
            lines = [ln for ln in journal(lab).splitlines() if ln.startswith(f"job={job} ")]
            return lines, [ln for ln in lines if "op=remove " in ln and "-kept." in ln]
        # The worker unlinks before it reports, and the daemon logs on its
        # report; journald then stores the line a moment later still.
        lines, removed = removal_lines()
        while not removed and time.monotonic() < deadline + 30:
            time.sleep(0.5)
            lines, removed = removal_lines()
        assert removed and all("result=ok" in ln and "by=worker" in ln for ln in removed), \
            f"removal of the kept directory: {lines}"
        assert not [ln for ln in lines if "error" in ln], f"errors for job {job}: {lines}"
    finally:
        lab.write(CONF, BASE_CONF)
        lab.run(["systemctl", "restart", UNIT], timeout=60)
        wait_active(lab)


# The unit's hardening options: the service without them is the baseline
# that systemd-analyze security scores the unit against.
HARDENING = ("NoNewPrivileges", "RestrictAddressFamilies", "RestrictNamespaces", "LockPersonality",
             "RestrictRealtime", "RestrictSUIDSGID", "SystemCallArchitectures", "SystemCallFilter",
             "SystemCallErrorNumber", "MemoryDenyWriteExecute", "CapabilityBoundingSet")


def exposure(lab, unit):
    r = lab.run(["systemd-analyze", "security", "--no-pager", unit], check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\S+)", r.stdout)
    assert m, f"systemd-analyze security {unit} gave no score (exit {r.returncode}):\n{r.stdout[-2000:]}{r.stderr}"
    return float(m.group(1)), m.group(2)


def test_security_analysis_scores_the_hardening(lab, figures):
    unit = lab.run(["cat", UNIT_PATH]).stdout
    logical = unit.replace("\\\n", " ").splitlines()     # systemd's line continuation
    bare = "\n".join(ln for ln in logical if ln.split("=", 1)[0] not in HARDENING)
    assert bare != unit, "the unit has none of the hardening options"
    lab.write("/etc/systemd/system/privtmpd-bare.service", bare + "\n")
    lab.run(["systemctl", "daemon-reload"])
    try:
        score, verdict = exposure(lab, UNIT)
        bare_score, bare_verdict = exposure(lab, "privtmpd-bare.service")
    finally:
        lab.run(["rm", "-f", "/etc/systemd/system/privtmpd-bare.service"])
        lab.run(["systemctl", "daemon-reload"])
    figures("systemd-security", exposure=score, verdict=verdict, without_hardening=bare_score,
            without_hardening_verdict=bare_verdict)
    assert score <= bare_score - 2.0, \
        f"exposure {score} {verdict} with the hardening, {bare_score} {bare_verdict} without: it does little"


def test_epilog_removes_the_job(lab):
    # A job process left behind: the Epilog's daemon finds it through
    # /proc/<pid>/ns/mnt (another user's: ptrace-mode access) and kills it.
    leftover = in_job(lab, "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!").stdout.strip()
    assert lab.run(["kill", "-0", leftover], check=False).returncode == 0
    r = hook(lab, "epilog")
    assert r.returncode == 0, f"Epilog failed under the unit: {r.stderr}\n{journal(lab, '-n', '10')}"
    gone = lab.sh(f"! [ -e /proc/{leftover} ] || grep -q '^State:.Z' /proc/{leftover}/status", check=False)
    assert gone.returncode == 0, f"the job's leftover process {leftover} survived the Epilog"
    assert pin_ns(lab) is None, f"{PIN} still pinned after the Epilog"
    deadline = time.monotonic() + 30
    while lab.run(["test", "-e", JOB_DIR], check=False).returncode == 0:
        assert time.monotonic() < deadline, f"{JOB_DIR} not removed within 30 s"
        time.sleep(0.2)
    assert ask(lab, op="list")["jobs"] == [], "the daemon still lists jobs"
    errors = lab.run(["journalctl", "--no-pager", "-o", "cat", "-u", UNIT, "-p", "err"]).stdout.strip()
    assert not errors, f"the daemon logged errors under the unit:\n{errors}"


def test_an_interrupted_run_is_stopped_by_the_next(lab):
    """A run killed before its stop() leaves a booted container; the next
    start (here: stop_leftovers) finds it by the recorded PIDs and start
    times and stops it, and stops nothing else."""
    lab.stop()
    orphan = SystemdLab().start()
    pids = (orphan.state["nspawn"], orphan.init_pid)
    orphan.proc = None          # as if its test process had died: nobody will stop it
    assert SystemdLab().stop_leftovers(), "the leftover container was not recognised as ours"
    for pid in pids:
        assert not _alive(pid), f"pid {pid} of the leftover container still runs"


def _alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except FileNotFoundError:
        return False
