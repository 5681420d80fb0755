#!/bin/sh
# Builds step_loop.cpp against this checkout's csrc/ and torch's headers, and runs it.
# Usage: benchmarks/in_cache/run.sh [params]
set -e
here=$(cd "$(dirname "$0")" && pwd)
includes=$(python -c "import torch.utils.cpp_extension as e; print(' '.join('-I' + p for p in e.include_paths()))" 2>/dev/null)
torch_lib=$(python -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
binary="$build/step_loop"
g++ -O3 -std=c++20 -DNDEBUG -fno-math-errno -Wall -Wextra -Wno-unused-parameter -Wno-psabi \
  -I"$here/../../csrc" $includes "$here/step_loop.cpp" -o "$binary" \
  -L"$torch_lib" -lc10 -Wl,-rpath,"$torch_lib"
"$binary" "$@"
