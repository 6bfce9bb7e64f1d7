"""The pipeline benchmark's report: a Markdown page with matplotlib plots, and the terminal summary.

    python -m bench._report [--out .wtc/bench]   # write it again from the saved results
    python -m bench._report --docs               # ... and publish it as docs/benchmarks.md

Every goal of the issue is printed next to its figure with `met` or `not met`; the figure's
baseline comes from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.settings import PROJECT_ROOT


@dataclass(frozen=True)
class Goal:
    name: str
    unit: str
    bound: float
    at_most: bool  # True: the figure must be <= bound
    figure: Callable[[dict], float | None]

    def verdict(self, value: float | None) -> str:
        if value is None:
            return "not measured"
        ok = value <= self.bound if self.at_most else value >= self.bound
        return "met" if ok else "not met"


def _stage(result: dict, name: str) -> dict | None:
    return next((s for s in result.get("stages", []) if s["name"] == name), None)


def _rate(result: dict, name: str) -> float | None:
    stage = _stage(result, name)
    return stage["rate"] if stage else None


def _seconds(result: dict, name: str) -> float | None:
    stage = _stage(result, name)
    if stage is None and name == "dbt build (first)":
        # the first build in two parts, one after the other (bench/pipeline.py)
        return result.get("first_build_seconds")
    return stage["seconds"] if stage else None


def loader_vs_copy(result: dict) -> float | None:
    copy = result.get("baselines", {}).get("landing", {}).get("psql_copy_2")
    rate = _rate(result, "CDR loader")
    return rate / copy if rate and copy else None


GOALS = [
    Goal(
        "end to end (files, ticks, CRM -> marts tested, API answers)",
        "s",
        120,
        True,
        lambda r: r.get("e2e_seconds"),
    ),
    Goal("no-op dbt build / first dbt build", "", 0.10, True, lambda r: r.get("noop_over_first")),
    Goal(
        "CDR loader / psql \\copy at equal parallelism (2 sessions)",
        "",
        0.70,
        False,
        loader_vs_copy,
    ),
    Goal("tick sink", "ticks/s", 100_000, False, lambda r: _rate(r, "tick sink")),
    Goal(
        "HVS consumer alone, one process",
        "events/s",
        80_000,
        False,
        lambda r: r.get("baselines", {}).get("hvs_alone", {}).get("events_per_s"),
    ),
    Goal(
        "landing to applied in the HVS (API can answer), p99 bound",
        "s",
        5,
        True,
        lambda r: r.get("landing_to_applied", {}).get("p99_le_s"),
    ),
    Goal(
        "Redis bytes per subscriber-day (whole HVS database)",
        "B",
        400,
        True,
        lambda r: r.get("redis", {}).get("all_hvs_bytes"),
    ),
]
SCALE_GOAL = "one-hour dbt build at 10x / at 1x"


def hour_ratio(results: dict) -> float | None:
    if "starter" in results and "10x" in results:
        small = _seconds(results["starter"], "dbt build (one hour)")
        large = _seconds(results["10x"], "dbt build (one hour)")
        return large / small if small and large else None
    return None


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def goal_rows(results: dict) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for scale, result in results.items():
        for goal in GOALS:
            value = goal.figure(result)
            bound = ("<= " if goal.at_most else ">= ") + _fmt(goal.bound, goal.unit)
            rows.append((scale, goal.name, _fmt(value, goal.unit), bound, goal.verdict(value)))
    ratio = hour_ratio(results)
    rows.append(
        (
            "10x/1x",
            SCALE_GOAL,
            _fmt(ratio),
            "<= 1.50",
            Goal("", "", 1.5, True, lambda r: None).verdict(ratio),
        )
    )
    return rows


def summary(results: dict) -> str:
    lines = []
    for scale, result in results.items():
        lines.append(
            f"== {scale}: end to end {_fmt(result.get('e2e_seconds'), 's')}"
            f" (load average {result['load_before'][0]:.1f} before,"
            f" {result['load_after'][0]:.1f} after, {os.cpu_count()} cores)"
        )
        for s in result["stages"]:
            rate = f"{s['rate']:>12,.0f} {s['unit']}/s" if s["rate"] else " " * 19
            rss = f"peak RSS {s['peak_rss_mb']:6.0f} MB" if s["peak_rss_mb"] else ""
            lines.append(
                f"  {s['phase']:11} {s['name']:40} {s['started']:7.1f} -> "
                f"{(s['ended'] or s['started']):7.1f} {s['seconds']:7.1f} s {rate}  {rss}"
            )
        mem = result.get("memory_peak", {})
        lines.append(
            f"  Postgres peak PSS {_fmt(mem.get('postgres_pss_mb'), 'MB')}, Redis peak"
            f" used_memory {_fmt(mem.get('redis_used_mb'), 'MB')}"
            f" (RSS {_fmt(mem.get('redis_rss_mb'), 'MB')})"
        )
    lines.append("goals (each against its baseline of the same run):")
    for scale, name, value, bound, verdict in goal_rows(results):
        lines.append(f"  {scale:8} {name:62} {value:>16} {bound:>18}  {verdict}")
    return "\n".join(lines)


# -- plots ---------------------------------------------------------------------------------------


def _plots(out: Path, results: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    colors = {
        "e2e": "#4c72b0",
        "incremental": "#dd8452",
        "baseline": "#8c8c8c",
        "sources": "#55a868",
    }
    for scale, result in results.items():
        stages = [s for s in result["stages"] if s["phase"] not in ("sources", "service")]
        fig, ax = plt.subplots(figsize=(9, 0.32 * len(stages) + 1.2))
        t0 = result.get("e2e_started", 0.0)
        for i, s in enumerate(stages):
            ax.barh(i, s["seconds"], left=s["started"] - t0, color=colors.get(s["phase"], "k"))
        if result.get("e2e_seconds"):
            ax.axvline(result["e2e_seconds"], color="k", lw=0.8, ls="--")
            ax.text(
                result["e2e_seconds"],
                -0.9,
                f" end to end {result['e2e_seconds']:.0f} s",
                fontsize=8,
            )
        ax.set_yticks(range(len(stages)), [s["name"] for s in stages], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds from the start of the end-to-end run")
        ax.set_title(f"Timeline, {scale} (blue: end to end; orange: after; grey: baselines)")
        fig.tight_layout()
        name = f"timeline-{scale}.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        files[f"timeline-{scale}"] = name

    # cost against scale: full and incremental work at each scale
    kinds = [
        ("CDR loader", "CDR loader"),
        ("tick sink", "tick sink"),
        ("CRM CDC", "CRM CDC"),
        ("dbt build (first)", "first build"),
        ("dbt build --full-refresh", "full refresh"),
        ("dbt build (one hour)", "one-hour build"),
        ("dbt build (no-op)", "no-op build"),
    ]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(results), 1)
    for j, (scale, result) in enumerate(results.items()):
        values = [(_seconds(result, k) or 0) for k, _ in kinds]
        ax.bar([i + j * width for i in range(len(kinds))], values, width, label=scale)
    ax.set_xticks(
        [i + width * (len(results) - 1) / 2 for i in range(len(kinds))],
        [label for _, label in kinds],
        rotation=20,
        fontsize=8,
    )
    ax.set_yscale("log")
    ax.set_ylabel("seconds (log)")
    ax.set_title("Cost against scale: full work grows with the data, incremental should not")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "cost-vs-scale.png", dpi=90)
    plt.close(fig)
    files["cost"] = "cost-vs-scale.png"

    # throughput of each stage against its baseline (the last scale run)
    scale, result = list(results.items())[-1]
    b = result.get("baselines", {})
    land, rb, hv, api = (
        b.get("landing", {}),
        b.get("redis_benchmark", {}),
        b.get("hvs_alone", {}),
        b.get("api", {}),
    )
    groups = [
        (
            "CDR landing, rows/s",
            [
                ("CDR loader", _rate(result, "CDR loader")),
                ("psql \\copy, 1 session", land.get("psql_copy_1")),
                ("psql \\copy, 2 sessions", land.get("psql_copy_2")),
                ("pandas read_csv+to_sql", land.get("pandas")),
            ],
        ),
        (
            "HVS, events/s vs HINCRBY/s",
            [
                (
                    "HVS during e2e",
                    (result.get("hvs_e2e", {}).get("events") or 0)
                    / max(result.get("hvs_e2e", {}).get("done_at") or 1, 1e-9),
                ),
                ("HVS alone", hv.get("events_per_s")),
                ("redis-benchmark, 1 round trip", rb.get("one_round_trip")),
                ("redis-benchmark, pipelined 64", rb.get("pipelined_64")),
            ],
        ),
        (
            "API, requests/s",
            [("usage API", api.get("api_rps")), ("bare Redis endpoint", api.get("bare_rps"))],
        ),
        ("ticks/s", [("tick sink", _rate(result, "tick sink")), ("goal", 100_000.0)]),
    ]
    fig, axes = plt.subplots(1, len(groups), figsize=(13, 3.6))
    for ax, (title, bars) in zip(axes, groups, strict=True):
        labels = [label for label, _ in bars]
        values = [v or 0 for _, v in bars]
        ax.barh(range(len(bars)), values, color=["#4c72b0"] + ["#8c8c8c"] * (len(bars) - 1))
        ax.set_yticks(range(len(bars)), labels, fontsize=8)
        ax.invert_yaxis()
        if any(values):
            ax.set_xscale("log")
        ax.set_title(title, fontsize=9)
        for i, v in enumerate(values):
            if v:
                ax.text(v, i, f" {v:,.0f}", va="center", fontsize=7)
    fig.suptitle(f"Throughput against baselines of the same run ({scale}; blue: ours)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=90)
    plt.close(fig)
    files["throughput"] = "throughput.png"
    return files


# -- the Markdown ----------------------------------------------------------------------------------


def git_commit() -> str:
    """The checkout's commit (short hash), "?" outside a git checkout."""
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=PROJECT_ROOT,
                capture_output=True,
                text=True,
            ).stdout.strip()
            or "?"
        )
    except OSError:
        return "?"


