"""Few-shot CLIP classification with CLIP-SVD (or any visionpeft method) on a CoOp-format dataset.

    python examples/fewshot_clip.py --model ViT-B-16 --pretrained /path/to/open_clip_weights.bin \\
        --split-file data/oxford_pets/split_zhou_OxfordPets.json --image-root data/oxford_pets/images \\
        --template "a photo of a {}, a type of pet." --shots 16 --seeds 1 2 3

The model comes from open_clip by architecture name, with ``--pretrained`` a local checkpoint path or an
open_clip pretrained tag (which needs the network once). For each seed: zero-shot top-1 of the frozen
model, then K-shot training (CLIP-SVD's protocol: 200·K steps, AdamW lr 5e-4, wd 0.01, cosine, batch 32)
and the few-shot top-1 on the test split; the mean over seeds is printed last.
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch

import visionpeft as vp
from visionpeft.fewshot import ClipClassifier, CoOpSplit, clip_transform, train_few_shot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture name")
    parser.add_argument("--pretrained", required=True, help="local checkpoint path or open_clip pretrained tag")
    parser.add_argument("--split-file", required=True)
    parser.add_argument("--image-root", required=True)
    parser.add_argument("--template", action="append", default=None, help="prompt template with {} (repeatable)")
    parser.add_argument("--method", default="svd", choices=vp.methods())
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=None, help="default: 200 x shots")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    import open_clip

    base, _, _ = open_clip.create_model_and_transforms(args.model, pretrained=args.pretrained, device=args.device)
    tokenize = open_clip.get_tokenizer(args.model)
    size = base.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    train = CoOpSplit(args.split_file, args.image_root, "train", clip_transform(size, train=True))
    test = CoOpSplit(args.split_file, args.image_root, "test", clip_transform(size))
    templates = args.template or ["a photo of a {}."]
    results = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = vp.attach(copy.deepcopy(base), args.method)
        classifier = ClipClassifier(model, tokenize, train.classnames, templates)
        result = train_few_shot(classifier, train, test, shots=args.shots, seed=seed, steps=args.steps,
                                batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay)
        print(f"seed {seed}: zero-shot {result['zero_shot_top1']:.2f}%  {args.shots}-shot {result['few_shot_top1']:.2f}%")
        results.append(result)
    print(vp.summary(model))
    print(f"{args.method} {args.shots}-shot over seeds {args.seeds}: "
          f"{statistics.mean(r['few_shot_top1'] for r in results):.2f}% "
          f"(zero-shot {results[0]['zero_shot_top1']:.2f}%)")


if __name__ == "__main__":
    main()
