"""The supervisor's errors, apart from the supervisor: the CLI catches them without importing every service."""


class PortInUseError(Exception):
    """The broker's port is taken (most likely another server on this directory)."""
