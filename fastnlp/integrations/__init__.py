"""Bridges to other libraries. Each submodule imports its library on import, so
`import fastnlp` never needs them; import the one you use, e.g.
`import fastnlp.integrations.transformers`."""
