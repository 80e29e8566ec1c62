"""Measuring a real training step: exact live tensor-storage accounting and step measurements."""
