"""
Results: samples per scenario, contender and metric; medians and ratios;
the targets the project holds itself to; and the JSON, Markdown and PNG
written from them.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Metric:
    """What one figure means."""

    key: str
    label: str
    unit: str
    higher_is_better: bool = True


@dataclass(frozen=True)
class Target:
    """
    ``contender``'s median over ``baseline``'s median must be ``>=`` (or
    ``<=``) ``bound``; with no baseline, the median itself is compared.
    """

    scenario: str
    metric: str
    contender: str
    baseline: str | None
    op: str
    bound: float
    text: str


@dataclass
class Scenario:
    """One scenario's samples, and what could not be measured and why."""

    key: str
    title: str
    reference: str | None
    metrics: list[Metric]
    contenders: list[str] = field(default_factory=list)
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    not_measured: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, contender: str, figures: dict[str, float]) -> None:
        """Record one run's figures (only the metrics this scenario knows, plus bookkeeping)."""
        if contender not in self.contenders:
            self.contenders.append(contender)
        per = self.samples.setdefault(contender, {})
        for key, value in figures.items():
            per.setdefault(key, []).append(float(value))

    def skip(self, what: str, why: str) -> None:
        """Say plainly that ``what`` was not measured, and why."""
        self.not_measured[what] = why

    def median(self, contender: str, metric: str) -> float | None:
        values = self.samples.get(contender, {}).get(metric)
        return statistics.median(values) if values else None

    def ratio(self, contender: str, baseline: str, metric: str) -> float | None:
        a, b = self.median(contender, metric), self.median(baseline, metric)
        if a is None or b is None or b == 0:
            return None
        return a / b


def from_json(data: dict[str, Any]) -> dict[str, Scenario]:
    """The scenarios of an earlier ``latest.json``, each noted with when and how it was measured."""
    meta = data.get("meta", {})
    quick = " (quick run)" if meta.get("quick") else ""
    when = (
        f"Measured earlier, {meta.get('finished', '?')}{quick}: {meta.get('runs', '?')} runs of "
        f"{meta.get('seconds', '?')} s; kept from that run's results, not measured again in this one."
    )
    found: dict[str, Scenario] = {}
    for key, entry in data.get("scenarios", {}).items():
        notes = list(entry.get("notes", []))
        if not any(n.startswith("Measured earlier") for n in notes):
            # Measured in that run; one kept from an even earlier run keeps its own note.
            notes.append(when)
        scenario = Scenario(
            key,
            entry["title"],
            entry.get("reference"),
            [Metric(**m) for m in entry.get("metrics", [])],
            not_measured=dict(entry.get("not_measured", {})),
            notes=notes,
            extra=dict(entry.get("extra", {})),
        )
        for contender, figures in entry.get("contenders", {}).items():
            scenario.add(contender, {})
            for metric, figure in figures.items():
                scenario.samples[contender][metric] = [float(v) for v in figure["samples"]]
        found[key] = scenario
    return found


def evaluate(target: Target, scenarios: dict[str, Scenario]) -> tuple[str, float | None]:
    """``("met" | "not met" | "not measured", the figure compared)``."""
    scenario = scenarios.get(target.scenario)
    if scenario is None:
        return "not measured", None
    if target.baseline is None:
        value = scenario.median(target.contender, target.metric)
    else:
        value = scenario.ratio(target.contender, target.baseline, target.metric)
    if value is None:
        return "not measured", None
    ok = value >= target.bound if target.op == ">=" else value <= target.bound
    return ("met" if ok else "not met"), value


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _short_path(text: str) -> str:
    """``/long/site-packages/twisted/internet/tcp.py:12: ...`` as ``twisted/internet/tcp.py:12: ...``."""
    for root in ("/muxtwist/", "/twisted/", "/bench/"):
        at = text.find(root)
        if at >= 0 and text.find(":", at) > at:
            return text[at + 1 :]
    return text


def to_json(meta: dict[str, Any], scenarios: dict[str, Scenario], targets: Sequence[Target]) -> dict[str, Any]:
    """Everything measured, with medians, ratios and target verdicts."""
    out: dict[str, Any] = {"meta": meta, "scenarios": {}, "targets": []}
    for key, s in scenarios.items():
        entry: dict[str, Any] = {
            "title": s.title,
            "reference": s.reference,
            "metrics": [m.__dict__ for m in s.metrics],
            "not_measured": s.not_measured,
            "notes": s.notes,
            "extra": s.extra,
            "contenders": {},
        }
        for c in s.contenders:
            figures: dict[str, Any] = {}
            for metric, values in s.samples.get(c, {}).items():
                figures[metric] = {
                    "samples": values,
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                    "ratio_to_reference": s.ratio(c, s.reference, metric) if s.reference else None,
                }
            entry["contenders"][c] = figures
        out["scenarios"][key] = entry
    for t in targets:
        status, value = evaluate(t, scenarios)
        out["targets"].append({**t.__dict__, "status": status, "value": value})
    return out


