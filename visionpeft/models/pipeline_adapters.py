"""A pipeline's adapters as one folder: ``vp.save`` of the denoiser (UNet or transformer) at the top, and of each
adapted text encoder in a subfolder named after its component (``text_encoder/``, ``text_encoder_2/``,
``text_encoder_3/``).

The folder is written into a staging folder that replaces the target folder as a whole, and applied all or nothing
(every adapter loaded by the call is removed again when one fails).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TEXT_ENCODER_FOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
ADAPTER_ENTRIES = ("adapter.json", "adapter.safetensors", *TEXT_ENCODER_FOLDERS)


def text_encoder_adapters(directory: str | os.PathLike) -> list[str]:
    """The text encoder components that have an adapter saved in ``directory``."""
    return [name for name in TEXT_ENCODER_FOLDERS if (Path(directory) / name / "adapter.json").is_file()]


def has_text_encoder_adapter(directory: str | os.PathLike) -> bool:
    return bool(text_encoder_adapters(directory))


def _adapted_text_encoders(pipeline_or_denoiser, text_encoder, text_encoders) -> dict:
    from visionpeft.core import records
    from visionpeft.models.pipeline_kinds import KINDS

    found = {}
    if type(pipeline_or_denoiser).__name__ in KINDS:
        from visionpeft.models.pipeline_kinds import text_encoders as pipeline_text_encoders

        found = pipeline_text_encoders(pipeline_or_denoiser)
    if text_encoder is not None:
        found["text_encoder"] = text_encoder
    found.update(text_encoders or {})
    unknown = sorted(set(found) - set(TEXT_ENCODER_FOLDERS))
    if unknown:
        raise ValueError(f"text encoder components {unknown} are unknown; allowed: {', '.join(TEXT_ENCODER_FOLDERS)}")
    return {name: model for name, model in found.items() if model is not None and records(model)}


def save_pipeline_adapter(pipeline_or_denoiser, directory: str | os.PathLike, text_encoder=None, *,
                          text_encoders: dict | None = None) -> Path:
    """``vp.save`` of the denoiser into ``directory`` and of every adapted text encoder into its subfolder.

    ``pipeline_or_denoiser``: a supported pipeline (its denoiser and adapted text encoders are saved), or the
    denoiser itself with ``text_encoder`` (SD's one) and/or ``text_encoders`` ({component: model}). Both are
    written into a staging folder that then replaces ``directory`` as a whole, so nothing of an earlier adapter saved
    there survives. An existing ``directory`` is replaced only when it is empty or holds a saved pipeline adapter."""
    from visionpeft.models.pipeline_kinds import KINDS, denoiser

    is_pipeline = type(pipeline_or_denoiser).__name__ in KINDS
    model = denoiser(pipeline_or_denoiser) if is_pipeline else pipeline_or_denoiser
    encoders = _adapted_text_encoders(pipeline_or_denoiser, text_encoder, text_encoders)
    directory = Path(directory)
    _check_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".staging", dir=directory.parent))
    try:
        import visionpeft as vp

        vp.save(model, staging)
        for name, encoder in encoders.items():
            vp.save(encoder, staging / name)
        _replace_folder(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _check_replaceable(directory: Path) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"cannot save the pipeline adapter into {str(directory)!r}: it exists and is not a folder")
    foreign = sorted(p.name for p in directory.iterdir() if p.name not in ADAPTER_ENTRIES and not p.name.startswith("."))
    if foreign:
        raise ValueError(f"cannot save the pipeline adapter into {str(directory)!r}: it holds {foreign[:5]}, which is "
                         f"not a saved adapter (allowed: an empty folder or one with {', '.join(ADAPTER_ENTRIES)})")


def _replace_folder(staging: Path, directory: Path) -> None:
    """Rename ``staging`` onto ``directory``; an existing ``directory`` is moved aside first and removed after."""
    old = None
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
        os.replace(directory, old / directory.name)
    try:
        os.replace(staging, directory)
    except BaseException:
        if old is not None:
            os.replace(old / directory.name, directory)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def apply_adapter(pipeline, directory: str | os.PathLike, *, merge: bool = False, scale: float = 1.0):
    """Load a saved pipeline adapter into ``pipeline`` (``vp.load``). ``scale`` is the adapter strength; any strength
    other than 1 is applied by merging (``vp.merge(model, scale)``), as is ``merge=True``. Returns ``pipeline``.
    All or nothing: every config is read first, and when one adapter cannot be loaded the others are removed again."""
    import visionpeft as vp
    from visionpeft.core import adapters_rolled_back_on_error
    from visionpeft.io import read_config
    from visionpeft.models.pipeline_kinds import denoiser, kind_of

    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"scale={scale!r} must be a number (1.0: the adapter as trained)")
    kind = kind_of(pipeline)
    read_config(directory)
    plan = [(denoiser(pipeline), Path(directory))]
    for name in text_encoder_adapters(directory):
        model = getattr(pipeline, name, None)
        if name not in kind.text_encoders or model is None:
            present = [n for n in kind.text_encoders if getattr(pipeline, n, None) is not None]
            raise ValueError(f"{str(directory)!r} holds an adapter for {name!r}, which this {kind.pipeline_class} does "
                             f"not have (its text encoders: {', '.join(present) or 'none'})")
        read_config(Path(directory) / name)
        plan.append((model, Path(directory) / name))
    models = [model for model, _ in plan]
    with adapters_rolled_back_on_error(*models):
        for model, folder in plan:
            vp.load(model, folder)
    if merge or scale != 1.0:
        for model in models:
            vp.merge(model, float(scale))
    return pipeline
