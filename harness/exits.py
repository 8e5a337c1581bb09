"""How a command ends on our own bug: exit status 3, one line on stderr, the traceback in a file."""
from __future__ import annotations

import os
import sys


def internal_error(exc: BaseException) -> int:
    """Exit status 3: one line on stderr naming the error and the file that holds its traceback."""
    import tempfile
    import time
    import traceback

    text = "".join(traceback.format_exception(exc))
    try:
        fd, where = tempfile.mkstemp(prefix=f"ratebench-error-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".txt")
        with os.fdopen(fd, "w") as fh:
            fh.write(f"ratebench {' '.join(sys.argv[1:])}\n{text}")
    except OSError as err:
        where = f"nowhere (the temporary folder refused it: {err.strerror or err})"
    first = (str(exc).strip().splitlines() or [""])[0]
    print(f"ratebench: internal error: {type(exc).__name__}: {first}; traceback written to {where}", file=sys.stderr)
    return 3
