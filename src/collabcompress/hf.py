"""Load a compressed output directory as a working transformers model (the ``hf`` extra).

:func:`from_pretrained` builds the source family's transformers model from the output
directory's ``config.json``, swaps every compressed attention module for a collaborative
one (:mod:`collabcompress.runtime.adapters`), and loads the weights with strict key
checking. :func:`load_model` loads any model directory, compressed or not, under the same
rules.

:func:`write_remote_code` makes a directory loadable with
``transformers.AutoModel.from_pretrained(DIR, trust_remote_code=True)``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import manifest as _mf
from .dtypes import to_torch
from .errors import BadInputError, UnsupportedArchitectureError
from .extras import require_transformers, unreadable_model_errors
from .files.checkpoint import Checkpoint, open_checkpoint, read_json, staged
from .files.manifest import MANIFEST_NAME
from .methods import method_for
from .runtime.adapters import ATTN_IMPLEMENTATIONS, check_rotary_frequencies, loadable_family
from .runtime.remote_code import REMOTE_CODE, REMOTE_CODE_NAME

__all__ = ["from_pretrained", "load_model", "write_remote_code", "is_compressed", "REMOTE_CODE_NAME"]

_DTYPES = {name: to_torch(name) for name in ("float32", "float16", "bfloat16", "float64")}


def _transformers():
    return require_transformers("loading a compressed model")


# --------------------------------------------------------------------------- loading

def is_compressed(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is an output directory of ``compress`` (it holds the manifest)."""
    return (Path(directory) / MANIFEST_NAME).is_file()


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise BadInputError(f"{directory} has no config.json: a transformers model cannot be built from it "
                            "(compress a directory that holds config.json)")
    config = read_json(path, "config", directory)
    if not isinstance(config, dict) or not isinstance(config.get("collaborative_attention"), dict):
        raise BadInputError(f"{path} has no 'collaborative_attention' block; is {directory} an output of "
                            "`collabcompress compress`?")
    return config


def _named_model_class(transformers, name: Any) -> type | None:
    """The transformers model class called ``name``, or ``None`` (``os.system``, ``AutoConfig``, not a string)."""
    found = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    return found if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel) else None


def _of_config(cls: type, config, directory: Path, what: str) -> type:
    """``cls``, refused unless it is a model class of ``config``'s type (not a class of another family)."""
    expected = getattr(cls, "config_class", None)
    if isinstance(expected, type) and not isinstance(config, expected):
        raise BadInputError(f"{what} {cls.__name__} is a model class for {getattr(expected, 'model_type', '') or expected.__name__!r} "
                            f"configs, but {directory / 'config.json'} has model_type {config.model_type!r}")
    return cls


# Task classes tried, in order, when config.json names no architecture: the model type's LM heads.
_HEAD_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSeq2SeqLM")


def _head_names(cls: type, config) -> set[str]:
    """The parameters of task class ``cls`` outside its base model that no tie derives from a base
    model weight (a tied LM head is held by the embedding it shares), nor transformers lets go missing."""
    prefix = getattr(cls, "base_model_prefix", "") or ""
    with torch.device("meta"):  # names and ties only: no memory, no initialisation cost
        task = cls(config)
    tied = _tied_names(task)
    _, ignore_missing = _ignored_patterns(task)
    inside = f"{prefix}."
    return {n for n, _ in task.named_parameters(remove_duplicate=False)
            if not n.startswith(inside) and not any(t.startswith(inside) for t in tied.get(n, ()))
            and not (ignore_missing and ignore_missing.search(n))}


