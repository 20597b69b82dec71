"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class DistsftError(Exception):
    """A problem with the user's input (config, data, paths) that they can fix."""


class ConfigError(DistsftError):
    pass


class DataError(DistsftError):
    pass


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's first line (its type when it says nothing), for the one-line messages above."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
