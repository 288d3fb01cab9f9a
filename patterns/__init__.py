"""The built-in MoE families, one module each (loaded by moe_fusion.catalogue from their files; this file
only makes the folder a package the import contract in pyproject.toml can name: families sit in the match
tier and import nothing above it)."""
