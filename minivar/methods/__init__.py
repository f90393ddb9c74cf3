"""Methods that act on a forward call or on the token choice (method.py says what a method is): VAR (var.py; the
paper's rule in var_paper.py) and the released code's rule (var_official.py, which registers itself with
var_paper.py's rules here, so the paper's rule never imports it)."""
from . import var, var_official  # noqa: F401
