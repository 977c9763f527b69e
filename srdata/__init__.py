"""srdata: pack image folders into LMDB and load (LR, HR) training pairs fast."""
__version__ = "0.1.0"

from .format import DBError, FORMAT_VERSION  # noqa: E402
from .reader import PackedDB  # noqa: E402

__all__ = ["DBError", "FORMAT_VERSION", "PackedDB", "__version__"]
