"""Models: artifacts on disk, their verified loading, device placement and batched prediction."""
