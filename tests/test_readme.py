"""The README's example runs as written (on 8 virtual CPU devices here)."""

import pathlib
import re

import numpy as np


def test_readme_example_runs():
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"## Example: an MoE layer inside `shard_map`\n\n```python\n(.*?)```",
                     readme, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    y, aux_loss = scope["y"], scope["aux_loss"]
    assert y.shape == (scope["mesh"].size * 256, 1024)
    assert np.isfinite(np.asarray(y, np.float32)).all() and np.isfinite(float(aux_loss))
