"""Sample and synthetic data: the cached ``mskt`` sdist files and generators built on them."""
