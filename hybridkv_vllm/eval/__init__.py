"""Fidelity harness (``hybridkv eval``): NIAH passkey, greedy agreement and KL against the full cache."""
