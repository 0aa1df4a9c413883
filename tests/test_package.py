"""The package as installed: it holds every module, and run configs load by path anywhere.

CI also runs this file from outside the checkout, where `cmdcl_jax` is the installed copy.
"""

import os
import subprocess
import sys
from pathlib import Path

import cmdcl_jax

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(cmdcl_jax.__file__).resolve().parent

# What `--config PATH` does: ml_collections loads the file as a module, by path.
LOAD_CONFIGS = """
import sys
from absl import flags
from ml_collections import config_flags

for spec in sys.argv[1:]:
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True)
    values(["main", f"--config={spec}"])
    print(values.config.dataset.name, values.config.dataset.task)
"""


def _modules(package_dir: Path) -> set[str]:
    return {p.relative_to(package_dir).as_posix() for p in package_dir.rglob("*.py")}


def test_imported_package_holds_every_module_of_the_checkout():
    assert "models/timesformer.py" in _modules(ROOT / "cmdcl_jax")
    assert _modules(PACKAGE) == _modules(ROOT / "cmdcl_jax"), PACKAGE


def test_configs_load_by_path_from_another_directory(tmp_path):
    """Only the package is importable there (not the checkout, whose `configs/` the config
    files must not need)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "cmdcl_jax").symlink_to(PACKAGE)
    specs = {
        "synthetic.py": "causal_kitchen activity",
        "synthetic.py:unconfounded": "causal_kitchen activity",
        "breakfast.py:actions": "breakfast actions",
        "coin.py:step": "coin step",
        "charades.py": "charades action",
    }
    result = subprocess.run(
        [sys.executable, "-c", LOAD_CONFIGS, *(str(ROOT / "configs" / s) for s in specs)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == list(specs.values())
