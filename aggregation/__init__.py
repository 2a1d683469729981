"""Merges a round's node updates into the next global model, on the submit host."""
