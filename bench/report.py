"""The throughput report: the main table, its targets and the bar chart (``docs/performance.png``).

Every figure comes from :class:`bench.runner.Run` objects; ``bench/cells.py`` has its own, narrower tables.
"""

from __future__ import annotations

import math
from pathlib import Path

from bench.runner import VARIANTS, Ceiling, Run, _partitions_used


def _fmt(x: float, nd: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:,.{nd}f}"


def _ratio(a: float, b: float) -> str:
    if not a or not b or math.isnan(a) or math.isnan(b):
        return "—"
    return f"{a / b:.1f}×"


def table(runs: list[Run], ceilings: dict[int, Ceiling], in_flight: int, messages: int) -> str:
    header = (
        f"{'lat':>5} {'keys':>6} {'variant':<10} {'msgs':>7} {'msg/s':>8} {'vs naive':>9} {'vs FS':>7} "
        f"{'CPU ms/msg':>10} {'RSS MiB':>8} {'p50 ms':>8} {'p99 ms':>8} {'@msg/s':>7} {'dup':>4} "
        f"{'ok':>3} {'load':>5} {'steal':>5}  notes"
    )
    lines = [header, "-" * len(header)]
    cells: dict[tuple[float, int], dict[str, Run]] = {}
    for r in runs:
        cells.setdefault((r.latency_ms, r.keys), {})[r.variant] = r
    for (lat, keys), by in cells.items():
        naive = by.get("naive")
        fs = by.get("faststream")
        for name in VARIANTS:
            r = by.get(name)
            if r is None:
                continue
            ok = (
                (r.capped or r.processed >= r.planned)
                and r.duplicates == 0
                and r.missing_side_effects == 0
                and r.unexpected_keys == 0
                and r.committed_to_end is not False
            )
            notes = list(r.notes)
            if r.planned < messages:
                notes.insert(0, f"slow: given {r.planned:,} of {messages:,} messages")
            lines.append(
                f"{_fmt(lat):>5} {keys:>6} {name:<10} {r.processed:>7,} {_fmt(r.msg_per_s):>8} "
                f"{_ratio(r.msg_per_s, naive.msg_per_s) if naive and r is not naive else '':>9} "
                f"{_ratio(r.msg_per_s, fs.msg_per_s) if fs and r is not fs else '':>7} "
                f"{_fmt(r.cpu_ms_per_msg, 2):>10} {_fmt(r.peak_rss_mib):>8} {_fmt(r.p50_ms):>8} "
                f"{_fmt(r.p99_ms):>8} {_fmt(r.latency_rate):>7} {r.duplicates:>4} {'yes' if ok else 'NO':>3} "
                f"{_fmt(r.cpu_split.get('other_cores', float('nan')), 1):>5} "
                f"{_fmt(r.cpu_split.get('steal_cores', float('nan')), 2):>5}  " + "; ".join(notes)
            )
        ceiling = ceilings.get(keys)
        bound = min(in_flight, keys) / (lat / 1000.0)
        partitions = next(iter(by.values())).partitions
        seq_bound = _partitions_used(keys, partitions) / (lat / 1000.0)
        lines.append(
            f"{'':>5} {'':>6} {'ceilings':<10} raw aiokafka {_fmt(ceiling.raw_msg_per_s) if ceiling else '—'}"
            f" msg/s; in-flight/latency {in_flight}/{_fmt(lat)} ms = {_fmt(in_flight / (lat / 1000.0))} msg/s"
            f" (these keys allow {_fmt(bound)}; one-at-a-time per partition {_fmt(seq_bound)})"
        )
    return "\n".join(lines)


def render(
    runs: list[Run],
    ceilings: dict[int, Ceiling],
    in_flight: int,
    messages: int,
    goals: list[tuple[str, bool, str]],
    elapsed: float,
) -> str:
    return "\n".join(
        [
            table(runs, ceilings, in_flight, messages),
            "",
            *(f"  [{'met' if ok else 'MISSED'}] {name}: {detail}" for name, ok, detail in goals),
            "",
            f"{len(runs)} runs in {elapsed / 60:.1f} min; load = CPU cores used by other processes on the "
            "machine during the run (not the variant, its sandbox or the broker); steal = cores the "
            "hypervisor took from this VM meanwhile",
        ]
    )


