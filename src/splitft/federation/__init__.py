"""Federated aggregation of LoRA adapters across clients and the server."""
