"""The families vlmkit knows: one module each, discovered (vlmkit/family.py imports every module of this package).

A family module registers one :class:`~vlmkit.family.Family` (``@register``) that names its config types, builds its
model, gives its image processor and prompt layout, maps its Hugging Face folders and says what it can do; its
model code, processing and key maps live where the parts of their kind live (models/, processing/, convert/hf/) or
in the module itself. docs/adding-a-family.md walks through adding one.
"""
