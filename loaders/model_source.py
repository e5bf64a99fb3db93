"""Turn what the user typed as a model into a ``ModelSpec``.

Resolution order, first match wins:

a. a local folder that holds ``config.json``           -> source "path"
b. a path to a ``.json`` config file                     -> source "path"
c. a model id in the bundled catalog (aliases applied)   -> source "catalog"
d. the local Hugging Face cache (HF_HOME / HF_HUB_CACHE) -> source "cache"
e. the Hub, fetching ``config.json`` only                -> source "hub"

Only ``config.json`` is ever read or downloaded: the planner builds the model on the meta
device, so weights are never needed here. transformers and huggingface_hub are imported
inside the functions that need them because importing transformers costs seconds and the CLI
imports this module for every command.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qplan.errors import ConfigError, ModelNotFoundError, UsageError
from qplan.planner.config_checks import check_raw_sizes
from qplan.planner.spec import ModelSpec
from qplan.profiles import data_dir

CONFIG_NAME = "config.json"
ALIASES_FILE = "aliases.json"
# NVIDIA ModelOpt keeps a checkpoint's quantisation here, not in config.json.
QUANT_CONFIG_NAME = "hf_quant_config.json"

# One HEAD request bounded by this timeout decides whether the Hub is reachable at all.
# hf_hub_download on its own retries network failures with a 60 s timeout and backoff,
# which looks like a hang to someone who is simply offline.
HUB_TIMEOUT_S = 10.0

# The shape huggingface_hub accepts for a repo id ("name" or "org/name"); anything else that
# is not an existing path cannot be looked up in the cache or on the Hub.
_REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9_.-]+/)?[A-Za-z0-9_.-]+$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class CatalogEntry:
    """One bundled config, as listed by ``qplan models``."""

    id: str
    model_type: str
    architecture: str
    file: str


@dataclass(frozen=True)
class _Alias:
    target: str
    note: str


# --------------------------------------------------------------------------- public API


def resolve_model(
    model: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    offline: bool | None = None,
) -> ModelSpec:
    """Resolve ``model`` (folder, config.json path or Hub id) to a ``ModelSpec``.

    ``offline=None`` follows HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE. The bundled catalog is a
    fixed copy of each config, so it is skipped when a ``revision`` other than "main" is asked
    for. ``ModelSpec.trust_remote_code`` is True only when the model's own code built the config.
    """
    text = model.strip()
    if not text:
        raise UsageError(
            "no model given; pass a Hugging Face id such as meta-llama/Llama-3.1-8B, "
            "a local folder or a config.json path"
        )

    local = _resolve_local(text, revision=revision, trust_remote_code=trust_remote_code)
    if local is not None:
        return local

    alias = _aliases().get(text.lower())
    repo_id = alias.target if alias else text
    notes = (alias.note,) if alias else ()

    if revision in (None, "main"):
        catalog_file = _catalog_files().get(repo_id.lower())
        if catalog_file is not None:
            return _spec_from_catalog(catalog_file, notes=notes, revision=revision)

    if not _is_repo_id(repo_id):
        raise ModelNotFoundError(
            f"'{text}' is neither an existing path nor a valid Hugging Face model id; "
            "pass a folder holding config.json, a config.json path or an id like org/name"
        )

    cached = _find_in_cache(repo_id, revision)
    if cached is not None:
        return _spec_from_hub_file(
            cached,
            repo_id=repo_id,
            source="cache",
            revision=revision,
            trust_remote_code=trust_remote_code,
            offline=_is_offline(offline),
            notes=notes,
        )

    if _is_offline(offline):
        raise ModelNotFoundError(
            f"model '{text}' is not a local folder, not in the bundled catalog and not in the "
            "HF cache, and HF_HUB_OFFLINE is set; pass a local folder or config.json, "
            "or run `qplan models` to list the catalog"
        )

    downloaded = _download_config(repo_id, revision)
    return _spec_from_hub_file(
        downloaded,
        repo_id=repo_id,
        source="hub",
        revision=revision,
        trust_remote_code=trust_remote_code,
        offline=False,
        notes=notes,
    )


def architecture_of(config: Any) -> str:
    """The model class to build: first ``architectures`` entry, else the type's causal-LM class."""
    architectures = getattr(config, "architectures", None)
    if architectures:
        return str(architectures[0])
    model_type = getattr(config, "model_type", None)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) if model_type else None
    if name:
        return str(name)
    raise ConfigError(
        f"the config (model_type '{model_type}') lists no `architectures` and transformers "
        'has no causal-LM class for that type; add an "architectures" entry to config.json'
    )


