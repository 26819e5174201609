"""3D face reconstruction and identity-matched PNCC reconstruction."""
