"""Run gpucnn's command line from a checkout: ``python cli.py train --device cpu``."""
from gpucnn.cli import main

if __name__ == "__main__":
    main()
