"""The one seam to YOLOZU (yolozu_ttt.seam): every private name listed, checked at import, one message."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from yolozu_ttt import seam

PACKAGE = Path(seam.__file__).parent
# how the package names YOLOZU's modules when it reaches into them
ALIASES = {"_ref": "yolozu.tta.integration", "_tent": "yolozu.tta.tent", "_mim": "yolozu.tta.ttt_mim",
           "integration": "yolozu.tta.integration", "tent": "yolozu.tta.tent", "ttt_mim": "yolozu.tta.ttt_mim"}


def _private_uses() -> set[tuple[str, str]]:
    uses = set()
    for path in PACKAGE.rglob("*.py"):
        for alias, name in re.findall(r"\b(_ref|_tent|_mim)\.(_\w+)", path.read_text(encoding="utf-8")):
            uses.add((ALIASES[alias], name))
    return uses


def test_every_private_yolozu_name_the_package_uses_is_in_the_seam():
    uses = _private_uses()
    assert ("yolozu.tta.integration", "_take_batches") in uses  # the scan finds them
    listed = {(module, name) for module, names in seam.PRIVATE.items() for name in names}
    assert uses <= listed, sorted(uses - listed)
    assert seam.missing_names() == []


def test_supported_versions_match_pyproject():
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert f'"yolozu{seam.SUPPORTED_YOLOZU}"' in pyproject


def _import_without(module: str, name: str, what: str = "from yolozu_ttt import run_ttt") -> subprocess.CompletedProcess:
    code = f"import importlib; m = importlib.import_module({module!r}); delattr(m, {name!r}); {what}"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module,name", [("yolozu.tta.integration", "_take_batches"),
                                         ("yolozu.tta.tent", "_extract_outputs"),
                                         ("yolozu.inference.export_predictions_cli", "build_manifest")])
def test_a_yolozu_lacking_one_name_fails_with_the_one_message(module, name):
    res = _import_without(module, name)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    import yolozu

    import yolozu_ttt

    assert last == (f"yolozu_ttt.seam.UnsupportedYolozu: yolozu-ttt {yolozu_ttt.__version__} supports yolozu "
                    f"{seam.SUPPORTED_YOLOZU}; the installed yolozu {yolozu.__version__} lacks {module}.{name}: "
                    f"install a supported yolozu (pip install 'yolozu{seam.SUPPORTED_YOLOZU}')")
    assert "AttributeError" not in res.stderr


def test_the_command_line_says_it_in_one_line():
    """`yolozu-ttt` on a YOLOZU lacking a name: exit 2 and the one message, no traceback."""
    res = _import_without("yolozu.tta.integration", "_take_batches",
                          "import sys; from yolozu_ttt.cli import main; sys.exit(main(['doctor']))")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("yolozu-ttt: error: yolozu-ttt ")
    assert "lacks yolozu.tta.integration._take_batches" in lines[0] and seam.SUPPORTED_YOLOZU in lines[0]


def test_export_does_not_import_the_cli():
    res = subprocess.run([sys.executable, "-c", "import sys, yolozu_ttt.export; print('yolozu_ttt.cli' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr


def test_rebound_restores_on_failure():
    from yolozu_ttt.seam import export_cli

    real = export_cli.build_manifest
    with pytest.raises(RuntimeError):
        with seam.rebound(export_cli, build_manifest=None):
            assert export_cli.build_manifest is None
            raise RuntimeError
    assert export_cli.build_manifest is real
