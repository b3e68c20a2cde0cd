"""Imports the garbage collector never scans, for scripts whose imports build most of their objects.

The imports of torch, transformers and this repo build about 650,000 objects that live as long as the
process. Python's collector makes a full pass each time the objects it tracks have grown by a quarter, so it
scans them again and again while they are built: 1-2 s of a script's start (docs/PERF.md, "The garbage
collector at start-up"). Inside `frozen_imports()` the collector is off; at the end, everything built so far
moves to the permanent generation, which no collection scans, and the collector is on again for what the
script builds next.

It also stops the script first, with a clear error, when $TORCHINDUCTOR_CACHE_DIR cannot be written: torch's own
imports would fail on it with a traceback; and a Ctrl-C while the imports run ends it as one later would, with
`aborted` and status 130, not a traceback through the import machinery.
"""

import atexit
import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def frozen_imports() -> Iterator[None]:
    """Run a block of imports with the collector off; then freeze what they built and turn it back on."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        from trainer.compile_cache import exit_if_variable_unwritable

        exit_if_variable_unwritable()
        yield
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    finally:
        gc.freeze()
        # Back to collectable at exit: frozen objects outlive teardown, and triton's nanobind bindings then report
        # each as "leaked" (~30 lines after every script that ends through the interpreter, e.g. --help).
        atexit.register(gc.unfreeze)
        if was_enabled:
            gc.enable()
