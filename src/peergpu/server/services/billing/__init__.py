"""Money: the ledger, job holds and settlement, Stripe top-ups and host payouts."""
