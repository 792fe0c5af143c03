"""Weights records, file formats, reading, fetching and caching, class names."""
