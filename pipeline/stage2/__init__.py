"""Stage two: SPP-SCL heads, losses and the two-step training loop, fed from the cache."""
