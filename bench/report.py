"""Markdown table, ratio targets and PNG chart of one bench run."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from measure import SCENARIOS, Row


@dataclass(frozen=True)
class Target:
    """A ratio the issue asks for, measured within one run."""

    scenario: str
    text: str
    peer: str
    versus: str
    metric: str     # "rps": peer/versus >= ratio ; "p99": peer p99 <= versus p99
    ratio: float


TARGETS: tuple[Target, ...] = (
    Target("a", "(a) jwtproxy/httptools >= 1.5x Envoy rps", "jwtproxy-httptools", "envoy", "rps", 1.5),
    Target("a", "(a) jwtproxy/httptools p99 <= Envoy p99", "jwtproxy-httptools", "envoy", "p99", 1.0),
    Target("a", "(a) jwtproxy/httptools >= 8x Node rps", "jwtproxy-httptools", "node", "rps", 8.0),
    Target("b", "(b) jwtproxy/httptools >= 1.0x Envoy rps", "jwtproxy-httptools", "envoy", "rps", 1.0),
    Target("c", "(c) jwtproxy/httptools >= 1.0x Envoy rps", "jwtproxy-httptools", "envoy", "rps", 1.0),
    Target("d", "(d) jwtproxy/httptools >= 0.8x Envoy rps", "jwtproxy-httptools", "envoy", "rps", 0.8),
    Target("e", "(e) jwtproxy/httptools >= 1.6x Envoy without JWT filter", "jwtproxy-httptools",
           "envoy-nojwt", "rps", 1.6),
    Target("i", "(i) signed assertions on >= 0.9x off", "jwtproxy-assertion", "jwtproxy-httptools", "rps", 0.9),
)

# Which row each scenario's "vs" column divides by.
REFERENCE = {"a": "envoy", "b": "envoy", "c": "envoy", "d": "envoy", "e": "envoy-nojwt", "f": "envoy",
             "i": "jwtproxy-httptools"}


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _ratio(rows: Mapping[str, Row], peer: str, versus: str, metric: str) -> float | None:
    a, b = rows.get(peer), rows.get(versus)
    if a is None or b is None or not a.ok or not b.ok:
        return None
    if metric == "rps":
        x, y = a.med("rps"), b.med("rps")
        return x / y if x is not None and y else None
    x, y = a.med("p99_ms"), b.med("p99_ms")
    return x / y if x is not None and y else None


def _rep_ratios(rows: Mapping[str, Row], peer: str, versus: str, metric: str) -> list[float]:
    """The ratio within each repetition: sample i of ``peer`` against sample i of ``versus``.

    run.py measures every peer once per repetition, interleaved, so the i-th samples of two peers
    were taken minutes apart at most; their spread shows how much of a median ratio is the
    machine's noise rather than the systems' difference."""
    a, b = rows.get(peer), rows.get(versus)
    if a is None or b is None or not a.ok or not b.ok:
        return []
    attr = "rps" if metric == "rps" else "p99_ms"
    ratios = []
    for x, y in zip(a.samples, b.samples):
        top, bottom = getattr(x, attr), getattr(y, attr)
        if top is not None and bottom:
            ratios.append(top / bottom)
    return ratios


def _range(values: Sequence[float], spec: str, suffix: str = "") -> str:
    """``min-max`` of two or more values, else an em dash (one repetition has no spread)."""
    if len(values) < 2:
        return "—"
    return f"{format(min(values), spec)}{suffix}–{format(max(values), spec)}{suffix}"


def markdown(results: Mapping[str, Mapping[str, Row]], meta: Sequence[tuple[str, str]],
             title: str, chart_name: str | None) -> str:
    """The whole report: header facts, one table per scenario, the targets table."""
    out = [f"# {title}", ""]
    for key, value in meta:
        out.append(f"- **{key}**: {value}")
    out.append("")
    if chart_name:
        out += [f"![requests per second by scenario]({chart_name})", ""]
    for skey, rows in results.items():
        scen = SCENARIOS[skey]
        ref = REFERENCE.get(skey, "envoy")
        has_ref = ref in rows
        out += [f"## ({skey}) {scen.title}", "",
                f"`GET {scen.path}`, expected status {scen.expect}.", "",
                "| system | req/s | req/s range | " + (f"vs {rows[ref].label} | " if has_ref else "")
                + "p50 ms | p99 ms | RSS MiB | token cache hits | errors |",
                "|---|---:|---:|" + ("---:|" if has_ref else "") + "---:|---:|---:|---:|---:|"]
        for row in rows.values():
            if not row.ok:
                out.append(f"| {row.label} | not measured: {_cell(row.failure or 'no samples')} |"
                           + " |" * (7 if has_ref else 6))
                continue
            ratio_cell = ""
            if has_ref:
                ratio = _ratio(rows, row.peer, ref, "rps")
                ratio_cell = (f"{ratio:.2f}x" if ratio is not None else "—") + " | "
            errors = row.errors
            err_text = "0" if not errors else f"**{errors}** " + ", ".join(
                f"{k}={v}" for k, v in _merge_detail(row).items())
            out.append(
                f"| {row.label} | {_fmt(row.med('rps'), ',.0f')} | "
                f"{_range([s.rps for s in row.samples], ',.0f')} | {ratio_cell}"
                f"{_fmt(row.med('p50_ms'), '.2f')} | {_fmt(row.med('p99_ms'), '.2f')} | "
                f"{_fmt(row.med('rss_mib'), '.0f')} | {_pct(row.med('cache_hit_ratio'))} | {err_text} |")
        out.append("")
    target_lines = targets_table(results)
    if target_lines:
        out += ["## Targets (ratios within this run)", "",
                "The measured ratio is of the medians; the range is the same ratio within each "
                "repetition (the two systems measured minutes apart at most).", "",
                TARGETS_HEAD, TARGETS_RULE, *target_lines, ""]
    return "\n".join(out)


def _cell(text: str, limit: int = 300) -> str:
    """Free text made safe for one Markdown table cell."""
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[:limit] + "…"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def _merge_detail(row: Row) -> dict[str, int]:
    merged: dict[str, int] = {}
    for sample in row.samples:
        for k, v in sample.error_detail.items():
            merged[k] = merged.get(k, 0) + v
    return merged


TARGETS_HEAD = "| target | measured | per repetition | met |"
TARGETS_RULE = "|---|---:|---:|:---:|"


def targets_table(results: Mapping[str, Mapping[str, Row]]) -> list[str]:
    """One line per target whose scenario ran; h11 figures beside the httptools ones."""
    lines = []
    for t in TARGETS:
        rows = results.get(t.scenario)
        if rows is None or t.peer not in rows or t.versus not in rows:
            continue  # not part of this run (e.g. --quick has no peers)
        value = _ratio(rows, t.peer, t.versus, t.metric)
        h11 = _ratio(rows, "jwtproxy-h11", t.versus, t.metric)
        if value is None:
            lines.append(f"| {t.text} | not measured | — | — |")
            continue
        met = value >= t.ratio if t.metric == "rps" else value <= t.ratio
        h11_text = f" (h11: {h11:.2f}x)" if h11 is not None else ""
        unit = "x" if t.metric == "rps" else "x of Envoy's p99"
        spread = _range(_rep_ratios(rows, t.peer, t.versus, t.metric), ".2f", "x")
        lines.append(f"| {t.text} | {value:.2f}{unit}{h11_text} | {spread} | {'yes' if met else '**no**'} |")
    # Limits on against off: scenario (j) against (a), same peer, same run.
    on, off = results.get("j"), results.get("a")
    if on is not None and off is not None:
        ratios = {}
        for peer in ("jwtproxy-httptools", "jwtproxy-h11"):
            a, b = on.get(peer), off.get(peer)
            x = a.med("rps") if a is not None and a.ok else None
            y = b.med("rps") if b is not None and b.ok else None
            ratios[peer] = x / y if x is not None and y else None
        value, h11 = ratios["jwtproxy-httptools"], ratios["jwtproxy-h11"]
        text = "(j)/(a) jwtproxy/httptools rps with limits on >= 0.9x off"
        if value is None:
            lines.append(f"| {text} | not measured | — | — |")
        else:
            h11_text = f" (h11: {h11:.2f}x)" if h11 is not None else ""
            a, b = on["jwtproxy-httptools"], off["jwtproxy-httptools"]  # both measured: value is set
            spread = _range([x.rps / y.rps for x, y in zip(a.samples, b.samples) if y.rps], ".2f", "x")
            lines.append(f"| {text} | {value:.2f}x{h11_text} | {spread} | {'yes' if value >= 0.9 else '**no**'} |")
    return lines


# One colour per system, the same in every panel.
COLOURS = {
    "nginx": "#9e9e9e", "envoy": "#d62728", "envoy-nojwt": "#ff9896", "node": "#2ca02c",
    "jwtproxy-httptools": "#1f77b4", "jwtproxy-h11": "#aec7e8", "jwtproxy-assertion": "#9467bd",
    "nginx-authz": "#ff7f0e",
}


def chart(results: Mapping[str, Mapping[str, Row]], path: Path, title: str) -> None:
    """One horizontal bar panel per scenario (req/s medians, p99 in the labels)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    cols = 2 if len(keys) > 1 else 1
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(7.5 * cols, 2.9 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, skey in zip(axes.flat, keys):
        rows = [r for r in results[skey].values()]
        labels = [r.label for r in rows]
        values = [(r.med("rps") or 0.0) if r.ok else 0.0 for r in rows]
        colours = [COLOURS.get(r.peer, "#555555") for r in rows]
        ypos = list(range(len(rows)))[::-1]
        # Scale to the proxies, not to the ceiling (often 3-10x higher): its bar is cut at the
        # right edge, paler, with its real value in the label.
        proxies = [v for r, v in zip(rows, values) if r.peer != "nginx"]
        peak = max(proxies) if proxies and max(proxies) > 0 else (max(values) if values else 1.0)
        xmax = (peak or 1.0) * 1.6
        shown = [min(v, xmax) for v in values]
        colours = [("#d9d9d9" if v > xmax else c) for c, v in zip(colours, values)]
        ax.barh(ypos, shown, color=colours)
        ax.set_yticks(ypos, labels, fontsize=8)
        for y, r, v, w in zip(ypos, rows, values, shown):
            text = (f" {v:,.0f}/s  p99 {r.med('p99_ms'):.1f} ms" if r.ok and r.med("p99_ms") is not None
                    else " not measured")
            if v > w:  # cut ceiling bar: its real value inside it, an arrow for "goes on"
                ax.text(w, y, text.strip() + "  \u2192 ", va="center", ha="right", fontsize=7)
            else:
                ax.text(w, y, text, va="center", fontsize=7)
        ax.set_xlim(0, xmax)
        ax.set_title(f"({skey}) {SCENARIOS[skey].title}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("requests/s (median)", fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
