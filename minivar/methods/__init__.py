"""Methods that act on a forward call or on the token choice: the hook protocol, VAR (the paper's rule and the
released code's rule)."""
