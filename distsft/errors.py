"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class DistsftError(Exception):
    """A problem with the user's input (config, data, paths) that they can fix."""


class ConfigError(DistsftError):
    pass


class DataError(DistsftError):
    pass