def list_catalog() -> list[CatalogEntry]:
    """Every bundled config, sorted by id (for ``qplan models``)."""
    entries = []
    for file_name in _catalog_files().values():
        raw = _read_catalog_json(file_name)
        model_type = str(raw.get("model_type", ""))
        architectures = raw.get("architectures") or []
        architecture = str(architectures[0]) if architectures else _causal_lm_class(model_type)
        entries.append(
            CatalogEntry(
                id=_id_from_file_name(file_name),
                model_type=model_type,
                architecture=architecture,
                file=file_name,
            )
        )
    return sorted(entries, key=lambda entry: entry.id.lower())


# --------------------------------------------------------------------------- local paths


def _resolve_local(text: str, *, revision: str | None, trust_remote_code: bool) -> ModelSpec | None:
    """Steps a and b: a folder or a .json file on disk; None when ``text`` is no local path."""
    # Absolute, so the spec stays valid if the caller changes directory later.
    path = Path(text).expanduser().absolute()
    if path.is_dir():
        config_path = path / CONFIG_NAME
        if config_path.is_file():
            return _spec_from_local_file(
                config_path,
                model_id=text,
                weights_dir=path,
                revision=revision,
                trust_remote_code=trust_remote_code,
            )
        if not _is_repo_id(text):
            # A folder the user pointed at explicitly; a folder that merely shares its name
            # with a model id (e.g. ./gpt2) should not hide the catalog or the Hub.
            raise ModelNotFoundError(
                f"folder '{text}' has no {CONFIG_NAME}; pass the folder that holds the model's "
                "config.json (for a HF cache, the snapshots/<hash> folder) or a model id"
            )
        return None
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise ModelNotFoundError(
                f"'{text}' is a file but not a .json config; pass a folder holding config.json, "
                "a config.json path or a model id"
            )
        return _spec_from_local_file(
            path,
            model_id=text,
            weights_dir=path.parent if _has_weights(path.parent) else None,
            revision=revision,
            trust_remote_code=trust_remote_code,
        )
    if _looks_like_path(text):
        raise ModelNotFoundError(
            f"path '{text}' does not exist; check the path, or pass a model id like org/name"
        )
    return None


def _looks_like_path(text: str) -> bool:
    """True for input that can only mean a file path (so it must not go to the Hub)."""
    return (
        text.lower().endswith(".json")
        or text.startswith(("/", "./", "../", "~", "\\"))
        or "\\" in text
        or text.count("/") > 1
    )


def _has_weights(folder: Path) -> bool:
    try:
        return any(child.suffix in _WEIGHT_SUFFIXES for child in folder.iterdir())
    except OSError:
        return False


def _spec_from_local_file(
    config_path: Path,
    *,
    model_id: str,
    weights_dir: Path | None,
    revision: str | None,
    trust_remote_code: bool,
) -> ModelSpec:
    # The id is the path the user typed: `_name_or_path` inside a config.json often names a
    # folder on the machine that saved it, which would only confuse.
    raw = _with_hf_quant_config(_read_config_json(config_path), config_path)
    built = _build_config(
        raw,
        origin=str(config_path),
        trust_remote_code=trust_remote_code,
        remote_target=str(config_path.parent),
        remote_kwargs={"revision": revision, "local_files_only": True},
    )
    return ModelSpec(
        id=model_id,
        source="path",
        config=built.config,
        config_path=str(config_path),
        revision=revision,
        trust_remote_code=built.used_remote_code,
        notes=built.notes,
        weights_dir=str(weights_dir) if weights_dir is not None else None,
    )


# --------------------------------------------------------------------------- catalog


@functools.lru_cache(maxsize=1)
def _catalog_files() -> dict[str, str]:
    """Lower-cased model id -> file name, for every bundled config."""
    files = {}
    for child in data_dir("models").iterdir():
        name = child.name
        if name.endswith(".json") and name != ALIASES_FILE and not name.endswith(
                "." + QUANT_CONFIG_NAME):
            files[_id_from_file_name(name).lower()] = name
    return files


@functools.lru_cache(maxsize=1)
def _aliases() -> dict[str, _Alias]:
    """Lower-cased alias -> target id and the note shown to the user."""
    raw = json.loads(data_dir("models").joinpath(ALIASES_FILE).read_text(encoding="utf-8"))
    return {
        alias.lower(): _Alias(target=entry["target"], note=entry["note"])
        for alias, entry in raw.items()
    }


