"""The public surface: ``astage.__all__`` must match what the package exports."""

from __future__ import annotations

import importlib.metadata
import inspect
import subprocess
import sys
import types

import pytest

import astage
from astage import _errors, compat


def _public_attributes() -> set[str]:
    return {
        name
        for name, value in vars(astage).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


def test_all_is_sorted() -> None:
    assert list(astage.__all__) == sorted(astage.__all__)


def test_all_has_no_duplicates() -> None:
    assert len(set(astage.__all__)) == len(astage.__all__)


def test_every_name_in_all_exists() -> None:
    missing = [name for name in astage.__all__ if not hasattr(astage, name)]
    assert missing == []


def test_every_public_attribute_is_in_all() -> None:
    assert _public_attributes() - set(astage.__all__) == set()


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from astage import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(astage.__all__)


def test_contract_names_are_public() -> None:
    # DESIGN.md section 1: other code depends on these names.
    for name in ("StagingOptions", "Stager", "SyncStager", "StagingError", "CacheInfo"):
        assert name in astage.__all__


def _error_classes() -> list[type[BaseException]]:
    return [
        value
        for value in vars(_errors).values()
        if inspect.isclass(value) and issubclass(value, BaseException)
    ]


def test_errors_module_defines_errors() -> None:
    assert len(_error_classes()) >= 5


@pytest.mark.parametrize("error", _error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_is_under_the_root(error: type[BaseException]) -> None:
    assert issubclass(error, astage.AstageError)


@pytest.mark.parametrize("error", _error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_has_a_one_line_raised_when_docstring(error: type[BaseException]) -> None:
    doc = error.__doc__
    assert doc is not None
    assert "\n" not in doc.strip()
    assert doc.strip().startswith("Raised when")


@pytest.mark.parametrize("error", _error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_is_exported(error: type[BaseException]) -> None:
    assert getattr(astage, error.__name__) is error
    assert error.__name__ in _errors.__all__


def test_version_is_a_string() -> None:
    assert isinstance(astage.__version__, str)
    assert astage.__version__


def test_version_is_the_distributions() -> None:
    # __version__ stays, and says the same as the installed metadata (pyproject.toml).
    assert astage.__version__ == importlib.metadata.version("astage")


def test_docstring_says_what_astage_is() -> None:
    doc = astage.__doc__
    assert doc is not None
    assert doc.startswith("astage: staging of PyTorch state dicts")
    assert "asyncio-native" not in doc  # it runs on asyncio and trio
    assert "asyncio" in doc
    assert "trio" in doc


# -- astage.compat ------------------------------------------------------------------------------


def test_compat_is_a_lazy_submodule() -> None:
    code = "import sys, astage; print('astage.compat' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # `import astage` does not pay for DCP's imports


def test_compat_all_is_sorted_unique_and_complete() -> None:
    names = list(compat.__all__)
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    assert [name for name in names if not hasattr(compat, name)] == []
    public = {
        name
        for name, value in vars(compat).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public - set(names) == set()


def test_compat_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from astage.compat import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(compat.__all__)


def test_compat_covers_dcps_staging_module() -> None:
    # `from torch.distributed.checkpoint.staging import X` -> `from astage.compat import X`
    from torch.distributed.checkpoint import staging

    assert set(staging.__all__) <= set(compat.__all__)
    assert {"StateDictStager", "DefaultStager", "BlockingAsyncStager"} <= set(compat.__all__)
    assert compat.StagingOptions is staging.StagingOptions
    assert compat.AsyncStager is staging.AsyncStager


def test_the_loop_backend_is_imported_with_astage_not_on_the_first_call() -> None:
    # anyio imports a loop's backend module on first use, on that loop: 0.1-0.2 s of loop time
    # that the first stage() held (the demo saw 150-550 ms first-call lag).
    code = "import sys, astage; print('anyio._backends._asyncio' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "True"
