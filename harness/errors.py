"""Errors a user can act on: every one names the field, what was given and what is allowed."""


class ConfigError(ValueError):
    """Bad input, found before any compute. The CLI prints it and exits 2."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")
