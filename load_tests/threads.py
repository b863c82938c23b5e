"""Where the workers' threads spend their wall time, from the kernel's scheduler statistics (Linux only).

    python -m load_tests.threads [--seconds S] [--interval S] [--json PATH]

Run it beside a load test (``python -m load_tests ab ...``): every ``--interval`` seconds it reads
``/proc/PID/task/TID/schedstat`` and ``status`` of every thread of every worker process (``-m stream.cli worker``,
the engine's, and ``-m load_tests.variants NAME``, the variants') and prints, per busy thread, the share of the
interval it ran on a CPU, the share it was runnable but waited for one (another thread or process had the CPU), and
its voluntary (it blocked: the GIL, a socket, a lock) and involuntary (preempted) context switches per second. A
scoring loop that is on a CPU 85% of the time and waits for one 8% of the time is short of CPU, not of input; one
that blocks a thousand times a second waits, for the GIL or for input. At the end, the medians per thread over the
intervals in which its process's busiest thread ran more than half of the time (the slices when it had traffic, and a
worker's first second or two: its imports and model load).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson
import psutil

from load_tests.procs import COMMANDS, VARIANT_MODULE


@dataclass(slots=True)
class ThreadShare:
    pid: int
    tid: int
    name: str
    on_cpu: float  # share of the interval on a CPU
    waiting_for_cpu: float  # share of the interval runnable, on a run queue
    voluntary_per_s: float
    involuntary_per_s: float


def worker_pids() -> list[int]:
    """The processes whose arguments run a worker: ``-m stream.cli worker`` (``intentstream worker``'s module) or
    ``-m load_tests.variants NAME`` (an A/B's variant), matched argument by argument (an editor or a shell naming
    those files does not count)."""
    engine, variant = COMMANDS["engine"][1:], VARIANT_MODULE  # the load tests' own commands, less the interpreter
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info["cmdline"] or []
        for i in range(len(args)):
            if args[i : i + len(engine)] == engine or args[i : i + len(variant)] == variant:
                pids.append(proc.pid)
                break
    return pids


def read_thread(pid: int, tid: int) -> tuple[str, int, int, int, int] | None:
    """(name, ns on a CPU, ns on a run queue, voluntary switches, involuntary switches), or None once it is gone."""
    task = Path(f"/proc/{pid}/task/{tid}")
    try:
        name = (task / "comm").read_text().strip()
        run_ns, wait_ns, _slices = map(int, (task / "schedstat").read_text().split())
        status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
    except (OSError, ValueError):
        return None
    return name, run_ns, wait_ns, int(status["voluntary_ctxt_switches"]), int(status["nonvoluntary_ctxt_switches"])


def sample(seconds: float, interval: float) -> list[list[ThreadShare]]:
    """One list of busy threads (on a CPU 2% of the interval or more) per interval."""
    before: dict[tuple[int, int], tuple[float, tuple[str, int, int, int, int]]] = {}
    out: list[list[ThreadShare]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rows = []
        for pid in worker_pids():
            try:
                tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
            except OSError:
                continue
            for tid in tids:
                now = time.monotonic()  # each thread's own instant: the shares do not count a slow walk of the others
                got = read_thread(pid, tid)
                if got is None:
                    continue
                last = before.get((pid, tid))
                before[(pid, tid)] = (now, got)
                if last is None:
                    continue
                dt = now - last[0]
                share = ThreadShare(
                    pid,
                    tid,
                    "main" if tid == pid else got[0],  # Python's threads keep the process's name unless they set one
                    round((got[1] - last[1][1]) / 1e9 / dt, 3),
                    round((got[2] - last[1][2]) / 1e9 / dt, 3),
                    round((got[3] - last[1][3]) / dt, 1),
                    round((got[4] - last[1][4]) / dt, 1),
                )
                if share.on_cpu >= 0.02:
                    rows.append(share)
        if rows:
            out.append(rows)
            print(
                " | ".join(
                    f"{r.pid}/{r.name[:12]} cpu {r.on_cpu:.2f} runq {r.waiting_for_cpu:.2f} "
                    f"vol {r.voluntary_per_s:.0f}/s invol {r.involuntary_per_s:.0f}/s"
                    for r in sorted(rows, key=lambda r: -r.on_cpu)[:4]
                ),
                flush=True,
            )
        time.sleep(interval)
    return out


def medians(intervals: list[list[ThreadShare]]) -> list[dict[str, object]]:
    """Per thread, the medians over the intervals in which its process's busiest thread was on a CPU half the time."""
    by_thread: dict[tuple[int, int], list[ThreadShare]] = {}
    for rows in intervals:
        busy = {r.pid for r in rows if r.on_cpu > 0.5}
        for r in rows:
            if r.pid in busy:
                by_thread.setdefault((r.pid, r.tid), []).append(r)
    out = []
    for (pid, tid), rows in sorted(by_thread.items()):
        out.append(
            {
                "pid": pid,
                "tid": tid,
                "name": rows[0].name,
                "intervals": len(rows),
                **{
                    k: round(statistics.median(getattr(r, k) for r in rows), 3)
                    for k in ("on_cpu", "waiting_for_cpu", "voluntary_per_s", "involuntary_per_s")
                },
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.threads", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="how long to sample (default 300)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    parser.add_argument("--json", type=Path, help="also write every interval and the medians here")
    args = parser.parse_args(argv)
    if not Path("/proc/self/task").is_dir():
        print("load_tests.threads: needs Linux's /proc (schedstat)", file=sys.stderr)
        return 2
    intervals = sample(args.seconds, args.interval)
    summary = medians(intervals)
    for row in summary:
        print(
            f"median over {row['intervals']} busy intervals: {row['pid']}/{row['name']} on a CPU {row['on_cpu']}, "
            f"waiting for one {row['waiting_for_cpu']}, voluntary {row['voluntary_per_s']}/s, "
            f"involuntary {row['involuntary_per_s']}/s"
        )
    if args.json:
        doc = {"intervals": [[asdict(r) for r in rows] for rows in intervals], "medians": summary}
        args.json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
