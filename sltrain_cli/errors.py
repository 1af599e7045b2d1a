"""The two errors a user sees as one line and exit code 2 (the CLI catches them; nothing else prints them)."""


class UserError(Exception):
    """A user mistake (bad input, unreachable data source); the CLI prints one line and exits with code 2."""


class ConfigError(UserError, ValueError):
    """A configuration value out of range or unknown; the message starts with the full key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")
