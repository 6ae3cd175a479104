"""Prepare VTAB-1k: unpack the archive, normalise task folder names, check every list, move into place.

    python datasets/vtab1k/prepare.py vtab-1k.zip --out data/vtab-1k
"""
import argparse

from visionpeft.data.prepare import prepare_vtab

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", help="the VTAB-1k .zip/.tar(.gz), or an already extracted folder")
    parser.add_argument("--out", default="data/vtab-1k")
    args = parser.parse_args()
    for task, sizes in prepare_vtab(args.archive, args.out).items():
        print(f"{task:<22} " + "  ".join(f"{split} {n}" for split, n in sizes.items()))
    print(f"ready: {args.out}")
