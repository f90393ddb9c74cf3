"""Methods that act on a forward call or on the token choice (method.py says what a method is): VAR under the
paper's rule (var.py) and the released code's (var_official.py, which registers itself with var.py's rules here,
so var.py never imports it)."""
from . import var, var_official  # noqa: F401