def _id_from_file_name(file_name: str) -> str:
    return file_name.removesuffix(".json").replace("__", "/")


def _read_catalog_json(file_name: str) -> dict[str, Any]:
    resource = data_dir("models").joinpath(file_name)
    raw = _parse_config_text(resource.read_text(encoding="utf-8"), origin=f"catalog {file_name}")
    return _with_hf_quant_config(raw, resource)


def _with_hf_quant_config(raw: dict[str, Any], config_path: Any) -> dict[str, Any]:
    """Fold NVIDIA ModelOpt's ``hf_quant_config.json`` (kept beside config.json, which then
    has no quantization_config) into the config as ``quant_method: modelopt``, so the
    checkpoint is planned in its stored format. Beside a renamed config ``X.json`` it is
    looked for as ``X.hf_quant_config.json`` or ``X.hf_quant_config`` (the catalog's)."""
    if raw.get("quantization_config") or config_path is None:
        return raw
    name = str(getattr(config_path, "name", ""))
    stem = name.removesuffix(".json")
    # The bundled catalog ships it as "<file stem>.hf_quant_config" (not a *.json model).
    for sibling in (QUANT_CONFIG_NAME, f"{stem}.{QUANT_CONFIG_NAME}",
                    f"{stem}.{QUANT_CONFIG_NAME.removesuffix('.json')}"):
        candidate = config_path.parent.joinpath(sibling) if hasattr(
            config_path, "parent") else None
        try:
            if candidate is None or not candidate.is_file():
                continue
            data = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        quant = data.get("quantization") if isinstance(data, dict) else None
        if isinstance(quant, dict):
            return {**raw, "quantization_config": {"quant_method": "modelopt", **quant}}
    return raw


def _spec_from_catalog(
    file_name: str, *, notes: tuple[str, ...], revision: str | None
) -> ModelSpec:
    raw = _read_catalog_json(file_name)
    # Catalog files are vetted to build with transformers' own classes, and there is no code
    # to run next to them, so remote code is never used here.
    built = _build_config(
        raw,
        origin=f"catalog {file_name}",
        trust_remote_code=False,
        remote_target=None,
        remote_kwargs={},
    )
    resource = data_dir("models").joinpath(file_name)
    return ModelSpec(
        id=_id_from_file_name(file_name),
        source="catalog",
        config=built.config,
        config_path=str(resource) if isinstance(resource, Path) else None,
        revision=revision,
        trust_remote_code=False,
        notes=(*notes, *built.notes),
        weights_dir=None,
    )


def _causal_lm_class(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return str(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ""))


# --------------------------------------------------------------------------- HF cache and Hub


def _is_repo_id(text: str) -> bool:
    return (
        len(text) <= 96
        and _REPO_ID_RE.match(text) is not None
        and "--" not in text
        and ".." not in text
        and not text.startswith(("-", "."))
        and not text.endswith(("-", "."))
    )