def _model_class(transformers, config, model_class, names, directory: Path) -> type:
    """The class to build: ``model_class`` as given; else config.json's ``architectures``, or its
    base model class when the weights hold none of the named class's head (a sentence-transformers
    export names ``BertForMaskedLM`` but holds the bare ``BertModel``); else, without
    ``architectures``, the weights decide: the model type's LM head class whose head is in the
    weights or tied to them, else its base model class. Never a guess: weights that fit none of
    these are refused when they are loaded."""
    if model_class is not None:
        found = _named_model_class(transformers, model_class) if isinstance(model_class, str) else model_class
        mapping = getattr(found, "_model_mapping", None)  # an Auto class: its class for this config
        if isinstance(found, type) and mapping is not None and found.__module__.startswith("transformers."):
            found = mapping.get(type(config), None)
            if found is None:
                raise BadInputError(f"{directory}: transformers has no {model_class.__name__} class for "
                                    f"model_type {config.model_type!r}")
        if not (isinstance(found, type) and issubclass(found, transformers.PreTrainedModel)):
            raise BadInputError(f"{str(model_class)[:80]!r} is not a transformers model class")
        return _of_config(found, config, directory, "model_class")
    base = transformers.AutoModel._model_mapping.get(type(config), None)
    if base is None:
        raise UnsupportedArchitectureError(f"transformers has no model class for model_type {config.model_type!r}")
    names = set(names)
    architectures = getattr(config, "architectures", None)
    for name in architectures if isinstance(architectures, list) else []:
        if (found := _named_model_class(transformers, name)) is not None:
            cls = _of_config(found, config, directory, "architectures names")
            if getattr(cls, "base_model_prefix", "") and cls is not base:
                head = _head_names(cls, config)
                if head and not head & names:
                    return base
            return cls
    for auto in _HEAD_AUTO_CLASSES:
        cls = getattr(transformers, auto)._model_mapping.get(type(config), None)
        if cls is not None and cls is not base and _head_names(cls, config) <= names:
            return cls
    return base


def _renamer(model: nn.Module):
    """file tensor name -> in-memory name, with transformers' own load-time renames (e.g. ViT in 5.x)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # older transformers: names in memory are the file names
        return lambda key, known: key
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None) or None

    def rename(key: str, known: dict[str, Any]) -> str:
        new, converter = rename_source_key(key, renamings, converters, prefix, known)
        if converter is not None:
            raise UnsupportedArchitectureError(f"tensor {key!r} needs transformers' weight conversion "
                                               f"({converter}); collabcompress.hf cannot load this model")
        return new

    return rename


def _load_tensors(out: Checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor of the output, each read once through :mod:`collabcompress.files.checkpoint`."""
    return {name: out.load(name) for name in out.names()}


def _ignored_patterns(model: nn.Module) -> tuple[re.Pattern[str] | None, re.Pattern[str] | None]:
    """transformers' own exceptions to strict loading: (unexpected, missing) regexes of the model class."""
    unexpected = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    missing = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
    buffers = [name for name, _ in model.named_buffers()]
    # buffers persistent in old checkpoints, not any more: (the buffer's name ends, its pattern)
    stale = (("position_ids", r"(^|\.)position_ids$"), ("rotary_emb.inv_freq", r"rotary_emb\.inv_freq"))
    unexpected.update(pattern for end, pattern in stale if any(b.endswith(end) for b in buffers))

    def compile_(patterns: set[str]) -> re.Pattern[str] | None:
        return re.compile("|".join(f"({p})" for p in sorted(patterns))) if patterns else None

    return compile_(unexpected), compile_(missing)


def _tied_names(model: nn.Module) -> dict[str, set[str]]:
    """name -> every name of the same parameter object (tied weights)."""
    groups: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(name)
    return {name: group for group in groups.values() for name in group}


