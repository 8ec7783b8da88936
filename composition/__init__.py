"""The domain: content configs, artifact configs and the settings the services share.

It knows nothing of NATS and nothing of the command line; it imports only
:mod:`contracts`.
"""
