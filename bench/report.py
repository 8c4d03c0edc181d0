"""The table printed at the end of a run, the goals, and the chart."""

from .common import fmt_spread


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def goals(res):
    """[(goal, measured, met or None when not measured in this run)]"""
    out = []
    sl = res.get("slurm")
    if sl:
        r = sl["ratios"]["per_job"]
        v = _get(r, "privtmpd_over_jc_overhead", "median")
        out.append(("per-job overhead of privtmpd <= 1/2 of job_container/tmpfs's",
                    f"{v:.2f}x" if v is not None else "-", v is not None and v <= 0.5))
        v = _get(r, "privtmpd_over_floor_total", "median")
        out.append(("per-job time of privtmpd within 10% of the empty-hook floor (b)",
                    f"{v:.3f}x" if v is not None else "-", v is not None and v <= 1.10))
        v = _get(r, "privtmpd_over_floor_overhead", "median")
        out.append(("  stricter reading: overhead over bare within 10% of the floor's overhead",
                    f"{v:.2f}x" if v is not None else "-", v is not None and v <= 1.10))
        v = _get(r, "privtmpd_over_exit_floor_overhead", "median")
        if v is not None:
            out.append(("  same, against empty hooks that also skip finalization (py-hooks-exit)",
                         f"{v:.2f}x", v <= 1.10))
    hk = res.get("hooks")
    if hk:
        for kind in ("prolog", "epilog"):
            v = hk["sequential"][kind]["median"]
            out.append((f"{kind.capitalize()} p50 <= 15 ms", f"{v:.1f} ms", v <= 15.0))
    td = res.get("teardown")
    if td:
        sizes = sorted(td, key=int)
        small, big = td[sizes[0]]["epilog_ms"]["median"], td[sizes[-1]]["epilog_ms"]["median"]
        if "epilog_over_empty_ms" in td[sizes[0]]:
            # Judged over an empty hook run just before: after a million
            # files every process starts slower, whatever it does.
            so, bo = (td[s]["epilog_over_empty_ms"]["median"] for s in (sizes[0], sizes[-1]))
            out.append((f"Epilog flat in job size ({sizes[0]} -> {sizes[-1]} files; over an empty hook)",
                        f"{small:.1f} -> {big:.1f} ms; over: {so:.1f} -> {bo:.1f}", bo <= so + 1.5))
        else:
            out.append((f"Epilog flat in job size ({sizes[0]} -> {sizes[-1]} files)",
                        f"{small:.1f} -> {big:.1f} ms", big <= max(small * 1.25, small + 2.0)))
        v = td[sizes[-1]]["worker_over_rm_rf"]["median"]
        out.append((f"space freed at unlink speed ({sizes[-1]} files, worker vs rm -rf)",
                    f"{v:.2f}x", v <= 1.10))
    sc = res.get("scale")
    if sc:
        n = sc["namespaces"]
        rss = sc["daemon_live"]["rss_kb"] / 1024
        full = n >= 1000
        out.append((f"daemon RSS < 40 MB with {n} live namespaces", f"{rss:.1f} MB",
                    rss < 40 if full else None))
        v = sc["last_over_first"]
        k = [x for x in sc["daemon_create_ms"] if x.startswith("first_")][0].split("_")[1]
        out.append((f"create time of job {n} within 2x of job 1 (median of last/first {k})",
                    f"{v:.2f}x", v <= 2.0 if full else None))
    return out


