"""The encode job of `zoo data encode-latents --modal`, without Modal: the request, and its body.

The client builds a request (plain JSON: paths relative to the Volume's data/ folder, the encode
settings); the container runs `run_encode_request` on it with the Volume mounted, committing the
Volume after every shard.  A preempted or failed attempt has its finished shards on the Volume,
and Modal's retry (or the same command run again) encodes only the rest.
"""

import re
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path, PurePosixPath

from zoo.data.encode import EncodeSettings, default_out, encode_folder
from zoo.remote.layout import DATA


def volume_data_path(text: str | Path, option: str) -> str:
    """A relative path under the Volume's data/ folder ('imagenet', 'imagenet/train')."""
    path = PurePosixPath(str(text))
    if path.is_absolute() or ".." in path.parts or str(path) in ("", "."):
        raise ValueError(
            f"{option} must be a folder under the Volume's {DATA}/ (e.g. imagenet), got {str(text)!r}; "
            f"upload images with `modal volume put <volume> ./imagenet /{DATA}/imagenet`"
        )
    return str(path)


def remote_vae(name: str) -> str:
    """--vae of a remote encoding: a hub id (owner/name, fetched in the container) or a folder
    under the Volume's data/; a path only this machine has (absolute, ~, ..) is refused."""
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("~") or ".." in path.parts or str(path) in ("", "."):
        raise ValueError(
            f"--vae {name!r} is a path on this machine, which the Modal container cannot read: pass a hub id "
            f"(e.g. stabilityai/sd-vae-ft-ema) or a folder under the Volume's {DATA}/ (upload it with "
            f"`modal volume put <volume> ./sd-vae-ft-ema /{DATA}/vae/sd-vae-ft-ema`, "
            "then --vae vae/sd-vae-ft-ema)"
        )
    return str(path)


def encode_request(
    dataset: str | Path,
    split: str,
    out: str | Path | None,
    settings: EncodeSettings,
    *,
    batch_size: int,
    num_workers: int,
    limit: int | None,
    device: str = "cuda",
) -> dict:
    """What the container is asked to do (checked here, before Modal is asked anything)."""
    dataset = volume_data_path(dataset, "DATASET")
    out = volume_data_path(out, "--out") if out is not None else str(default_out(PurePosixPath(dataset)))
    app_name = "zoo-encode-" + re.sub(r"[^A-Za-z0-9._-]", "-", f"{out}-{split}")[:50]
    settings = replace(settings, vae=remote_vae(settings.vae))
    return {
        "dataset": dataset,
        "split": split,
        "out": out,
        "settings": asdict(settings),
        "batch_size": batch_size,
        "num_workers": num_workers,
        "limit": limit,
        "device": device,
        "app_name": app_name,
    }


def run_encode_request(
    request: dict, volume_root: Path, commit: Callable[[], None], log: Callable[[str], None] = print
) -> dict:
    """The container's work: encode request's split from volume_root/data/... into the Volume,
    committing after each shard; returns the summary."""
    data = volume_root / DATA
    out = data / request["out"]
    settings = EncodeSettings(**request["settings"])
    if (data / settings.vae).is_dir():  # a folder on the Volume, else a hub id
        settings = replace(settings, vae=str(data / settings.vae))

    def start(items: int, done: int) -> None:
        log(f"encoding {request['split']} of {data / request['dataset']}: {items} images, {done} done before")

    def shard_done(shard: int) -> None:
        commit()
        log(f"shard {shard} written and committed")

    summary = encode_folder(
        data / request["dataset"],
        request["split"],
        out,
        settings,
        device=request["device"],
        batch_size=request["batch_size"],
        num_workers=request["num_workers"],
        limit=request["limit"],
        on_start=start,
        on_shard=shard_done,
    )
    commit()
    log(f"done: {summary['items']} latents in {out} ({summary['seconds']:.0f} s)")
    return summary
