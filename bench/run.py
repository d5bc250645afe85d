"""Overhead benchmark of the sidecar against a bare aiohttp proxy (the floor) and no proxy.

One command (from the repository root)::

    python bench/run.py            # ~5 min: all targets, all scenarios, 3 rounds, soak, open_streams
    python bench/run.py --quick    # CI-sized, < 30 s (no soak, no open_streams)
    python bench/run.py --report docs/performance.md   # also the markdown report (report.py)

Targets: direct (no proxy), the floor (floor.py) and the sidecar configs
passthrough, default-chain and every-policy (bench/configs/), optionally
LiteLLM's proxy (--litellm). After the interleaved rounds each target gets the
``soak`` (RSS growth over 100,000 requests) and ``open_streams`` (RSS per open
stream with 1,000 held open); the end of the output is issue 7's targets table.

Why it is built this way (see /work/shared/environment-notes.md, "Measuring a
proxy on 2 cores"):

* Pinning. The fake upstream, the load generator and this runner share core 1;
  the proxy being measured has core 0 to itself. Unpinned, three processes fight
  for two cores and the figures describe the scheduler.
* CPU per request is the headline figure: the on-CPU time of the target's
  process tree over a visit divided by the requests of that visit. It moves a
  few percent between runs where latency moves tens of percent.
* Interleaving. Every round measures each scenario in A/B/C/C/B/A order
  (direct, floor, sidecar configs, then back), so slow drift of the machine
  lands on every target alike, and ratios to the floor are taken within one run.
* A cheap harness. ``fast_upstream.py`` and ``loadgen.py`` are plain asyncio
  protocols with pre-built bytes; the runner reports how busy core 1 was and
  flags visits where the harness, not the target, set the pace.

Exit status: 0 fine; 1 a target answered with errors, stalled or died;
2 ``--max-cpu-ratio`` exceeded; 3 ``--max-cpu-ratio`` given but no sidecar
config could be measured on ``chat_c10``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import platform
import queue
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
import report as benchreport
from loadgen import CHAT_BODY, default_body, summarize_us

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CONFIGS = BENCH / "configs"
RESULTS = BENCH / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_CORE, HARNESS_CORE = 0, 1
LG_SATURATED = 0.85  # load generator alone above this share of a core: it set the pace
CORE1_SATURATED = 0.90  # load generator + upstream above this: the harness set the pace
DEFAULT_CONFIGS = {
    "passthrough": CONFIGS / "passthrough.yaml",
    "default-chain": CONFIGS / "default-chain.yaml",
    "every-policy": CONFIGS / "every-policy.yaml",
}
# Issue 7's CPU-per-request target of a config, as a multiple of the floor's. The
# --max-cpu-ratio guard scales with it (a config without one counts as 1.0).
CHAT_MODEL = str(CHAT_BODY["model"])
CPU_TARGETS = {"default-chain": 1.0, "every-policy": 1.5}
PHASES = ("soak", "open_streams")  # measured once per target after the rounds
LONG_CHUNKS = 80  # events per stream of sse_paced80_c10


# --------------------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Scenario:
    """A traffic shape; ``weight`` scales --requests so every visit lasts similar time."""

    name: str
    desc: str
    kind: str  # json | sse | ndjson (what the load generator checks)
    path: str
    connections: int
    weight: float
    expect_events: int = 0
    headers: tuple[str, ...] = ()
    min_latency_ms: float = 0.0
    embed_inputs: int = 0  # embeddings: a list of this many inputs (0: one string)

    @property
    def streaming(self) -> bool:
        return self.kind != "json"


def build_scenarios(chunks: int, pace_ms: float) -> dict[str, Scenario]:
    """All scenarios the runner knows; DEFAULT_SCENARIOS picks the default set."""
    long_chunks = LONG_CHUNKS
    chat = "/v1/chat/completions"
    return {
        s.name: s
        for s in (
            Scenario("chat_c1", "non-stream chat, 1 connection", "json", chat, 1, 0.5),
            Scenario("chat_c10", "non-stream chat, 10 connections", "json", chat, 10, 1.0),
            Scenario("chat_c50", "non-stream chat, 50 connections", "json", chat, 50, 1.0),
            Scenario(
                "sse_c10",
                f"SSE chat stream, {chunks} events back to back, 10 connections",
                "sse",
                chat,
                10,
                0.5,
                expect_events=chunks + 1,
            ),
            Scenario(
                "ndjson_c10",
                f"Ollama /api/chat NDJSON stream, {chunks} lines back to back, 10 connections",
                "ndjson",
                "/api/chat",
                10,
                0.5,
                expect_events=chunks,
            ),
            Scenario(
                "sse_paced_c10",
                f"SSE chat stream, {chunks} events {pace_ms:g} ms apart, 10 connections "
                "(is each event forwarded as it comes?)",
                "sse",
                chat,
                10,
                0.15,
                expect_events=chunks + 1,
                headers=(f"X-Bench-Chunk-Delay-Ms: {pace_ms:g}",),
                min_latency_ms=pace_ms * chunks * 0.9,
            ),
            Scenario(
                "sse_paced_c1",
                f"SSE chat stream, {chunks} events {pace_ms:g} ms apart, 1 connection "
                "(what the proxy adds to one stream, without queueing behind others)",
                "sse",
                chat,
                1,
                0.1,
                expect_events=chunks + 1,
                headers=(f"X-Bench-Chunk-Delay-Ms: {pace_ms:g}",),
                min_latency_ms=pace_ms * chunks * 0.9,
            ),
            Scenario(
                f"sse_paced{long_chunks}_c10",
                f"SSE chat stream, {long_chunks} events {pace_ms:g} ms apart, 10 connections "
                f"(with sse_paced_c10: the CPU of one relayed event)",
                "sse",
                chat,
                10,
                0.15 * (chunks + 1) / (long_chunks + 1),
                expect_events=long_chunks + 1,
                headers=(f"X-Bench-Chunk-Delay-Ms: {pace_ms:g}", f"X-Bench-Chunks: {long_chunks}"),
                min_latency_ms=pace_ms * long_chunks * 0.9,
            ),
            Scenario(
                "embed_c10",
                "embeddings, one input, 10 connections",
                "json",
                "/v1/embeddings",
                10,
                0.5,
            ),
            Scenario(
                "embed_batch_c10",
                "embeddings, a list of 16 inputs, 10 connections",
                "json",
                "/v1/embeddings",
                10,
                0.5,
                embed_inputs=16,
            ),
            Scenario(
                "chat_nocache_c10",
                "non-stream chat with Cache-Control: no-cache, 10 connections (a cache miss that stores)",
                "json",
                chat,
                10,
                1.0,
                headers=("Cache-Control: no-cache",),
            ),
        )
    }


DEFAULT_SCENARIOS = (
    "chat_c1",
    "chat_c10",
    "chat_c50",
    "sse_c10",
    "ndjson_c10",
    "sse_paced_c1",
    "sse_paced_c10",
    "sse_paced80_c10",
    "embed_batch_c10",
    "soak",
    "open_streams",
)
GUARD_SCENARIO = "chat_c10"
PACED_SHORT = "sse_paced_c10"  # with PACED_LONG: the CPU of one relayed event
PACED_LONG = "sse_paced80_c10"


# --------------------------------------------------------------------------- /proc
def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


def tree(pid: int) -> list[int]:
    """The process and all its live descendants (a sidecar may fork workers)."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo += _children(p)
    return seen


