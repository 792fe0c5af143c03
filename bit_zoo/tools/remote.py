"""Put a dataset or weights into object storage: python -m bit_zoo.utils.remote {upload LOCAL URL | mb s3://bucket}."""

from __future__ import annotations

import argparse
import logging
import sys

from ..utils.remote import RemoteError, make_bucket, upload


def main(argv: list[str] | None = None) -> int:
    """python -m bit_zoo.utils.remote {upload LOCAL URL | mb s3://bucket}: one line and exit 2 on failure."""
    p = argparse.ArgumentParser(prog="python -m bit_zoo.utils.remote", description="Put a dataset or weights into object storage.")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", help="upload a local file or folder (every file under it) to a URL")
    up.add_argument("local")
    up.add_argument("url")
    mb = sub.add_parser("mb", help="create a bucket (a local test server; on OBS use the console)")
    mb.add_argument("url")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.command == "upload":
            print(f"{upload(args.local, args.url)} files uploaded to {args.url}")
        else:
            make_bucket(args.url)
            print(f"created {args.url}")
    except (RemoteError, OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
