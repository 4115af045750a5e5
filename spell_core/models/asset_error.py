"""The one error of named assets (assets.py) and the hub (hub.py): shared by both, imported by both."""


class AssetError(RuntimeError):
    """A model or corpus could not be found, fetched or converted; the message says what to do."""
