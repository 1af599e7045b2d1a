"""The two errors a user sees as one line and exit code 2 (the CLI catches them; nothing else prints them), and the
helpers that raise them for a config value."""


class UserError(Exception):
    """A user mistake (bad input, unreachable data source); the CLI prints one line and exits with code 2."""


class ConfigError(UserError, ValueError):
    """A configuration value out of range or unknown; the message starts with the full key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _enum(value, enum_cls, key: str):
    """Accept an Enum member or its value; reject anything else naming the allowed values."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum_cls)
        raise ConfigError(key, f"must be one of {allowed}, got {value!r}") from None


def _accept_values(enum_cls):
    """OmegaConf looks Enum members up by *name*; also accept each value (users write bf16-mixed)."""
    for member in enum_cls:
        enum_cls._member_map_.setdefault(member.value, member)
    return enum_cls
