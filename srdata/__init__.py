"""srdata: pack image folders into LMDB and load (LR, HR) training pairs fast."""
__version__ = "0.1.0"

from .format import DBError, FORMAT_VERSION  # noqa: E402
from .reader import PackedDB  # noqa: E402

__all__ = ["DBError", "FORMAT_VERSION", "PackedDB", "DaliTuning", "make_loader", "__version__"]


def __getattr__(name):
    # make_loader and DaliTuning pull in torch (seconds to import): only when a loader is
    # asked for, so `srdata pack` and the spawned pack workers stay light.
    if name == "make_loader":
        from .loader import make_loader
        return make_loader
    if name == "DaliTuning":
        from .loader_base import DaliTuning
        return DaliTuning
    raise AttributeError(f"module 'srdata' has no attribute {name!r}")
