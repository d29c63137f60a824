"""User-facing errors: each message is one line naming the file, the field and the fix.

The CLI prints `error: <message>` and exits 2 for any `OuroLabError`; set
`OURO_LAB_DEBUG=1` to get the traceback instead.
"""


class OuroLabError(Exception):
    """A mistake in user input (files, recipes, arguments), not a bug."""


class ConfigError(OuroLabError, ValueError):
    """A config.json the model cannot be built from."""


class CheckpointError(OuroLabError):
    """A checkpoint folder or weight file that cannot be loaded."""