def markdown(
    meta: dict[str, Any],
    scenarios: dict[str, Scenario],
    targets: Sequence[Target],
    *,
    chart: str | None,
    command: str,
) -> str:
    """The performance page: verdicts first, then each scenario's table."""
    # Generated, and not in a toctree: orphan keeps Sphinx's -W build quiet about it.
    lines: list[str] = ["---", "orphan: true", "---", "", "# Performance", ""]
    if meta.get("quick"):
        lines += [
            "> **Quick run**: short and noisy, made to check the harness end to end. "
            "These figures are not the project's benchmark results; run `python -m bench` for those.",
            "",
        ]
    lines += [
        f"Measured {meta['finished']} in one run of `{command}`: {meta['runs']} interleaved runs of "
        f"{meta['seconds']} s per measurement; every figure is the **median** of those runs "
        "(min-max beside it), and ratios are median over median. Everything ran on 127.0.0.1.",
        "",
    ]
    if meta.get("merged"):
        lines += [
            f"**Not all from one run**: {', '.join(meta['merged'])} come from an earlier run (the note under "
            "each says when and how); only the other scenarios were measured by the command above.",
            "",
        ]
    lines += [
        "## Targets",
        "",
        "| target | figure | status |",
        "| --- | --- | --- |",
    ]
    for t in targets:
        status, value = evaluate(t, scenarios)
        mark = {"met": "**met**", "not met": "**not met**"}.get(status, "not measured")
        figure = "-" if value is None else (f"{value:.2f}x" if t.baseline else _fmt(value))
        lines.append(f"| {t.text} | {figure} | {mark} |")
    lines.append("")
    if chart:
        lines += [f"![Each contender's median relative to the scenario's reference]({chart})", ""]
    for s in scenarios.values():
        lines += [f"## {s.title}", ""]
        if s.reference:
            lines += [f"Ratios (x) are against **{s.reference}**.", ""]
        shown = [m for m in s.metrics if any(m.key in s.samples.get(c, {}) for c in s.contenders)]
        if shown:
            header = ["contender"] + [f"{m.label} ({m.unit})" for m in shown]
            lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            for c in s.contenders:
                cells = [c]
                for m in shown:
                    values = s.samples.get(c, {}).get(m.key)
                    if not values:
                        cells.append("-")
                        continue
                    cell = f"**{_fmt(statistics.median(values))}** ({_fmt(min(values))}-{_fmt(max(values))})"
                    if s.reference and c != s.reference:
                        r = s.ratio(c, s.reference, m.key)
                        if r is not None:
                            cell += f" {r:.2f}x"
                    cells.append(cell)
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        foreign = [
            v
            for c in s.contenders
            for k, values in s.samples.get(c, {}).items()
            if k.endswith("foreign_cpu")
            for v in values
        ]
        for c in s.contenders:
            for k, values in s.samples.get(c, {}).items():
                if k.endswith("loadgen_cpu") and statistics.median(values) > 0.9:
                    lines.append(
                        f"- **Load generator bound**: {c}, `{k}` median {statistics.median(values):.0%} of its "
                        "core; that figure measures the load generator more than the server."
                    )
        if foreign and statistics.median(foreign) > 0.25:
            lines.append(
                f"- **Noisy**: processes outside the benchmark used a median {statistics.median(foreign):.2f} "
                f"cores (max {max(foreign):.2f}) of the {meta['machine'].get('cores', '?')} during these runs."
            )
        for name, found in s.extra.items():
            if isinstance(found, list) and found and all(isinstance(x, str) for x in found):
                lines.append(f"- {name}, top {min(8, len(found))}:")
                lines += [f"  - `{_short_path(x)}`" for x in found[:8]]
        for what, why in s.not_measured.items():
            lines.append(f"- **Not measured: {what}** — {why}")
        for note in s.notes:
            lines.append(f"- {note}")
        if s.not_measured or s.notes:
            lines.append("")
    lines += ["## Machine", ""]
    for key, value in meta["machine"].items():
        if key == "tools":
            for tool, version in value.items():
                lines.append(f"- {tool}: {version}")
        else:
            lines.append(f"- {key}: {value}")
    lines += [
        "",
        "## How to reproduce",
        "",
        "```sh",
        "pip install -e '.[bench]'",
        "python -m bench            # the full run: writes bench/results/ and this page",
        "python -m bench --quick    # a short run to check the harness",
        "python -m bench --only proxy",
        "python -m bench.instructions --tree ../before --tree .   # instructions per connection, A/B, not timed",
        "```",
        "",
        "The harness installs what it lacks (`apt-get install wrk nginx haproxy sslh iperf3 nghttp2-client`, "
        "`pip install matplotlib py-spy`), starts every server on 127.0.0.1 on free ports in a temporary "
        "directory, and stops them all at the end. On a machine with two or more cores, servers and proxies "
        "are pinned to CPU 0 and the load generator (one wrk thread, iperf3, the TLS client) to CPU 1; "
        "backends (nginx, iperf3 -s) share CPU 1 with the load generator. The `load gen CPU` column is the "
        "load generator's share of its one core: near 100% means it, not the server, was the limit.",
        "",
    ]
    return "\n".join(lines)


