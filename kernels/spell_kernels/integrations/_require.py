"""Integrations import their framework when they are used, and say which extra installs it."""
from importlib import import_module


def require(module: str, extra: str | None):
    """Import `module` (e.g. "transformers"); a missing one names the pip extra that installs it
    (extra=None: a framework spell-kernels has no extra for, installed on its own)."""
    try:
        return import_module(module)
    except ImportError as e:
        how = f"pip install 'spell-kernels[{extra}]' (or pip install {module})" if extra else f"pip install {module}"
        raise ImportError(f"spell_kernels.integrations needs {module!r}, which is not installed: {how}") from e
