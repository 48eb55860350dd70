"""What every object owning a library handle shares: `close()` once, on `with` exit too, and
on garbage collection as a last resort."""

from __future__ import annotations


class Closing:
    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass
