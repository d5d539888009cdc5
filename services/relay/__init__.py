"""The relay: sealed ESP between nodes that cannot reach each other, over TLS on port 443."""
