"""Shared plumbing: atomic writes, cache paths, remote (s3://) locations."""
