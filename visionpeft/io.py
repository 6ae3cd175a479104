"""Adapters on disk: ``adapter.safetensors`` (tensors) + ``adapter.json`` (what to attach again); PEFT's adapter
directories through ``interop/peft_format.py``.

Writes are atomic (temporary file, then rename); the JSON carries the SHA-256 of the tensor file so
a corrupt or mixed pair is refused. Loading validates everything, and builds every adapter
module, before the model is touched; nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from visionpeft.core import AdapterRecord, Plan, adapters_rolled_back_on_error, install, plan, records
from visionpeft.distributed import any_sharded, gathered, unsharded_class, written_on_rank_zero
from visionpeft.layers.adapted import ADAPTERS_ATTR, is_adapted, layer_kind
from visionpeft.layers.kinds import PARAMETERS_KIND, ParametersKind
from visionpeft.targeting import Target

FORMAT = "visionpeft-adapter"
FORMAT_VERSION = 1
TENSORS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"


def _version() -> str:
    from visionpeft import __version__

    return __version__


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file next to it, which is then renamed onto
    ``path``; on any error the temporary file is removed and ``path`` is left as it was. Returns ``path``."""
    path = Path(path)
    # mkstemp creates the file private (0600); the result gets the mode a plain open() would give it
    mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def adapter_state(model: nn.Module, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the adapters ``names`` (default: all) and of the modules they unfreeze, under the model's
    own keys."""
    recs = [r for n, r in records(model).items() if names is None or n in names]
    chosen = {r.name for r in recs}
    return {key: value for key, value in model.state_dict().items()
            if _saved_with_adapter(key, recs) and _adapter_of(key) in (None, *chosen)}


def _adapter_of(key: str) -> str | None:
    """The adapter name in an adapter tensor's key, None for other keys."""
    parts = key.split(".")
    return parts[parts.index(ADAPTERS_ATTR) + 1] if ADAPTERS_ATTR in parts else None


def _saved_with_adapter(key: str, recs) -> bool:
    if ADAPTERS_ATTR in key.split("."):
        return True
    return any(key.startswith(m + ".") for r in recs for m in r.unfreeze) or \
        any(key in r.unfreeze_parameters for r in recs)


FORMATS = ("visionpeft", "peft")


def save(model: nn.Module, directory: str | os.PathLike, *, names: Any = None, format: str = "visionpeft") -> None:
    """Write the adapters ``names`` (default: all, with their active states) and the modules they unfreeze to
    ``directory``, atomically per file. ``format="peft"``: ``adapter_config.json`` + ``adapter_model.safetensors``,
    which ``peft.PeftModel.from_pretrained`` loads (one LoRA adapter; ValueError for what PEFT cannot express).
    On a model sharded with FSDP2 every rank calls ``save``: the shards are gathered, rank 0 writes, and every rank
    returns after the write (``visionpeft.distributed``)."""
    from visionpeft.by_name import check_names

    recs = records(model)
    if not recs:
        raise ValueError(f"{type(model).__name__} has no visionpeft adapter to save; call visionpeft.attach first")
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is unknown; allowed: {', '.join(map(repr, FORMATS))}")
    chosen = list(recs) if names is None else check_names(model, names, "save")
    if not chosen:
        raise ValueError("save: names=[] chooses no adapter")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"cannot save into {str(directory)!r}: it exists and is not a directory")
    state = adapter_state(model, chosen)
    sharded = any_sharded(state)
    if format == "peft":
        if sharded:
            raise ValueError("format='peft' on a model sharded with FSDP2 is not supported; save with "
                             "format='visionpeft' (converted to PEFT's format after loading it unsharded)")
        from visionpeft.interop.peft_format import save_peft

        save_peft(model, directory, chosen)
        return
    tensors = gathered(state)  # a collective per sharded tensor, on every rank; nothing is written before it
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": _version(),
        "model_class": unsharded_class(model).__name__,
        "adapters": [recs[n].to_json() for n in chosen],
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }

    def write() -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tensor_path = directory / TENSORS_FILE
        atomic_write(tensor_path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
        text = json.dumps(dict(config, sha256=_sha256(tensor_path)), indent=2, sort_keys=False)
        atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))

    written_on_rank_zero(sharded, write)  # sharded: rank 0 writes, every rank returns after it


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed and checked ``adapter.json`` of a saved adapter."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {str(directory)!r} does not exist")
    for name in (CONFIG_FILE, TENSORS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{str(directory / name)!r} is missing; a saved adapter has {CONFIG_FILE} and {TENSORS_FILE}")
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(directory / CONFIG_FILE)!r} is corrupt (not JSON: {err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{str(directory / CONFIG_FILE)!r} is not a visionpeft adapter (format is "
                         f"{config.get('format') if isinstance(config, dict) else None!r}, expected {FORMAT!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{str(directory / CONFIG_FILE)!r} has format_version {config.get('format_version')!r}; "
                         f"this visionpeft reads version {FORMAT_VERSION}")
    if not isinstance(config.get("adapters"), list) or not config["adapters"]:
        raise ValueError(f"{str(directory / CONFIG_FILE)!r} lists no adapters")
    return config


def _targets_from_layers(model: nn.Module, layers: dict[str, list[str]], adapter: str,
                         all_parameters: bool = False) -> list[Target]:
    modules = dict(model.named_modules())
    targets = []
    for name, slot_names in layers.items():
        module = modules.get(name)
        if module is not None and all_parameters:
            if is_adapted(module) and not isinstance(layer_kind(module), ParametersKind):
                raise ValueError(f"adapter {adapter!r} was attached with targets='all', but layer {name!r} already "
                                 f"carries an adapter attached with other targets; detach it first")
            kind = PARAMETERS_KIND if PARAMETERS_KIND.matches(module) else None
        else:
            kind = layer_kind(module) if module is not None else None
        if kind is None:
            found = "missing" if module is None else f"a {type(module).__name__} with no adaptable weight"
            raise ValueError(f"adapter {adapter!r} was saved for another architecture: layer {name!r} is {found} "
                             f"in this {type(model).__name__}")
        unknown = [s for s in slot_names if s not in kind.slot_names(module)]
        if unknown:
            raise ValueError(f"adapter {adapter!r}: layer {name!r} has no weight slot(s) {unknown}; "
                             f"it has {kind.slot_names(module)}")
        targets.append(Target(name, module, kind, list(slot_names)))
    return targets


def _plan_from_record(model: nn.Module, raw: Any, name: str | None = None) -> Plan:
    try:
        record = AdapterRecord(**raw)
    except TypeError as err:
        raise ValueError(f"adapter.json has a malformed adapter entry: {err}") from None
    if name is not None:
        record.name = name
    targets = _targets_from_layers(model, record.layers, record.name, record.all_parameters)
    modules = dict(model.named_modules())
    missing = [m for m in record.unfreeze if m not in modules]
    if missing:
        raise ValueError(f"adapter {record.name!r} unfreezes module(s) {missing} that this model does not have")
    result = plan(model, record.method, targets, record.name, record.unfreeze, record.options, record.layer_options)
    result.record.reconstruction_error = record.reconstruction_error
    result.record.active = record.active
    return result


def _expected_state(model: nn.Module, plans: list[Plan]) -> dict[str, torch.Tensor]:
    expected = {}
    for p in plans:
        for layer, slots in p.instances.items():
            prefix = f"{layer}.{ADAPTERS_ATTR}.{p.record.name}." if layer else f"{ADAPTERS_ATTR}.{p.record.name}."
            for key, value in nn.ModuleDict(slots).state_dict().items():
                expected[prefix + key] = value
    for key, value in model.state_dict().items():
        if ADAPTERS_ATTR not in key.split(".") and _saved_with_adapter(key, [p.record for p in plans]):
            expected[key] = value
    return expected


def _renamed(tensors: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    """Adapter tensors of ``old`` under the keys of ``new``."""
    renamed = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if _adapter_of(key) == old:
            parts[parts.index(ADAPTERS_ATTR) + 1] = new
        renamed[".".join(parts)] = value
    return renamed


def _read_native(directory: Path, name: str | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = read_config(directory)
    tensor_path = directory / TENSORS_FILE
    if _sha256(tensor_path) != config.get("sha256"):
        raise ValueError(f"{str(tensor_path)!r} does not match {CONFIG_FILE} (checksum differs): the file is corrupt "
                         f"or comes from another save")
    try:
        tensors = load_file(tensor_path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{str(tensor_path)!r} is corrupt: {err}") from None
    if name is not None:
        if len(config["adapters"]) != 1:
            held = [a.get("name") for a in config["adapters"] if isinstance(a, dict)]
            raise ValueError(f"name={name!r} renames a single-adapter directory; {str(directory)!r} holds {held}")
        tensors = _renamed(tensors, config["adapters"][0].get("name"), name)
    return config, tensors


def _check_fits(directory: Path, model: nn.Module, expected: dict[str, torch.Tensor],
                tensors: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}")
        if wrong:
            details.append("shape mismatch " + ", ".join(
                f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong[:5]))
        raise ValueError(f"adapter in {str(directory)!r} does not fit this {type(model).__name__} "
                         f"(other architecture or shapes): {'; '.join(details)}")


def _load_instances(plans: list[Plan], tensors: dict[str, torch.Tensor]) -> None:
    for p in plans:
        for layer, slots in p.instances.items():
            prefix = f"{layer}.{ADAPTERS_ATTR}.{p.record.name}." if layer else f"{ADAPTERS_ATTR}.{p.record.name}."
            try:
                nn.ModuleDict(slots).load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            except ValueError as err:
                raise ValueError(f"adapter {p.record.name!r} on layer {layer!r}: {err}") from None


def _install_all(model: nn.Module, plans: list[Plan], base_tensors: dict[str, torch.Tensor]) -> None:
    """Install the plans and copy the unfrozen modules' tensors; a failure removes what was installed."""
    with adapters_rolled_back_on_error(model):
        for p in plans:
            install(model, p)
    model_state = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for key, value in base_tensors.items():
            model_state[key].copy_(value)


def load(model: nn.Module, directory: str | os.PathLike, *, name: str | None = None, hotswap: bool = False) -> nn.Module:
    """Attach the adapters saved in ``directory`` (visionpeft's format, or a PEFT adapter directory with
    ``adapter_config.json``, read as LoRA) to ``model`` and load their tensors.

    ``name`` attaches a single-adapter directory under that name; ``hotswap=True`` copies the tensors into the
    already attached adapter ``name`` in place (same method and layers, ranks not larger), so a
    ``torch.compile``'d model is not recompiled.

    Raises FileNotFoundError or ValueError (missing, corrupt, foreign or mismatched adapter), in
    which case ``model`` is left exactly as it was.
    """
    directory = Path(directory)
    if name is not None and (not isinstance(name, str) or not name.isidentifier()):
        raise ValueError(f"name={name!r} is invalid; use a Python identifier such as 'default'")
    if hotswap:
        from visionpeft.hotswap import hotswap as swap

        return swap(model, directory, name)
    from visionpeft.interop.peft_format import is_peft_directory, load_peft

    if is_peft_directory(directory) and not (directory / CONFIG_FILE).is_file():
        p, base_tensors = load_peft(model, directory, name or "default")
        _install_all(model, [p], base_tensors)
        return model
    config, tensors = _read_native(directory, name)
    plans = [_plan_from_record(model, raw, name) for raw in config["adapters"]]
    expected = _expected_state(model, plans)
    _check_fits(directory, model, expected, tensors)
    _load_instances(plans, tensors)
    _install_all(model, plans, {k: tensors[k] for k in expected if ADAPTERS_ATTR not in k.split(".")})
    return model
