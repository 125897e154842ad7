#!/usr/bin/env bash
# `make test-peft-suite` (part of `make test-long`): peft's own LoRA tests, for the peft
# installed in .venv, run offline twice: as shipped, and with every LoRA model they build
# patched by lora_kernels.patch_peft (tests/peft_suite_plugin.py). Fails if a test that
# passes without the patch fails with it; reports the counts and how many calls reached
# the fused op. peft's sdist ships its tests; their own extra requirements (diffusers,
# attrs, parameterized, requests) go into build/peft-suite/deps, not into .venv.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PEFT_SUITE_PYTHON:-$repo/.venv/bin/python}
version=$("$py" -c "import peft; print(peft.__version__)")
work=$repo/build/peft-suite
src=$work/peft-$version
deps=$work/deps
mkdir -p "$work"
if ! [ -d "$src/tests" ]; then
    "$py" -m pip download -q --no-binary :all: --no-deps "peft==$version" -d "$work"
    tar xzf "$work/peft-$version.tar.gz" -C "$work"
    touch "$src/tests/__init__.py"  # its tests import each other relatively
fi
if ! [ -d "$deps/parameterized" ]; then
    "$py" -m pip install -q --no-deps --target "$deps" diffusers attrs parameterized \
        requests urllib3 idna certifi charset-normalizer
fi
# The files with LoRA tests (PEFT_SUITE_FILES: others); -k keeps the LoRA cases, and
# tests/peft_suite_offline.py skips those that reach for the Hub.
files=${PEFT_SUITE_FILES:-"test_custom_models.py test_lora_variants.py test_initialization.py
test_xlora.py test_other.py test_low_level_api.py test_target_parameters.py"}
selection=()
for f in $files; do selection+=("tests/$f"); done

run() {  # run NAME [pytest args]: junit XML into $work/NAME.xml
    local name=$1
    shift
    echo "peft suite ($version): $name run"
    (cd "$src" && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
        PYTHONPATH="$repo:$repo/tests:$deps" "$py" -m pytest -c /dev/null --rootdir . -q \
        -p no:cacheprovider -p peft_suite_offline -k "lora or Lora or LoRA" \
        --junitxml="$work/$name.xml" "$@" "${selection[@]}" > "$work/$name.log" 2>&1) || true
    tail -n 1 "$work/$name.log"
}
start=$(date +%s)
run plain
PEFT_SUITE_COUNTS=$work/patched-counts.json run patched -p peft_suite_plugin
"$py" - "$work" <<'PY'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

work = Path(sys.argv[1])


def outcomes(name):
    result = {}
    for case in ET.parse(work / f"{name}.xml").iter("testcase"):
        key = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        result[key] = "failed" if kinds & {"failure", "error"} else (
            "skipped" if "skipped" in kinds else "passed")
    return result


plain, patched = outcomes("plain"), outcomes("patched")
passed = [k for k, v in plain.items() if v == "passed"]
broken = sorted(k for k in passed if patched.get(k) != "passed")
counts = json.loads((work / "patched-counts.json").read_text())
print(f"peft suite: {len(passed)} tests pass without patch_peft; "
      f"{len(passed) - len(broken)} of them pass with it")
print(f"peft suite: {counts['patch_calls']} patch_peft calls, {counts['modules_patched']} "
      f"modules patched, {counts['fused_calls']} fused calls; fallbacks: "
      f"{counts['fallback_calls']}")
for k in broken:
    print(f"  passes without, fails with patch_peft: {k}")
sys.exit(1 if broken else 0)
PY
echo "peft suite: $(( $(date +%s) - start )) s"
