"""Datasets: their lifecycle (load, retry, refresh, status) and the accelerator that holds them."""
