"""Kafka Connect connector configs and their registration (scale-out stack)."""
