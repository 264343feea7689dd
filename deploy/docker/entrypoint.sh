#!/bin/sh
# Container entrypoint: turns the container's environment into llamarouter flags, then
# execs llamarouter (PID stays the same, so `docker stop` SIGTERMs the router itself).
#
#   LLAMAROUTER_MODELS_DIR   models directory            (default /models)
#   LLAMAROUTER_HOST         listen address              (default 0.0.0.0)
#   PORT                     listen port                 (default 8080)
#   LLAMAROUTER_MODELS_MAX   --models-max                (default: llamarouter's)
#   LLAMAROUTER_MODELS_PRESET  --models-preset INI file  (optional)
#   LLAMAROUTER_API_KEY      --api-key (comma-separated keys)
#   LLAMAROUTER_API_KEY_FILE --api-key-file
#   LLAMAROUTER_ALLOW_NO_API_KEY=1  serve a non-loopback address without a key
# Every LLAMAROUTER_* setting of `llamarouter --help` (LLAMAROUTER_STATE_DIR,
# LLAMAROUTER_TTL, ...) and llama-server's LLAMA_ARG_* variables are read by llamarouter
# itself. Arguments given to the container (`docker run IMAGE -ngl 99 -c 8192`) are
# appended, so any llama-server flag reaches every child.
set -eu

models_dir="${LLAMAROUTER_MODELS_DIR:-/models}"
host="${LLAMAROUTER_HOST:-0.0.0.0}"
port="${PORT:-8080}"

set -- --models-dir "$models_dir" --host "$host" --port "$port" "$@"
if [ -n "${LLAMAROUTER_MODELS_MAX:-}" ]; then
    set -- "$@" --models-max "$LLAMAROUTER_MODELS_MAX"
fi
if [ -n "${LLAMAROUTER_MODELS_PRESET:-}" ]; then
    set -- "$@" --models-preset "$LLAMAROUTER_MODELS_PRESET"
fi

has_key=no
if [ -n "${LLAMAROUTER_API_KEY:-}" ]; then
    set -- "$@" --api-key "$LLAMAROUTER_API_KEY"
    has_key=yes
fi
if [ -n "${LLAMAROUTER_API_KEY_FILE:-}" ]; then
    if [ ! -r "$LLAMAROUTER_API_KEY_FILE" ]; then
        echo "entrypoint: LLAMAROUTER_API_KEY_FILE=$LLAMAROUTER_API_KEY_FILE is not readable" >&2
        exit 64
    fi
    set -- "$@" --api-key-file "$LLAMAROUTER_API_KEY_FILE"
    has_key=yes
fi
# llama-server's own spellings count too: a key given as an argument or LLAMA_API_KEY.
if [ -n "${LLAMA_API_KEY:-}" ] || [ -n "${LLAMA_ARG_API_KEY_FILE:-}" ]; then
    has_key=yes
fi
for arg in "$@"; do
    case "$arg" in
        --api-key|--api-key=*|--api-key-file|--api-key-file=*) has_key=yes ;;
    esac
done

case "$host" in
    127.*|localhost|::1) public=no ;;
    *) public=yes ;;
esac
if [ "$public" = yes ] && [ "$has_key" = no ] && [ "${LLAMAROUTER_ALLOW_NO_API_KEY:-}" != 1 ]; then
    cat >&2 <<MSG
entrypoint: refusing to serve $host:$port without an API key.
Set LLAMAROUTER_API_KEY (or LLAMAROUTER_API_KEY_FILE, e.g. a mounted secret), or set
LLAMAROUTER_ALLOW_NO_API_KEY=1 if something in front of the container does the auth.
MSG
    exit 64
fi

exec llamarouter "$@"
