"""Command-line plumbing shared by ``train.pretrain``, ``train.finetune`` and ``train.sample``.

Every failure a user can cause or meet prints one line on stderr, without a traceback:

- ``config error: ...`` (exit code 2): a usage error, a flag or config value that cannot be
  used, a missing file or directory; it names the flag or field and what was expected, and
  nothing has been created on disk.
- ``checkpoint error: ...`` (exit code 1): a checkpoint that cannot be read or fails its
  integrity check (the message names the step directory and the parameters).
- ``training stopped: ...`` (exit code 1): a non-finite step under ``nonfinite="stop"``.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from train.config import ConfigError
from train.integrity import CheckpointError

__all__ = ["USAGE_ERROR", "RUN_ERROR", "guarded"]

USAGE_ERROR, RUN_ERROR = 2, 1


def guarded(main: Callable[[], object]) -> object:
    """Call ``main()``; turn the errors above into their one-line message and exit code."""
    from train.loop import NonFiniteError

    try:
        return main()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr, flush=True)
        sys.exit(USAGE_ERROR)
    except CheckpointError as err:
        print(f"checkpoint error: {err}", file=sys.stderr, flush=True)
        sys.exit(RUN_ERROR)
    except NonFiniteError as err:
        print(f"training stopped: {err}", file=sys.stderr, flush=True)
        sys.exit(RUN_ERROR)
