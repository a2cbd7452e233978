"""Reading an output folder never runs code: `quantkit eval` imports a recorded file.py:factory only when the
user names it again (--model) or passes --trust-recipe."""

from __future__ import annotations

import hashlib

import pytest
from click.testing import CliRunner

from quantkit.cli import main
from quantkit.errors import UsageError
from quantkit.models.consent import consented_model, runs_code
from quantkit.recipe import load_recipe

HOSTILE = '''
import pathlib
pathlib.Path({marker!r}).write_text("code from an output folder ran")
def build():
    raise SystemExit("not a model")
'''


@pytest.fixture()
def received(tmp_path):
    """An output folder someone sent: its recipe names a factory file that writes a marker when imported."""
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.py"
    evil.write_text(HOSTILE.format(marker=str(marker)))
    folder, data = tmp_path / "out", tmp_path / "data"
    folder.mkdir()
    data.mkdir()
    (folder / "recipe.resolved.yaml").write_text(load_recipe(None, [
        f"model.name='{evil}:build'", f"calibration.data='{data}'"]).to_yaml())
    (folder / "model.onnx").write_bytes(b"never read before the check")
    return folder, evil, marker


def _eval(folder, *args):
    res = CliRunner().invoke(main, ["eval", str(folder), "--eval", str(folder.parent / "data"), *map(str, args)])
    return res.exit_code, res.output


def test_eval_refuses_to_run_code_named_in_the_folder(received):
    folder, evil, marker = received
    before = hashlib.sha256(evil.read_bytes()).hexdigest()
    code, text = _eval(folder)
    assert code == 2, text
    assert f"--model {evil}:build" in text and "--trust-recipe" in text and "import and run" in text, text
    assert not marker.exists()
    assert hashlib.sha256(evil.read_bytes()).hexdigest() == before


def test_eval_refuses_a_different_model_named(received, tmp_path):
    folder, evil, marker = received
    other = tmp_path / "other.py"
    other.write_text(HOSTILE.format(marker=str(marker)))
    for spec in (f"{other}:build", f"{evil}:other", "trees"):
        code, text = _eval(folder, "--model", spec)
        assert code == 2 and "is not the model recorded in" in text, text
    assert not marker.exists()


@pytest.mark.parametrize("how", ["named", "trusted"])
def test_naming_the_model_or_trusting_the_recipe_runs_it(received, how):
    folder, evil, marker = received
    extra = ["--model", f"{evil}:build"] if how == "named" else ["--trust-recipe"]
    code, text = _eval(folder, *extra)
    assert marker.exists(), text  # consent given: the factory file was imported
    assert code == 2 and "SystemExit" in text, text  # and its factory's failure is reported as usual


def test_consent_rules(tmp_path):
    assert not runs_code("trees") and not runs_code("model.onnx") and not runs_code(None)
    assert runs_code("net.py:build") and runs_code("mypkg.models:build")
    assert consented_model("trees", None, False, "r.yaml") == "trees"  # registered: no user code
    with pytest.raises(UsageError, match="--model mypkg.models:build"):
        consented_model("mypkg.models:build", None, False, "r.yaml")  # an import runs module code too
    assert consented_model("mypkg.models:build", "mypkg.models:build", False, "r.yaml") == "mypkg.models:build"
    # a folder from another machine: its recorded path does not exist here, the user's copy has the same name
    mine = tmp_path / "net.py"
    mine.write_text("")
    assert consented_model("/home/alice/proj/net.py:build", f"{mine}:build", False, "r.yaml") == f"{mine}:build"
    with pytest.raises(UsageError, match="not the model recorded"):
        consented_model("/home/alice/proj/other.py:build", f"{mine}:build", False, "r.yaml")


def test_help_says_a_factory_file_is_executed():
    for cmd in ("eval", "export", "sensitivity"):
        text = CliRunner().invoke(main, [cmd, "--help"]).output
        assert "imports and runs" in text and "factory" in text, cmd


@pytest.mark.parametrize("cmd", ["export", "sensitivity"])
def test_a_recipe_from_an_output_folder_runs_no_code_unless_named(received, tmp_path, cmd):
    folder, evil, marker = received
    recipe = folder / "recipe.resolved.yaml"
    out = tmp_path / "new"
    code, text = _run(cmd, "--recipe", recipe, "--out", out)
    assert code == 2 and f"--model {evil}:build" in text and "--trust-recipe" in text, text
    assert not marker.exists() and not out.exists()
    # a manifest.json beside a recipe of any name marks an output folder too
    renamed = folder / "mine.yaml"
    renamed.write_bytes(recipe.read_bytes())
    (folder / "manifest.json").write_text("{}")
    code, text = _run(cmd, "--recipe", renamed, "--out", out)
    assert code == 2 and "--trust-recipe" in text and not marker.exists(), text
    code, text = _run(cmd, "--recipe", recipe, "--out", out, "--model", f"{evil}:build")
    assert marker.exists(), text  # named: consent given, the factory file was imported
    marker.unlink()
    code, text = _run(cmd, "--recipe", recipe, "--out", out, "--trust-recipe")
    assert marker.exists(), text


def test_a_users_own_recipe_file_is_its_own_consent(received, tmp_path):
    folder, evil, marker = received
    own = tmp_path / "my_recipe.yaml"
    own.write_bytes((folder / "recipe.resolved.yaml").read_bytes())
    code, text = _run("export", "--recipe", own, "--out", tmp_path / "new")
    assert marker.exists(), text


def _run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output
