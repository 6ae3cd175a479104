"""Subject-driven generation metrics (DreamBooth, Ruiz et al. 2023) and the DreamBooth prompt lists.

* subject fidelity: the mean cosine similarity over every (generated, reference) pair of image embeddings;
  with DINO ViT-S/16 features it is the paper's DINO score, with CLIP image features its CLIP-I score;
* prompt fidelity (CLIP-T): the mean cosine similarity between each generated image's CLIP image embedding
  and the CLIP text embedding of the prompt it was generated from.

The feature models are passed in as encoders: a callable from a list of PIL images (or of prompts) to a
``(N, D)`` tensor. :func:`clip_encoders` and :func:`image_encoder` wrap a transformers CLIP model or any
vision backbone (a DINO ViT from timm or torch hub) with its preprocessing; tests pass tiny random models.

The prompt lists are the DreamBooth dataset's ``prompts_and_classes.txt`` (a subject → class table, then an
"Object Prompts" and a "Live Subject Prompts" list of ``'a {0} {1} in the jungle'.format(unique_token,
class_token)`` lines) or a plain file with one template per line (``{0}``: the identifier, ``{1}``: the class).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

ImageEncoder = Callable[[Sequence[Any]], torch.Tensor]
TextEncoder = Callable[[Sequence[str]], torch.Tensor]
#: the DreamBooth dataset's live subjects (dogs and cats) use the live-subject prompt list
LIVE_CLASSES = ("dog", "cat")


# --- metrics ------------------------------------------------------------------------------------
@torch.no_grad()
def embed(encoder: Callable[[Sequence[Any]], torch.Tensor], items: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
    """Unit-norm float32 embeddings ``(len(items), D)`` computed in batches."""
    if not items:
        raise ValueError("nothing to embed: the list of images or prompts is empty")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    parts = []
    for start in range(0, len(items), batch_size):
        out = _features(encoder(list(items[start:start + batch_size])))
        if out.dim() != 2 or out.shape[0] != len(items[start:start + batch_size]):
            raise ValueError(f"the encoder returned shape {tuple(out.shape)} for {len(items[start:start + batch_size])} "
                             f"inputs; it must return one embedding per input, shape (N, D)")
        parts.append(out.float().cpu())
    return F.normalize(torch.cat(parts), dim=-1)


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of cos(a_i, b_j) over every pair (i, j)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two (N, D) embedding matrices with the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T).mean().item()


def subject_fidelity(generated: Sequence[Any], references: Sequence[Any], encoder: ImageEncoder,
                     batch_size: int = 32) -> float:
    """DINO (encoder = a DINO ViT) or CLIP-I (encoder = CLIP's image tower): mean cosine over every
    (generated, reference) pair. 1.0 when every generated image embeds like every reference."""
    return mean_pairwise_cosine(embed(encoder, generated, batch_size), embed(encoder, references, batch_size))


def prompt_fidelity(generated: Sequence[Any], prompts: Sequence[str] | str, image_encoder: ImageEncoder,
                    text_encoder: TextEncoder, batch_size: int = 32) -> float:
    """CLIP-T: mean cosine between each image and its prompt (``prompts[i]`` for ``generated[i]``, or one prompt
    for all)."""
    if isinstance(prompts, str):
        prompts = [prompts] * len(generated)
    if len(prompts) != len(generated):
        raise ValueError(f"{len(generated)} images but {len(prompts)} prompts; give one prompt per image, "
                         f"or a single string")
    images = embed(image_encoder, generated, batch_size)
    texts = embed(text_encoder, list(prompts), batch_size)
    if images.shape[1] != texts.shape[1]:
        raise ValueError(f"image embeddings have {images.shape[1]} dimensions, text embeddings {texts.shape[1]}: "
                         f"CLIP-T needs the image and text towers of one CLIP model")
    return (images * texts).sum(-1).mean().item()


def evaluate_subject(generated: Sequence[Any], prompts: Sequence[str], references: Sequence[Any], *,
                     dino: ImageEncoder | None = None, clip_image: ImageEncoder | None = None,
                     clip_text: TextEncoder | None = None, batch_size: int = 32) -> dict[str, float]:
    """The DreamBooth scores the given encoders allow: ``dino``, ``clip_i`` and ``clip_t`` (needs both CLIP towers)."""
    _check_encoders(dino, clip_image, clip_text)
    scores: dict[str, float] = {}
    if dino is not None:
        scores["dino"] = subject_fidelity(generated, references, dino, batch_size)
    if clip_image is not None:
        scores["clip_i"] = subject_fidelity(generated, references, clip_image, batch_size)
        if clip_text is not None:
            scores["clip_t"] = prompt_fidelity(generated, prompts, clip_image, clip_text, batch_size)
    return scores


def _check_encoders(dino, clip_image, clip_text) -> None:
    if clip_text is not None and clip_image is None:
        raise ValueError("clip_text= is given without clip_image=: CLIP-T compares images and prompts in one CLIP "
                         "space, so it needs both towers of one CLIP model (pass clip_image= too, or drop clip_text=)")
    if dino is None and clip_image is None:
        raise ValueError("give at least one encoder: dino=, clip_image= (and clip_text= for CLIP-T)")


def evaluate_pipeline_on_subject(pipeline, bench: "PromptBenchmark", subject: str, references: Sequence[Any], *,
                                 unique_token: str = "sks", images_per_prompt: int = 4, steps: int = 25,
                                 guidance_scale: float = 7.5, seed: int = 0, dino: ImageEncoder | None = None,
                                 clip_image: ImageEncoder | None = None, clip_text: TextEncoder | None = None,
                                 sampler: str = "dpmsolver") -> dict[str, Any]:
    """DreamBooth's protocol for one subject: ``images_per_prompt`` images for each of its prompts (25 in the
    DreamBooth lists; identifier included), scored against the reference photos; CLIP-T uses the prompts without
    the identifier. Returns the scores, plus ``images`` and ``prompts`` (the generation prompts)."""
    from visionpeft.models.pipelines import generate

    _check_encoders(dino, clip_image, clip_text)  # before generating
    prompts = bench.prompts_for(subject, unique_token)
    images = generate(pipeline, prompts, images_per_prompt=images_per_prompt, steps=steps,
                      guidance_scale=guidance_scale, seed=seed, sampler=sampler)
    text_prompts = [p for p in bench.text_prompts_for(subject) for _ in range(images_per_prompt)]
    scores: dict[str, Any] = evaluate_subject(images, text_prompts, references, dino=dino, clip_image=clip_image,
                                              clip_text=clip_text)
    return scores | {"images": images, "prompts": [p for p in prompts for _ in range(images_per_prompt)]}


# --- encoders for real (or tiny) models -----------------------------------------------------------
def _features(out: Any) -> torch.Tensor:
    """The embedding tensor of a model output: a tensor, a pooled output, or the CLS token of a sequence."""
    if isinstance(out, torch.Tensor):
        return out[:, 0] if out.dim() == 3 else out
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden[:, 0]
    raise ValueError(f"cannot find an embedding in a {type(out).__name__}; return an (N, D) tensor")


def image_encoder(model: torch.nn.Module, transform: Callable[[Any], torch.Tensor],
                  device: str | torch.device = "cpu") -> ImageEncoder:
    """An encoder from a vision backbone and its preprocessing (PIL image → (3, H, W) tensor). The output of
    ``model(batch)`` may be pooled features, or a token sequence whose CLS token is used (DINO)."""
    model = model.eval().to(device)

    @torch.no_grad()
    def encode(images: Sequence[Any]) -> torch.Tensor:
        batch = torch.stack([transform(image.convert("RGB") if hasattr(image, "convert") else image) for image in images])
        return _features(model(batch.to(device)))

    return encode


def clip_encoders(model: torch.nn.Module, processor: Any,
                  device: str | torch.device = "cpu") -> tuple[ImageEncoder, TextEncoder]:
    """(image encoder, text encoder) of a transformers ``CLIPModel`` with its ``CLIPProcessor``."""
    model = model.eval().to(device)

    @torch.no_grad()
    def encode_images(images: Sequence[Any]) -> torch.Tensor:
        inputs = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        return _features(model.get_image_features(pixel_values=inputs["pixel_values"].to(device)))

    @torch.no_grad()
    def encode_texts(texts: Sequence[str]) -> torch.Tensor:
        inputs = processor(text=list(texts), padding=True, truncation=True, return_tensors="pt")
        return _features(model.get_text_features(**{k: v.to(device) for k, v in inputs.items()}))

    return encode_images, encode_texts


# --- prompt lists -------------------------------------------------------------------------------
@dataclasses.dataclass
class PromptBenchmark:
    """The DreamBooth evaluation prompts: subject → class noun, and the object and live-subject templates."""

    subjects: dict[str, str]
    object_prompts: list[str]
    live_prompts: list[str]

    def class_of(self, subject: str) -> str:
        if subject not in self.subjects:
            raise ValueError(f"unknown subject {subject!r}; the list has: {', '.join(self.subjects)}")
        return self.subjects[subject]

    def is_live(self, subject: str) -> bool:
        return self.class_of(subject) in LIVE_CLASSES

    def templates_for(self, subject: str) -> list[str]:
        return self.live_prompts if self.is_live(subject) else self.object_prompts

    def prompts_for(self, subject: str, unique_token: str = "sks") -> list[str]:
        """The generation prompts of ``subject``, e.g. ``'a sks dog in the jungle'``."""
        return render_prompts(self.templates_for(subject), unique_token, self.class_of(subject))

    def text_prompts_for(self, subject: str) -> list[str]:
        """The same prompts without the identifier (``'a dog in the jungle'``), for CLIP-T: a text encoder that
        never saw the rare token would only be confused by it."""
        return render_prompts(self.templates_for(subject), "", self.class_of(subject))


_QUOTED = re.compile(r"""^\s*(['"])(?P<template>.*)\1\s*(?:\.format\([^)]*\))?\s*,?\s*$""")


def render_prompts(templates: Sequence[str], unique_token: str, class_token: str = "") -> list[str]:
    """``{0}`` → ``unique_token``, ``{1}`` → ``class_token``; repeated spaces from an empty token are collapsed."""
    rendered = []
    for template in templates:
        try:
            text = template.format(unique_token, class_token)
        except (IndexError, KeyError, ValueError) as err:
            raise ValueError(f"prompt template {template!r} is malformed ({err}); use {{0}} for the identifier "
                             f"and {{1}} for the class noun") from None
        rendered.append(" ".join(text.split()))
    return rendered


def _template(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or stripped in ("]",) or stripped.startswith("prompt_list"):
        return None
    quoted = _QUOTED.match(stripped)
    return quoted["template"] if quoted else stripped


def read_prompt_list(path: str | Path) -> list[str]:
    """Templates from a plain prompt-list file: one per line (``#`` comments and blank lines skipped); lines in the
    DreamBooth python form (``'a {0} {1} in the snow'.format(unique_token, class_token),``) are accepted too."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt list {str(path)!r} does not exist")
    templates = [t for t in (_template(line) for line in path.read_text().splitlines()) if t]
    if not templates:
        raise ValueError(f"prompt list {str(path)!r} holds no prompt")
    return templates


def read_prompts_and_classes(path: str | Path) -> PromptBenchmark:
    """The DreamBooth dataset's ``prompts_and_classes.txt``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    subjects: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for line in path.read_text().splitlines():
        stripped = line.strip()
        lowered = stripped.lower()
        if lowered in ("classes", "prompts"):
            section = lowered
        elif lowered == "object prompts":
            section = "object"
        elif lowered == "live subject prompts":
            section = "live"
        elif section == "classes" and "," in stripped and lowered != "subject_name,class":
            name, noun = (part.strip() for part in stripped.split(",", 1))
            subjects[name] = noun
        elif section in lists:
            template = _template(line)
            if template:
                lists[section].append(template)
    if not subjects or not lists["object"] or not lists["live"]:
        raise ValueError(f"{str(path)!r} is not a DreamBooth prompts_and_classes.txt: found {len(subjects)} subjects, "
                         f"{len(lists['object'])} object prompts and {len(lists['live'])} live-subject prompts "
                         f"(expected sections 'Classes', 'Object Prompts', 'Live Subject Prompts')")
    return PromptBenchmark(subjects, lists["object"], lists["live"])