def chart(scenarios: dict[str, Scenario], path: Path) -> bool:
    """One panel per scenario metric: each contender's median relative to the reference."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels: list[tuple[Scenario, Metric]] = []
    for s in scenarios.values():
        for m in s.metrics:
            if any(word in m.key for word in ("loadgen_cpu", "foreign_cpu", "server_cpu", "errors", "rss_base")):
                continue
            if sum(1 for c in s.contenders if s.median(c, m.key) is not None) >= 2:
                panels.append((s, m))
    if not panels:
        return False
    columns = 3
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 2.6 * rows + 0.6), squeeze=False)
    for ax, (s, m) in zip(axes.flat, panels, strict=False):
        names = [c for c in s.contenders if s.median(c, m.key) is not None]
        values = [s.median(c, m.key) or 0.0 for c in names]
        ref = s.median(s.reference, m.key) if s.reference else None
        shown = [v / ref for v in values] if ref else values
        colours = ["tab:orange" if "muxtwist" in n else "tab:blue" for n in names]
        ax.barh(names[::-1], shown[::-1], color=colours[::-1])
        if ref:
            ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
        better = "higher" if m.higher_is_better else "lower"
        unit = f"x {s.reference}" if ref else m.unit
        ax.set_title(f"{s.key}: {m.label}\n({unit}, {better} is better)", fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


KEPT_BEGIN = "<!-- kept across runs: begin -->"
KEPT_END = "<!-- kept across runs: end -->"


def keep_sections(old: str, new: str) -> str:
    """
    ``new`` with the sections of ``old`` written by hand between
    :data:`KEPT_BEGIN` and :data:`KEPT_END` (measurements made outside
    ``python -m bench``, such as bench.breakdown's) put back before "## Machine".
    """
    kept = []
    at = old.find(KEPT_BEGIN)
    while at >= 0:
        end = old.find(KEPT_END, at)
        if end < 0:
            break
        kept.append(old[at : end + len(KEPT_END)] + "\n")
        at = old.find(KEPT_BEGIN, end)
    if not kept:
        return new
    block = "\n".join(kept) + "\n"
    marker = "## Machine\n"
    return new.replace(marker, block + marker, 1) if marker in new else new + "\n" + block


def write(
    directory: Path,
    docs: Path | None,
    meta: dict[str, Any],
    scenarios: dict[str, Scenario],
    targets: Sequence[Target],
    command: str,
) -> dict[str, Path]:
    """Write results JSON and Markdown (and, when ``docs`` is given, the docs page and chart)."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = meta["finished"].replace(":", "").replace("-", "")
    written: dict[str, Path] = {}
    data = to_json(meta, scenarios, targets)
    for name in (f"results-{stamp}.json", "latest.json"):
        (directory / name).write_text(json.dumps(data, indent=2, default=str) + "\n")
    written["json"] = directory / "latest.json"
    png = directory / "latest.png"
    has_chart = chart(scenarios, png)
    (directory / "latest.md").write_text(
        markdown(meta, scenarios, targets, chart="latest.png" if has_chart else None, command=command)
    )
    written["markdown"] = directory / "latest.md"
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        if has_chart:
            (docs / "performance.png").write_bytes(png.read_bytes())
            written["png"] = docs / "performance.png"
        page = markdown(meta, scenarios, targets, chart="performance.png" if has_chart else None, command=command)
        existing = docs / "performance.md"
        page = keep_sections(existing.read_text() if existing.exists() else "", page)
        existing.write_text(page)
        written["page"] = docs / "performance.md"
    return written
