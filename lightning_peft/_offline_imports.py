"""Imports of dependencies that would otherwise reach the network: made local before anything imports them.

``bitsandbytes`` (imported by ``peft`` 0.21 at import, so by every command, and by the 8-bit optimizers) asks the
Hugging Face hub for a CPU kernel (``kernels.get_kernel("kernels-community/quantization-bitsandbytes")``) while it
is being imported, on CPUs with AVX512-BF16. That request has no timeout of its own: behind a proxy or firewall
that never answers, ``import peft`` waits for minutes, and with no network it makes DNS look-ups on every start;
when it fails, its warning ("Failed to load CPU gemm_4bit_forward …") becomes the first line of every run.

:func:`install` registers an import hook that runs ``bitsandbytes``' own import with the hub in offline mode (the
``kernels`` package reads ``huggingface_hub.constants.HF_HUB_OFFLINE`` when it resolves a kernel): a kernel already in
the local cache is still used, a missing one is not fetched and bitsandbytes keeps its built-in CPU code, which is
what it uses for everything this package does (8-bit optimizers; the kernel only serves 4-bit matrix products).
Nothing else changes: the hub stays online for whatever the user asks to download. The hook removes itself after
that one import, and does nothing when ``bitsandbytes`` is already imported or not installed.

This module imports only the standard library, so ``lightning_peft/__init__.py`` installs it before any import of
torch, transformers or peft.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Generator, Sequence
from types import ModuleType

__all__ = ["OFFLINE_IMPORTS", "install", "offline_hub"]

# The packages whose import is made local, and the loggers that report the kernel they then do without (a kernel
# missing from the local cache is the expected case, not a failure worth the first line of a run).
OFFLINE_IMPORTS = {"bitsandbytes": ("bitsandbytes", "kernels")}


@contextlib.contextmanager
def offline_hub(quiet_loggers: Sequence[str] = ()) -> Generator[None, None, None]:
    """Within the block, the Hugging Face hub is offline (local cache only) and ``quiet_loggers`` log only errors.

    Example::

        >>> import huggingface_hub.constants as hub
        >>> before = hub.HF_HUB_OFFLINE
        >>> with offline_hub():
        ...     hub.HF_HUB_OFFLINE
        True
        >>> hub.HF_HUB_OFFLINE == before
        True
    """
    import huggingface_hub.constants as hub

    loggers = [logging.getLogger(name) for name in quiet_loggers]
    levels = [logger.level for logger in loggers]
    offline = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    for logger in loggers:  # a package's loggers inherit the level of its top logger
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = offline
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class _OfflineLoader(importlib.abc.Loader):
    """Runs another loader's ``exec_module`` inside :func:`offline_hub`, then steps aside."""

    def __init__(self, loader: importlib.abc.Loader, quiet_loggers: Sequence[str]) -> None:
        self.loader = loader
        self.quiet_loggers = quiet_loggers

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # The module keeps its own loader (resources, reloads); this wrapper only lives for the one import.
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        try:
            import huggingface_hub.constants  # noqa: F401
        except ImportError:  # no hub client installed: nothing could reach the hub
            self.loader.exec_module(module)
            return
        with offline_hub(self.quiet_loggers):
            self.loader.exec_module(module)


class _OfflineImportFinder(importlib.abc.MetaPathFinder):
    """Finds the packages of :data:`OFFLINE_IMPORTS` through the other finders and wraps their loaders."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in OFFLINE_IMPORTS:
            return None
        spec = None
        for finder in list(sys.meta_path):  # the finders after this one, as the import system would ask them
            find = getattr(finder, "find_spec", None)
            if finder is not self and find is not None:
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None:
            return None
        if all(name in sys.modules for name in OFFLINE_IMPORTS if name != fullname):
            uninstall()  # every package of the table has been seen: the hook is no longer needed
        spec.loader = _OfflineLoader(spec.loader, OFFLINE_IMPORTS[fullname])
        return spec


_FINDER = _OfflineImportFinder()


def install() -> bool:
    """Put the import hook first on ``sys.meta_path``; False when every package of the table is imported already.

    ``import lightning_peft`` calls it; ``tests/test_network.py`` checks that a later ``import peft`` then makes no
    connection attempt, behind a proxy that never answers and with no network at all.
    """
    if all(name in sys.modules for name in OFFLINE_IMPORTS):
        return False
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    return True


def uninstall() -> None:
    """Remove the import hook (it removes itself after the imports it is for)."""
    with contextlib.suppress(ValueError):
        sys.meta_path.remove(_FINDER)
