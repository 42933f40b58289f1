"""Encode an ImageNet class-folder split into SD-VAE latents for `data.name=imagenet-latents`.

    python scripts/encode_latents.py --root data --split train --device cuda
    python scripts/encode_latents.py --root data --split val --device cuda

Reads ROOT/imagenet/SPLIT/<class>/*.JPEG (centre crop, resize to --image-size), writes
ROOT/imagenet-latents/SPLIT_latents.npy (float16, times 0.18215), SPLIT_labels.npy, meta.json and
a JSON summary plus the log of this run next to them.
"""

import argparse
import json
from pathlib import Path

import torch

from zoo.data.images import image_folder_files
from zoo.data.latents import LATENT_FOLDER, SD_VAE_SCALE, encode_images
from zoo.data.sources import CenterCropResize, ImageFiles


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=Path("data"), help="folder holding imagenet/")
    parser.add_argument("--split", choices=["train", "val"], required=True)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="passed to SDVAE.from_pretrained")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument(
        "--limit", type=int, default=None, help="encode only the first N images (a quick check)"
    )
    args = parser.parse_args()

    out_dir = args.root / LATENT_FOLDER
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = (out_dir / f"encode_{args.split}.log").open("w")

    def log(message: str) -> None:
        print(message, flush=True)
        log_file.write(message + "\n")
        log_file.flush()

    log(f"config: {json.dumps({k: str(v) for k, v in vars(args).items()})}")
    from zoo.models.vae import SDVAE  # needs diffusers (the `vae` extra) and the weights

    files, labels, classes = image_folder_files(args.root / "imagenet" / args.split)
    if args.limit is not None:
        files, labels = files[: args.limit], labels[: args.limit]
    dataset = ImageFiles(files, labels, CenterCropResize(args.image_size))
    vae = SDVAE.from_pretrained(args.vae).to(args.device).eval()
    summary = encode_images(
        vae.encode,
        dataset,
        out_dir,
        args.split,
        device=torch.device(args.device),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        log=log,
    )
    meta = {"classes": classes, "image_size": args.image_size, "vae": args.vae, "scale": SD_VAE_SCALE}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    (out_dir / f"encode_{args.split}.json").write_text(json.dumps(summary, indent=1))
    log(f"done: {summary['images']} images in {summary['seconds']:.1f} s -> {summary['latents']}")


if __name__ == "__main__":
    main()
