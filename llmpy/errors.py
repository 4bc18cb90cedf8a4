"""The one user-facing exception of llmpy.

LlmpyError: user-facing error: the CLI prints its message without a traceback and exits 1.
Raise it (with a one-line message that names the file or flag and what is wrong) for problems in
what the user handed us: a missing or malformed file, an empty glob, a shard too small for B*T.
Programming errors (wrong dtypes, bad shapes passed between modules) stay ValueError/TypeError.
"""


class LlmpyError(Exception):
    """user-facing error: the CLI prints its message without a traceback and exits 1"""