def _short(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def from_pretrained(directory: str | os.PathLike, *, model_class: type | str | None = None,
                    dtype: torch.dtype | str | None = None, attn_implementation: str | None = None,
                    device: torch.device | str = "cpu") -> nn.Module:
    """Load a ``compress`` output directory as a transformers model with collaborative attention.

    Builds the class :func:`_model_class` chooses (config.json's ``architectures``, or its base
    model class when the weights hold no task head, as a sentence-transformers export that names
    ``BertForMaskedLM`` but holds the bare ``BertModel``; without ``architectures``, the LM head
    class whose head is in the weights or tied to them, else the base class), replaces every
    attention module listed in the manifest with a collaborative one (an instance of the original
    attention class and of :class:`~collabcompress.runtime.attention.CollaborativeAttention`), and loads every
    tensor of the directory; a tensor the model does not take, or a model weight the directory
    lacks (other than weights tied to a loaded one, under either name), is an error.

    Args:
        directory: output directory of ``collabcompress compress``.
        model_class: a transformers model class (or its name) to build instead, e.g.
            ``"BertModel"`` for the bare encoder of a ``BertForMaskedLM`` checkpoint; obeyed
            as given.
        dtype: dtype of the model (default: the source checkpoint's, from the manifest).
        attn_implementation: ``"sdpa"`` (default where transformers picks it) or ``"eager"``
            (needed for ``output_attentions=True``).
        device: where the model is built.

    Returns:
        The model, in eval mode.

    Raises:
        MissingExtraError: transformers is not installed (``pip install 'collabcompress[hf]'``).
        BadInputError: not a compressed directory (no manifest or no ``collaborative_attention``
            block), unreadable files, or weights that do not fit the model.
        UnsupportedArchitectureError: a family this loader does not run (e.g. ``timm-vit``).
    """
    directory = Path(directory)
    manifest = _mf.read(directory)
    family = loadable_family(manifest.source.architecture, directory)
    _read_config(directory)
    transformers = _transformers()
    dtype, device = _torch_dtype(dtype), _torch_device(device)
    manifest, out = _mf.open_output(directory)  # every output file checked against its recorded hash
    try:
        config = _auto_config(transformers, directory, attn_implementation)
        if family.model_types and config.model_type not in family.model_types:
            raise BadInputError(f"{directory / 'config.json'} has model_type {config.model_type!r}, but the manifest "
                                f"records the {family.name} family ({', '.join(family.model_types)})")
        cls = _model_class(transformers, config, model_class, out.names(), directory)
        tensors = _load_tensors(out)  # only once the config and the class are known good
    finally:
        out.close()
    if dtype is None:
        dtype = _DTYPES.get(manifest.source.dtype) if manifest.source.dtype else None
    model = _build(cls, config, dtype, device, directory)
    rename = _renamer(model)
    plain_names = dict.fromkeys(model.state_dict(), True)
    memory_module: dict[str, str] = {}
    for layer in manifest.layers:
        file_module = layer.module
        query_name = layer.removed[0] if layer.removed else f"{file_module}.query.weight"
        in_memory = rename(query_name, plain_names)
        if in_memory not in plain_names:
            raise BadInputError(f"{directory}: compressed module {file_module} has no counterpart in "
                                f"{cls.__name__} built from config.json (expected {in_memory})")
        mem = in_memory.rsplit(".", 2)[0]
        memory_module[file_module] = mem
        parent, _, child = mem.rpartition(".")
        old = model.get_submodule(mem)
        try:
            new = method_for(layer).runtime_module(old, layer, mem, family)
        except UnsupportedArchitectureError as e:  # the family was loadable: config.json contradicts the manifest
            raise BadInputError(f"{directory / 'config.json'} (model_type {config.model_type!r}) does not build the "
                                f"{family.name} family the manifest records: {e}") from e
        setattr(model.get_submodule(parent) if parent else model, child, new)
    _load_state(model, tensors, memory_module, rename, directory)
    check_rotary_frequencies(model, directory)
    model.eval()
    return model


def load_model(directory: str | os.PathLike, *, model_class: type | str | None = None,
               dtype: torch.dtype | str | None = None, attn_implementation: str | None = None,
               device: torch.device | str = "cpu") -> nn.Module:
    """Load a model directory, compressed or not, under the same rules as :func:`from_pretrained`.

    An uncompressed directory (``config.json`` and safetensors weights) is read through
    :mod:`collabcompress.files.checkpoint` and built as the class :func:`from_pretrained` would choose: every
    weight of the model comes from the file or from a tie transformers documents (a tied LM head
    stored as ``lm_head.weight`` alone is the embedding), and a weight missing or left over is an
    error naming it, never a random initialisation. ``dtype`` defaults to the weights' own.

    Returns:
        The model, in eval mode.

    Raises:
        BadInputError: unreadable files, weights that do not fit the model, bad ``dtype`` or
            ``device``; MissingExtraError: transformers is not installed.
    """
    directory = Path(directory)
    if is_compressed(directory):
        return from_pretrained(directory, model_class=model_class, dtype=dtype,
                               attn_implementation=attn_implementation, device=device)
    transformers = _transformers()
    dtype, device = _torch_dtype(dtype), _torch_device(device)
    if not (directory / "config.json").is_file() and not (directory / "config.json").is_symlink():
        raise BadInputError(f"{directory} has no config.json: a transformers model cannot be built from it")
    ckpt = open_checkpoint(directory)
    try:
        config = _auto_config(transformers, directory, attn_implementation)
        cls = _model_class(transformers, config, model_class, ckpt.names(), directory)
        tensors = _load_tensors(ckpt)  # only once the config and the class are known good
    finally:
        ckpt.close()
    if dtype is None:  # the weights' own: the most common floating dtype among them
        floats = Counter(t.dtype for t in tensors.values() if t.is_floating_point())
        dtype = floats.most_common(1)[0][0] if floats else None
    model = _build(cls, config, dtype, device, directory)
    _load_state(model, tensors, {}, _renamer(model), directory)
    return model.eval()


def _torch_dtype(dtype: Any) -> torch.dtype | None:
    """``dtype`` as a torch dtype (``None``: the weights' own), refusing what a model cannot take."""
    if dtype is None or dtype == "auto":
        return None
    found = _DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if found not in _DTYPES.values():
        raise BadInputError(f"dtype {str(dtype)[:80]!r} is not supported; choose {', '.join(_DTYPES)} or 'auto'")
    return found


def _torch_device(device: Any) -> torch.device:
    """``device`` as a torch device where weights can be loaded (not ``meta``), or a clear error."""
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise BadInputError(f"device {str(device)[:80]!r} is not a device: {str(e).splitlines()[0]}") from e
    if found.type == "meta":
        raise BadInputError("device 'meta' holds no weights; load on 'cpu' or 'cuda'")
    if found.type != "cpu":
        module = getattr(torch, found.type, None)
        if module is None or not module.is_available():
            raise BadInputError(f"device {str(found)!r} is not available on this machine")
        if found.index is not None and found.index >= module.device_count():
            raise BadInputError(f"device {str(found)!r} does not exist ({module.device_count()} available)")
    return found


def _auto_config(transformers, directory: Path, attn_implementation: str | None):
    """transformers' config of ``directory``, read from a checked copy of its config.json."""
    if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise BadInputError(f"attn_implementation {str(attn_implementation)[:40]!r} is not supported with "
                            f"collaborative attention (query/key width differs from the value width); use "
                            f"{' or '.join(ATTN_IMPLEMENTATIONS)}")
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with staged(directory, ("config.json",)) as copy:
        try:
            return transformers.AutoConfig.from_pretrained(str(copy), local_files_only=True, **kw)
        except unreadable_model_errors() as e:
            message = str(e).splitlines()[0].replace(str(copy), str(directory)) if str(e) else type(e).__name__
            raise BadInputError(f"transformers cannot read {directory / 'config.json'}: {message}") from e


def _build(cls: type, config, dtype: torch.dtype | None, device: torch.device, directory: Path) -> nn.Module:
    """An instance of ``cls`` with its ties made and no random initialisation (every weight is loaded next)."""
    try:
        with torch.device(device), _skip_init():
            model = cls(config)
        model.tie_weights()  # part of the initialisation transformers 5 skipped
    except (ValueError, ImportError, TypeError, AttributeError) as e:  # e.g. an attn_implementation the class lacks
        raise BadInputError(f"transformers cannot build {cls.__name__} from {directory / 'config.json'}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if dtype is not None:
        model = model.to(dtype)
    if model.config._attn_implementation not in ATTN_IMPLEMENTATIONS:  # e.g. flash kernels from config.json
        model.config._attn_implementation = "eager"
    return model


def _skip_init():
    """transformers' context that skips random initialisation when building a model whose every
    weight is loaded afterwards (SmolLM2: 3.1 s of a 4.5 s load); buffers are still computed."""
    from transformers.initialization import no_init_weights

    return no_init_weights()


def _load_state(model: nn.Module, tensors: dict[str, torch.Tensor], memory_module: dict[str, str], rename,
                directory: Path) -> None:
    expected = model.state_dict()
    known = dict.fromkeys(expected, True)
    by_file_module = sorted(memory_module, key=len, reverse=True)
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        module = next((m for m in by_file_module if key.startswith(f"{m}.collab_")), None)
        new = memory_module[module] + key[len(module):] if module is not None else rename(key, known)
        mapped[new] = tensor
    ignore_unexpected, ignore_missing = _ignored_patterns(model)
    for key in [k for k in mapped if k not in expected and ignore_unexpected and ignore_unexpected.search(k)]:
        del mapped[key]  # legacy tensors transformers also drops (e.g. old persistent position_ids)
    unexpected = sorted(set(mapped) - set(expected))
    if unexpected:
        raise BadInputError(f"{directory}: tensors the model does not take: {_short(unexpected)}")
    tied = _tied_names(model)
    missing = [k for k in expected if k not in mapped and not (tied.get(k, set()) & set(mapped))
               and not (ignore_missing and ignore_missing.search(k))]
    if missing:
        raise BadInputError(f"{directory}: model weights missing from the directory: {_short(missing)}")
    wrong = [f"{k} {tuple(t.shape)} (model {tuple(expected[k].shape)})" for k, t in mapped.items()
             if t.shape != expected[k].shape]
    if wrong:
        raise BadInputError(f"{directory}: tensors with shapes that do not fit the model: {_short(wrong)}")
    model.load_state_dict(mapped, strict=False)


# --------------------------------------------------------------------------- trust_remote_code

def write_remote_code(directory: str | os.PathLike) -> Path:
    """Make ``directory`` load with ``AutoModel.from_pretrained(DIR, trust_remote_code=True)``.

    Writes ``modeling_collabcompress.py`` (a subclass of the source model class whose
    ``from_pretrained`` calls :func:`from_pretrained`; it needs collabcompress installed
    where it is loaded) and adds ``"auto_map": {"AutoModel": ...}`` to ``config.json`` (and
    ``AutoModelForCausalLM`` for a causal LM).
    The manifest's ``outputs`` records are updated. Without ``trust_remote_code`` transformers
    loads its own class instead and initialises the missing query/key weights randomly (it
    warns about them), so load with ``trust_remote_code=True`` or with :func:`from_pretrained`.

    Returns:
        The path of the modeling file.

    Raises:
        BadInputError: not a compressed directory; UnsupportedArchitectureError: family not loadable.
    """
    from . import __version__
    from .files.output import write_json, write_manifest

    from .files.output import file_record

    directory = Path(directory)
    manifest = _mf.read(directory)
    loadable_family(manifest.source.architecture, directory)
    config = _read_config(directory)
    transformers = _transformers()
    cfg = _auto_config(transformers, directory, None)
    out = open_checkpoint(directory)
    try:
        names = out.names()
    finally:
        out.close()
    base = _model_class(transformers, cfg, None, names, directory).__name__
    code = directory / REMOTE_CODE_NAME
    module = REMOTE_CODE_NAME.removesuffix(".py")
    try:
        code.write_text(REMOTE_CODE.format(base=base, version=__version__), encoding="utf-8")
        auto = {"AutoModel": f"{module}.Collaborative{base}"}
        if base.endswith("ForCausalLM"):
            auto["AutoModelForCausalLM"] = auto["AutoModel"]
        config["auto_map"] = {**(config.get("auto_map") or {}), **auto}
        write_json(config, directory / "config.json")
        outputs = [o for o in manifest.outputs if o.name not in ("config.json", REMOTE_CODE_NAME)]
        outputs += [_mf.FileRecord(**file_record(path, directory)) for path in (directory / "config.json", code)]
        write_manifest(directory, dataclasses.replace(manifest, outputs=tuple(outputs)))
    except OSError as e:
        raise BadInputError(f"cannot write the remote code into {directory}: {e}") from e
    return code
