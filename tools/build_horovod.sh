#!/usr/bin/env bash
# Builds and installs Horovod (TensorFlow + Gloo, CPU or GPU) into a virtual environment.
#
#   tools/build_horovod.sh [PYTHON]        (make horovod: PYTHON=.venv/bin/python)
#
# Horovod 0.28.1 is the last release. As published it does not build against
# TensorFlow >= 2.21: horovod/tensorflow/xla_mpi_ops.cc includes XLA headers
# TensorFlow no longer ships. That file only adds the XLA (jit_compile) variant
# of the MPI ops, which this project does not use, so the one patch below drops
# it from the build; everything else is the unmodified PyPI sdist.
#
# The wheel links TensorFlow's own shared libraries, so it is cached per exact
# Horovod, TensorFlow and Python version under ${XDG_CACHE_HOME:-~/.cache}/sparse-embed/:
# the first build takes about 5-8 minutes on 2 cores, every later install (a
# new clone, a new venv) seconds.
set -euo pipefail

PYTHON=${1:-${PYTHON:-python3}}
HOROVOD_VERSION=0.28.1

if "$PYTHON" -c "import horovod.tensorflow" >/dev/null 2>&1; then
  echo "horovod: already installed ($("$PYTHON" -c 'import horovod; print(horovod.__version__)'))"
  exit 0
fi

tf_version=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('tensorflow'))")
py_tag=$("$PYTHON" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
cache=${XDG_CACHE_HOME:-$HOME/.cache}/sparse-embed/horovod-${HOROVOD_VERSION}-tf${tf_version}-${py_tag}
mkdir -p "$cache"

# Horovod's runtime dependencies (the wheel is installed with --no-deps).
"$PYTHON" -m pip install --quiet cloudpickle psutil pyyaml packaging

wheel=$(ls "$cache"/horovod-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  build_start=$SECONDS
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  echo "horovod: building ${HOROVOD_VERSION} against tensorflow ${tf_version} (${py_tag}); takes minutes"
  # --no-build-isolation builds against the TensorFlow of this venv; the
  # build tools must then be present in it.
  "$PYTHON" -m pip install --quiet "setuptools<70" wheel
  "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "horovod==${HOROVOD_VERSION}" -d "$work"
  tar -xzf "$work/horovod-${HOROVOD_VERSION}.tar.gz" -C "$work"
  src="$work/horovod-${HOROVOD_VERSION}"
  cmakelists="$src/horovod/tensorflow/CMakeLists.txt"
  # The patch: remove the XLA op source that needs the missing headers.
  grep -q 'xla_mpi_ops.cc' "$cmakelists"
  sed -i '/xla_mpi_ops\.cc/d' "$cmakelists"
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
  HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
  MAKEFLAGS="-j$(nproc)" \
    "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation "$src" -w "$work/dist"
  built=$(ls "$work"/dist/horovod-*.whl)
  # Copy, then rename: a killed build never leaves a partial wheel in the cache.
  cp "$built" "$cache/.partial.whl"
  mv "$cache/.partial.whl" "$cache/$(basename "$built")"
  wheel="$cache/$(basename "$built")"
  # `make test` leaves this first build out of its time budget.
  if [ -n "${HOROVOD_BUILD_SECONDS_FILE:-}" ]; then
    echo $((SECONDS - build_start)) > "$HOROVOD_BUILD_SECONDS_FILE"
  fi
fi

"$PYTHON" -m pip install --quiet --no-deps --force-reinstall "$wheel"
"$PYTHON" -c "import horovod.tensorflow as hvd; hvd.init(); print('horovod:', __import__('horovod').__version__, 'gloo', hvd.gloo_built())"
