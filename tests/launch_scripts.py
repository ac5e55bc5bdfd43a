"""Import ``launch/<name>.py`` (scripts, not part of the installed package) as a module in tests."""

import importlib.util
import sys
from pathlib import Path


def load_launch_script(name: str):
    path = Path(__file__).resolve().parents[1] / "launch" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses with string annotations look their module up there
    spec.loader.exec_module(mod)
    return mod