def table(res):
    lines = []
    add = lines.append
    sl = res.get("slurm")
    if sl:
        add(f"1. Per-job cost on Slurm (ms; median [p25-p75] over {len(sl['rounds'])} interleaved rounds)")
        add(f"   {'configuration':18s} {'srun true, per job':>20s} {'overhead':>18s} "
            f"{'batch alloc->1st line':>22s} {'submit->1st line':>20s} {'step in allocation':>20s}")
        order = sl.get("order") or list(sl["configs"])      # the JSON's keys come back sorted
        for name in order:
            s = sl["summary"][name]
            add(f"   {name:18s} {fmt_spread(s['per_job']):>20s} "
                f"{fmt_spread(s['per_job_overhead']):>18s} {fmt_spread(s['batch_start']):>22s} "
                f"{fmt_spread(s['batch_first_line']):>20s} {fmt_spread(s['step']):>20s}")
        add("   " + "; ".join(f"{k}: {sl['configs'][k]}" for k in order))
        for m in ("per_job", "batch_start", "step"):
            r = sl["ratios"][m]
            if m == "step":
                # No hook runs per step: every configuration's overhead over
                # bare is noise around 0, and ratios of those mean nothing.
                add(f"   step: privtmpd/floor total {fmt_spread(r['privtmpd_over_floor_total'], 3)} (Prolog and "
                    f"Epilog do not run per step; the entry helper does)")
                continue
            add(f"   {m}: privtmpd/jc-tmpfs overhead {fmt_spread(r['privtmpd_over_jc_overhead'], 2)}, "
                f"privtmpd/floor overhead {fmt_spread(r['privtmpd_over_floor_overhead'], 2)}, "
                f"privtmpd/floor total {fmt_spread(r['privtmpd_over_floor_total'], 3)}")
            if r.get("privtmpd_over_exit_floor_overhead", {}).get("n"):
                add(f"   {'':{len(m)}s}  privtmpd/py-hooks-exit overhead "
                    f"{fmt_spread(r['privtmpd_over_exit_floor_overhead'], 2)}")
        d = sl.get("daemon_in_slurm", {})
        if d.get("create", {}).get("n"):
            add(f"   daemon inside those jobs: create {fmt_spread(d['create'])} ms, destroy {fmt_spread(d['destroy'])} ms")
        add("")
    hk = res.get("hooks")
    if hk:
        s = hk["sequential"]
        add(f"2. Hooks, run as slurmd runs them ({s['prolog']['n']} sequential jobs; ms)")
        add(f"   {'':22s} {'p50':>7s} {'p99':>7s}")
        for k, label in (("prolog", "Prolog"), ("epilog", "Epilog"), ("empty-py", "empty python3 -IS"),
                         ("empty-py-exit", "  same, posix._exit"),
                         ("empty-sh", "empty /bin/sh"), ("daemon_create", "daemon: create"),
                         ("daemon_destroy", "daemon: destroy")):
            add(f"   {label:22s} {s[k]['median']:7.2f} {s[k]['p99']:7.2f}")
        add(f"   Prolog over the empty python hook: {fmt_spread(s['prolog_minus_floor'])}, "
            f"Epilog: {fmt_spread(s['epilog_minus_floor'])}")
        add(f"   {'jobs at once':>12s} {'Prolog p50/p99':>16s} {'Epilog p50/p99':>16s} "
            f"{'create p50/p99':>16s} {'destroy p50/p99':>16s}")
        for k, c in sorted(hk["concurrent"].items(), key=lambda kv: int(kv[0])):
            add(f"   {k:>12s} {c['prolog']['median']:7.1f}/{c['prolog']['p99']:<8.1f} "
                f"{c['epilog']['median']:7.1f}/{c['epilog']['p99']:<8.1f} "
                f"{c['daemon_create']['median']:7.2f}/{c['daemon_create']['p99']:<8.2f} "
                f"{c['daemon_destroy']['median']:7.2f}/{c['daemon_destroy']['p99']:<8.2f}")
        im = hk["imports"]
        cost = im["cost_over_bare_interpreter_ms"]
        add("   import cost over a bare `python3 -IS` (ms): " + ", ".join(
            f"{k} {cost[k]:+.2f}" for k in ("privtmpd.client", "_socket", "socket", "json", "json+socket")
            if k in cost))
        add("   modules the client adds: " + " ".join(im["modules_added"]))
        add("")
    td = res.get("teardown")
    if td:
        add("3. Teardown of big jobs (ms)")
        add(f"   {'files':>9s} {'1st proc':>9s} {'empty':>6s} {'Epilog':>7s} {'over':>5s} {'destroy':>8s} "
            f"{'space free':>11s} {'worker':>9s} {'rm -rf':>9s} {'worker/rm':>10s}")
        nan = {"median": float("nan")}
        for n, t in sorted(td.items(), key=lambda kv: int(kv[0])):
            first = t.get("first_process_ms", {}).get("median")
            add(f"   {int(n):>9d} {first if first is not None else float('nan'):9.1f} "
                f"{t.get('empty_ms', nan)['median']:6.1f} {t['epilog_ms']['median']:7.1f} "
                f"{t.get('epilog_over_empty_ms', nan)['median']:5.1f} {t['daemon_destroy_ms']['median']:8.2f} "
                f"{t['free_ms']['median']:11.0f} {t['worker_ms']['median']:9.0f} {t['rm_rf_ms']['median']:9.0f} "
                f"{t['worker_over_rm_rf']['median']:10.2f}")
        add("   1st proc: an empty python3 -IS hook started right after the job's files were written and")
        add("   synced (the first process then is slower whatever it does); empty: a second one, right before")
        add("   the Epilog; over: Epilog minus empty; destroy: in the daemon")
        add("")
    sc = res.get("scale")
    if sc:
        n = sc["namespaces"]
        k = [x for x in sc["daemon_create_ms"] if x.startswith("first_")][0]
        kl = k.replace("first_", "last_")
        add(f"4. Scale: {n} live job namespaces")
        add(f"   daemon RSS {sc['daemon_before']['rss_kb'] / 1024:.1f} MB -> {sc['daemon_live']['rss_kb'] / 1024:.1f} MB, "
            f"fds {sc['daemon_before']['fds']} -> {sc['daemon_live']['fds']}; mounts in the host "
            f"{sc['mounts_before']} -> {sc['mounts_live']}")
        dc = sc["daemon_create_ms"]
        add(f"   create (daemon ms): job 1 {dc['job_1']:.2f}, job {n} {dc[f'job_{n}']:.2f}; "
            f"median of {k.replace('_', ' ')} {dc[k]['median']:.2f}, {kl.replace('_', ' ')} {dc[kl]['median']:.2f}")
        dd = sc["daemon_destroy_ms"]
        if k in dd:
            add(f"   destroy (daemon ms): median of {k.replace('_', ' ')} (all {n} live) {dd[k]['median']:.2f}, "
                f"{kl.replace('_', ' ')} {dd[kl]['median']:.2f}")
        for where in ("shared", "private"):
            b, lv = sc["host_mount_before"][where], sc["host_mount_live"][where]
            add(f"   host mount+umount under a {where} mount: {b['mount_ms']['median'] + b['umount_ms']['median']:.3f} ms "
                f"-> {lv['mount_ms']['median'] + lv['umount_ms']['median']:.3f} ms with {n} namespaces")
        add("")
    en = res.get("entry")
    if en:
        c = en["callback_us"]
        add(f"5. Entry helper per task: {c['median']:.1f} us p50, {c['p99']:.1f} us p99 ({en['calls']} calls)")
        add("")
    g = goals(res)
    if g:
        add("Goals")
        for goal, value, met in g:
            mark = "n/a (not measured at full size)" if met is None else ("met" if met else "NOT met")
            add(f"   {goal:78s} {value:>16s}  {mark}")
    return "\n".join(lines)


