"""`python -m money_plane`: serve the ledger until SIGTERM (see serve.py)."""

from money_plane.metrics_share import share_between_processes

# Before serve.py imports prometheus_client (metrics_share.py says why).
share_between_processes()

from money_plane.serve import main  # noqa: E402

if __name__ == "__main__":
    main()
