"""The public names of ``sidecar.bundles`` but its constants, loaded on first use
(``sidecar._lazy``)."""

from . import _format
from ._format import *  # noqa: F403 - _format's __all__ is the package's, whole
from ._sources import BundleSource, FileSource, HttpSource
from ._sync import BundleSync

__all__ = ["BundleSource", "BundleSync", "FileSource", "HttpSource"]
__all__ += _format.__all__
