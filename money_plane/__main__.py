"""`python -m money_plane`: serve the ledger until SIGTERM (see serve.py)."""

from money_plane.serve import main

if __name__ == "__main__":
    main()
