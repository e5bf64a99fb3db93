"""Model resolution: local folder, config.json path, bundled catalog, HF cache, Hub.

No test touches the network: an autouse fixture sets HF_HUB_OFFLINE=1, points HF_HOME at an
empty temporary folder and replaces huggingface_hub's download functions with ones that fail;
the Hub tests install their own fakes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qplan.errors import ConfigError, ModelNotFoundError, UsageError
from qplan.loaders import model_source
from qplan.loaders.model_source import architecture_of, list_catalog, resolve_model
from qplan.planner.inventory import model_class_for
from qplan.planner.spec import ModelSpec
from qplan.profiles import data_dir

TINY_LLAMA: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 1000,
    "torch_dtype": "bfloat16",
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CATALOG_FILES = sorted(
    child.name
    for child in data_dir("models").iterdir()
    if child.name.endswith(".json") and child.name != "aliases.json"
)


def _no_network(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError(f"a test tried to reach the Hub: {args} {kwargs}")


@pytest.fixture(autouse=True)
def _isolated_hf_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_network)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", _no_network)


def _write_config(
    folder: Path, config: dict[str, Any] | None = None, text: str | None = None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(text if text is not None else json.dumps(config or TINY_LLAMA), "utf-8")
    return path


def _fake_cache(cache: Path, repo_id: str, *, ref: str = "main", commit: str = COMMIT) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/<ref>, snapshots/<hash>/}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / ref).write_text(commit, "utf-8")
    snapshot = repo / "snapshots" / commit
    _write_config(snapshot)
    return snapshot


def _one_line_error(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- catalog contents


@pytest.mark.parametrize("file_name", CATALOG_FILES)
def test_every_catalog_config_loads_and_names_a_known_architecture(file_name: str) -> None:
    import torch

    model_id = file_name.removesuffix(".json").replace("__", "/")
    spec = resolve_model(model_id)
    assert spec.source == "catalog"
    assert spec.id == model_id
    assert spec.weights_dir is None
    raw = json.loads(data_dir("models").joinpath(file_name).read_text("utf-8"))
    assert spec.config.model_type == raw["model_type"]
    assert spec.config.architectures == raw["architectures"]
    assert architecture_of(spec.config)
    # The class qplan plans: the one the config names, or its model_type's where
    # transformers spells the name differently (Phi-3.5-MoE's PhiMoEForCausalLM), or a
    # vision-language model's text class (Llama 4).
    factory, _ = model_class_for(spec.config)
    with torch.device("meta"):
        model = factory.from_config(spec.config)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_catalog_keeps_the_config_dtype() -> None:
    import torch

    assert resolve_model("meta-llama/Llama-2-7b-hf").config.dtype == torch.float16
    assert resolve_model("Qwen/Qwen3-8B").config.dtype == torch.bfloat16


def test_list_catalog_covers_every_file_and_sources_md_lists_them() -> None:
    entries = list_catalog()
    assert sorted(entry.file for entry in entries) == CATALOG_FILES
    assert [entry.id.lower() for entry in entries] == sorted(e.id.lower() for e in entries)
    sources = data_dir("models").joinpath("SOURCES.md").read_text("utf-8")
    for entry in entries:
        assert entry.model_type and entry.architecture
        assert f"| {entry.file} |" in sources, f"{entry.file} has no provenance row"


def test_aliases_are_well_formed() -> None:
    aliases = json.loads(data_dir("models").joinpath("aliases.json").read_text("utf-8"))
    assert aliases
    for alias, entry in aliases.items():
        assert set(entry) == {"target", "note"}, alias
        assert entry["target"] != alias
        assert entry["note"] and "\n" not in entry["note"]


# --------------------------------------------------------------------------- catalog lookup


def test_catalog_lookup_is_case_insensitive() -> None:
    spec = resolve_model("QWEN/qwen2.5-7b")
    assert spec.source == "catalog"
    assert spec.id == "Qwen/Qwen2.5-7B"


def test_llama2_alias_uses_the_hf_repo_and_says_so() -> None:
    spec = resolve_model("meta-llama/Llama-2-7b")
    assert spec.id == "meta-llama/Llama-2-7b-hf"
    assert spec.source == "catalog"
    assert spec.notes == (
        "meta-llama/Llama-2-7b holds Meta-format weights without a config.json; "
        "using the config of meta-llama/Llama-2-7b-hf",
    )


def test_gpt2_alias() -> None:
    spec = resolve_model("gpt2")
    assert spec.id == "openai-community/gpt2"
    assert architecture_of(spec.config) == "GPT2LMHeadModel"


def test_catalog_auto_map_with_builtin_type_uses_builtin_classes() -> None:
    spec = resolve_model("microsoft/Phi-3-mini-4k-instruct")
    assert type(spec.config).__name__ == "Phi3Config"
    assert spec.trust_remote_code is False
    assert any("auto_map" in note for note in spec.notes)


def test_catalog_is_skipped_for_an_explicit_revision() -> None:
    with pytest.raises(ModelNotFoundError):
        resolve_model("meta-llama/Llama-2-7b-hf", revision="some-branch")


# --------------------------------------------------------------------------- local paths


def test_local_folder_beats_a_catalog_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "meta-llama" / "Llama-2-7b-hf"
    _write_config(folder)
    spec = resolve_model("meta-llama/Llama-2-7b-hf")
    assert spec.source == "path"
    assert spec.config.hidden_size == 64
    assert spec.id == "meta-llama/Llama-2-7b-hf"
    assert spec.weights_dir == str(folder)
    assert spec.config_path == str(folder / "config.json")


def test_local_folder(tmp_path: Path) -> None:
    config_path = _write_config(tmp_path / "my-model")
    spec = resolve_model(str(tmp_path / "my-model"))
    assert spec == ModelSpec(
        id=str(tmp_path / "my-model"),
        source="path",
        config=spec.config,
        config_path=str(config_path),
        weights_dir=str(tmp_path / "my-model"),
    )
    assert architecture_of(spec.config) == "LlamaForCausalLM"


def test_config_json_path(tmp_path: Path) -> None:
    config_path = _write_config(tmp_path / "cfg")
    spec = resolve_model(str(config_path))
    assert spec.source == "path"
    assert spec.config_path == str(config_path)
    assert spec.weights_dir is None  # no weight files next to it

    (tmp_path / "cfg" / "model.safetensors").write_bytes(b"")
    assert resolve_model(str(config_path)).weights_dir == str(tmp_path / "cfg")


def test_any_json_file_name_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "llama-tiny.json"
    path.write_text(json.dumps(TINY_LLAMA), "utf-8")
    assert resolve_model(str(path)).config.num_hidden_layers == 2


def test_missing_path_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model(str(tmp_path / "nope" / "config.json"), offline=False)
    assert "does not exist" in _one_line_error(excinfo)


def test_folder_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model(str(tmp_path / "empty"))
    assert "has no config.json" in _one_line_error(excinfo)


def test_non_json_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model(str(path))
    assert "not a .json config" in _one_line_error(excinfo)


def test_empty_model_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        resolve_model("  ")


# --------------------------------------------------------------------------- HF cache


def test_cache_via_hf_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snapshot = _fake_cache(tmp_path / "hf" / "hub", "acme/tiny-llama")
    spec = resolve_model("acme/tiny-llama")
    assert spec.source == "cache"
    assert spec.id == "acme/tiny-llama"
    assert spec.weights_dir == str(snapshot)
    assert spec.config_path == str(snapshot / "config.json")
    assert spec.revision == COMMIT
    assert spec.config.hidden_size == 64


def test_cache_via_hf_hub_cache_wins_over_hf_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    snapshot = _fake_cache(tmp_path / "elsewhere", "acme/tiny-llama")
    spec = resolve_model("acme/tiny-llama")
    assert spec.source == "cache"
    assert spec.weights_dir == str(snapshot)


def test_cache_honours_the_revision(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    other = "f" * 40
    snapshot = _fake_cache(tmp_path / "cache", "acme/tiny-llama", ref="dev", commit=other)
    assert resolve_model("acme/tiny-llama", revision="dev").weights_dir == str(snapshot)
    with pytest.raises(ModelNotFoundError):  # nothing cached for main
        resolve_model("acme/tiny-llama")


def test_alias_applies_to_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    _fake_cache(tmp_path / "cache", "meta-llama/Llama-2-7b-chat-hf")
    spec = resolve_model("meta-llama/Llama-2-7b-chat")
    assert (spec.id, spec.source) == ("meta-llama/Llama-2-7b-chat-hf", "cache")
    assert "Meta-format" in spec.notes[0]


# --------------------------------------------------------------------------- offline / Hub


OFFLINE_MESSAGE = (
    "model 'acme/unknown' is not a local folder, not in the bundled catalog and not in the HF "
    "cache, and HF_HUB_OFFLINE is set; pass a local folder or config.json, or run `qplan models` "
    "to list the catalog"
)


def test_offline_miss_from_env() -> None:
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model("acme/unknown")
    assert _one_line_error(excinfo) == OFFLINE_MESSAGE


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_offline_env_values(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", value)
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE is set"):
        resolve_model("acme/unknown")


def test_offline_argument_overrides_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE is set"):
        resolve_model("acme/unknown", offline=True)


def test_invalid_id_is_not_sent_to_the_hub() -> None:
    with pytest.raises(ModelNotFoundError, match="nor a valid Hugging Face model id"):
        resolve_model("not a model id!", offline=False)


class _FakeHub:
    """Stands in for huggingface_hub's network functions and records every call."""

    def __init__(self, tmp_path: Path, error: Exception | None = None) -> None:
        self.tmp_path = tmp_path
        self.error = error
        self.downloads: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.heads: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def get_hf_file_metadata(self, *args: Any, **kwargs: Any) -> None:
        self.heads.append((args, kwargs))
        if self.error is not None:
            raise self.error

    def hf_hub_download(self, *args: Any, **kwargs: Any) -> str:
        self.downloads.append((args, kwargs))
        snapshot = self.tmp_path / "hub-cache" / "models--acme--tiny" / "snapshots" / COMMIT
        return str(_write_config(snapshot))


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> _FakeHub:
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub = _FakeHub(tmp_path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", hub.get_hf_file_metadata)
    return hub


def test_hub_fetches_only_config_json(fake_hub: _FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    spec = resolve_model("acme/tiny", revision="v1.0")
    assert spec.source == "hub"
    assert spec.id == "acme/tiny"
    assert spec.weights_dir is None
    assert spec.revision == COMMIT
    assert len(fake_hub.downloads) == 1
    args, kwargs = fake_hub.downloads[0]
    assert args == ("acme/tiny", "config.json")
    assert kwargs["revision"] == "v1.0"
    assert kwargs["token"] == "hf_secret"
    assert kwargs["etag_timeout"] == model_source.HUB_TIMEOUT_S
    head_args, head_kwargs = fake_hub.heads[0]
    assert head_args[0].endswith("/acme/tiny/resolve/v1.0/config.json")
    assert head_kwargs["timeout"] == model_source.HUB_TIMEOUT_S
    assert head_kwargs["token"] == "hf_secret"


def test_hub_without_token_lets_huggingface_hub_choose(fake_hub: _FakeHub) -> None:
    resolve_model("acme/tiny")
    _, kwargs = fake_hub.downloads[0]
    assert kwargs["token"] is None
    assert kwargs["revision"] is None


def test_hub_download_goes_to_the_cache_named_by_the_env_now(
    fake_hub: _FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "now"))
    resolve_model("acme/tiny")
    assert Path(fake_hub.downloads[0][1]["cache_dir"]) == tmp_path / "now"


def _http_error(cls: type[Exception], status: int) -> Exception:
    import httpx2

    request = httpx2.Request("HEAD", "https://huggingface.co/acme/tiny/resolve/main/config.json")
    return cls("server said no", response=httpx2.Response(status, request=request))


def _hub_errors() -> list[tuple[Exception, str]]:
    import httpx2
    from huggingface_hub import errors

    return [
        (_http_error(errors.GatedRepoError, 403), "is gated on the Hugging Face Hub"),
        (_http_error(errors.RepositoryNotFoundError, 404), "was not found on the Hugging Face Hub"),
        (_http_error(errors.RevisionNotFoundError, 404), "revision 'v9' of model 'acme/tiny'"),
        (_http_error(errors.RemoteEntryNotFoundError, 404), "has no config.json on the Hub"),
        (_http_error(errors.HfHubHTTPError, 401), "HTTP 401"),
        (errors.LocalEntryNotFoundError("cannot reach\nthe Hub"), "could not fetch config.json"),
        (httpx2.ConnectError("connection refused"), "check your connection"),
        (TimeoutError("timed out"), "could not fetch config.json"),
    ]


@pytest.mark.parametrize("index", range(len(_hub_errors())))
def test_hub_errors_become_one_line_model_not_found(fake_hub: _FakeHub, index: int) -> None:
    error, expected = _hub_errors()[index]
    fake_hub.error = error
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model("acme/tiny", revision="v9")
    assert expected in _one_line_error(excinfo)
    assert fake_hub.downloads == []  # a failed probe stops before any download


def test_gated_message_names_the_fix(fake_hub: _FakeHub) -> None:
    from huggingface_hub import errors

    fake_hub.error = _http_error(errors.GatedRepoError, 403)
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model("acme/tiny")
    message = _one_line_error(excinfo)
    assert "HF_TOKEN" in message and "hf auth login" in message


# --------------------------------------------------------------------------- bad configs


def test_malformed_json_names_file_and_position(tmp_path: Path) -> None:
    path = _write_config(tmp_path / "bad", text='{\n  "model_type": "llama",\n}')
    with pytest.raises(ConfigError) as excinfo:
        resolve_model(str(tmp_path / "bad"))
    message = _one_line_error(excinfo)
    assert str(path) in message
    assert "line 3 column 1" in message


def test_json_that_is_not_an_object(tmp_path: Path) -> None:
    _write_config(tmp_path / "list", text="[1, 2]")
    with pytest.raises(ConfigError, match="not an object"):
        resolve_model(str(tmp_path / "list"))


def test_missing_model_type(tmp_path: Path) -> None:
    config = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    _write_config(tmp_path / "m", config)
    with pytest.raises(ConfigError) as excinfo:
        resolve_model(str(tmp_path / "m"))
    assert "has no model_type; is this a transformers config.json?" in _one_line_error(excinfo)


def test_unknown_model_type(tmp_path: Path) -> None:
    import transformers

    _write_config(tmp_path / "m", {**TINY_LLAMA, "model_type": "martian"})
    with pytest.raises(ConfigError) as excinfo:
        resolve_model(str(tmp_path / "m"))
    message = _one_line_error(excinfo)
    assert f"model_type 'martian' is not known to transformers {transformers.__version__}" in (
        message
    )
    assert "--trust-remote-code" in message


def test_unknown_architecture_of_a_known_type_resolves_by_model_type(tmp_path: Path) -> None:
    """As from_pretrained does: the auto classes go by model_type, not by the name."""
    _write_config(tmp_path / "m", {**TINY_LLAMA, "architectures": ["LlamaForTimeTravel"]})
    spec = resolve_model(str(tmp_path / "m"))
    assert any("LlamaForTimeTravel" in note and "LlamaForCausalLM" in note
               for note in spec.notes)


def test_unknown_architecture_of_a_type_without_a_generative_class(tmp_path: Path) -> None:
    _write_config(tmp_path / "m", {"model_type": "vit", "architectures": ["ViTForTimeTravel"]})
    with pytest.raises(ConfigError) as excinfo:
        resolve_model(str(tmp_path / "m"))
    assert "'ViTForTimeTravel'" in _one_line_error(excinfo)


def test_incomplete_config_uses_transformers_defaults(tmp_path: Path) -> None:
    _write_config(tmp_path / "m", {"model_type": "llama"})
    spec = resolve_model(str(tmp_path / "m"))
    assert spec.config.hidden_size == 4096  # LlamaConfig's default
    assert architecture_of(spec.config) == "LlamaForCausalLM"  # derived from model_type


def test_architecture_of_without_a_causal_lm_class(tmp_path: Path) -> None:
    _write_config(tmp_path / "m", {"model_type": "vit"})
    config = resolve_model(str(tmp_path / "m")).config
    with pytest.raises(ConfigError, match="no `architectures`"):
        architecture_of(config)


CUSTOM = {
    **TINY_LLAMA,
    "model_type": "martian",
    "architectures": ["MartianForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_martian.MartianConfig"},
}


def test_auto_map_without_trust_is_refused(tmp_path: Path) -> None:
    _write_config(tmp_path / "m", CUSTOM)
    with pytest.raises(ConfigError) as excinfo:
        resolve_model(str(tmp_path / "m"))
    message = _one_line_error(excinfo)
    assert "auto_map" in message and "pass --trust-remote-code" in message


def test_auto_map_with_trust_uses_the_models_code(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import transformers

    calls: list[tuple[Any, dict[str, Any]]] = []
    sentinel = transformers.LlamaConfig(architectures=["MartianForCausalLM"])

    def fake_from_pretrained(target: Any, **kwargs: Any) -> Any:
        calls.append((target, kwargs))
        return sentinel

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake_from_pretrained)
    _write_config(tmp_path / "m", CUSTOM)
    spec = resolve_model(str(tmp_path / "m"), trust_remote_code=True, revision="abc")
    assert spec.config is sentinel
    assert spec.trust_remote_code is True
    assert architecture_of(spec.config) == "MartianForCausalLM"
    assert calls == [
        (
            str(tmp_path / "m"),
            {"trust_remote_code": True, "revision": "abc", "local_files_only": True},
        )
    ]


def test_trust_flag_without_auto_map_builds_locally(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import transformers

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", _no_network)
    _write_config(tmp_path / "m")
    spec = resolve_model(str(tmp_path / "m"), trust_remote_code=True)
    assert spec.trust_remote_code is False
    assert type(spec.config).__name__ == "LlamaConfig"


@pytest.mark.parametrize(
    "change", [{"hidden_size": "big"}, {"hidden_size": 65}], ids=["type", "heads"]
)
def test_invalid_value_is_a_config_error(tmp_path: Path, change: dict[str, Any]) -> None:
    _write_config(tmp_path / "m", {**TINY_LLAMA, **change})
    with pytest.raises(ConfigError) as excinfo:
        resolve_model(str(tmp_path / "m"))
    message = _one_line_error(excinfo)
    assert "could not be built as LlamaConfig" in message
    assert "hidden" in message
