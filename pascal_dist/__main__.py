"""`python -m pascal_dist ...`: the same command line as the `pascal-dist` script."""

from pascal_dist.cli import entry

if __name__ == "__main__":
    entry()
