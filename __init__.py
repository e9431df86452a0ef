"""The checkout root stands for the package `flowblend`: each top-level folder is `flowblend.<folder>`
(pyproject.toml's package-dir), and the packages import each other relatively (`from ..engines import ...`).

Nothing imports this file and it is not installed. It is here so that a tool reading packages from the
folders as they stand resolves those relative imports as Python does, and draws the true layers
(tests/test_layout.py holds the packages to relative imports of each other)."""
