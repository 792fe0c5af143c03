"""Put a dataset or weights into object storage.

    python -m bit_zoo.remote mb s3://bucket                      # create a bucket (a local test server; on OBS use the console)
    python -m bit_zoo.remote upload data/digits s3://bucket/digits

The store and its credentials are configured as bit_zoo.utils.remote describes (the README's
object-storage walk-through runs these before train.py --data_dir s3://...).
"""

from __future__ import annotations

import logging
import sys

from ..options import HelpFormatter, ToolParser
from ..utils.remote import RemoteError, UploadError, make_bucket, upload
from ..utils.runner import run_cli

__all__ = ["main"]

PROG = "python -m bit_zoo.remote"


def _parser() -> ToolParser:
    p = ToolParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", help="upload a local file or folder (every file under it) to a URL")
    up.add_argument("local")
    up.add_argument("url")
    mb = sub.add_parser("mb", help="create a bucket (a local test server; on OBS use the console)")
    mb.add_argument("url")
    return p


def main(argv: list[str] | None = None) -> int:
    """{upload LOCAL URL | mb s3://bucket}: one line and exit 2 on failure."""
    return run_cli(_main, argv, prog=PROG)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.command == "upload":
        try:
            count = upload(args.local, args.url)
        except UploadError as e:  # the upload is this command's whole work: a failure is bad input (exit 2), not a run's late upload (4)
            raise RemoteError(str(e)) from e
        print(f"{count} files uploaded to {args.url}")
    else:
        make_bucket(args.url)
        print(f"created {args.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
