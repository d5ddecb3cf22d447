#!/usr/bin/env bash
# The five research repositories at the commits measured (docs/benchmarks.md "Research code"), into repos/ (ignored
# by git: their code is theirs, not part of fxmemopt), and timm into _deps/ (--no-deps: it would pull another torch).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p repos
fetch() {  # owner/name commit
    local dir="repos/${1/\//+}"
    [ -d "$dir" ] || git clone -q "https://github.com/$1" "$dir"
    git -C "$dir" checkout -q "$2"
}
fetch ZK-Zhou/spikformer 621268981827af47aa666c1b5f774de4281d90ad
fetch zhouchenlin2096/QKFormer c2a00e8e54538e76f5954614a60c1d53824bbee9
fetch BICLab/Spike-Driven-Transformer 3faa82272eb499e4d56ea77707d4536e7c69a54b
fetch xyshi2000/SpikingResformer 3f751275dedfda8b0a4ed0bf50e85e02a4335f3e
fetch fangwei123456/Spike-Element-Wise-ResNet cfc547c5e8196b1a16ebc596509b4dffea7c306f
[ -d _deps/timm ] || python -m pip install -q --no-deps --target _deps timm==1.0.31
