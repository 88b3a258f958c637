# Shared by setup.sh and lock.sh: the default torch, a uv binary, and the package sources
# this machine's pip is configured with (uv does not read pip's configuration).
FASTFACE_DEFAULT_TORCH="torch==2.14.1 torchvision==0.29.1"
UV_SOURCES=(--index-strategy unsafe-best-match)
for link in ${PIP_FIND_LINKS:-}; do
  [ -e "$link" ] && UV_SOURCES+=(--find-links "$link")
done
for url in ${PIP_EXTRA_INDEX_URL:-} $(python3 -m pip config get global.extra-index-url 2>/dev/null || true); do
  case "$url" in
    file://*) [ -d "${url#file://}" ] && UV_SOURCES+=(--extra-index-url "$url") ;;
    *) UV_SOURCES+=(--extra-index-url "$url") ;;
  esac
done
if command -v uv >/dev/null 2>&1; then
  UV="$(command -v uv)"
else
  # Bootstrap uv from PyPI into its own folder (no system change); empty when that fails.
  UV=""
  if python3 -m pip install -q --target .tools/uv uv >/dev/null 2>&1; then
    UV="$PWD/.tools/uv/bin/uv"
  fi
fi
