"""Outputs of a load-test run: report.json, summary.md and PNG plots (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson


def write_outputs(report: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "report.json"]
    files[0].write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    try:
        files += plots(report, out)
    except Exception as exc:  # a plot must never cost the figures
        print(f"load test: plots failed: {exc!r}")
    md = out / "summary.md"
    md.write_text(markdown(report))
    files.append(md)
    return files


def _fmt(x: Any, digits: int = 0) -> str:
    if x is None:
        return "-"
    if isinstance(x, float | int):
        return f"{x:,.{digits}f}"
    return str(x)


def markdown(r: dict[str, Any]) -> str:
    m = r.get("machine", {})
    cfg = r.get("config", {})
    lines = [
        f"# Load test {r.get('tag', '')} ({r.get('started_at', '')})",
        "",
        f"Machine: {m.get('cpus')} CPUs ({m.get('cpu_model')}), {m.get('memory_gb')} GB; load average "
        f"{m.get('load_avg_start')} at the start, {m.get('load_avg_end')} at the end. Python {m.get('python')}, "
        f"torch {m.get('torch')}, CUDA: {m.get('cuda') or 'none'}.",
        f"Model: {r.get('model', {}).get('name')} {r.get('model', {}).get('version')} "
        f"({r.get('model', {}).get('arch')}). Workers per system: {cfg.get('workers')}; partitions "
        f"{cfg.get('partitions')}; batch {cfg.get('batch_max_events')} events / {cfg.get('batch_max_ms')} ms, "
        f"up to {cfg.get('batch_backlog_events', cfg.get('batch_max_events'))} from a backlog; "
        f"emit policy every_event.",
        f"Traffic: simulator users, population {_fmt(cfg.get('users'))}; distinct users sent to the engine in the "
        f"steps: {_fmt(r.get('distinct_users'))}.",
        "",
    ]
    if r.get("interrupted"):
        lines += ["**Interrupted: partial figures.**", ""]
    cap = r.get("capacity", {})
    if cap:
        lines += [
            "## Capacity, side by side (same backlog, same broker, one after the other)",
            "",
            "| system | events/s | window s | CPU % (procs) | broker CPU % | RSS MB max | load1 |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, c in cap.items():
            runs = c.get("eps_runs") or []
            turns = f" (turns: {', '.join(_fmt(x) for x in runs)})" if len(runs) > 1 else ""
            lines.append(
                f"| {name} | {_fmt(c.get('eps'))}{turns} | {_fmt(c.get('window_s'), 1)} | {_fmt(c.get('cpu_pct_mean'))} | "
                f"{_fmt(c.get('broker_cpu_pct_mean'))} | {_fmt(c.get('rss_mb_max'))} | {_fmt(c.get('load1_mean'), 1)} |"
            )
        lines.append("")
        eng = cap.get("engine", {}).get("engine")
        if eng:
            lines += [
                f"Engine at its maximum: mean batch {_fmt(eng.get('batch_size_mean'), 1)} events, model "
                f"{_fmt(eng.get('model_ms_per_batch'), 2)} ms per batch ({_fmt(eng.get('model_us_per_event'), 1)} us "
                f"per event), model time {_fmt(100 * (eng.get('model_fraction') or 0), 1)}% of the wall time.",
                "",
            ]
        lines += [
            f"engine_vs_ceiling = **{_fmt(r.get('engine_vs_ceiling'), 3)}**, engine_vs_naive = "
            f"**{_fmt(r.get('engine_vs_naive'), 2)}**.",
            "",
        ]
    steps = r.get("steps", [])
    if steps:
        lines += [
            "## Rate steps (engine)",
            "",
            "| step | offered/s | scored/s | sustained | lag end | lag max | p50 ms | p95 ms | p99 ms | max ms | "
            "batch | model ms/batch | CPU % | RSS MB start → end (growth) |",
            "|---|---:|---:|:-:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for s in steps:
            lat, eng, rss = s.get("latency_ms", {}), s.get("engine", {}), s.get("rss_mb", {})
            lines.append(
                f"| {s['requested']} | {_fmt(s['offered_eps'])} | {_fmt(s['achieved_eps'])} | "
                f"{'yes' if s['sustained'] else 'no'} | {_fmt(s['lag_end'])} | {_fmt(s['lag_max'])} | "
                f"{_fmt(lat.get('p50'), 1)} | {_fmt(lat.get('p95'), 1)} | {_fmt(lat.get('p99'), 1)} | "
                f"{_fmt(lat.get('max'))} | {_fmt(eng.get('batch_size_mean'), 1)} | "
                f"{_fmt(eng.get('model_ms_per_batch'), 2)} | {_fmt(s.get('cpu_pct_mean'))} | "
                f"{_fmt(rss.get('start'))} → {_fmt(rss.get('end'))} ({_fmt(rss.get('growth_pct'), 1)}%) |"
            )
        lines.append("")
        lines.append(f"Maximum sustainable rate: {_fmt(r.get('max_sustainable_eps'))} events/s.")
        half = r.get("latency_at_50pct") or {}
        lines.append(
            f"Latency at 50% of the maximum ({half.get('requested')}, {_fmt(half.get('offered_eps'))}/s): "
            f"p50 {_fmt(half.get('p50'), 1)} ms, p95 {_fmt(half.get('p95'), 1)} ms, p99 {_fmt(half.get('p99'), 1)} ms, "
            f"max {_fmt(half.get('max'))} ms."
        )
        lines.append("")
    for variant, group in r.get("compare_steps", {}).items():
        lines += [
            f"### The same steps with `{variant}` (load_tests/variants.py), after the engine's",
            "",
            "| step | offered/s | scored/s | sustained | lag max | p50 ms | p99 ms | max ms | engine p99 ms | CPU % |",
            "|---|---:|---:|:-:|---:|---:|---:|---:|---:|---:|",
        ]
        base = {s["requested"]: s for s in steps}
        for s in group["steps"]:
            lat = s.get("latency_ms", {})
            ref = base.get(s["requested"], {}).get("latency_ms", {})
            lines.append(
                f"| {s['requested']} | {_fmt(s['offered_eps'])} | {_fmt(s['achieved_eps'])} | "
                f"{'yes' if s['sustained'] else 'no'} | {_fmt(s['lag_max'])} | {_fmt(lat.get('p50'), 1)} | "
                f"{_fmt(lat.get('p99'), 1)} | {_fmt(lat.get('max'))} | {_fmt(ref.get('p99'), 1)} | "
                f"{_fmt(s.get('cpu_pct_mean'))} |"
            )
        lines.append("")
    if r.get("runtimes"):
        lines += [
            "## Scoring runtimes (INTENTSTREAM_RUNTIME), side by side",
            "",
            "Capacity of each on the same backlog (in turns with --repeat); then the same rate steps for each, set "
            "from the first one's capacity.",
            "",
            "| runtime | capacity/s | RSS MB max (capacity) | at 50%: offered/s | p50 ms | p99 ms | RSS MB max (steps) | "
            "all scored |",
            "|---|---:|---:|---:|---:|---:|---:|:-:|",
        ]
        for rt, x in r["runtimes"].items():
            lines.append(
                f"| {rt} | {_fmt(x['capacity_eps'])} | {_fmt(x['capacity_rss_mb_max'])} | "
                f"{_fmt(x['offered_eps_at_50pct'])} | {_fmt(x['p50_ms_at_50pct'], 1)} | {_fmt(x['p99_ms_at_50pct'], 1)} | "
                f"{_fmt(x['steps_rss_mb_max'])} | {'yes' if x['complete'] else 'no'} |"
            )
        lines.append("")
    acc = r.get("accounting")
    if acc:
        lines += [
            f"Accounting: sent {_fmt(acc['sent'])} (malformed {_fmt(acc['bad_sent'])}), consumed "
            f"{_fmt(acc['consumed'])}, scored {_fmt(acc['scored'])}, DLQ {_fmt(acc['dlq'])}: "
            f"{'complete' if acc['complete'] else '**INCOMPLETE**'}. State on disk at the end: "
            f"{_fmt(r.get('state_mb'))} MB.",
            "",
        ]
    tg = r.get("targets", {})
    if tg:
        lines += ["## Targets", "", "| target | wanted | reached | met |", "|---|---|---:|:-:|"]
        for k, v in tg.items():
            met = "-" if v["met"] is None else "yes" if v["met"] else "no"
            lines.append(f"| {k} | {v['target']} | {v['reached']} | {met} |")
        lines.append("")
    lines += ["Plots: throughput_lag.png, latency.png, resources.png, capacity.png.", ""]
    return "\n".join(lines)


def plots(r: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[Path] = []
    samples = r.get("samples", [])
    steps = r.get("steps", [])
    run_samples = [s for s in samples if s["phase"].startswith(("step:", "drain:", "preload"))]
    if run_samples:
        t0 = run_samples[0]["t"]
        t = [s["t"] - t0 for s in run_samples]
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
        ax1.plot(t, [s["in_eps"] for s in run_samples], label="produced/s", lw=1, color="tab:gray")
        ax1.plot(t, [s["out_eps"] for s in run_samples], label="scored/s (outputs)", lw=1.3, color="tab:blue")
        ax1.set_ylabel("events/s")
        ax1.legend(loc="upper left")
        ax1.grid(alpha=0.3)
        ax2.plot(t, [s["lag"] for s in run_samples], label="lag (produced - outputs)", color="tab:red", lw=1.3)
        ax2.plot(t, [s["committed_lag"] for s in run_samples], label="committed-offset lag", color="tab:orange", lw=1)
        ax2.set_ylabel("records")
        ax2.set_xlabel("seconds since the first step")
        ax2.legend(loc="upper left")
        ax2.grid(alpha=0.3)
        for s in steps:
            for ax in (ax1, ax2):
                ax.axvspan(s["t_start"] - t0, s["t_end"] - t0, alpha=0.07, color="tab:green")
            ax1.text(s["t_start"] - t0, ax1.get_ylim()[1] * 0.92, f" {s['requested']}", fontsize=8)
        fig.suptitle("Engine: throughput and consumer lag over the rate steps")
        fig.tight_layout()
        files.append(out / "throughput_lag.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
        n = len(run_samples[0]["cpu_pct"])
        for i in range(n):
            ax1.plot(
                t, [s["cpu_pct"][i] if i < len(s["cpu_pct"]) else None for s in run_samples], lw=1, label=f"worker {i}"
            )
            ax2.plot(
                t, [s["rss_mb"][i] if i < len(s["rss_mb"]) else None for s in run_samples], lw=1.3, label=f"worker {i}"
            )
        ax1.plot(t, [s["broker_cpu_pct"] for s in run_samples], lw=1, color="tab:gray", label="broker")
        ax1.set_ylabel("CPU % of one core")
        ax1.legend(loc="upper left", fontsize=8)
        ax1.grid(alpha=0.3)
        ax2.set_ylabel("resident MB")
        ax2.set_xlabel("seconds since the first step")
        ax2.set_ylim(bottom=0)
        ax2.grid(alpha=0.3)
        for s in steps:
            for ax in (ax1, ax2):
                ax.axvspan(s["t_start"] - t0, s["t_end"] - t0, alpha=0.07, color="tab:green")
        fig.suptitle("Engine workers: CPU and resident memory")
        fig.tight_layout()
        files.append(out / "resources.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

    with_lat = [s for s in steps if s.get("latency_ms", {}).get("n")]
    if with_lat:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        x = [s["offered_eps"] for s in with_lat]
        for key, style in (("p50", "o-"), ("p95", "s-"), ("p99", "^-"), ("max", "x--")):
            ax1.plot(x, [s["latency_ms"][key] for s in with_lat], style, label=key)
        ax1.axhline(100, color="tab:red", lw=0.8, ls=":", label="p99 target 100 ms")
        ax1.set_yscale("log")
        ax1.set_xlabel("offered events/s")
        ax1.set_ylabel("end-to-end latency, ms")
        ax1.legend(fontsize=8)
        ax1.grid(alpha=0.3, which="both")
        ax1.set_title("Latency percentiles by rate")
        tl = r.get("latency_timeline", [])
        if tl:
            t0 = tl[0]["t"]
            ax2.plot([p["t"] - t0 for p in tl], [p["p50"] for p in tl], lw=1, label="p50 per second")
            ax2.plot([p["t"] - t0 for p in tl], [p["p99"] for p in tl], lw=1, label="p99 per second")
            ax2.set_yscale("log")
            ax2.set_xlabel("seconds (input time)")
            ax2.legend(fontsize=8)
            ax2.grid(alpha=0.3, which="both")
            ax2.set_title("Latency over time")
        fig.tight_layout()
        files.append(out / "latency.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

    cap = r.get("capacity", {})
    if cap:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = list(cap)
        ax.barh(names, [cap[n]["eps"] for n in names], color="tab:blue")
        for i, n in enumerate(names):
            ax.text(cap[n]["eps"], i, f" {cap[n]['eps']:,.0f}/s", va="center", fontsize=9)
        ax.set_xscale("log")
        ax.set_xlabel("events/s (log)")
        ax.set_title(f"Capacity, side by side (load avg {r.get('machine', {}).get('load_avg_start', ['?'])[0]})")
        fig.tight_layout()
        files.append(out / "capacity.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files
