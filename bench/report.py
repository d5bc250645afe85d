"""Markdown from one benchmark run's JSON: issue 7's targets, the scenario tables, the machine.

``run.py`` prints the targets table at the end of a run and, with
``--report PATH``, writes the whole document (docs/performance.md). To render it
again from a saved run without measuring anything::

    python bench/report.py                                  # bench/results/latest.json to stdout
    python bench/report.py RUN.json --out docs/performance.md

Every figure comes from the JSON; nothing here measures. A target's verdict is
given for the configs the target is about (``VERDICTS``); the other columns show
the same figure for comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
DEFAULT_JSON = BENCH / "results" / "latest.json"

# Issue 7's bounds.
ADDED_P50_MAX_MS = 0.3  # chat c=1, p50 added latency
TTFC_MAX_MS = 0.5  # streams: time to first chunk, over direct
SPREAD_TOL_MS = 0.5  # streams: first-to-last spread "the same as direct", within this
PEAK_RSS_MAX_MIB = 50.0  # "50 MB", read as MiB
GROWTH_MAX_PCT = 5.0  # RSS growth over the soak
OPEN_STREAM_MAX_KIB = 64.0  # RSS per open stream
DEFAULT_CHAIN = "default-chain"
EVERY_POLICY = "every-policy"
LATENCY_SCENARIO = "chat_c1"
CPU_SCENARIO = "chat_c10"
STREAM_SCENARIO = "sse_paced_c1"  # the stream targets are judged here: no queueing
LOADED_STREAM_SCENARIO = "sse_paced_c10"  # the same figures with 10 streams at once


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def _fmt(x: Any, fmt: str, unit: str = "") -> str:
    v = _num(x)
    return "-" if v is None else format(v, fmt) + unit


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else (" **PASS**" if ok else " **FAIL**")


def _configs(data: dict[str, Any]) -> list[str]:
    """The measured proxies other than the floor, in run order (sidecar configs, then litellm)."""
    return [
        name
        for name, t in data["targets"].items()
        if t["role"] in ("sidecar", "litellm") and not t.get("skipped")
    ]


def _res(data: dict[str, Any], target: str, scenario: str) -> dict[str, Any] | None:
    r = data.get("results", {}).get(target, {}).get(scenario)
    return r if isinstance(r, dict) else None


# --------------------------------------------------------------------------- targets
Cell = Callable[[dict[str, Any], str], tuple[str, bool | None]]


def _cpu_c10(data: dict[str, Any], name: str) -> tuple[str, bool | None]:
    r = _res(data, name, CPU_SCENARIO)
    if not r or _num(r.get("cpu_ratio_to_floor")) is None:
        return "-", None
    ratio = float(r["cpu_ratio_to_floor"])
    bound = data["meta"].get("cpu_targets", {}).get(name)
    ok = None if bound is None else ratio <= bound
    return f"{ratio:.2f}x ({r['cpu_ms_per_req']:.4f} ms)", ok


def _cpu_worst(data: dict[str, Any], name: str) -> tuple[str, bool | None]:
    per = data.get("results", {}).get(name, {})
    ratios = [
        (float(r["cpu_ratio_to_floor"]), sc)
        for sc, r in per.items()
        if _num(r.get("cpu_ratio_to_floor")) is not None
    ]
    if not ratios:
        return "-", None
    ratio, sc = max(ratios)
    bound = data["meta"].get("cpu_targets", {}).get(name)
    ok = None if bound is None else ratio <= bound
    return f"{ratio:.2f}x ({sc})", ok


def _p50_vs_floor(data: dict[str, Any], name: str) -> tuple[str, bool | None]:
    r, f = _res(data, name, LATENCY_SCENARIO), _res(data, "floor", LATENCY_SCENARIO)
    if not r or not f or not r.get("latency") or not f.get("latency"):
        return "-", None
    d = r["latency"]["p50_ms"] - f["latency"]["p50_ms"]
    return f"{d:+.3f} ms", d <= ADDED_P50_MAX_MS


def _p50_vs_direct(data: dict[str, Any], name: str) -> tuple[str, bool | None]:
    r = _res(data, name, LATENCY_SCENARIO)
    d = _num(r.get("added_p50_ms")) if r else None
    if d is None:
        return "-", None
    return f"{d:+.3f} ms", d <= ADDED_P50_MAX_MS


def _ttfc(
    data: dict[str, Any], name: str, scenario: str = STREAM_SCENARIO
) -> tuple[str, bool | None]:
    r = _res(data, name, scenario)
    d = _num(r.get("added_ttfc_p50_ms")) if r else None
    if d is None:
        return "-", None
    return f"{d:+.3f} ms", d <= TTFC_MAX_MS


def _spread(
    data: dict[str, Any], name: str, scenario: str = STREAM_SCENARIO
) -> tuple[str, bool | None]:
    r = _res(data, name, scenario)
    d = _num(r.get("spread_p50_vs_direct_ms")) if r else None
    if d is None:
        return "-", None
    return f"{d:+.3f} ms", abs(d) <= SPREAD_TOL_MS


def _loaded_stream(data: dict[str, Any], name: str) -> tuple[str, bool | None]:
    ttfc, _ = _ttfc(data, name, LOADED_STREAM_SCENARIO)
    spread, _ = _spread(data, name, LOADED_STREAM_SCENARIO)
    if ttfc == "-" and spread == "-":
        return "-", None
    return f"{ttfc} / {spread}", None


def _chunk(data: dict[str, Any], name: str) -> tuple[str, bool | None]:
    c = data.get("chunk_cost", {}).get(name)
    if not c or _num(c.get("cpu_us_per_chunk")) is None:
        return "-", None
    ratio = _num(c.get("chunk_ratio_to_floor"))
    tail = f" ({ratio:.2f}x floor)" if ratio is not None and name != "floor" else ""
    return f"{c['cpu_us_per_chunk']:.1f} µs{tail}", None


def _peak_rss(data: dict[str, Any], name: str) -> tuple[str, bool | None]:
    p = data.get("peak_rss_load_mib", {}).get(name)
    if not p or _num(p.get("tree")) is None:
        return "-", None
    return f"{p['tree']:.1f} MiB", p["tree"] <= PEAK_RSS_MAX_MIB


def _growth(data: dict[str, Any], name: str) -> tuple[str, bool | None]:
    s = data.get("soak", {}).get(name)
    g = _num(s.get("growth_pct")) if s else None
    if s is None or g is None:
        return "-", None
    note = f", {s['errors']} errors" if s.get("errors") else ""
    return f"{g:+.1f} % ({s['rss_warm_mib']:.1f} → {s['rss_end_mib']:.1f} MiB{note})", (
        g < GROWTH_MAX_PCT and not s.get("errors")
    )


def _open(data: dict[str, Any], name: str) -> tuple[str, bool | None]:
    o = data.get("open_streams", {}).get(name)
    k = _num(o.get("kib_per_stream")) if o else None
    if o is None or k is None:
        return "-", None
    ok = k <= OPEN_STREAM_MAX_KIB and o.get("all_open") and not o.get("errors")
    note = "" if o.get("all_open") else f", only {o['opened']}/{o['streams']} open"
    return f"{k:.1f} KiB{note}", bool(ok)


# (what, goal, cell, configs that get a verdict, reference targets shown)
ROWS: list[tuple[str, str, Cell, tuple[str, ...], tuple[str, ...]]] = [
    (
        f"CPU per request, chat c=10 ({CPU_SCENARIO})",
        "≤ 1.0x floor (default chain), ≤ 1.5x (every policy)",
        _cpu_c10,
        (DEFAULT_CHAIN, EVERY_POLICY),
        (),
    ),
    (
        "CPU per request, worst scenario",
        "≤ 1.0x floor (default chain), ≤ 1.5x (every policy)",
        _cpu_worst,
        (DEFAULT_CHAIN, EVERY_POLICY),
        (),
    ),
    (
        f"p50 added latency, c=1 ({LATENCY_SCENARIO}), vs floor",
        f"≤ {ADDED_P50_MAX_MS} ms",
        _p50_vs_floor,
        (DEFAULT_CHAIN,),
        (),
    ),
    (
        f"p50 added latency, c=1 ({LATENCY_SCENARIO}), vs direct",
        f"≤ {ADDED_P50_MAX_MS} ms",
        _p50_vs_direct,
        (DEFAULT_CHAIN,),
        ("floor",),
    ),
    (
        f"stream time to first chunk over direct ({STREAM_SCENARIO}, p50)",
        f"≤ +{TTFC_MAX_MS} ms",
        _ttfc,
        (DEFAULT_CHAIN,),
        ("floor",),
    ),
    (
        f"stream first-to-last spread minus direct's ({STREAM_SCENARIO}, p50)",
        f"the same (±{SPREAD_TOL_MS} ms)",
        _spread,
        (DEFAULT_CHAIN,),
        ("floor",),
    ),
    (
        f"the same two with 10 streams at once ({LOADED_STREAM_SCENARIO}, p50): "
        "time to first chunk / spread",
        "reference (queueing included)",
        lambda data, name: _loaded_stream(data, name),
        (),
        ("floor",),
    ),
    (
        "CPU per relayed chunk (paced SSE: (80-event - 20-event) / 60)",
        "measured",
        _chunk,
        (),
        ("floor",),
    ),
    (
        "peak RSS under load (rounds + soak, before open_streams)",
        f"≤ {PEAK_RSS_MAX_MIB:g} MiB",
        _peak_rss,
        (DEFAULT_CHAIN,),
        ("floor",),
    ),
    (
        "RSS growth over the soak (end vs after the first {warm})",
        f"< {GROWTH_MAX_PCT:g} %",
        _growth,
        (DEFAULT_CHAIN,),
        ("floor",),
    ),
    (
        "RSS per open stream (open_streams)",
        f"≤ {OPEN_STREAM_MAX_KIB:g} KiB",
        _open,
        (DEFAULT_CHAIN,),
        ("direct", "floor"),
    ),
]


def _soak_warm(data: dict[str, Any]) -> int | None:
    soak = data.get("soak") or {}
    first = next(iter(soak.values()), None)
    warm = first.get("warm_requests") if first else data["meta"].get("args", {}).get("soak_warm")
    return int(warm) if isinstance(warm, int) else None


def issue7_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per target: its figures per config, the verdicts, the references."""
    configs = _configs(data)
    warm = _soak_warm(data)
    rows = []
    for what, goal, cell, judged, refs in ROWS:
        what = what.replace("{warm}", f"{warm:,}" if warm else "warm-up part")
        figures, verdicts = {}, {}
        for name in configs:
            text, ok = cell(data, name)
            figures[name] = text
            verdicts[name] = ok if name in judged and text != "-" else None
        ref = [
            f"{r} {cell(data, r)[0]}"
            for r in refs
            if r in data.get("targets", {}) and cell(data, r)[0] != "-"
        ]
        if cell is _cpu_c10 and _res(data, "floor", CPU_SCENARIO):
            ref = [f"floor {data['results']['floor'][CPU_SCENARIO]['cpu_ms_per_req']:.4f} ms"]
        if cell is _p50_vs_floor and _res(data, "floor", LATENCY_SCENARIO):
            lat = data["results"]["floor"][LATENCY_SCENARIO]["latency"]
            ref = [f"floor p50 {lat['p50_ms']:.3f} ms"] if lat else []
        rows.append(
            {
                "target": what,
                "goal": goal,
                "figures": figures,
                "verdicts": verdicts,
                "reference": "; ".join(ref),
            }
        )
    return rows


