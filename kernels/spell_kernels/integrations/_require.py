"""Integrations import their framework when they are used, and say which extra installs it."""
from importlib import import_module


def require(module: str, extra: str):
    """Import `module` (e.g. "transformers"); a missing one names the pip extra that installs it."""
    try:
        return import_module(module)
    except ImportError as e:
        raise ImportError(f"spell_kernels.integrations needs {module!r}, which is not installed: "
                          f"pip install 'spell-kernels[{extra}]' (or pip install {module})") from e
