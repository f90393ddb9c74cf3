"""The one exception type minivar raises for bad input.

Everything a user can get wrong (a missing image, a broken checkpoint, a bad flag value) raises `MinivarError`
with a one-line message that names the thing at fault; the command line prints it to stderr as
`minivar: error: ...` and exits with code 2.
Anything else that escapes is a bug in minivar, and keeps its traceback.
"""


class MinivarError(Exception):
    """A user-facing error: the message is one line naming the file, tensor, value or limit at fault."""
