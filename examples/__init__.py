"""User-style strategies that run by dotted path (``--strategy examples.cosine_linear:CosineLinear``).

This file makes ``examples`` a regular package: avalanche-lib installs a top-level ``examples``
package into site-packages, which would otherwise shadow this folder.
"""
