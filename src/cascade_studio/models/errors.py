"""Errors of the models layer; each message tells the user what to do next."""


class ModelNotFoundError(RuntimeError):
    """The weights asked for are not on this machine (and nothing will be downloaded implicitly)."""


class ModelConfigError(ValueError):
    """A model folder, device or dtype choice that cannot work."""
