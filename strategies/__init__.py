"""Built-in exit strategies: one file each, the file's stem is the strategy's name.

Installed as the package `ouro_lab_strategies`; `ouro_lab.registry` finds them from a
checkout or a wheel. Files whose name starts with `_` are not strategies.
"""