def chart(res, path):
    """Per-job overhead over bare Slurm by configuration (+ step overhead)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sl = res["slurm"]
    names = [n for n in (sl.get("order") or sl["configs"]) if n != "bare"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.8))
    panels = (("per_job", "srun true: per-job time over bare Slurm"),
              ("batch_start", "sbatch: allocation -> first line, over bare"),
              ("step", "step inside an allocation, over bare"))
    colors = {"sh-hooks": "#9e9e9e", "py-hooks": "#616161", "py-hooks-exit": "#424242", "contain": "#90a4ae",
              "jc-tmpfs": "#e57373", "privtmpd": "#43a047", "privtmpd-noprolog": "#1b5e20"}
    for ax, (metric, title) in zip(axes, panels):
        med, lo, hi = [], [], []
        for n in names:
            s = sl["summary"][n][metric + "_overhead"]
            med.append(s["median"])
            lo.append(s["median"] - s["p25"])
            hi.append(s["p75"] - s["median"])
        bars = ax.bar(range(len(names)), med, yerr=[lo, hi], capsize=4,
                      color=[colors.get(n, "#777") for n in names])
        for b, v in zip(bars, med):
            ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, max(v, 0)), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=25, ha="right")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("ms (median and p25-p75 over rounds)")
        ax.axhline(0, color="black", linewidth=0.6)
    base = sl["summary"]["bare"]["per_job"]["median"]
    m = res.get("machine", {})
    fig.suptitle(f"privtmpd vs alternatives, one-node Slurm {m.get('slurm', '')}, {m.get('cpus', '?')} CPUs "
                 f"(bare Slurm: {base:.1f} ms per srun job; {len(sl['rounds'])} rounds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
