"""Prepare one FGVC dataset: unpack its image archive and VPT split files, check them, move into place.

    python datasets/fgvc/prepare.py cub --images CUB_200_2011.tgz --splits cub_splits/ --out data/fgvc
"""
import argparse

from visionpeft.data.formats import FGVC_DATASETS
from visionpeft.data.prepare import prepare_fgvc

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=list(FGVC_DATASETS))
    parser.add_argument("--images", required=True, help="the dataset's original image archive (or folder)")
    parser.add_argument("--splits", required=True, help="VPT's train/val/test.json for it (archive or folder)")
    parser.add_argument("--out", default="data/fgvc")
    args = parser.parse_args()
    sizes = prepare_fgvc(args.dataset, args.images, args.splits, args.out)
    print(f"{args.dataset}: " + "  ".join(f"{split} {n}" for split, n in sizes.items()) + f" -> {args.out}/{args.dataset}")