def _is_offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    # Read at call time: huggingface_hub.constants froze these at import.
    return any(
        os.environ.get(name, "").upper() in _TRUE_VALUES
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_cache_dir() -> Path:
    """The HF hub cache folder, with huggingface_hub's precedence, read from the env now.

    huggingface_hub.constants reads these variables once at import, so a process (or a test)
    that changes them later would otherwise look in the wrong place.
    """
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    xdg_cache = env.get("XDG_CACHE_HOME") or "~/.cache"
    home = env.get("HF_HOME") or os.path.join(xdg_cache, "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _find_in_cache(repo_id: str, revision: str | None) -> Path | None:
    import huggingface_hub

    found = huggingface_hub.try_to_load_from_cache(
        repo_id, CONFIG_NAME, cache_dir=hub_cache_dir(), revision=revision
    )
    # try_to_load_from_cache also returns a sentinel for "known not to exist"; only a str is
    # a usable file.
    return Path(found) if isinstance(found, str) else None


def _hub_token() -> str | None:
    # None lets huggingface_hub fall back to the token saved by `hf auth login`.
    return os.environ.get("HF_TOKEN") or None


def _download_config(repo_id: str, revision: str | None) -> Path:
    import huggingface_hub

    token = _hub_token()
    try:
        url = huggingface_hub.hf_hub_url(repo_id, CONFIG_NAME, revision=revision)
        huggingface_hub.get_hf_file_metadata(url, token=token, timeout=HUB_TIMEOUT_S)
        path = huggingface_hub.hf_hub_download(
            repo_id,
            CONFIG_NAME,
            revision=revision,
            token=token,
            cache_dir=hub_cache_dir(),
            etag_timeout=HUB_TIMEOUT_S,
        )
    except Exception as exc:
        raise ModelNotFoundError(_hub_error_message(repo_id, revision, exc)) from exc
    return Path(path)


def _hub_error_message(repo_id: str, revision: str | None, exc: Exception) -> str:
    """One line that names what went wrong on the Hub and what to do about it."""
    from huggingface_hub import errors

    at = f" at revision '{revision}'" if revision else ""
    if isinstance(exc, errors.GatedRepoError):
        return (
            f"model '{repo_id}' is gated on the Hugging Face Hub; accept its licence on "
            f"https://huggingface.co/{repo_id}, then set HF_TOKEN or run `hf auth login`"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return (
            f"model '{repo_id}' was not found on the Hugging Face Hub (or it is private); "
            "check the id, set HF_TOKEN / run `hf auth login` for a private repo, "
            "or run `qplan models` to list the catalog"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return (
            f"revision '{revision}' of model '{repo_id}' was not found on the Hub; "
            "pass an existing branch, tag or commit with --revision"
        )
    if isinstance(exc, errors.EntryNotFoundError) and not isinstance(
        exc, errors.LocalEntryNotFoundError
    ):
        return (
            f"model '{repo_id}' has no config.json on the Hub{at}, so it is not a transformers "
            "model (it may hold another weight format); pass a transformers repo or a local folder"
        )
    status = _http_status(exc)
    if status in (401, 403):
        return (
            f"the Hub refused access to '{repo_id}' (HTTP {status}); "
            "set HF_TOKEN or run `hf auth login` with a token that can read it"
        )
    return (
        f"could not fetch config.json of '{repo_id}' from the Hugging Face Hub "
        f"({_one_line(type(exc).__name__ + ': ' + str(exc), 120)}); check your connection, "
        "proxy or HF_ENDPOINT, or pass a local folder or config.json"
    )


def _http_status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _spec_from_hub_file(
    config_path: Path,
    *,
    repo_id: str,
    source: str,
    revision: str | None,
    trust_remote_code: bool,
    offline: bool,
    notes: tuple[str, ...],
) -> ModelSpec:
    raw = _with_hf_quant_config(_read_config_json(config_path), config_path)
    built = _build_config(
        raw,
        origin=f"{CONFIG_NAME} of '{repo_id}' ({config_path})",
        trust_remote_code=trust_remote_code,
        remote_target=repo_id,
        remote_kwargs={
            "revision": revision,
            "cache_dir": str(hub_cache_dir()),
            "token": _hub_token(),
            "local_files_only": offline,
        },
    )
    snapshot = config_path.parent
    return ModelSpec(
        id=repo_id,
        source=source,
        config=built.config,
        config_path=str(config_path),
        # The snapshot folder is named after the commit that was read; record that, so the
        # plan says exactly which config it used.
        revision=snapshot.name if snapshot.parent.name == "snapshots" else revision,
        trust_remote_code=built.used_remote_code,
        notes=(*notes, *built.notes),
        weights_dir=str(snapshot) if source == "cache" else None,
    )


# --------------------------------------------------------------------------- parsing and building


@dataclass(frozen=True)
class _Built:
    config: Any
    notes: tuple[str, ...] = ()
    used_remote_code: bool = False


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc.reason}); pass a config.json") from exc
    except OSError as exc:
        raise ConfigError(
            f"could not read {path} ({exc.strerror or exc}); check that the file is readable"
        ) from exc
    return _parse_config_text(text, origin=str(path))


def _parse_config_text(text: str, *, origin: str) -> dict[str, Any]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{origin} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}; "
            "fix the file or download config.json again"
        ) from exc
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{origin} holds a JSON {type(raw).__name__}, not an object; "
            "is this a transformers config.json?"
        )
    return raw


