# Shell functions shared by tools/env.sh and tools/compat.sh (sourced, not run). They use $PY (the
# environment's python) and say() (the caller's prefix for messages).

# pip install, quiet; on failure the end of pip's output and exit 1
pipq() {
  local log; log=$(mktemp)
  if ! "$PY" -m pip install --disable-pip-version-check "$@" > "$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" | tail -n 30; rm -f "$log"; say "pip install $* failed"; exit 1
  fi
  rm -f "$log"
}

# need_disk GIB PATH WHAT: stops with a clear message when the file system holding PATH has less than GIB GiB
# free, before a step that would fail half-way with pip's "No space left on device".
need_disk() {
  local gib=$1 path=$2 what=$3 dir=$2 free_kib
  while [ ! -d "$dir" ]; do dir=$(dirname "$dir"); done
  free_kib=$(df -Pk "$dir" | awk 'NR==2 {print $4}')
  if [ "$free_kib" -lt $((gib * 1024 * 1024)) ]; then
    say "$what needs about $gib GiB free at $path; the file system has $((free_kib / 1024 / 1024)) GiB free."
    say "Free some space (old clones, ${TMPDIR:-/tmp}/pytest-of-$(id -un), ~/.cache/pip) and run again."
    exit 1
  fi
}

# have name[==version] ...: every distribution installed (at that version, local suffix ignored)
have() { "$PY" - "$@" <<'PYEOF' >/dev/null 2>&1
import importlib.metadata as md, sys
for spec in sys.argv[1:]:
    name, _, ver = spec.partition("==")
    got = md.version(name)
    if ver and got.split("+")[0] != ver:
        raise SystemExit(1)
PYEOF
}

# install_mmcv VERSION TORCH_VERSION CACHE STD OPENCV: mmcv with its CPU ops, from the wheel cached for this
# torch and Python, or built from mmcv's sdist once (its setup.py's -std flags replaced by STD unless STD is
# empty); then mmcv's runtime dependencies, OpenCV as the requirement OPENCV. Rebuilds when a cached wheel
# does not import.
install_mmcv() {
  local version=$1 torch_version=$2 cache=$3 std=$4 opencv=$5 wheels whl src pytag
  pytag=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
  wheels="$cache/wheels/torch-$torch_version-py$pytag"
  mkdir -p "$wheels"
  whl=$(ls "$wheels"/mmcv-"$version"-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$whl" ]; then
    say "building mmcv $version with its CPU ops from its sdist against torch $torch_version (7-15 minutes on 2 cores)"
    src=$(mktemp -d)
    "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation mmcv=="$version" -d "$src" 2>&1 | grep -v "is ignored" || true
    tar xzf "$src"/mmcv-"$version".tar.gz -C "$src"
    [ -n "$std" ] && sed -i -e "s/-std=c++14/-std=$std/g" -e "s/-std=c++17/-std=$std/g" "$src/mmcv-$version/setup.py"
    if ! (cd "$src/mmcv-$version" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
          "$PY" -m pip wheel --no-build-isolation --no-deps -w "$wheels" . > "$src/build.log" 2>&1); then
      tail -n 40 "$src/build.log"; say "building mmcv failed (log above)"; exit 1
    fi
    rm -rf "$src"
    whl=$(ls "$wheels"/mmcv-"$version"-*.whl | head -n1)
  fi
  say "installing $(basename "$whl")"
  pipq --no-deps --force-reinstall "$whl"
  pipq addict packaging Pillow pyyaml yapf "$opencv"
  if ! "$PY" -c "import mmcv.ops" >/dev/null 2>&1; then
    say "the cached mmcv wheel does not import against this torch; rebuilding it"
    rm -f "$whl"; install_mmcv "$@"
  fi
}