def cpu_ns(pid: int) -> tuple[int, int]:
    """(precise, ticks) CPU time in ns of the process tree of ``pid``.

    precise: sum of every live thread's on-CPU time from /proc/.../schedstat (ns
    resolution). ticks: utime+stime (+ reaped children's cutime+cstime of the
    root) from /proc/PID/stat, at 1/CLK_TCK resolution (10 ms). The kernel
    derives the second from the first, so they agree over a run; the precise one
    keeps short visits (``--quick``) from being dominated by 10 ms steps.
    """
    precise = ticks = 0
    for i, p in enumerate(tree(pid)):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
            if i == 0:
                ticks += int(fields[13]) + int(fields[14])
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{p}/task/{task}/schedstat") as f:
                    precise += int(f.read().split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return precise, ticks * 1_000_000_000 // CLK_TCK


def core_ns() -> dict[int, tuple[int, int, int]]:
    """Per core (task, irq+softirq, steal) busy time in ns from /proc/stat.

    Used to see *other* work on the cores during a visit (another test suite, a
    noisy neighbour VM): core busy time minus what our own processes used.
    """
    out: dict[int, tuple[int, int, int]] = {}
    scale = 1_000_000_000 // CLK_TCK
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *vals = line.split()
            v = [int(x) for x in vals[:8]] + [0] * max(0, 8 - len(vals))
            user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
            out[int(name[3:])] = (
                (user + nice + system) * scale,
                (irq + softirq) * scale,
                steal * scale,
            )
    return out


def peak_rss_kib(pid: int) -> tuple[int, int]:
    """(root, tree) VmHWM in KiB: the peak resident set since the process started."""
    root = total = 0
    for i, p in enumerate(tree(pid)):
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    kib = int(line.split()[1])
                    total += kib
                    root = kib if i == 0 else root
                    break
    return root, total


def rss_kib(pid: int) -> tuple[int, int]:
    """(root, tree) VmRSS in KiB: the resident set now."""
    root = total = 0
    for i, p in enumerate(tree(pid)):
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    kib = int(line.split()[1])
                    total += kib
                    root = kib if i == 0 else root
                    break
    return root, total


def raise_nofile(wanted: int) -> tuple[int, int]:
    """Raise the soft open-files limit towards ``wanted`` (children inherit it); (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < limit:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def can_pin() -> bool:
    if not hasattr(os, "sched_getaffinity"):
        return False
    return {PROXY_CORE, HARNESS_CORE} <= os.sched_getaffinity(0)


def spawn(
    cmd: list[str],
    core: int | None,
    stdout: int | IO[Any] | None,
    stderr: int | IO[Any] | None,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
) -> subprocess.Popen[bytes]:
    """Start a process in its own session (so we can stop its whole group), pinned.

    `cwd` is where `python -m sidecar` finds its code: another checkout runs that
    checkout's sidecar (see --checkout).
    """
    if core is not None:
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", str(core), *cmd]  # taskset execs: same pid
        else:
            pin_to = core

            def _pin() -> None:
                os.sched_setaffinity(0, {pin_to})

            return subprocess.Popen(
                cmd,
                cwd=cwd,
                stdout=stdout,
                stderr=stderr,
                env=env,
                start_new_session=True,
                preexec_fn=_pin,
            )
    return subprocess.Popen(
        cmd, cwd=cwd, stdout=stdout, stderr=stderr, env=env, start_new_session=True
    )


def stop(proc: subprocess.Popen[Any] | None) -> None:
    """SIGTERM the process group we started, SIGKILL it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def http_get(port: int, path: str, timeout: float = 2.0, method: str = "GET") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def wait_ready(proc: subprocess.Popen[Any], port: int, path: str, timeout: float) -> str | None:
    """Poll ``GET path`` until 200; return why not, or None when ready."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with status {proc.returncode} before answering"
        try:
            status, body = http_get(port, path, 1.0)
            if status == 200:
                return None
            last = f"GET {path} -> {status} {body[:200]!r}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.05)
    return f"not ready after {timeout:.0f} s ({last})"


def sidecar_usable() -> str | None:
    """Why ``python -m sidecar serve`` cannot run here, or None if it can."""
    if (
        not (REPO / "sidecar" / "__main__.py").exists()
        and not (REPO / "sidecar" / "cli.py").exists()
    ):
        return "sidecar/__main__.py and sidecar/cli.py do not exist yet"
    try:
        r = subprocess.run(
            [sys.executable, "-m", "sidecar", "serve", "--help"],
            cwd=REPO,
            capture_output=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        return "`python -m sidecar serve --help` did not finish in 60 s"
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).decode(errors="replace").strip().splitlines()[-6:]
        return f"`python -m sidecar serve --help` exited {r.returncode}: " + " | ".join(tail)
    return None


def sidecar_cmd(config: Path, port: int, upstream_port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sidecar",
        "serve",
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--upstream",
        f"http://127.0.0.1:{upstream_port}",
    ]


LITELLM_CONFIG = """\
# Written by bench/run.py --litellm: LiteLLM's proxy in front of the fast upstream,
# as an OpenAI-compatible provider, no master key, no database, no callbacks.
model_list:
  - model_name: "{model}"
    litellm_params:
      model: "openai/{model}"
      api_base: "http://127.0.0.1:{port}/v1"
      api_key: "unused"
litellm_settings:
  telemetry: false
general_settings:
  dangerously_permit_weak_or_unset_master_key: true
  # x-* headers go upstream, so the paced and held streams work through it too.
  forward_client_headers_to_llm_api: true
"""
LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # do not fetch the price list from GitHub
    "LITELLM_TELEMETRY": "False",
    "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
}


def litellm_cmd(binary: str, config: Path, port: int) -> list[str]:
    return [binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]


def diagnose_start(
    cmd: list[str], core: int | None, env: dict[str, str] | None = None, wait: float = 8
) -> str:
    """Re-run a target that failed to start, this time keeping stderr, to say why."""
    p = spawn(cmd, core, subprocess.DEVNULL, subprocess.PIPE, env)
    try:
        _, err = p.communicate(timeout=wait)
    except subprocess.TimeoutExpired:
        stop(p)
        err = p.stderr.read() if p.stderr else b""
    lines = err.decode(errors="replace").strip().splitlines()[-8:]
    return " | ".join(lines) or "(nothing on stderr)"


class LoadGen:
    """The load generator worker process: one JSON job in, one JSON result out."""

    def __init__(self, core: int | None) -> None:
        cmd = [sys.executable, str(BENCH / "loadgen.py"), "--stdin"]
        if core is not None:
            cmd += ["--cpu", str(core)]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True
        )
        # A thread reads the lines, so a read can wait with a timeout (open_streams).
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(b"")  # end of output: the worker is gone

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        self.send(job)
        while True:
            res = self.read()
            assert res is not None
            if "event" not in res:
                return res

    def send(self, job: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps(job) + b"\n")
        self.proc.stdin.flush()

    def read(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next line (a result, or an ``{"event": ...}``); None if none came in ``timeout``."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        if not line:
            raise RuntimeError("load generator died")
        res: dict[str, Any] = orjson.loads(line)
        if "fatal" in res:
            raise RuntimeError(f"load generator failed: {res['fatal']}")
        return res

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            stop(self.proc)


# --------------------------------------------------------------------------- targets
@dataclass
class Target:
    """Something the load generator can be pointed at."""

    name: str
    role: str  # direct | floor | sidecar | litellm
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    pid: int = 0
    config: str | None = None
    checkout: Path = REPO  # the source tree a sidecar target runs from
    skipped: str | None = None  # why it is not measured
    died: str | None = None

    def alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            self.died = self.died or f"exited with status {self.proc.returncode} during the run"
        return self.skipped is None and self.died is None


@dataclass
class Visit:
    """One measured pass of one scenario against one target."""

    target: str
    scenario: str
    round: int
    leg: str  # "fwd" | "back"
    requests: int
    ok: int
    errors: int
    timed_out: bool
    stalled: int
    wall_s: float
    lg_cpu_s: float
    target_cpu_ns: int
    target_cpu_ticks_ns: int
    upstream_cpu_ns: int
    foreign_core0_ns: int = 0  # busy time on the proxy core not used by the target
    foreign_core1_ns: int = 0  # busy time on the harness core not used by the harness
    irq_core0_ns: int = 0  # irq+softirq time on the proxy core (not in the target's CPU)
    retries: int = 0  # times this visit was re-measured because of foreign load
    error_samples: list[str] = field(default_factory=list)
    lat_us: list[int] = field(default_factory=list, repr=False)
    ttfc_us: list[int] = field(default_factory=list, repr=False)
    spread_us: list[int] = field(default_factory=list, repr=False)

    @property
    def done(self) -> int:
        return self.ok + self.errors


# --------------------------------------------------------------------------- runner
class Bench:
    """Owns the processes, runs the visits, aggregates and reports."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pin = can_pin() and not args.no_pin
        self.scen_all = build_scenarios(args.chunks, args.pace_ms)
        self.scenarios = [self.scen_all[n] for n in args.scenarios if n not in PHASES]
        self.phases = [n for n in args.scenarios if n in PHASES]
        self.open_n = args.open_streams
        # Peak RSS (root, tree) of each target after the rounds and after the soak:
        # "under load", before open_streams holds its 1,000 streams.
        self.rss_rounds: dict[str, tuple[int, int]] = {}
        self.rss_load: dict[str, tuple[int, int]] = {}
        self.soak_results: dict[str, dict[str, Any]] = {}
        self.open_results: dict[str, dict[str, Any]] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="sidecar-bench-")
        self.targets: list[Target] = []
        self.upstream: subprocess.Popen[bytes] | None = None
        self.upstream_port = 0
        self.lg: LoadGen | None = None
        self.visits: list[Visit] = []
        self.warmup_errors: dict[str, list[str]] = {}
        self.notes: list[str] = []
        self.retry_s = 0.0  # time spent re-measuring noisy visits (bounded by --noise-budget-s)
        self._devnull = open(os.devnull, "wb")  # noqa: SIM115 - lives as long as the run

    def core(self, which: int) -> int | None:
        return which if self.pin else None

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # -- setup ------------------------------------------------------------------
    def start(self) -> None:
        if self.pin:
            os.sched_setaffinity(0, {HARNESS_CORE})  # the runner idles beside the harness
        else:
            self.notes.append("no CPU pinning (fewer than 2 usable cores or --no-pin)")
        if "open_streams" in self.phases:
            # A proxy holds 2 sockets per open stream, the load generator 1: every
            # process we start inherits this soft limit.
            soft, hard = raise_nofile(2 * self.open_n + 1024)
            if soft < 2 * self.open_n + 256:
                n = max(0, (soft - 256) // 2)
                self.notes.append(
                    f"open_streams: {self.open_n} streams need ~{2 * self.open_n + 256} open files, "
                    f"the limit is {soft} (hard {hard}): measuring {n}"
                )
                self.open_n = n
        self.upstream_port = free_port()
        self.upstream = spawn(
            [
                sys.executable,
                str(BENCH / "fast_upstream.py"),
                "--port",
                str(self.upstream_port),
                "--chunks",
                str(self.args.chunks),
            ],
            self.core(HARNESS_CORE),
            self._devnull,
            None,
        )
        why = wait_ready(self.upstream, self.upstream_port, "/api/version", 15)
        if why:
            raise SystemExit(f"fast_upstream failed to start: {why}")
        self.lg = LoadGen(self.core(HARNESS_CORE))
        wanted = self.args.targets
        self.targets.append(Target("direct", "direct", self.upstream_port, None, self.upstream.pid))
        self.targets.append(Target("floor", "floor"))
        for name, path in self.args.configs.items():
            checkout = self.args.checkouts.get(name, REPO)
            self.targets.append(Target(name, "sidecar", config=str(path), checkout=checkout))
        if self.args.litellm:
            self.targets.append(Target("litellm", "litellm", config=self.args.litellm))
        if wanted:
            self.targets = [t for t in self.targets if t.name in wanted or t.role == "direct"]
        sidecars = [t for t in self.targets if t.role == "sidecar"]
        why_not = sidecar_usable() if sidecars else None
        for t in self.targets:
            if t.role == "floor":
                t.port = free_port()
                t.proc = spawn(
                    [
                        sys.executable,
                        str(BENCH / "floor.py"),
                        "--port",
                        str(t.port),
                        "--upstream",
                        f"http://127.0.0.1:{self.upstream_port}",
                    ],
                    self.core(PROXY_CORE),
                    self._devnull,
                    None,
                )
                why = wait_ready(t.proc, t.port, "/api/version", 20)
                if why:
                    raise SystemExit(f"floor.py failed to start: {why}")
                t.pid = t.proc.pid
            elif t.role == "sidecar":
                if why_not:
                    t.skipped = why_not
                    self.log(f"SKIP sidecar config {t.name!r}: {why_not}")
                    continue
                assert t.config is not None
                if not Path(t.config).exists():
                    t.skipped = f"config file {t.config} not found"
                    self.log(f"SKIP sidecar config {t.name!r}: {t.skipped}")
                    continue
                t.port = free_port()
                cmd = sidecar_cmd(Path(t.config), t.port, self.upstream_port)
                # stdout (the JSON access log) and stderr go to /dev/null: writing the
                # access line is part of the cost, reading it is not.
                t.proc = spawn(
                    cmd, self.core(PROXY_CORE), self._devnull, self._devnull, cwd=t.checkout
                )
                why = wait_ready(t.proc, t.port, "/healthz", self.args.start_timeout)
                if why:
                    stop(t.proc)
                    t.skipped = f"did not start: {why}; stderr: {diagnose_start(cmd, None)}"
                    self.log(f"SKIP sidecar config {t.name!r}: {t.skipped}")
                    t.proc = None
                    continue
                t.pid = t.proc.pid
                self.log(f"sidecar {t.name!r} ready on :{t.port} (pid {t.pid}, {t.config})")
            elif t.role == "litellm":
                self.start_litellm(t)

    def start_litellm(self, t: Target) -> None:
        """LiteLLM's proxy (``litellm --config``) with the fast upstream as an OpenAI provider."""
        assert t.config is not None
        cfg = Path(self._tmp.name) / "litellm.yaml"
        cfg.write_text(LITELLM_CONFIG.format(model=CHAT_MODEL, port=self.upstream_port))
        t.port = free_port()
        cmd = litellm_cmd(t.config, cfg, t.port)
        env = {**os.environ, **LITELLM_ENV}
        try:
            t.proc = spawn(cmd, self.core(PROXY_CORE), self._devnull, self._devnull, env)
        except OSError as exc:
            t.skipped = f"cannot run {t.config}: {exc}"
            self.log(f"SKIP litellm: {t.skipped}")
            return
        why = wait_ready(t.proc, t.port, "/health/liveliness", max(self.args.start_timeout, 90))
        if why:
            stop(t.proc)
            t.skipped = f"did not start: {why}; stderr: {diagnose_start(cmd, None, env, 30)}"
            self.log(f"SKIP litellm: {t.skipped}")
            t.proc = None
            return
        t.pid = t.proc.pid
        self.log(f"litellm ready on :{t.port} (pid {t.pid}, {t.config})")

    def supports(self, t: Target, sc: Scenario) -> bool:
        """LiteLLM speaks the OpenAI API only: no /api/* scenarios."""
        return t.role != "litellm" or sc.path.startswith("/v1/")

    def close(self) -> None:
        if self.lg:
            self.lg.close()
        for t in self.targets:
            stop(t.proc)
        stop(self.upstream)
        self._devnull.close()
        self._tmp.cleanup()

    # -- measuring ----------------------------------------------------------------
    def n_requests(self, sc: Scenario, base: int) -> int:
        return max(sc.connections * 2, round(base * sc.weight))

    def job(self, t: Target, sc: Scenario, n: int) -> dict[str, Any]:
        return {
            "host": "127.0.0.1",
            "port": t.port,
            "path": sc.path,
            "kind": sc.kind,
            "method": "POST",
            "body": default_body(sc.kind, sc.path, sc.embed_inputs).decode(),
            "connections": sc.connections,
            "requests": n,
            "duration_s": self.args.max_visit_s,
            "timeout_s": self.args.max_visit_s + self.args.stall_timeout,
            # LiteLLM re-chunks a stream (extra role/finish events): check its [DONE] only.
            "expect_events": 0 if t.role == "litellm" else sc.expect_events,
            "headers": list(sc.headers),
            "min_latency_ms": sc.min_latency_ms,
        }

    def visit(self, t: Target, sc: Scenario, n: int, rnd: int, leg: str) -> Visit | None:
        assert self.lg is not None and self.upstream is not None
        if not t.alive():
            return None
        c0, k0 = cpu_ns(t.pid)
        u0 = cpu_ns(self.upstream.pid)[0]
        me0, cores0 = _self_cpu_ns(), core_ns()
        res = self.lg.run(self.job(t, sc, n))
        me1, cores1 = _self_cpu_ns(), core_ns()
        c1, k1 = cpu_ns(t.pid)
        u1 = cpu_ns(self.upstream.pid)[0]
        ours = {PROXY_CORE: 0, HARNESS_CORE: res["cpu_s"] * 1e9 + (u1 - u0) + (me1 - me0)}
        if t.role != "direct":
            ours[PROXY_CORE] = c1 - c0
        foreign = (
            {
                core: max(
                    0,
                    (cores1[core][0] - cores0[core][0])
                    + (cores1[core][2] - cores0[core][2])
                    - ours[core],
                )
                for core in ours
                if core in cores0 and core in cores1
            }
            if self.pin
            else {}
        )
        v = Visit(
            target=t.name,
            scenario=sc.name,
            round=rnd,
            leg=leg,
            requests=n,
            ok=res["ok"],
            errors=res["errors"],
            timed_out=res["timed_out"],
            stalled=res["stalled"],
            wall_s=res["wall_s"],
            lg_cpu_s=res["cpu_s"],
            target_cpu_ns=c1 - c0,
            target_cpu_ticks_ns=k1 - k0,
            upstream_cpu_ns=u1 - u0,
            foreign_core0_ns=int(foreign.get(PROXY_CORE, 0)),
            foreign_core1_ns=int(foreign.get(HARNESS_CORE, 0)),
            irq_core0_ns=cores1[PROXY_CORE][1] - cores0[PROXY_CORE][1]
            if PROXY_CORE in cores0
            else 0,
            error_samples=res["error_samples"],
            lat_us=res["lat_us"],
            ttfc_us=res["ttfc_us"],
            spread_us=res["spread_us"],
        )
        if v.errors or v.timed_out:
            self.log(
                f"  ! {t.name}/{sc.name} round {rnd} {leg}: {v.errors} errors"
                + (f", TIMED OUT with {v.stalled} requests in flight" if v.timed_out else "")
                + (f"; first: {v.error_samples[0]}" if v.error_samples else "")
            )
        t.alive()
        return v

    @staticmethod
    def noise_share(v: Visit) -> float:
        """Largest share of the visit's wall time that other processes took on a core."""
        if v.wall_s <= 0:
            return 0.0
        # /proc/stat counts in 10 ms ticks: forgive two of them per visit.
        slack = 2 * 1_000_000_000 // CLK_TCK
        return max(0, max(v.foreign_core0_ns, v.foreign_core1_ns) - slack) / 1e9 / v.wall_s

    def noisy(self, v: Visit) -> bool:
        return self.noise_share(v) > self.args.noise_max

    def warmup(self) -> None:
        """Fill connection pools, JIT-less caches and allocator arenas before measuring."""
        assert self.lg is not None
        for t in self.targets:
            if not t.alive():
                continue
            for sc in self.scenarios:
                if not self.supports(t, sc):
                    continue
                n = max(sc.connections * 2, round(self.args.warmup * max(sc.weight, 0.1)))
                res = self.lg.run(self.job(t, sc, n))
                if res["errors"] or res["timed_out"]:
                    msg = (
                        f"{res['errors']} errors"
                        + (", timed out" if res["timed_out"] else "")
                        + (f"; first: {res['error_samples'][0]}" if res["error_samples"] else "")
                    )
                    self.warmup_errors.setdefault(t.name, []).append(f"{sc.name}: {msg}")
                    self.log(f"  ! warm-up {t.name}/{sc.name}: {msg}")

    def measure(self) -> None:
        live = [t for t in self.targets if t.alive()]
        order = live + live[::-1]
        legs = ["fwd"] * len(live) + ["back"] * len(live)
        for rnd in range(1, self.args.rounds + 1):
            for sc in self.scenarios:
                n = self.n_requests(sc, self.args.requests)
                t0 = time.monotonic()
                for t, leg in zip(order, legs, strict=True):
                    if not self.supports(t, sc):
                        continue
                    v = self.visit(t, sc, n, rnd, leg)
                    retries = 0
                    while (
                        v is not None
                        and self.noisy(v)
                        and retries < self.args.noise_retries
                        and self.retry_s < self.args.noise_budget_s
                    ):
                        retries += 1
                        t_retry = time.monotonic()
                        self.log(
                            f"  ~ {t.name}/{sc.name}: other work on the cores "
                            f"({self.noise_share(v) * 100:.0f} % of the visit), measuring again"
                        )
                        time.sleep(self.args.noise_pause)
                        v = self.visit(t, sc, n, rnd, leg)
                        self.retry_s += time.monotonic() - t_retry
                    if v is not None:
                        v.retries = retries
                        self.visits.append(v)
                self.log(
                    f"round {rnd}/{self.args.rounds} {sc.name:<14} {n:>5} req x "
                    f"{len(order)} visits in {time.monotonic() - t0:5.1f} s"
                )

    # -- phases: measured once per target, after the rounds ----------------------------
    def run_phases(self) -> None:
        for t in self.targets:
            if t.alive() and t.pid:
                self.rss_rounds[t.name] = peak_rss_kib(t.pid)
        if "soak" in self.phases and self.args.soak > 0:
            for t in self.targets:
                if t.alive() and t.role in ("floor", "sidecar"):
                    self.soak_results[t.name] = self.soak(t)
        for t in self.targets:
            if t.alive() and t.pid:
                self.rss_load[t.name] = peak_rss_kib(t.pid)
        if "open_streams" in self.phases and self.open_n > 0:
            for t in self.targets:
                if t.alive():
                    self.open_results[t.name] = self.open_streams(t)

    def soak(self, t: Target) -> dict[str, Any]:
        """``--soak`` chat requests at c=10 back to back; RSS after the first
        ``--soak-warm`` (warm) and after every ``--soak-step`` more."""
        assert self.lg is not None
        sc = self.scen_all[GUARD_SCENARIO]
        total = self.args.soak
        warm = min(self.args.soak_warm, total)

        def chunk(k: int) -> dict[str, Any]:
            job = self.job(t, sc, k)
            # No time bound: the count is the point. Stalled below ~100 requests/s.
            job.update(duration_s=0, timeout_s=k / 100 + self.args.stall_timeout)
            assert self.lg is not None
            return self.lg.run(job)

        t0 = time.monotonic()
        res = chunk(warm)
        errors, timeouts, samples = res["errors"], int(res["timed_out"]), res["error_samples"][:3]
        rss_series = [(warm, rss_kib(t.pid)[1])]
        c0, cores0, me0, lg_s = cpu_ns(t.pid)[0], core_ns(), _self_cpu_ns(), 0.0
        u0 = cpu_ns(self.upstream.pid)[0] if self.upstream else 0
        t_warm = time.monotonic()
        done, ok, lat = warm, 0, []
        while done < total and t.alive() and not timeouts:
            k = min(self.args.soak_step, total - done)
            res = chunk(k)
            done += k
            ok += res["ok"]
            errors += res["errors"]
            timeouts += int(res["timed_out"])
            samples += res["error_samples"][: max(0, 3 - len(samples))]
            lg_s += res["cpu_s"]
            lat += res["lat_us"]
            rss_series.append((done, rss_kib(t.pid)[1]))
        wall = time.monotonic() - t_warm
        c1, cores1, me1 = cpu_ns(t.pid)[0], core_ns(), _self_cpu_ns()
        u1 = cpu_ns(self.upstream.pid)[0] if self.upstream else 0
        noise = 0.0
        if self.pin and wall > 0 and PROXY_CORE in cores0 and HARNESS_CORE in cores0:
            busy = {
                c: (cores1[c][0] - cores0[c][0]) + (cores1[c][2] - cores0[c][2]) for c in cores0
            }
            ours = {PROXY_CORE: c1 - c0, HARNESS_CORE: lg_s * 1e9 + (u1 - u0) + (me1 - me0)}
            noise = max(max(0, busy[c] - ours[c]) for c in ours) / 1e9 / wall
        kib_warm, kib_end = rss_series[0][1], rss_series[-1][1]
        after_warm = done - warm
        out = {
            "requests": done,
            "warm_requests": warm,
            "errors": errors,
            "timeouts": timeouts,
            "error_samples": samples,
            "rss_warm_mib": kib_warm / 1024,
            "rss_end_mib": kib_end / 1024,
            "rss_max_mib": max(k for _, k in rss_series) / 1024,
            "growth_pct": (kib_end - kib_warm) / kib_warm * 100 if kib_warm else None,
            "rss_series_kib": [list(x) for x in rss_series],
            "cpu_ms_per_req": (c1 - c0) / after_warm / 1e6 if after_warm else None,
            "rps": ok / wall if wall else None,
            "latency": summarize_us(lat),
            "wall_s": time.monotonic() - t0,
            "noise_pct": noise * 100,
        }
        self.log(
            f"soak {t.name:<14} {done} req in {out['wall_s']:5.1f} s: RSS {kib_warm / 1024:.1f} -> "
            f"{kib_end / 1024:.1f} MiB ({_f(out['growth_pct'], 0, '+.1f').strip()} %)"
            + (f", {errors} ERRORS" if errors else "")
            + (", TIMED OUT" if timeouts else "")
        )
        return out

    def upstream_call(self, method: str, path: str) -> int:
        """GET /bench/held or POST /bench/release on the fast upstream: the count it answers."""
        try:
            _, body = http_get(self.upstream_port, path, 10.0, method)
            return int(next(iter(orjson.loads(body).values())))
        except (OSError, ValueError, StopIteration, orjson.JSONDecodeError):
            return -1

    def open_streams(self, t: Target) -> dict[str, Any]:
        """Hold ``--open-streams`` SSE streams open at once through ``t``; its RSS before and while open."""
        assert self.lg is not None
        n = self.open_n
        sc = self.scen_all["sse_c10"]
        time.sleep(0.3)
        rss0, hwm0 = rss_kib(t.pid), peak_rss_kib(t.pid)
        c0 = cpu_ns(t.pid)[0]
        job = self.job(t, sc, n)
        job.update(
            connections=n,
            requests=n,
            duration_s=0,
            timeout_s=2 * self.args.open_timeout + self.args.stall_timeout,
            headers=["X-Bench-Hold: 1"],
            notify_first=True,
        )
        t0 = time.monotonic()
        self.lg.send(job)
        first = self.lg.read(timeout=self.args.open_timeout)
        result = first if first is not None and "event" not in first else None
        all_open = first is not None and first.get("event") == "all_first"
        open_s = time.monotonic() - t0
        if all_open:
            time.sleep(self.args.open_settle)  # the last first-chunks relayed, buffers settled
        held = self.upstream_call("GET", "/bench/held")
        rss1 = rss_kib(t.pid)
        c1 = cpu_ns(t.pid)[0]
        released = self.upstream_call("POST", "/bench/release")
        # Streams the target had not yet sent upstream (a pool smaller than N) are
        # held when they arrive: keep releasing until the load generator is done.
        deadline = time.monotonic() + 2 * self.args.open_timeout + self.args.stall_timeout + 10
        while result is None:
            r = self.lg.read(timeout=0.5)
            if r is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"open_streams on {t.name}: the load generator did not finish"
                    )
                self.upstream_call("POST", "/bench/release")
            elif "event" not in r:
                result = r
        time.sleep(0.3)
        rss2 = rss_kib(t.pid)
        opened = n if all_open else max(0, min(held, n))
        per_stream = (rss1[1] - rss0[1]) / opened if opened else None
        out = {
            "streams": n,
            "opened": opened,
            "all_open": all_open,
            "held_upstream": held,
            "released": released,
            "open_s": open_s,
            "rss_before_mib": rss0[1] / 1024,
            "rss_open_mib": rss1[1] / 1024,
            "rss_after_mib": rss2[1] / 1024,
            "kib_per_stream": per_stream,
            "peak_rss_before_mib": hwm0[1] / 1024,
            "cpu_ms_per_stream_open": (c1 - c0) / opened / 1e6 if opened else None,
            "ok": result["ok"],
            "errors": result["errors"],
            "timeouts": int(result["timed_out"]),
            "error_samples": result["error_samples"][:3],
        }
        self.log(
            f"open_streams {t.name:<14} {opened}/{n} open in {open_s:4.1f} s: RSS "
            f"{rss0[1] / 1024:.1f} -> {rss1[1] / 1024:.1f} MiB = "
            f"{_f(per_stream, 0, '.1f').strip()} KiB/stream"
            + (f", {result['errors']} ERRORS" if result["errors"] else "")
            + ("" if all_open else " NOT ALL OPEN")
        )
        return out

    # -- aggregation ----------------------------------------------------------------
    def aggregate(self) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for t in self.targets:
            if t.skipped:
                continue
            per: dict[str, dict[str, Any]] = {}
            rss = self.rss_rounds.get(t.name) or (
                peak_rss_kib(t.pid) if t.pid and t.died is None else (0, 0)
            )
            for sc in self.scenarios:
                vs = [v for v in self.visits if v.target == t.name and v.scenario == sc.name]
                if not vs:
                    continue
                done = sum(v.done for v in vs)
                ok = sum(v.ok for v in vs)
                wall = sum(v.wall_s for v in vs)
                cpu = sum(v.target_cpu_ns for v in vs)
                per_visit = [v.target_cpu_ns / v.done / 1e6 for v in vs if v.done]
                mean = sum(per_visit) / len(per_visit) if per_visit else math.nan
                lat = [x for v in vs for x in v.lat_us]
                r: dict[str, Any] = {
                    "visits": len(vs),
                    "requests": done,
                    "ok": ok,
                    "errors": sum(v.errors for v in vs),
                    "timeouts": sum(v.timed_out for v in vs),
                    "stalled": sum(v.stalled for v in vs),
                    "error_samples": [e for v in vs for e in v.error_samples][:5],
                    "rps": ok / wall if wall else 0.0,
                    "latency": summarize_us(lat),
                    # Median of the visits: one disturbed visit must not move the headline.
                    "cpu_ms_per_req": statistics.median(per_visit) if per_visit else math.nan,
                    "cpu_ms_per_req_pooled": cpu / done / 1e6 if done else math.nan,
                    "cpu_ticks_ms_per_req": sum(v.target_cpu_ticks_ns for v in vs) / done / 1e6
                    if done
                    else math.nan,
                    "cpu_ms_per_req_visits": [round(x, 5) for x in per_visit],
                    "cpu_visit_spread_pct": (max(per_visit) - min(per_visit)) / 2 / mean * 100
                    if per_visit and mean
                    else math.nan,
                    "upstream_cpu_ms_per_req": sum(v.upstream_cpu_ns for v in vs) / done / 1e6
                    if done
                    else math.nan,
                    "lg_cpu_util_max": max(v.lg_cpu_s / v.wall_s for v in vs if v.wall_s),
                    "core1_util_max": max(
                        (v.lg_cpu_s + v.upstream_cpu_ns / 1e9) / v.wall_s for v in vs if v.wall_s
                    ),
                    "noise_pct_max": max(self.noise_share(v) for v in vs) * 100,
                    "noisy_visits": sum(self.noisy(v) for v in vs),
                    "retried_visits": sum(v.retries for v in vs),
                    "irq_core0_ms_per_req": sum(v.irq_core0_ns for v in vs) / done / 1e6
                    if done
                    else math.nan,
                    "target_core_util_max": max(
                        v.target_cpu_ns / 1e9 / v.wall_s for v in vs if v.wall_s
                    ),
                    "peak_rss_mib": rss[0] / 1024,
                    "peak_rss_tree_mib": rss[1] / 1024,
                }
                if sc.streaming:
                    r["ttfc"] = summarize_us([x for v in vs for x in v.ttfc_us])
                    r["spread"] = summarize_us([x for v in vs for x in v.spread_us])
                per[sc.name] = r
            out[t.name] = per
        # Ratios and deltas need the reference rows.
        direct, floor = out.get("direct", {}), out.get("floor", {})
        for per in out.values():
            for name, r in per.items():
                d, f = direct.get(name), floor.get(name)
                r["cpu_ratio_to_floor"] = (
                    r["cpu_ms_per_req"] / f["cpu_ms_per_req"] if f and f["cpu_ms_per_req"] else None
                )
                r["added_p50_ms"] = (
                    r["latency"]["p50_ms"] - d["latency"]["p50_ms"]
                    if d and d["latency"] and r["latency"]
                    else None
                )
                if "ttfc" in r and d and d.get("ttfc") and r["ttfc"]:
                    r["added_ttfc_p50_ms"] = r["ttfc"]["p50_ms"] - d["ttfc"]["p50_ms"]
                    r["spread_p50_vs_direct_ms"] = r["spread"]["p50_ms"] - d["spread"]["p50_ms"]
        return out

    # -- reporting --------------------------------------------------------------------
    def table(self, results: dict[str, dict[str, dict[str, Any]]]) -> str:
        lines: list[str] = []
        for sc in self.scenarios:
            rows = [
                (t, results[t.name][sc.name])
                for t in self.targets
                if sc.name in results.get(t.name, {})
            ]
            if not rows:
                continue
            lines.append("")
            lines.append(f"== {sc.name}: {sc.desc}")
            head = (
                f"{'target':<14}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'+p50 ms':>9}"
                f"{'CPU ms/req':>11}{'±%':>5}{'x floor':>8}{'RSS MiB':>8}{'lg%':>5}{'core1%':>7}{'noise%':>7}"
            )
            if sc.streaming:
                head += f"{'ttfc p50':>9}{'+ttfc':>7}{'spread p50':>11}{'Δspread':>8}"
            lines.append(head + "  notes")
            for t, r in rows:
                lat = r["latency"] or {}
                row = (
                    f"{t.name:<14}{r['rps']:>8.0f}{lat.get('p50_ms', math.nan):>8.3f}"
                    f"{lat.get('p99_ms', math.nan):>8.3f}{_f(r['added_p50_ms'], 9, '+.3f')}"
                    f"{r['cpu_ms_per_req']:>11.4f}{r['cpu_visit_spread_pct']:>5.0f}"
                    f"{_f(r['cpu_ratio_to_floor'], 8, '.2f')}{r['peak_rss_mib']:>8.1f}"
                    f"{r['lg_cpu_util_max'] * 100:>5.0f}{r['core1_util_max'] * 100:>7.0f}"
                    f"{r['noise_pct_max']:>7.0f}"
                )
                if sc.streaming:
                    tt, sp = r.get("ttfc") or {}, r.get("spread") or {}
                    row += (
                        f"{tt.get('p50_ms', math.nan):>9.3f}{_f(r.get('added_ttfc_p50_ms'), 7, '+.3f')}"
                        f"{sp.get('p50_ms', math.nan):>11.3f}"
                        f"{_f(r.get('spread_p50_vs_direct_ms'), 8, '+.3f')}"
                    )
                notes = []
                if r["errors"]:
                    notes.append(f"{r['errors']} ERRORS")
                if r["timeouts"]:
                    notes.append(f"{r['timeouts']} TIMEOUTS ({r['stalled']} stalled)")
                if r["noisy_visits"]:
                    notes.append(f"{r['noisy_visits']} NOISY visit(s)")
                if r["lg_cpu_util_max"] > LG_SATURATED:
                    notes.append("loadgen saturated")
                elif r["core1_util_max"] > CORE1_SATURATED:
                    notes.append("harness-bound" if t.role == "direct" else "HARNESS-BOUND")
                lines.append(row + "  " + ", ".join(notes))
        return "\n".join(lines)

    def summary(self, results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
        """One line per sidecar config: its CPU ratio to the floor in every scenario."""
        lines = []
        for t in self.targets:
            per = results.get(t.name)
            if t.role != "sidecar" or not per:
                continue
            ratios = ", ".join(
                f"{name} {r['cpu_ratio_to_floor']:.2f}"
                for name, r in per.items()
                if r.get("cpu_ratio_to_floor") is not None
            )
            lines.append(f"{t.name}: CPU/request x floor: {ratios}")
        return lines

    def chunk_cost(self, results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
        """CPU of one relayed event: the paced 80- and 20-event streams' difference / 60."""
        short, long = self.scen_all[PACED_SHORT], self.scen_all[PACED_LONG]
        extra = long.expect_events - short.expect_events
        out: dict[str, Any] = {}
        for name, per in results.items():
            a, b = per.get(PACED_SHORT), per.get(PACED_LONG)
            if not a or not b or not extra:
                continue
            per_chunk = (b["cpu_ms_per_req"] - a["cpu_ms_per_req"]) / extra
            out[name] = {
                "events_short": short.expect_events,
                "events_long": long.expect_events,
                "cpu_ms_per_req_short": a["cpu_ms_per_req"],
                "cpu_ms_per_req_long": b["cpu_ms_per_req"],
                "cpu_us_per_chunk": per_chunk * 1000,
                # What a stream request costs besides its events (the line's intercept).
                "cpu_ms_per_req_fixed": a["cpu_ms_per_req"] - per_chunk * short.expect_events,
            }
        floor = out.get("floor")
        for r in out.values():
            r["chunk_ratio_to_floor"] = (
                r["cpu_us_per_chunk"] / floor["cpu_us_per_chunk"]
                if floor and floor["cpu_us_per_chunk"] > 0
                else None
            )
        return out

    def report(
        self, results: dict[str, dict[str, dict[str, Any]]], elapsed: float
    ) -> dict[str, Any]:
        import aiohttp

        meta = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "elapsed_s": round(elapsed, 1),
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "cpu_model": _cpu_model(),
            "git": _git_describe(),
            "cpus": os.cpu_count(),
            "pinned": self.pin,
            "cores": {"proxy": PROXY_CORE, "harness": HARNESS_CORE} if self.pin else None,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
            "scenarios": {s.name: asdict(s) for s in self.scenarios},
            "phases": self.phases,
            "open_streams_n": self.open_n,
            "cpu_targets": CPU_TARGETS,
            "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
            "notes": self.notes,
        }
        prec = sum(v.target_cpu_ns for v in self.visits)
        tick = sum(v.target_cpu_ticks_ns for v in self.visits)
        meta["cpu_precise_vs_ticks"] = round(prec / tick, 4) if tick else None
        return {
            "meta": meta,
            "targets": {
                t.name: {
                    "role": t.role,
                    "config": t.config,
                    "skipped": t.skipped,
                    "died": t.died,
                    "warmup_errors": self.warmup_errors.get(t.name, []),
                }
                for t in self.targets
            },
            "results": results,
            "peak_rss_load_mib": {
                name: {"root": kib[0] / 1024, "tree": kib[1] / 1024}
                for name, kib in self.rss_load.items()
            },
            "chunk_cost": self.chunk_cost(results),
            "soak": self.soak_results,
            "open_streams": self.open_results,
            "visits": [
                {
                    k: v
                    for k, v in asdict(vis).items()
                    if k not in ("lat_us", "ttfc_us", "spread_us")
                }
                for vis in self.visits
            ],
        }


def _f(x: float | None, width: int, fmt: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-".rjust(width)
    return format(x, fmt).rjust(width)


def _git_describe() -> str | None:
    """The commit measured (with -dirty), so a JSON file says which sidecar it describes."""
    try:
        r = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() or None


def _self_cpu_ns() -> int:
    """The runner's own CPU (it sits on the harness core too)."""
    t = os.times()
    return int((t.user + t.system) * 1e9)


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Measure the sidecar's overhead against no proxy and a bare aiohttp proxy.",
        epilog="Exit status: 0 ok, 1 errors/stalls/died, 2 --max-cpu-ratio exceeded, "
        "3 --max-cpu-ratio could not be evaluated.",
    )
    p.add_argument("--quick", action="store_true", help="CI-sized run (< 30 s)")
    p.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests per visit at weight 1 (default 2000, quick 600)",
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="A/B/C/C/B/A rounds (default 3, quick 1)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warm-up requests per target and scenario (default 300, quick 100)",
    )
    p.add_argument(
        "--scenarios",
        default=None,
        help=f"comma list (default {','.join(DEFAULT_SCENARIOS)}; --quick leaves out "
        "soak and open_streams); also: embed_c10, chat_nocache_c10",
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="measure another sidecar config (repeatable)",
    )
    p.add_argument(
        "--checkout",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="run sidecar config NAME from the source tree DIR (e.g. a `git worktree` of the "
        "commit before a change), to compare two versions of the code in one run",
    )
    p.add_argument("--no-default-configs", action="store_true", help="only the --config ones")
    p.add_argument(
        "--targets", default="", help="comma list of target names to keep (direct is always kept)"
    )
    p.add_argument(
        "--max-cpu-ratio",
        type=float,
        default=None,
        metavar="X",
        help=f"fail if a sidecar's CPU/request on {GUARD_SCENARIO} exceeds X times the floor's "
        "(times the config's issue-7 target where it has one: every-policy 1.5)",
    )
    p.add_argument(
        "--soak",
        type=int,
        default=100_000,
        metavar="N",
        help="soak: N chat requests at c=10 per sidecar config and the floor (0: skip)",
    )
    p.add_argument(
        "--soak-warm",
        type=int,
        default=10_000,
        metavar="N",
        help="soak: the RSS after the first N requests is the baseline of the growth",
    )
    p.add_argument(
        "--soak-step",
        type=int,
        default=10_000,
        metavar="N",
        help="soak: sample RSS every N requests",
    )
    p.add_argument(
        "--open-streams",
        type=int,
        default=1000,
        metavar="N",
        help="open_streams: streams held open at once through each target (0: skip)",
    )
    p.add_argument(
        "--open-timeout",
        type=float,
        default=60.0,
        help="open_streams: seconds for all streams to get their first event",
    )
    p.add_argument(
        "--open-settle",
        type=float,
        default=1.0,
        help="open_streams: seconds to wait once all are open before sampling RSS",
    )
    p.add_argument(
        "--litellm",
        default=None,
        metavar="PATH",
        help="also measure LiteLLM's proxy: PATH of its `litellm` command "
        "(e.g. /tmp/litellm-venv/bin/litellm); /v1 scenarios only; never in CI",
    )
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the markdown report (issue-7 targets, tables, machine) to PATH, "
        "e.g. docs/performance.md",
    )
    p.add_argument("--chunks", type=int, default=20, help="events per stream")
    p.add_argument("--pace-ms", type=float, default=1.0, help="gap between events in sse_paced_c10")
    p.add_argument(
        "--max-visit-s",
        type=float,
        default=None,
        help="duration bound of one visit (default 6, quick 2)",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=20.0,
        help="seconds past the bound before a visit counts as stalled",
    )
    p.add_argument(
        "--start-timeout", type=float, default=30.0, help="seconds for a sidecar to answer /healthz"
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument(
        "--noise-max",
        type=float,
        default=0.10,
        help="a visit where other processes took more than this share of a core is noisy",
    )
    p.add_argument(
        "--noise-retries", type=int, default=3, help="re-measure a noisy visit up to N times"
    )
    p.add_argument(
        "--noise-pause", type=float, default=0.5, help="seconds to wait before re-measuring"
    )
    p.add_argument(
        "--noise-budget-s",
        type=float,
        default=None,
        help="total seconds allowed for re-measuring (default 40, quick 5)",
    )
    p.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    a = p.parse_args(argv)
    q = a.quick
    a.requests = a.requests or (600 if q else 2000)
    a.rounds = a.rounds or (1 if q else 3)
    a.warmup = a.warmup if a.warmup is not None else (100 if q else 300)
    a.noise_budget_s = a.noise_budget_s if a.noise_budget_s is not None else (5.0 if q else 40.0)
    a.max_visit_s = a.max_visit_s or (2.0 if q else 6.0)
    if a.scenarios is None:
        names = [n for n in DEFAULT_SCENARIOS if not (q and n in PHASES)]
    else:
        names = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    known = [*build_scenarios(a.chunks, a.pace_ms), *PHASES]
    bad = [n for n in names if n not in known]
    if bad:
        p.error(f"unknown scenario(s) {bad}; known: {', '.join(known)}")
    if a.soak_warm >= a.soak > 0:
        p.error("--soak must be larger than --soak-warm")
    a.scenarios = names
    configs: dict[str, Path] = {} if a.no_default_configs else dict(DEFAULT_CONFIGS)
    for item in a.config:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--config wants NAME=PATH, got {item!r}")
        if name in ("direct", "floor", "litellm"):
            p.error(f"--config name {name!r} is reserved")
        configs[name] = Path(path).resolve()
    a.configs = configs
    a.checkouts = {}
    for item in a.checkout:
        name, sep, directory = item.partition("=")
        if not sep or name not in configs:
            p.error(f"--checkout wants NAME=DIR with NAME a sidecar config, got {item!r}")
        if not (Path(directory) / "sidecar" / "__main__.py").is_file():
            p.error(f"--checkout {name}: {directory} has no sidecar/__main__.py")
        a.checkouts[name] = Path(directory).resolve()
    a.targets = {s.strip() for s in a.targets.split(",") if s.strip()}
    known_targets = {"direct", "floor", *configs, *(["litellm"] if a.litellm else [])}
    unknown = a.targets - known_targets
    if unknown:
        p.error(f"unknown target(s) {sorted(unknown)}; known: {', '.join(sorted(known_targets))}")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    bench = Bench(args)
    try:
        bench.start()
        live = [t.name for t in bench.targets if t.alive()]
        bench.log(
            f"targets: {', '.join(live)}; scenarios: {', '.join(args.scenarios)}; "
            f"{args.rounds} round(s); pinned: {bench.pin}"
        )
        bench.warmup()
        bench.measure()
        bench.run_phases()
        results = bench.aggregate()
    finally:
        bench.close()
    report = bench.report(results, time.monotonic() - t_start)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(_finite(report), indent=2, allow_nan=False))
    print(bench.table(results))
    print()
    for t in bench.targets:
        if t.skipped:
            print(f"skipped {t.name}: {t.skipped}")
        if t.died:
            print(f"DIED {t.name}: {t.died}")
    print(
        "CPU ms/req: on-CPU time of the target's process tree / requests (median of the visits);"
        " x floor: that / floor.py's.\n±%: half the spread of the visits around their mean."
        " lg%, core1%: load generator, + upstream. noise%: other processes on a core.\n"
        f"wrote {args.output.relative_to(REPO) if args.output.is_relative_to(REPO) else args.output} "
        f"in {time.monotonic() - t_start:.0f} s"
    )
    ratio = report["meta"]["cpu_precise_vs_ticks"]
    if ratio is not None and abs(ratio - 1) > 0.05:
        print(
            f"warning: per-thread CPU (schedstat) is {ratio:.3f} x utime+stime (stat): "
            "threads or children that exited during visits are missing from the precise figure"
        )
    for line in bench.summary(results):
        print(line)
    data = _finite(report)
    print()
    print(benchreport.phases_markdown(data))
    print(benchreport.targets_markdown(data))
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(benchreport.render(data))
        print(f"wrote {args.report}")
    status = 0
    phase_rows = [*bench.soak_results.items(), *bench.open_results.items()]
    bad = [
        t.name
        for t in bench.targets
        if t.died
        or any(r["errors"] or r["timeouts"] for r in results.get(t.name, {}).values())
        or any(n == t.name and (r["errors"] or r["timeouts"]) for n, r in phase_rows)
    ]
    if "litellm" in bad:
        # A comparison, not ours to pass: its failures are figures (see the tables).
        print("litellm: errors, stalls or crashes (comparison target, not counted in the status)")
        bad.remove("litellm")
    if bad:
        print(f"FAIL: errors, stalls or crashes in: {', '.join(bad)}")
        status = 1
    if args.max_cpu_ratio is not None:
        ratios = {
            t.name: results[t.name][GUARD_SCENARIO]["cpu_ratio_to_floor"]
            for t in bench.targets
            if t.role == "sidecar" and GUARD_SCENARIO in results.get(t.name, {})
        }
        ratios = {k: v for k, v in ratios.items() if v is not None}
        if not ratios:
            print(
                f"FAIL: --max-cpu-ratio given but no sidecar config was measured on {GUARD_SCENARIO}"
            )
            return 3
        bound = {k: args.max_cpu_ratio * CPU_TARGETS.get(k, 1.0) for k in ratios}
        over = {k: v for k, v in ratios.items() if v > bound[k]}
        for k, v in ratios.items():
            verdict = "OVER" if k in over else "ok"
            scale = f" = {args.max_cpu_ratio} x {CPU_TARGETS[k]}" if k in CPU_TARGETS else ""
            print(
                f"guard {k}: {v:.2f} x floor CPU/request on {GUARD_SCENARIO} "
                f"(max {bound[k]:.2f}{scale}) {verdict}"
            )
        if over:
            return 2
    return status


def _finite(x: Any) -> Any:
    """NaN/inf -> None, so the JSON is strict (jq, browsers and orjson all read it)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (set, frozenset)):
        return sorted(_finite(v) for v in x)
    if isinstance(x, Path):
        return str(x)
    return x


if __name__ == "__main__":
    sys.exit(main())
