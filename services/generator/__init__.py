"""The generator service: renders content configs and reports every outcome.

``chora.generation.requested`` in, exactly one ``chora.content_generated`` out
(success with the content, or error with a code). See :mod:`.handlers`.
"""
