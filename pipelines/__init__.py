"""labelmatch pipelines (KFP v2): definitions, the version registry and the compiled IR."""
