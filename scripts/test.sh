#!/usr/bin/env bash
# Run the test suite (CPU, offline): every tier but `slow` (real weights / GPU), integration tests
# with real servers included. Extra arguments go to pytest.
#   FASTFACE_TEST_WORKERS=N  pytest-xdist workers (default 2: one per core of CI's machine; the
#                            tiny models run one torch thread each, see tests/conftest.py); 0 = none
#   FASTFACE_INTEGRATION=0   skip the multi-process integration tests (tests/conftest.py, INTEGRATION)
#   FASTFACE_LONG=0          skip the three longest integration tests (tests/conftest.py, LONG)
# --no-loadscope-reorder: files are handed out in tests/conftest.py's order (longest first), not
# by their number of tests, so no long file starts last and leaves the other worker idle.
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
workers="${FASTFACE_TEST_WORKERS:-2}"
# The project's own bytecode, written once: the editable install leaves it uncompiled and, where
# PYTHONDONTWRITEBYTECODE is set (as on CI), every process of the suite — each Ray actor, each
# `fastface` subprocess — would compile the modules it imports again (site-packages are compiled
# by scripts/setup.sh).
.venv/bin/python -m compileall -q fastface storage actors evaluation flows app > /dev/null
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadfile --no-loadscope-reorder --durations=30 "$@"
