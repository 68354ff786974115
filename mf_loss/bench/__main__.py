"""`python -m mf_loss.bench`, and the script msrun starts on each rank of the mp=2 rows (absolute import:
msrun runs this file by path)."""
import sys

from mf_loss.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
