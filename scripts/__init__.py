"""The command-line tools around the library: each runs as ``python scripts/NAME.py`` from the repository root
and, after ``pip install -e .``, as a console command (``[project.scripts]`` in pyproject.toml). A package so
that one script can import another (``from scripts.toy_world import train``)."""
