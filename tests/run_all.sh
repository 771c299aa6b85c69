#!/usr/bin/env bash
# Every CPU test: the C++ unit tests (GoogleTest via ctest, Debug build so asserts are live)
# and the Python suite (pytest). CUDA tests are skipped without a GPU. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p build
cmake -S . -B build/cpp-tests -G Ninja -DCMAKE_BUILD_TYPE=Debug -DKESTREL_BUILD_TESTS=ON \
  -DKESTREL_CUDA=OFF > build/cmake-cpp-tests.log 2>&1 || { cat build/cmake-cpp-tests.log; exit 1; }
cmake --build build/cpp-tests
ctest --test-dir build/cpp-tests --output-on-failure
"$PY" -m pytest -q "$@"
