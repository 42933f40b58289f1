"""Opening the remote store: the Modal Volume, or a local directory with its layout standing in.

The Volume is opened only after the token and the network check (zoo.remote.credentials, well
under a second), so nothing after it can hang inside the Modal client; `modal` itself is
imported only then, so local commands never pay for it.
"""

from pathlib import Path

from zoo.remote import credentials
from zoo.remote.store import LocalDirStore, RunStore, StoreError


def open_volume(volume: str) -> RunStore:
    """The Modal Volume `volume`; ModalUnavailable, at once, without a token or the network."""
    credentials.check_modal_ready()
    from zoo.remote.modal_app import ModalVolumeStore  # imports modal: only for the Volume itself

    return ModalVolumeStore(volume)


def open_remote_store(volume: str, volume_dir: Path | None) -> RunStore:
    """The remote store: a directory with the Volume's layout if given, else the Modal Volume."""
    if volume_dir is None:
        return open_volume(volume)
    if not volume_dir.is_dir():
        raise StoreError(f"--volume-dir {volume_dir} is not a directory")
    return LocalDirStore(volume_dir, label="remote")