def targets(runs: list[Run]) -> list[tuple[str, bool, str]]:
    by = {(r.latency_ms, r.keys, r.variant): r for r in runs}
    d = by.get((20.0, 10000, "daemon"))
    n = by.get((20.0, 10000, "naive"))
    f = by.get((20.0, 10000, "faststream"))
    out: list[tuple[str, bool, str]] = []
    if d is None:
        return out
    out.append(
        (
            "≥ 1,000 msg/s (20 ms, 8 partitions, 10,000 keys)",
            d.msg_per_s >= 1000,
            f"{d.msg_per_s:,.0f} msg/s ({d.msg_per_s / 1000 - 1:+.0%})",
        )
    )
    if n is not None and n.msg_per_s > 0:
        ratio = d.msg_per_s / n.msg_per_s
        out.append(("≥ 10× naive", ratio >= 10, f"{ratio:.1f}×"))
    if f is not None and f.msg_per_s > 0:  # 0: the variant failed (its row says why)
        ratio = d.msg_per_s / f.msg_per_s
        out.append(("≥ 2× FastStream", ratio >= 2, f"{ratio:.1f}×"))
    out.append(("daemon CPU ≤ 1 ms/message", d.cpu_ms_per_msg <= 1.0, f"{d.cpu_ms_per_msg:.2f} ms/msg"))
    out.append(("peak RSS ≤ 150 MiB", d.peak_rss_mib <= 150, f"{d.peak_rss_mib:.0f} MiB"))
    dups = sum(max(r.duplicates, 0) for r in runs)
    bad = [r for r in runs if r.duplicates != 0 or r.missing_side_effects != 0 or r.unexpected_keys != 0]
    out.append(("0 duplicate side effects (every run)", not bad, f"{dups} duplicates in {len(runs)} runs"))
    return out


def plot(runs: list[Run], ceilings: dict[int, Ceiling], in_flight: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latencies = sorted({r.latency_ms for r in runs})
    keys_all = sorted({r.keys for r in runs})
    colors = {"daemon": "#1f77b4", "naive": "#d62728", "faststream": "#ff7f0e"}
    fig, axes = plt.subplots(
        1, len(latencies), figsize=(5.5 * len(latencies), 4.6), sharey=True, squeeze=False
    )
    width = 0.26
    for ax, lat in zip(axes[0], latencies, strict=True):
        for i, name in enumerate(VARIANTS):
            xs, ys = [], []
            for j, k in enumerate(keys_all):
                r = next((r for r in runs if r.latency_ms == lat and r.keys == k and r.variant == name), None)
                if r is not None and r.msg_per_s > 0:
                    xs.append(j + (i - 1) * width)
                    ys.append(r.msg_per_s)
            bars = ax.bar(xs, ys, width, label=name, color=colors[name])
            ax.bar_label(bars, labels=[f"{y:,.0f}" for y in ys], fontsize=7, padding=1)
        for j, k in enumerate(keys_all):
            bound = min(in_flight, k) / (lat / 1000.0)
            ax.hlines(
                bound,
                j - 1.5 * width,
                j + 1.5 * width,
                colors="gray",
                linestyles="dashed",
                label="min(in-flight, keys) ÷ latency" if j == 0 else None,
            )
            c = ceilings.get(k)
            if c is not None:
                # Off the scale of the real variants (10^5): written, not drawn.
                ax.annotate(
                    f"raw aiokafka\n{c.raw_msg_per_s / 1000:,.0f}k msg/s",
                    (j, 1.0),
                    xycoords=("data", "axes fraction"),
                    xytext=(0, -4),
                    textcoords="offset points",
                    ha="center",
                    va="top",
                    fontsize=7,
                    color="dimgray",
                )
        ax.set_yscale("log")
        ax.set_xticks(range(len(keys_all)), [f"{k:,} key{'s' if k > 1 else ''}" for k in keys_all])
        ax.set_title(f"provider latency {lat:g} ms, {runs[0].partitions} partitions")
        ax.grid(axis="y", which="both", alpha=0.3)
    shown = [r.msg_per_s for r in runs if r.msg_per_s > 0]
    bounds = [min(in_flight, r.keys) / (r.latency_ms / 1000.0) for r in runs]
    if shown:
        axes[0][0].set_ylim(min(shown) / 2, max(bounds + shown) * 8)
    axes[0][0].set_ylabel("verified messages / s (log)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"Exactly-once throughput: daemon (in-flight {in_flight}) vs naive vs FastStream")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
