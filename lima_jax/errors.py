"""The one exception type for input a user must fix: every entry point answers it with exit status 2.

Its message is the whole answer: it names the file and line, the field or the flag that is wrong
and what was expected, so the command line prints it as one line, without a traceback.
"""

EXIT_BAD_INPUT = 2


class InputError(ValueError):
  """Bad user input (a file, a config field, a flag); the message says where and what to change."""