def targets_markdown(data: dict[str, Any]) -> str:
    configs = _configs(data)
    rows = issue7_rows(data)
    head = ["issue 7 target", "goal", "reference", *configs]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["target"], r["goal"], r["reference"] or ""]
        cells += [r["figures"][n] + _verdict(r["verdicts"][n]) for n in configs]
        out.append("| " + " | ".join(cells) + " |")
    verdicts = [v for r in rows for v in r["verdicts"].values() if v is not None]
    out.append("")
    out.append(
        f"{sum(verdicts)} of {len(verdicts)} verdicts pass. Verdicts are given for "
        f"`{DEFAULT_CHAIN}` (every target) and `{EVERY_POLICY}` (the CPU targets); the other "
        "columns show the same figure for comparison."
    )
    return "\n".join(out)


# --------------------------------------------------------------------------- tables
def _ordered_targets(data: dict[str, Any]) -> list[str]:
    return [n for n in data["targets"] if n in data.get("results", {})]


def ratio_markdown(data: dict[str, Any]) -> str:
    """Scenarios x targets: CPU per request as a multiple of the floor's (floor in ms)."""
    names = [n for n in _ordered_targets(data) if n not in ("direct", "floor")]
    head = ["scenario", "floor ms/req", *names]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sc in data["meta"]["scenarios"]:
        f = _res(data, "floor", sc)
        cells = [sc, _fmt(f["cpu_ms_per_req"], ".4f") if f else "-"]
        for n in names:
            r = _res(data, n, sc)
            cells.append(_fmt(r.get("cpu_ratio_to_floor"), ".2f", "x") if r else "-")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def scenario_markdown(data: dict[str, Any]) -> str:
    out = []
    for sc, desc in data["meta"]["scenarios"].items():
        streaming = desc.get("kind") != "json"
        head = ["target", "req/s", "p50 ms", "p99 ms", "+p50 ms", "CPU ms/req", "±%", "x floor"]
        head += ["RSS MiB"]
        if streaming:
            head += ["ttfc p50", "+ttfc", "spread p50", "Δspread"]
        head += ["notes"]
        rows = []
        for n in _ordered_targets(data):
            r = _res(data, n, sc)
            if not r:
                continue
            lat = r.get("latency") or {}
            cells = [
                n,
                _fmt(r.get("rps"), ".0f"),
                _fmt(lat.get("p50_ms"), ".3f"),
                _fmt(lat.get("p99_ms"), ".3f"),
                _fmt(r.get("added_p50_ms"), "+.3f"),
                _fmt(r.get("cpu_ms_per_req"), ".4f"),
                _fmt(r.get("cpu_visit_spread_pct"), ".0f"),
                _fmt(r.get("cpu_ratio_to_floor"), ".2f"),
                _fmt(r.get("peak_rss_mib"), ".1f"),
            ]
            if streaming:
                tt, sp = r.get("ttfc") or {}, r.get("spread") or {}
                cells += [
                    _fmt(tt.get("p50_ms"), ".3f"),
                    _fmt(r.get("added_ttfc_p50_ms"), "+.3f"),
                    _fmt(sp.get("p50_ms"), ".3f"),
                    _fmt(r.get("spread_p50_vs_direct_ms"), "+.3f"),
                ]
            notes = []
            if r.get("errors"):
                notes.append(f"{r['errors']} ERRORS")
            if r.get("timeouts"):
                notes.append(f"{r['timeouts']} TIMEOUTS")
            if r.get("noisy_visits"):
                notes.append(f"{r['noisy_visits']} noisy visit(s)")
            if n == "direct":
                notes.append("harness-bound reference")
            cells.append(", ".join(notes))
            rows.append("| " + " | ".join(cells) + " |")
        if not rows:
            continue
        out += [f"### `{sc}`: {desc.get('desc', '')}", ""]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows, ""]
    return "\n".join(out)


