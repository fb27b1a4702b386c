"""Protections for the data and models afina keeps: encryption at rest (`encryption`), master-key
rotation (`rotation`) and what each role may do (`permissions`). Each module says what it protects
against and how it is used.

The layers below (models, training, the store) never import this package: the layers that compose
afina hand its pieces down. The sealed files of `afina.sealing` are `encryption.use_encryption()`,
once per process; the store's permission check is `open_store(authorize=permissions.authorize)`.
"""
