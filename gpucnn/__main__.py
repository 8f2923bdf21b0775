"""``python -m gpucnn ...``: the same command line as the ``gpucnn`` console script."""
from gpucnn.cli import main

if __name__ == "__main__":
    main()
