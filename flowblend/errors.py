"""The one exception type for user errors, raised by every package where the bad value enters."""


class FlowblendError(Exception):
    """A user error: bad input, a missing artifact or a mismatched engine. The message says the fix."""
