"""`Closing`: what an object with a `close()` needs to be used in a `with` block, written once.

It is a protocol (the stream protocols extend it) and, subclassed, a mixin that supplies
`__enter__` and `__exit__`: leaving the block closes the object. When the block ends with an
error and `close()` fails too, the close failure is logged and the block's own error is the one
raised, so the cause is never hidden by a broken connection's second complaint.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Protocol, Self

log = logging.getLogger(__name__)


class Closing(Protocol):
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception:
            log.exception("closing %s failed while handling another error", type(self).__name__)
