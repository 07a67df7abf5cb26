"""Exit codes of gaspar's processes, shared by the worker, the supervisor and the producer.

A module of its own so that none of them imports another for a number.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
# A worker whose consumer's setup() raised: it never served.
EXIT_BOOT_ERROR = 3
# The most of its setup() error, in bytes, that a failed worker reports (below
# PIPE_BUF, so that the write never blocks on its supervisor).
MAX_SETUP_ERROR = 4096