def _machine(results: dict) -> str:
    """The machine, and the commit the run was taken on (saved with it; a run saved before
    that was recorded reads the checkout's)."""
    commits = sorted({r.get("commit") or git_commit() for r in results.values()}) or [git_commit()]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.system()} {platform.release()}, {os.cpu_count()} cores, {mem:.0f} GiB,"
        f" Python {platform.python_version()}; commit {', '.join(commits)}"
    )


def markdown(results: dict, images: dict[str, str], image_dir: str) -> str:
    md = [
        "# Benchmarks: the whole pipeline at 1x and 10x",
        "",
        f"Machine: {_machine(results)}.",
        "",
    ]
    for scale, result in results.items():
        src = result.get("sources", {})
        md.append(
            f"- **{scale}**: {src.get('cdr_rows', 0):,} CDR rows in {src.get('cdr_files', 0):,}"
            f" files, {src.get('ticks', 0):,} ticks, {src.get('crm_changes', 0):,} CRM changes;"
            f" load average {result['load_before'][0]:.1f} before, {result['load_after'][0]:.1f}"
            " after the run."
        )
    md += [
        "",
        "## Goals",
        "",
        "| scale | goal | measured | bound | verdict |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    md += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in goal_rows(results)]
    for scale, result in results.items():
        md += [
            "",
            f"## Stages at {scale}",
            "",
            "| phase | stage | start s | end s | seconds | throughput | peak RSS MB |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in result["stages"]:
            rate = f"{s['rate']:,.0f} {s['unit']}/s" if s["rate"] else ""
            rss = f"{s['peak_rss_mb']:.0f}" if s["peak_rss_mb"] else ""
            md.append(
                f"| {s['phase']} | {s['name']} | {s['started']:.1f} |"
                f" {(s['ended'] or s['started']):.1f} | {s['seconds']:.1f} | {rate} | {rss} |"
            )
        mem, redis_ = result.get("memory_peak", {}), result.get("redis", {})
        b = result.get("baselines", {})
        md += [
            "",
            f"Memory: Postgres peak PSS {_fmt(mem.get('postgres_pss_mb'), 'MB')} (all its"
            f" processes, shared buffers once), Redis peak used_memory"
            f" {_fmt(mem.get('redis_used_mb'), 'MB')} (RSS {_fmt(mem.get('redis_rss_mb'), 'MB')};"
            " the streams and the HVS share one Redis). HVS database:"
            f" {redis_.get('subscriber_days', 0):,} subscriber-days,"
            f" {_fmt(redis_.get('usage_hash_bytes'), 'B')} per usage hash,"
            f" {_fmt(redis_.get('all_hvs_bytes'), 'B')} per subscriber-day with every other HVS key"
            " (applied-event bitmaps, rates) counted in.",
        ]
        if b:
            rb, api = b.get("redis_benchmark", {}), b.get("api", {})
            md += [
                "",
                f"Baselines: redis-benchmark HINCRBY on one connection"
                f" {_fmt(rb.get('one_round_trip'), 'ops/s')} one round trip at a time,"
                f" {_fmt(rb.get('pipelined_64'), 'ops/s')} pipelined by 64; usage API"
                f" {_fmt(api.get('api_rps'), 'req/s')} against a bare Redis endpoint"
                f" {_fmt(api.get('bare_rps'), 'req/s')} (ratio {_fmt(api.get('ratio'))}).",
            ]
    for scale, result in results.items():
        md += _profile_md(scale, result.get("profile", {}))
    md += ["", "## Plots", ""]
    for key, name in images.items():
        md.append(f"![{key}]({image_dir}/{name})")
        md.append("")
    return "\n".join(md) + "\n"


def _profile_md(scale: str, profile: dict) -> list[str]:
    sql, python = profile.get("sql", {}), profile.get("python", {})
    if not (sql or python):
        return []
    md = ["", f"## Profiles at {scale} (--profile)"]
    for name, summary in python.items():
        md += ["", f"py-spy, {name} ({summary['samples']} samples): own time by function", ""]
        md += [f"- {share:.0%} `{frame}`" for frame, share in summary["own"][:8]]
    for name, statements in sql.items():
        if not statements:
            continue
        md += [
            "",
            f"pg_stat_statements, {name}: the statements that took the most time",
            "",
            "| share | ms | calls | rows | temp blocks | statement |",
            "| ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for st in statements[:6]:
            query = st["query"][:140].replace("|", "\\|")
            md.append(
                f"| {st['share'] or 0:.0%} | {st['ms']:,.0f} | {st['calls']} | {st['rows']} |"
                f" {st['temp_blocks_written']} | `{query}` |"
            )
    return md


def write(out: Path, results: dict, image_dir: str = "img") -> Path:
    images_path = out / image_dir
    images_path.mkdir(parents=True, exist_ok=True)
    images = _plots(images_path, results)
    path = out / "report.md"
    path.write_text(markdown(results, images, image_dir))
    return path


NOTES = "## Notes"


def write_docs(docs: Path, results: dict) -> Path:
    """The reference run as `docs/benchmarks.md` with its plots in `docs/benchmarks/`; the
    hand-written part of the page (from its `## Notes` heading on) is kept."""
    images = docs / "benchmarks"
    images.mkdir(parents=True, exist_ok=True)
    page = docs / "benchmarks.md"
    notes = ""
    if page.exists() and NOTES in page.read_text():
        notes = page.read_text()[page.read_text().index(NOTES) :]
    text = markdown(results, _plots(images, results), "benchmarks")
    page.write_text(text + ("\n" + notes if notes else ""))
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench._report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / ".wtc" / "bench")
    parser.add_argument(
        "--docs", action="store_true", help="publish as docs/benchmarks.md (the reference run)"
    )
    args = parser.parse_args(argv)
    results = {}
    for scale in ("tiny", "small", "starter", "10x"):
        path = args.out / f"pipeline-{scale}.json"
        if path.exists():
            results[scale] = json.loads(path.read_text())
    print(summary(results))
    print(write(args.out, results))
    if args.docs:
        print(write_docs(PROJECT_ROOT / "docs", results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
