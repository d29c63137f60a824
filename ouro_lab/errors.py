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


DEVICES = "cpu, cuda, cuda:N, mps or auto"
DEVICE_PATTERN = r"^(cpu|auto|mps|cuda(:\d+)?)$"  # the recipe's model.device and every --device


def check_device(device: str | None) -> None:
    """Refuse a device name torch would fail on with a traceback (`tpu`, `cuda:x`)."""
    import re

    if device is not None and not re.fullmatch(DEVICE_PATTERN, str(device)):
        raise OuroLabError(f"device {str(device)!r}: use {DEVICES}")
