"""URLs of object stores: which filesystem reaches them, and what to install when none does.

A URL's credentials come from its store's standard chain (environment, profile, instance role,
``AWS_ENDPOINT_URL`` for an S3-compatible store), as fsspec's filesystems find them; nothing
of them is ever printed: :func:`redact` is what a message shows of a URL.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError

URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")  # two letters at least: not a Windows drive

# scheme -> (the library fsspec needs for it, batchkimi's extra that installs it)
_EXTRAS = {
    "s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure"), "adl": ("adlfs", "azure"),
    "hf": ("huggingface_hub", "hf"),
}


def scheme_of(value: str) -> str | None:
    """The scheme of a remote URL (``s3``), or None for a local path or a ``file://`` URL."""
    m = URL.match(value)
    if m is None:
        return None
    scheme = m.group(1).lower()
    return None if scheme == "file" else scheme


def is_url(value: object) -> bool:
    return isinstance(value, str) and scheme_of(value) is not None


def redact(url: str) -> str:
    """``url`` without a password or key written into it (``s3://KEY:SECRET@bucket`` or a query)."""
    url = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1***@", url)
    return url.split("?", 1)[0]


def filesystem(url: str, options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for ``url``; ConfigError naming the scheme and the
    extra to install when no filesystem can reach it."""
    scheme = scheme_of(url) or "file"
    library, extra = _EXTRAS.get(scheme, (None, None))
    try:
        import fsspec
    except ImportError:
        raise ConfigError(f"{redact(url)}: reading {scheme}:// needs fsspec and {library or 'its filesystem'}: "
                          f"pip install 'batchkimi[{extra or 's3'}]'") from None
    try:
        fs, path = fsspec.core.url_to_fs(url, **(options or {}))
    except ImportError:
        install = f"pip install 'batchkimi[{extra}]'" if extra else f"install fsspec's filesystem for {scheme}://"
        raise ConfigError(f"{redact(url)}: {scheme}:// needs {library or 'a filesystem library'}, not installed: "
                          f"{install}") from None
    except ValueError as exc:
        if "protocol" in str(exc).lower():
            raise ConfigError(f"{redact(url)}: {scheme}:// is no storage batchkimi knows (fsspec has no filesystem "
                              f"for it); use s3://, gs://, az://, hf:// or a local path") from None
        raise ConfigError(f"{redact(url)}: {exc}") from None
    return fs, path.rstrip("/")
