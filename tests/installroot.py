"""A clean Debian 12 node to install privtmpd into, for the installation
tests: tools/bookworm-root.sh's cached debootstrap (never changed) under a
fresh overlay, entered with pivot_root in new mount and PID namespaces (not
chroot: the daemon setns()es into job namespaces, which would leave a
chroot).  Everything lives in those namespaces and goes with them: the host
keeps its mounts, its packages, its /usr/sbin.

    with DebianRoot(workdir) as node:
        node.put(host_path, "/xfer/name")       # files in /xfer inside
        node.run("apt-get install -y /xfer/x.deb")
"""

import os
import shutil
import signal
import subprocess
import time

from harness import REPO

BOOKWORM_ROOT = os.path.join(REPO, "tools", "bookworm-root.sh")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Runs as PID 1 of the new PID namespace.  bash stays PID 1 and reaps the
# orphans (a detached daemon, job processes); killing it ends the namespace.
_ENTER = r"""
set -eu
base=$1 top=$2
mount --make-rprivate /
mkdir -p "$top/merged"
mount -t overlay overlay -o "lowerdir=$base,upperdir=$top/upper,workdir=$top/work" "$top/merged"
R=$top/merged
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
mount --rbind /dev "$R/dev"
mount -t tmpfs -o mode=755 run "$R/run"
mount -t tmpfs -o mode=1777 tmp "$R/tmp"
mkdir -p "$R/xfer"
mount --bind "$top/xfer" "$R/xfer"
cp /etc/resolv.conf "$R/etc/resolv.conf"
cp /etc/hosts "$R/etc/hosts"
mkdir -p "$R/.oldroot"
cd "$R"
pivot_root . .oldroot
umount -l /.oldroot
cd /
echo ready > /xfer/.ready
while :; do sleep 1; done
"""


class RootError(Exception):
    pass


def base_root():
    """Path of the cached Debian 12 root; RootError with the reason when it
    cannot be made here."""
    if os.geteuid() != 0:
        raise RootError("needs root (debootstrap, mount namespaces, pivot_root)")
    for tool in ("debootstrap", "unshare", "nsenter"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            raise RootError(f"{tool} is not installed (apt-get install debootstrap util-linux)")
    r = subprocess.run([BOOKWORM_ROOT], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RootError(f"tools/bookworm-root.sh failed: {r.stderr.strip()[-2000:]}")
    return r.stdout.strip().splitlines()[-1]


class DebianRoot:
    def __init__(self, workdir):
        self.base = base_root()
        self.top = workdir
        self.holder = None
        self.pid1 = None

    def __enter__(self):
        if os.path.exists(self.top):
            shutil.rmtree(self.top)
        for d in ("upper", "work", "xfer"):
            os.makedirs(os.path.join(self.top, d))
        self.holder = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--propagation", "private",
                                        "bash", "-c", _ENTER, "enter", self.base, self.top],
                                       stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.top, "enter.log"),
                                                                               "wb"))
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(self.top, "xfer", ".ready")):
            if self.holder.poll() is not None or time.monotonic() > deadline:
                with open(os.path.join(self.top, "enter.log")) as f:
                    raise RootError(f"the test root did not come up: {f.read()[-2000:]}")
            time.sleep(0.05)
        # unshare --fork: its only child is PID 1 of the new namespaces.
        with open(f"/proc/{self.holder.pid}/task/{self.holder.pid}/children") as f:
            [self.pid1] = [int(p) for p in f.read().split()]
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.holder is None:
            return
        # SIGKILL to PID 1 of the namespace kills every process in it (the
        # daemon, job processes); the mounts go with the last of them.
        if self.holder.poll() is None:
            try:
                os.kill(self.pid1, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.holder.wait(30)
        self.holder = None
        subprocess.run(["rm", "-rf", "--one-file-system", self.top], check=False)

    def host_path(self, path):
        """Host path of a file under /xfer inside."""
        assert path.startswith("/xfer/"), path
        return os.path.join(self.top, "xfer", path[len("/xfer/"):])

    def put(self, host_file, inside):
        dest = self.host_path(inside)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if os.path.isdir(host_file):
            shutil.copytree(host_file, dest, symlinks=True)
        else:
            shutil.copy2(host_file, dest)
        return inside

    def run(self, script, env=None, check=True, timeout=600, cwd="/"):
        """bash -c script inside the root, as root, with a clean environment
        (what an admin's root shell has).  Returns CompletedProcess."""
        full = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
        full.update(env or {})
        argv = ["nsenter", "-t", str(self.pid1), "--mount", "--pid", "--root", "--wd=/", "--",
                "/usr/bin/env", "-i", *[f"{k}={v}" for k, v in full.items()],
                "/bin/bash", "-c", f"cd {cwd} && {{\n{script}\n}}"]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise AssertionError(f"in the test root, exit {r.returncode}: {script}\n--- stdout\n{r.stdout[-4000:]}"
                                 f"\n--- stderr\n{r.stderr[-4000:]}")
        return r

    def exists(self, path):
        return self.run(f"test -e {path} || test -L {path}", check=False).returncode == 0

    def wait_for(self, script, timeout=60, what=None):
        deadline = time.monotonic() + timeout
        while self.run(script, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"in the test root, timed out waiting for {what or script}")
            time.sleep(0.2)
