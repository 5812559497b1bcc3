"""Failures a run reports in one line (``python -m apt`` prints it and exits 1), beside ``ConfigError``
(``apt.config``: a mistake in the input, exit 2). Kept free of heavy imports: the CLI catches them."""


class RunFailure(RuntimeError):
    """A run stopped for a reason the user can act on; the message says what and where."""
