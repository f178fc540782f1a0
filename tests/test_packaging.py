"""The folder layout maps into one ``berth`` namespace without shadowing the standard library."""

import subprocess
import sys
from pathlib import Path

import berth

ROOT = Path(__file__).resolve().parent.parent


def run_from_root(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)


def test_stdlib_operator_is_not_shadowed_from_the_repository_root() -> None:
    result = run_from_root(
        "import operator, collections; operator.itemgetter;"
        "import berth.operator.inventory;"
        "print(operator.__file__)"
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).parent.name.startswith("python3")


def test_operator_folder_has_no_init_module() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()


def test_import_packages_map_to_top_level_folders() -> None:
    import berth.cluster
    import berth.kernels
    import berth.operator
    import berth.runtime

    assert Path(berth.operator.__path__[0]).resolve() == ROOT / "operator"
    assert Path(berth.runtime.__path__[0]).resolve() == ROOT / "runtime"
    assert Path(berth.kernels.__path__[0]).resolve() == ROOT / "kernels"
    assert Path(berth.cluster.__path__[0]).resolve() == ROOT / "cluster"


def test_operator_never_imports_torch() -> None:
    result = run_from_root(
        "import sys, berth.operator.inventory, berth.wire, berth.cli;"
        "assert 'torch' not in sys.modules and 'triton' not in sys.modules, 'torch imported'"
    )
    assert result.returncode == 0, result.stderr


def test_version_command_prints_the_package_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "berth", "version"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"berth {berth.__version__}"
