"""The command line imports ``transformers.models`` with its index of exports built when
first read (qplan/deferred_model_index.py): a plan never reads it, anything that does gets
transformers' own index, and the report is the one an ordinary import gives."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from qplan import deferred_model_index
from tests.tiny_models import make_config


def _run(code: str, *args: str) -> dict:
    code = textwrap.dedent(code)
    done = subprocess.run([sys.executable, "-c", code, *args],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# What an ordinary import's module holds, for a comparison after the index is built.
_FIELDS = """
    def fields(module):
        return {
            "modules": sorted(module._modules),
            "class_to_module": module._class_to_module,
            "all": sorted(module.__all__),
            "structure": {k: sorted(v) for k, v in module._import_structure.items()},
            "missing": {k: sorted(v) for k, v in module._object_missing_backend.items()},
        }
"""


def test_a_plan_never_builds_the_index_and_its_report_is_the_ordinary_one(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    make_config("llama").save_pretrained(folder)
    plan = """
        import json, sys
        from qplan.startup import import_planning_libraries
        import_planning_libraries()
        from qplan.api import estimate
        from qplan.deferred_model_index import index_built
        from qplan.report import report_json
        built_at_start = index_built()
        report = json.loads(report_json(estimate(sys.argv[1], gpu="4090", seq_len=64)))
        report["model"].pop("config_path")
        print(json.dumps({"built_at_start": built_at_start, "built": index_built(),
                          "type": type(sys.modules["transformers.models"]).__name__,
                          "report": report}))
    """
    deferred = _run(plan, str(folder))
    # The same plan in a process that imported transformers.models as usual.
    ordinary = _run("import transformers.models\n" + textwrap.dedent(plan), str(folder))
    assert not deferred["built_at_start"] and not deferred["built"]
    assert deferred["type"] == "_IndexOnFirstRead"
    assert ordinary["built"] and ordinary["type"] == "_LazyModule"
    assert deferred["report"] == ordinary["report"]


def test_reading_a_name_or_listing_builds_transformers_own_index():
    out = _run(textwrap.dedent(_FIELDS) + textwrap.dedent("""
        import json, sys
        from qplan.deferred_model_index import import_models_package, index_built
        import_models_package()
        import transformers.models as models
        from transformers.utils import import_utils
        # A submodule imported by its full name is an attribute, with no index built
        # (the auto classes first, as every plan imports them: a model's docstring
        # decorator takes them with ``from transformers.models import auto``).
        import transformers.models.auto
        import transformers.models.llama.configuration_llama
        submodule = models.llama is sys.modules["transformers.models.llama"]
        before = index_built()
        config = models.MistralConfig  # a name only the index knows
        after = index_built()
        reference = import_utils._LazyModule(
            "transformers.models", models.__file__,
            import_utils.define_import_structure(models.__file__),
            module_spec=models.__spec__)
        print(json.dumps({
            "submodule": submodule, "before": before, "after": after,
            "config": config.__name__, "type": type(models).__name__,
            "same": fields(models) == fields(reference),
            "dir": set(reference.__all__) <= set(dir(models)),
        }))
    """))
    assert out["submodule"] and not out["before"] and out["after"]
    assert out["config"] == "MistralConfig" and out["type"] == "_LazyModule"
    assert out["same"] and out["dir"]


def test_listing_or_reading_an_index_field_builds_it_too():
    out = _run("""
        import json
        from qplan.deferred_model_index import import_models_package, index_built
        import_models_package()
        import transformers.models as models
        listed = "LlamaForCausalLM" in dir(models)
        built_by_dir = index_built()
        print(json.dumps({"listed": listed, "built_by_dir": built_by_dir}))
    """)
    assert out == {"listed": True, "built_by_dir": True}
    out = _run("""
        import json
        from qplan.deferred_model_index import import_models_package
        import_models_package()
        import transformers.models as models
        print(json.dumps({"all": "LlamaConfig" in models.__all__}))
    """)
    assert out == {"all": True}


def test_another_package_init_is_imported_as_it_is():
    # An init that does not end in the statement read here (another release): the
    # ordinary import, with its index.
    out = _run("""
        import json
        from qplan import deferred_model_index
        deferred_model_index.BUILDS_MODULE = "something else"
        deferred_model_index.import_models_package()
        import transformers.models as models
        print(json.dumps({"built": deferred_model_index.index_built(),
                          "type": type(models).__name__}))
    """)
    assert out == {"built": True, "type": "_LazyModule"}


def test_the_installed_release_is_the_one_read_here():
    from pathlib import Path

    import transformers
    from transformers.utils import import_utils

    init = Path(transformers.__file__).parent / "models" / "__init__.py"
    assert deferred_model_index._builds_module_from_index(init)
    assert deferred_model_index._index_fields_are_known(import_utils._LazyModule)

    class KeepsMore(import_utils._LazyModule):  # a release deriving one field more
        def __init__(self, name, module_file, import_structure, **kwargs):
            super().__init__(name, module_file, import_structure, **kwargs)
            self._count = len(import_structure)

    assert not deferred_model_index._index_fields_are_known(KeepsMore)


def test_a_package_init_that_makes_another_module_is_imported_again_as_usual():
    # The init's statement matches, but it builds another class of module (a release whose
    # ``transformers.utils._LazyModule`` is not the one read here): made again, with the
    # index, by an ordinary import.
    out = _run("""
        import json
        import transformers.utils as utils
        from transformers.utils import import_utils

        class Other(import_utils._LazyModule):
            pass

        utils._LazyModule = Other
        from qplan import deferred_model_index
        deferred_model_index.import_models_package()
        import transformers.models as models
        print(json.dumps({"built": deferred_model_index.index_built(),
                          "type": type(models).__name__}))
    """)
    assert out == {"built": True, "type": "Other"}
