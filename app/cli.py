"""``fastface app --root ROOT [--host H] [--port P]`` (registered by :func:`flows.cli.register_commands`)."""

from __future__ import annotations

import argparse
import sys


def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="store root: a folder or s3://bucket/prefix")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (0: any free one; default: %(default)s)")
    parser.add_argument("--cache-dir", default=None, help="models and identities for the Generate tab "
                        "(default: $FASTFACE_CACHE or ~/.cache/fastface)")
    parser.add_argument("--device", default=None, help="torch device for the Generate tab (default: cuda if available)")


def run_app(args: argparse.Namespace) -> int:
    from app.server import make_server

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0..65535, got {args.port}")
    try:
        server = make_server(args.root, args.host, args.port, cache_dir=args.cache_dir, device=args.device)
    except OSError as exc:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; choose another --port") from None
    host, port = server.server_address[:2]
    # Open the store and prepare the first page now; a missing or empty root is a message in the page
    # later (the app keeps trying on each request), not a crash.
    server.RequestHandlerClass.app.reader.warm()
    print(f"serving {args.root} at http://{host}:{port}/explore (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
