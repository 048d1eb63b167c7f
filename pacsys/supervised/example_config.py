"""Print the commented example configuration, derived from `Settings`.

    python -m pacsys.supervised.example_config > ops/supervisor.example.toml

Its own module (not `python -m pacsys.supervised.config`): importing the package already
imports `config`, and running an imported module again as `__main__` is what Python warns of.
"""

from pacsys.supervised.config import render_example

if __name__ == "__main__":
    print(render_example(), end="")
