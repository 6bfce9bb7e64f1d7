"""The project's Alertmanager webhook receiver: each alert as one JSON line (README.md)."""
