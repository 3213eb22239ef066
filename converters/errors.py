"""The one error type checkpoint readers raise: always names the file at fault."""


class CheckpointError(ValueError):
    """A model file is missing, truncated, corrupt or of an unsupported kind."""

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")
