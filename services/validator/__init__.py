"""The validator service: checks generated content against its config's rules.

``chora.content_generated`` (status success) in, one ``chora.content_validated``
out; every content config version is reported once as ``chora.config_validated``
(status success with its rules, or error), from a scan of the configs directory
or from traffic. See :mod:`.rules` for the rule types, :mod:`.reports` for the
config reports and :mod:`.handlers` for the delivery guarantees.
"""
