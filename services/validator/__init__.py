"""The validator service: checks generated content against its config's rules.

``chora.content_generated`` (status success) in, one ``chora.content_validated``
out; a config whose rules cannot be used is also reported once per config
version as ``chora.config_validated`` (status error). See :mod:`.rules` for the
rule types and :mod:`.handlers` for the delivery guarantees.
"""
