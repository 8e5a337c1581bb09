"""Errors a user can act on: every one names the field, what was given and what is allowed."""


class ConfigError(ValueError):
    """Bad input, found before any compute. The CLI prints it and exits 2."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def require(config, where: str, fields: tuple[str, ...], ok, rule: str) -> None:
    """Raise ConfigError naming `<where>.<field>` for the first of `fields` whose value fails
    ok(value); `rule` says what is allowed. Example:
    require(cfg, "algorithm", ("lr",), lambda v: v > 0, "must be > 0")."""
    for field in fields:
        value = getattr(config, field)
        if not ok(value):
            raise ConfigError(f"{where}.{field}", f"{rule}, got {value}")
