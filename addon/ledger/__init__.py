"""Token pools: estimates, windows, the one computation of a pool's status, the ledgers that enforce limits."""
