#!/usr/bin/env bash
# System services the integration tests start (PostgreSQL for the DuckLake catalog, Chromium for
# the report's and the app's browser tests, driven over DevTools: no chromedriver). Installs what
# is missing with apt-get; does nothing when present.
set -uo pipefail
need=()
command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing ${need[*]} (apt-get)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
      || echo "could not install ${need[*]}: the tests that need them will skip, saying so"
  else
    echo "missing ${need[*]} and no root apt-get: the tests that need them will skip, saying so"
  fi
fi
exit 0
