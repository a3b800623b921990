"""The errors tuner reports to the user as one line (the bottom layer: it imports nothing of tuner)."""


class ConfigError(ValueError):
    """A configuration or an input that cannot run; the message names the key or file and the fix."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a stage that has put what it made so far in order; the message says what is there."""
