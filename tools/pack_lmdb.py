#!/usr/bin/env python3
"""Pack an image folder into an srpipe LMDB database: `python tools/pack_lmdb.py IMAGES DB`.

The same command as `srdata pack`; runnable from a checkout without installing srpipe.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from srdata.cli import pack_cmd  # noqa: E402

if __name__ == "__main__":
    # the defaults in --help, as `srdata pack --help` shows them (the group sets that there)
    pack_cmd(prog_name="pack_lmdb.py", show_default=True)