def _build_config(
    raw: dict[str, Any],
    *,
    origin: str,
    trust_remote_code: bool,
    remote_target: str | None,
    remote_kwargs: dict[str, Any],
) -> _Built:
    """A ``PretrainedConfig`` from a parsed config.json, without touching the network.

    Only the trust_remote_code route calls ``AutoConfig.from_pretrained``, because the model's
    own configuration class has to be imported from its repo or folder.
    """
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(
            f"{origin} has no model_type; is this a transformers config.json? "
            "Pass the config.json of a Hugging Face transformers model"
        )
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    version = transformers.__version__
    known_type = model_type in CONFIG_MAPPING
    has_code = bool(raw.get("auto_map"))
    check_raw_sizes(raw, origin)

    if has_code and trust_remote_code and remote_target is not None:
        return _build_remote_config(remote_target, remote_kwargs, origin=origin)
    if not known_type:
        if has_code:
            raise ConfigError(
                f"{origin} uses custom code (auto_map) for model_type '{model_type}', which "
                f"transformers {version} does not have; pass --trust-remote-code to run the "
                "model's own code, if you trust it"
            )
        raise ConfigError(
            f"model_type '{model_type}' is not known to transformers {version}; upgrade "
            "transformers or pass --trust-remote-code if the model ships its own code"
        )

    arch_notes = _check_architectures(
        raw.get("architectures"), origin=origin, version=version, model_type=model_type
    )
    config_class = CONFIG_MAPPING[model_type]
    try:
        # from_dict is what AutoConfig.from_pretrained itself ends with: it keeps
        # architectures, dtype (torch_dtype) and nested sub-configs as transformers would.
        # transformers writes inf/NaN as {"__float__": "Infinity"} and decodes them when
        # it reads config.json (Nemotron-H's time_step_limit); do the same.
        decode = getattr(config_class, "_decode_special_floats", lambda obj: obj)
        config = config_class.from_dict(decode(raw))
    except Exception as exc:
        raise ConfigError(
            f"{origin} could not be built as {config_class.__name__}: "
            f"{_one_line(str(exc), 160)}; fix the offending value in config.json"
        ) from exc

    notes: tuple[str, ...] = arch_notes
    if has_code:
        # Same choice as from_pretrained(trust_remote_code=False) for a type transformers
        # ships: the built-in classes, not the repo's code.
        notes += (
            f"config.json maps custom code (auto_map) but transformers {version} has a "
            f"built-in '{model_type}'; planned with the built-in classes, as from_pretrained "
            "does without trust_remote_code",
        )
    return _Built(config=config, notes=notes)


def _build_remote_config(target: str, kwargs: dict[str, Any], *, origin: str) -> _Built:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(target, trust_remote_code=True, **kwargs)
    except Exception as exc:
        raise ConfigError(
            f"the custom code of {origin} could not build its config "
            f"({_one_line(type(exc).__name__ + ': ' + str(exc), 160)}); check that the "
            "model's .py files sit next to config.json (or are reachable on the Hub)"
        ) from exc
    note = f"config built by the model's own code from '{target}' (trust_remote_code)"
    return _Built(config=config, notes=(note,), used_remote_code=True)


def _check_architectures(
    architectures: Any, *, origin: str, version: str, model_type: str
) -> tuple[str, ...]:
    """Refuse a malformed ``architectures``; a name transformers lacks is resolved by
    model_type, as from_pretrained does (returns the note saying so), unless the
    model_type has no generative class either."""
    if architectures is None:
        return ()
    if not isinstance(architectures, list) or not all(
        isinstance(name, str) for name in architectures
    ):
        raise ConfigError(
            f"{origin} has an `architectures` entry that is not a list of class names; "
            'fix it, e.g. "architectures": ["LlamaForCausalLM"]'
        )
    if all(name in _causal_lm_architectures() for name in architectures):
        return ()  # the common case, answered without scanning transformers' whole namespace
    from qplan.planner.families import generative_classes

    known = _known_architectures()
    for name in architectures:
        if name in known:
            continue
        classes = generative_classes(model_type)
        if not classes:
            raise ConfigError(
                f"{origin} names architecture '{name}', which transformers {version} does not "
                "have; upgrade transformers or correct `architectures` in config.json"
            )
        return (
            f"config.json names {name}, which transformers {version} does not have; planned "
            f"as {classes[0].name}, the class from_pretrained takes for model_type "
            f"'{model_type}'",
        )
    return ()


@functools.lru_cache(maxsize=1)
def _causal_lm_architectures() -> frozenset[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


@functools.lru_cache(maxsize=1)
def _known_architectures() -> frozenset[str]:
    """Every model class name transformers knows, without importing the modeling modules."""
    import transformers
    from transformers.models.auto import modeling_auto

    names: set[str] = set(dir(transformers))
    for attribute in dir(modeling_auto):
        if not attribute.endswith("_MAPPING_NAMES"):
            continue
        for value in getattr(modeling_auto, attribute).values():
            names.update([value] if isinstance(value, str) else value)
    return frozenset(names)


def _one_line(text: str, limit: int) -> str:
    """Embedded exception text, squeezed so the whole error stays one short line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