def phases_markdown(data: dict[str, Any]) -> str:
    """Chunk cost, soak and open streams, each a table (nothing if not measured)."""
    out = []
    cc = data.get("chunk_cost") or {}
    if cc:
        out += [
            "CPU per relayed chunk (paced SSE streams, 1 event per read and write):",
            "",
            "| target | CPU ms/req, 21 events | CPU ms/req, 81 events | µs per chunk | x floor "
            "| ms/req besides its chunks |",
            "|---|---|---|---|---|---|",
        ]
        for n, c in cc.items():
            out.append(
                f"| {n} | {_fmt(c['cpu_ms_per_req_short'], '.4f')} | "
                f"{_fmt(c['cpu_ms_per_req_long'], '.4f')} | {_fmt(c['cpu_us_per_chunk'], '.1f')} | "
                f"{_fmt(c.get('chunk_ratio_to_floor'), '.2f')} | "
                f"{_fmt(c['cpu_ms_per_req_fixed'], '.4f')} |"
            )
        out.append("")
    soak = data.get("soak") or {}
    if soak:
        first = next(iter(soak.values()))
        out += [
            f"Soak: {first['requests']:,} chat requests at c=10 per target; RSS (process "
            f"tree) after the first {first['warm_requests']:,} and at the end:",
            "",
            "| target | RSS warm MiB | RSS end MiB | max MiB | growth | CPU ms/req | req/s "
            "| p99 ms | errors |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for n, s in soak.items():
            out.append(
                f"| {n} | {_fmt(s['rss_warm_mib'], '.1f')} | {_fmt(s['rss_end_mib'], '.1f')} | "
                f"{_fmt(s['rss_max_mib'], '.1f')} | {_fmt(s.get('growth_pct'), '+.2f', ' %')} | "
                f"{_fmt(s.get('cpu_ms_per_req'), '.4f')} | {_fmt(s.get('rps'), '.0f')} | "
                f"{_fmt((s.get('latency') or {}).get('p99_ms'), '.3f')} | "
                f"{s['errors'] + s['timeouts']} |"
            )
        out.append("")
    op = data.get("open_streams") or {}
    if op:
        n_streams = next(iter(op.values()))["streams"]
        out += [
            f"Open streams: {n_streams:,} SSE streams held open at once (first event sent, "
            "the rest held by the upstream); RSS (process tree) before and while open:",
            "",
            "| target | open | seconds to open | RSS before MiB | RSS open MiB | KiB per stream "
            "| CPU ms per stream opened | RSS after release MiB | errors |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for n, o in op.items():
            out.append(
                f"| {n} | {o['opened']}/{o['streams']} | {_fmt(o['open_s'], '.1f')} | "
                f"{_fmt(o['rss_before_mib'], '.1f')} | {_fmt(o['rss_open_mib'], '.1f')} | "
                f"{_fmt(o.get('kib_per_stream'), '.1f')} | "
                f"{_fmt(o.get('cpu_ms_per_stream_open'), '.3f')} | "
                f"{_fmt(o['rss_after_mib'], '.1f')} | {o['errors'] + o['timeouts']} |"
            )
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- document
def render(data: dict[str, Any], note: str | None = None) -> str:
    m = data["meta"]
    args = m.get("args", {})
    skipped = [
        f"- `{n}` skipped: {t['skipped']}" for n, t in data["targets"].items() if t.get("skipped")
    ]
    died = [f"- `{n}` DIED: {t['died']}" for n, t in data["targets"].items() if t.get("died")]
    notes = [f"- {x}" for x in m.get("notes", [])]
    configs = [
        f"`{n}` ({Path(t['config']).name if t.get('config') else ''})"
        for n, t in data["targets"].items()
        if t["role"] == "sidecar"
    ]
    parts = [
        "# Performance",
        "",
        *([f"> {note}", ""] if note else []),
        "Issue 7's overhead targets, measured by [`bench/`](../bench/README.md) against two "
        "references in the same run: **direct** (no proxy) and **floor** "
        "([`bench/floor.py`](../bench/floor.py), the smallest aiohttp pass-through proxy). "
        "How it measures and how to read each column: [bench/README.md](../bench/README.md).",
        "",
        "Generated by `python bench/run.py --report docs/performance.md` (or from a saved run: "
        "`python bench/report.py RUN.json --out docs/performance.md`); do not edit by hand.",
        "",
        "## The run",
        "",
        f"- when: {m.get('when')}, {m.get('elapsed_s')} s; commit `{m.get('git')}`",
        f"- machine: {m.get('cpu_model')}, {m.get('cpus')} CPUs; pinned: {m.get('pinned')} "
        "(proxy on core 0, load generator and fake upstream on core 1)",
        f"- Python {m.get('python')}, aiohttp {m.get('aiohttp')}",
        f"- {args.get('rounds')} round(s) of {args.get('requests')} requests per visit "
        f"(scaled per scenario){', quick' if args.get('quick') else ''}; "
        f"sidecar configs: {', '.join(configs) or 'none'}",
        f"- phases: {', '.join(m.get('phases') or []) or 'none'}"
        + (
            f" (soak {args.get('soak'):,} requests, open_streams {m.get('open_streams_n'):,})"
            if m.get("phases")
            else ""
        ),
        *skipped,
        *died,
        *notes,
        "",
        "## Issue 7's targets",
        "",
        targets_markdown(data),
        "",
        "Definitions: CPU is the on-CPU time of the proxy's process tree per request (median "
        "of the visits), as a multiple of the floor's in the same scenario. Added latency is "
        "the p50 of the whole request at one connection minus the floor's (or direct's) p50; "
        "direct has no proxy hop at all, so the floor itself is the least any proxy adds "
        "there. Stream figures are from the paced SSE stream (20 events 1 ms apart) on one "
        "connection, and beside them on 10 (where each event also queues behind the others'): "
        "time to the first body bytes, and first to last byte, minus direct's; the floor's "
        "own figures show what any proxy hop adds on this machine. "
        "Peak RSS is `VmHWM` of the proxy's process tree after the interleaved rounds and the "
        "soak (50 MB is read as 50 MiB). Growth is the soak's RSS at the end against its RSS "
        f"after the first {_soak_warm(data) or 0:,} requests. KiB per open stream is the RSS "
        "with every stream open minus the RSS before, divided by the streams.",
        "",
        "## CPU per request, as a multiple of the floor's",
        "",
        ratio_markdown(data),
        "",
    ]
    phases = phases_markdown(data)
    if phases:
        parts += ["## Streams and memory", "", phases]
    parts += ["## Every scenario", "", scenario_markdown(data)]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Render a benchmark run's JSON as markdown.")
    p.add_argument("json", nargs="?", type=Path, default=DEFAULT_JSON, help="a run's JSON")
    p.add_argument("--out", type=Path, default=None, help="write here (default: stdout)")
    p.add_argument("--targets-only", action="store_true", help="only issue 7's targets table")
    p.add_argument("--note", default=None, help="a line quoted under the title (e.g. why this run)")
    a = p.parse_args(argv)
    data = json.loads(a.json.read_text())
    text = targets_markdown(data) + "\n" if a.targets_only else render(data, a.note)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
