"""Progress of a long loop: a tqdm bar on a terminal, plain log lines otherwise (training, evaluation, the tools)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator

__all__ = ["Progress"]

_logger = logging.getLogger(__name__)


class Progress:
    """tqdm on a terminal, plain log lines every `every` items otherwise; silent when not enabled."""

    def __init__(self, iterable: Iterable, *, total: int | None, desc: str, enabled: bool = True, every: int = 50) -> None:
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.every = every
        self.postfix: dict = {}
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)

    def set_postfix(self, **kwargs) -> None:
        self.postfix = kwargs
        if self._bar is not None:
            self._bar.set_postfix(kwargs, refresh=False)

    def __iter__(self) -> Iterator:
        for i, item in enumerate(self.iterable, 1):
            yield item
            if self._bar is not None:
                self._bar.update(1)
            elif self.enabled and (i % self.every == 0 or i == self.total):
                extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
                _logger.info("%s %d/%s %s", self.desc, i, self.total if self.total else "?", extra)
        if self._bar is not None:
            self._bar.close()
