"""Reading compiled programs and the analytic minimum of communication (for moejax.bench)."""
